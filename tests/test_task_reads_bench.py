"""bench/task_reads.py --tiny: a task's fetched bytes through the record index against the
whole-split download, on 600 synthetic lines in the emulator; the same samples either way."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_bench_fetches_a_task_share(smol_tokenizer, gcs_server, tmp_path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_task_reads", ROOT / "bench/task_reads.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_task_reads"] = mod
    spec.loader.exec_module(mod)
    # the bench starts its own emulator: the session's keeps its address afterwards
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    out = tmp_path / "task_reads.json"
    mod.main(["--tiny", "--json", str(out), "--scratch", str(tmp_path)], smol_tokenizer)
    r = json.loads(out.read_text())
    assert list(tmp_path.iterdir()) == [out]  # the dataset is gone
    assert r["mode"] == "tiny" and r["lines"] == 600 and r["index"]["records"] == 600
    by = {row["tasks"]: row for row in r["rows"]}
    assert sorted(by) == [1, 4, 16]
    base = by[1]["baseline"]["fetched_bytes"]
    assert base == r["split_bytes"]  # the baseline downloads the split, whatever its share
    assert all(row["baseline"]["fetched_bytes"] == base for row in r["rows"])
    assert by[1]["ours"]["fetched_bytes"] == base  # task 0 of 1 owns every record
    # 75 shards of 8: task 0 of 4 owns 19, of 16 owns 5
    assert 0.2 < by[4]["bytes_ratio"] < 0.32 and 0.04 < by[16]["bytes_ratio"] < 0.1
    for row in r["rows"]:
        assert row["ours"]["task_tokens"] == row["baseline"]["task_tokens"] > 0
