"""bench/data_scale.py --tiny: the whole bench on 500 and 50 synthetic lines, in this process;
its JSON's fields, and the batched path's ids and masks equal to the one-sample loop's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_data_scale", ROOT / "bench/data_scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_data_scale"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_chats_are_varied_and_fixed_by_the_seed(bench) -> None:
    a = list(bench.chats(300))
    assert a == list(bench.chats(300))
    assert a != list(bench.chats(300, seed=1))
    turns = {sum(m["role"] == "user" for m in c["messages"]) for c in a if "messages" in c}
    assert {1, 2, 8} <= turns
    assert any("prompt" in c for c in a) and any("system" in c for c in a)
    assert any(c["messages"][0]["role"] == "system" for c in a if "messages" in c)


def test_tiny_bench_writes_every_figure(bench, smol_tokenizer, tmp_path) -> None:
    out = tmp_path / "data_scale.json"
    bench.main(["--tiny", "--json", str(out), "--scratch", str(tmp_path)], smol_tokenizer)
    r = json.loads(out.read_text())
    assert list(tmp_path.iterdir()) == [out]  # the datasets are gone
    assert r["mode"] == "tiny" and r["machine"] and r["cores"] >= 1
    assert set(r["load_average"]) >= {"start", "end"}
    assert [r["sizes"][s]["lines"] for s in ("small", "large")] == [50, 500]

    tok = r["tokenisation"]["large"]
    assert tok["same_ids_and_masks"] and tok["records_compared"] == tok["records"] == 500
    assert tok["serial_tokens_per_s"] > 0 and tok["parallel_tokens_per_s"] > 0
    assert tok["speedup"] == pytest.approx(tok["serial_s"] / tok["parallel_s"])

    prep = r["preparation"]["large"]
    assert set(prep) == {"1", "4", "16"}
    assert prep["1"]["task_tokens"] == tok["tokens"]  # task 0 of 1: every record
    assert prep["4"]["task_samples"] == 256 == prep["4"]["first_shard_samples"]  # shard 0 only
    for p in [*prep.values(), r["preparation"]["small_1"]]:
        assert p["seconds"] > 0 and p["peak_kib"] > 0 and p["rss_before_kib"] > 0
        assert isinstance(p["hwm_reset"], bool) and "peak_above_start_kib" in p
    assert r["preparation"]["small_1"]["task_tokens"] < tok["tokens"]
    assert set(r["preparation_model"]["predicted_s"]) == {"1", "4", "16"}

    cost = r["cost_estimate"]
    assert cost["sampled"]["sampled"]["train"]["sampled"] == 200  # a sample of the 500 lines
    assert not cost["exact"]["sampled"] and cost["exact"]["counts"]["tokens"] == tok["tokens"]
    assert cost["errors"]["samples"] == {
        "sampled": 500,
        "exact": 500,
        "bound": 0,
        "error": 0.0,
        "inside": True,
    }
    for e in cost["errors"].values():
        assert e["inside"] == (abs(e["sampled"] - e["exact"]) <= e["bound"])

    assert set(r["targets"]) == {"tokenisation", "preparation", "memory", "cost_estimate"}
    assert all(isinstance(t["met"], bool) and "want" in t for t in r["targets"].values())
