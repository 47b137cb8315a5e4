"""bench/cross_tokenizer.py: its ``--tiny`` run end to end on the tiny teacher (JSON structure,
the PNG), and bits per byte of assistant text (distill/student/bits_per_byte.py, what the bench
and ``distill-ctl eval`` score) against a hand computation on one record."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from distill import models
from distill.student.bits_per_byte import bits_per_byte

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def xbench():
    path = ROOT / "bench" / "cross_tokenizer.py"
    spec = importlib.util.spec_from_file_location("bench_cross_tokenizer", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_cross_tokenizer"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bits_per_byte_by_hand(tiny_teacher_dir) -> None:
    """One record, SmolLM2's template: the tokens of the assistant's content, found by hand
    from the rendered text, -log2 q of each from a plain forward, over the content's bytes."""
    tok = models.load_tokenizer(tiny_teacher_dir)
    model = models.load_model(tiny_teacher_dir, "float32", "cpu")
    answer = "Voilà: a list comprehension builds a list — in one line."
    msgs = [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": answer}]
    model.train()
    got = bits_per_byte(model, tok, [msgs])
    assert model.training  # left as it was found

    text = tok.apply_chat_template(msgs, tokenize=False)
    start = text.index(answer)
    end = start + len(answer)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    scored = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end]
    assert tok.decode([ids[j] for j in scored]).strip() == answer
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logq = torch.log_softmax(logits, -1)
    bits = sum(-float(logq[j - 1, ids[j]]) / math.log(2) for j in scored)
    nbytes = len(answer.encode("utf-8"))
    assert nbytes > len(answer)  # non-ASCII: bytes, not characters
    assert got["bytes"] == nbytes and got["tokens"] == len(scored)
    assert got["bpb"] == pytest.approx(bits / nbytes, rel=1e-9)


def test_summarize_verdict(xbench) -> None:
    rows = [
        {"arm": a, "seed": s, "bpb": v}
        for a, vals in {
            "A-ce": (2.0, 2.02),
            "A-kd": (1.8, 1.82),
            "B-ce": (2.2, 2.21),
            "B-alm": (2.1, 2.12),
            "B-xkl": (2.15, 2.15),
        }.items()
        for s, v in zip((0, 1), vals, strict=True)
    ]
    v = xbench.summarize(rows, xbench.ARMS)["verdict"]
    assert v["best_b_arm"] == "B-alm"
    assert v["gain_a"] == pytest.approx([0.2, 0.2]) and v["gain_b"] == pytest.approx([0.1, 0.09])
    assert v["ratio"] == pytest.approx(0.095 / 0.2)
    assert v["seed_spread"] == pytest.approx(0.02)
    assert not v["met"]  # seed 1's B gain is under half of A's
    assert v["not_met_because"] == ["B's best gain is not half of A's beyond the seed spread"]
    for r in rows:
        if r["arm"] == "B-alm":
            r["bpb"] -= 0.05
    v = xbench.summarize(rows, xbench.ARMS)["verdict"]
    assert v["met"] and v["ratio"] == pytest.approx(0.145 / 0.2)
    one = xbench.summarize([r for r in rows if r["seed"] == 0], xbench.ARMS)["verdict"]
    assert not one["met"] and one["not_met_because"] == ["fewer than 2 seeds"]


def test_tiny_run(xbench, tiny_teacher_dir, tmp_path, monkeypatch) -> None:
    out = tmp_path / "x.json"
    png = tmp_path / "x.png"
    argv = [
        "--tiny",
        "--model",
        str(tiny_teacher_dir),
        "--device",
        "cpu",
        "--workdir",
        str(tmp_path / "w"),
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    xbench.main(argv)
    r = json.loads(out.read_text())
    assert png.stat().st_size > 0
    assert [x["arm"] for x in r["rows"]] == list(xbench.ARMS)
    assert set(r["arms"]) == set(xbench.ARMS)
    for x in r["rows"]:
        assert x["seed"] == 0 and math.isfinite(x["bpb"]) and x["bpb"] > 0
        assert x["bytes"] > 0 and x["tokens"] > 0
    # the same held-out bytes are scored by both students, in more tokens by the small BPE
    a = next(x for x in r["rows"] if x["arm"] == "A-ce")
    b = next(x for x in r["rows"] if x["arm"] == "B-ce")
    assert a["bytes"] == b["bytes"] and b["tokens"] > a["tokens"]
    assert {"init-A", "init-B", "teacher"} <= r["reference"].keys()
    v = r["verdict"]
    assert v["best_b_arm"] in ("B-alm", "B-xkl", "B-both")
    assert not v["met"] and "fewer than 2 seeds" in v["not_met_because"]
    assert r["settings"]["tiny"] and r["settings"]["bpe_vocab"] == 600
    b_ce = next(x for x in r["rows"] if x["arm"] == "B-ce")
    assert b_ce["loss"] == {"forward_kl": 0.0, "ce": 1.0}  # CE alone, no token of ALM
    assert all(x["step_ms"] > 0 for x in r["rows"])

    # a re-run with the same settings takes every finished arm from the workdir: nothing trains
    def no_training(job):
        raise AssertionError(f"trained {job.train.run_dir} again")

    monkeypatch.setattr(xbench.dtrain, "train", no_training)
    again = xbench.main([*argv, "--json", str(tmp_path / "y.json")])
    assert [x["bpb"] for x in again["rows"]] == [x["bpb"] for x in r["rows"]]
    # another setting is another arm: it trains
    with pytest.raises(AssertionError, match="trained .*A-ce-s0 again"):
        xbench.main([*argv, "--lr", "1e-3"])
    # another BPE: A's arms are kept, B's student is built again for it and its arms train
    with pytest.raises(AssertionError, match="trained .*B-ce-s0 again"):
        xbench.main([*argv, "--bpe-vocab", "500"])
    init_b = json.loads((tmp_path / "w" / "init-B-2" / "config.json").read_text())
    assert init_b["vocab_size"] == len(models.load_tokenizer(tmp_path / "w" / "bpe-500"))
