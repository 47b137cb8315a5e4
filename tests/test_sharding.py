"""The record-range shard rule: a fan-out task reads, checks and tokenises only its shards'
records; a skipped line leaves a hole and names the rule in the job fingerprint; N tasks write
the single run's shards and manifest, skipped lines included."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import make_job

from distill import models
from distill.config import load_job
from distill.data import encode
from distill.data.prepare import Rules, prepare
from distill.data.records import DataFile
from distill.errors import DistillError
from distill.format.manifest import MANIFEST, Manifest
from distill.shardset import Part, finish_split, job_fingerprint, split_fingerprints
from distill.store.cache import sha256_file
from distill.store.storage import open_store
from distill.teacher.run import run_teacher

REPO = Path(__file__).resolve().parents[1]


def demo(tmp_path: Path, n: int = 98, bad: dict[int, str] | None = None) -> DataFile:
    lines = (REPO / "data" / "demo" / "eval.jsonl").read_text().splitlines()[:n]
    for k, v in (bad or {}).items():
        lines[k - 1] = v
    p = tmp_path / "eval.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return DataFile(p.name, p, str(p))


def test_a_part_reads_checks_and_tokenises_only_its_records(smol_tokenizer, tmp_path, monkeypatch):
    f = demo(tmp_path)
    seen: list[int] = []
    real = encode.parse

    def spy(raw, n, where):
        seen.append(n)
        return real(raw, n, where)

    monkeypatch.setattr(encode, "parse", spy)
    part = Part(1, 3)
    rules = Rules(128, "right")
    p = prepare([f], f.shown, smol_tokenizer, rules, 10, lambda i: part.owns(i // 10), workers=1)
    mine = [n for n in range(1, 99) if part.owns((n - 1) // 10)]
    assert sorted(set(seen)) == mine and len(seen) == 2 * len(mine)  # checked, then encoded
    assert p.records == 98 and len(p.chunks()) == 10
    assert [len(c) for c in p.chunks()] == [0, 10, 0, 0, 10, 0, 0, 10, 0, 0]
    assert p.stats.samples == 30
    whole = prepare([f], f.shown, smol_tokenizer, rules, 10, workers=1)
    for s in (1, 4, 7):
        assert [x.key for x in p.chunks()[s]] == [x.key for x in whole.chunks()[s]]
        assert p.chunks().tokens(s) == whole.chunks().tokens(s)
    p.close()
    whole.close()


def test_checks_that_need_tokens_fail_only_the_task_that_owns_the_line(smol_tokenizer, tmp_path):
    long = json.dumps({"prompt": "Say many words.", "response": " ".join(["word"] * 700)})
    f = demo(tmp_path, bad={25: long})  # record 24: shard 2 of 10 a shard
    rules = Rules(512, "error")
    ok = prepare([f], f.shown, smol_tokenizer, rules, 10, lambda i: (i // 10) % 2 == 1, workers=1)
    ok.close()
    with pytest.raises(DistillError) as e:
        prepare([f], f.shown, smol_tokenizer, rules, 10, lambda i: (i // 10) % 2 == 0, workers=1)
    assert str(e.value).startswith(f"{f.shown}:25: ") and "tokens > data.max_length=512" in str(
        e.value
    )


def test_a_skipped_line_leaves_a_hole_and_moves_no_other_sample(smol_tokenizer, tmp_path):
    rules = Rules(128, "right", on_invalid="skip")
    clean = prepare([demo(tmp_path)], "x", smol_tokenizer, rules, 10, workers=1)
    want = [[s.key for s in c] for c in clean.chunks()]
    clean.close()
    bad = {12: "{oops", 13: json.dumps({"prompt": "x " * 200, "response": "y"})}
    p = prepare([demo(tmp_path, bad=bad)], "x", smol_tokenizer, rules, 10, workers=1)
    got = [[s.key for s in c] for c in p.chunks()]
    assert got[1] == [k for k in want[1] if k not in ("eval-0000012", "eval-0000013")]
    assert got[:1] + got[2:] == want[:1] + want[2:]
    assert p.skipped_in(1) == [12, 13] and p.stats.invalid_info() == {
        "count": 2,
        "first_lines": [12, 13],
    }
    p.close()
    # a shard whose every line is invalid would be empty: refused, naming it
    every = {n: "[1]" for n in range(21, 31)}
    with pytest.raises(DistillError, match=r"shard 2 would hold no sample: all 10 of its lines"):
        prepare([demo(tmp_path, bad=every)], "x", smol_tokenizer, rules, 10, workers=1)


def test_the_fingerprint_names_the_rule_only_where_it_can_differ(tiny_teacher_dir, tmp_path):
    job = load_job(make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "o")))
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(tiny_teacher_dir))
    data = tmp_path / "train.jsonl"
    fp = job_fingerprint(job, "train", str(data), tiny_teacher_dir, tok_fp)
    # on_invalid = "error": the fingerprint of the releases before #22, formula for formula
    before = {
        "split": "train",
        "dataset_sha256": sha256_file(data),
        "teacher": job.teacher.model,
        "teacher_config_sha256": sha256_file(tiny_teacher_dir / "config.json"),
        "tokenizer": tok_fp,
        "dtype": job.teacher.dtype,
        "targets": job.targets.fingerprint(),
        "data": {"max_length": 128, "truncation": "right", "max_samples": 0},
        "samples_per_shard": 16,
    }
    assert fp == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    skip = load_job(tmp_path / "job.toml", ['data.on_invalid="skip"'])
    assert job_fingerprint(skip, "train", str(data), tiny_teacher_dir, tok_fp) != fp
    # a digest given in the job (the controller's, in a VM's job) is used as is
    given = load_job(tmp_path / "job.toml", [f'data.dataset_sha256={{train="{"ab" * 32}"}}'])
    assert job_fingerprint(given, "train", str(data), tiny_teacher_dir, tok_fp) != fp
    before["dataset_sha256"] = "ab" * 32
    want = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert job_fingerprint(given, "train", "/no/such/file", tiny_teacher_dir, tok_fp) == want


def test_parts_with_skipped_lines_write_the_single_run_shards_and_manifest(
    tiny_teacher_dir, tmp_path
):
    bad = {3: "{oops", 20: "[1]", 37: '{"prompt": "p", "response": ""}'}

    def job_at(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        path = make_job(
            d,
            tiny_teacher_dir,
            str(d / "out"),
            n_train=48,
            n_eval=8,
            teacher__samples_per_shard="8",
            data__on_invalid='"skip"',
        )
        lines = (d / "train.jsonl").read_text().splitlines()
        for k, v in bad.items():
            lines[k - 1] = v
        (d / "train.jsonl").write_text("\n".join(lines) + "\n")
        return path

    single = run_teacher(load_job(job_at("one")))["train"]
    assert single is not None and single.skipped_lines == {"count": 3, "first_lines": [3, 20, 37]}
    assert [s.samples for s in single.shards] == [7, 8, 7, 8, 7, 8]  # holes, nothing moved
    j = load_job(job_at("two"))
    for i in (1, 0):
        assert run_teacher(j, Part(i, 2)) == {"train": None, "eval": None}
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(tiny_teacher_dir))
    fps = split_fingerprints(j, tiny_teacher_dir, tok_fp)
    store = open_store(f"{j.output}/train")
    assert sorted(n for n in store.list() if n.startswith("skipped-")) == [
        "skipped-000000.json",
        "skipped-000002.json",
        "skipped-000004.json",
    ]
    made = finish_split(store, fps["train"])
    assert made is not None and made.shards == single.shards
    assert made.skipped_lines == single.skipped_lines
    stored = Manifest.from_json(store.read_bytes(MANIFEST), "m")
    assert stored.skipped_lines == single.skipped_lines


def test_a_part_reads_only_the_parquet_row_groups_it_needs(smol_tokenizer, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": f"q{i}", "response": "" if i in (10, 31) else f"answer {i}"} for i in range(60)
    ]
    p = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=7)  # groups across shards
    f = DataFile(p.name, p, str(p))
    read: list[int] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *a, **k):
        read.append(i)
        return real(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    rules = Rules(128, "right", on_invalid="skip")
    part = prepare([f], f.shown, smol_tokenizer, rules, 10, lambda i: (i // 10) % 2 == 1, workers=1)
    # shards 1, 3, 5: rows 10-19, 30-39, 50-59 live in row groups 1-2, 4-5, 7-8
    assert sorted(set(read)) == [1, 2, 4, 5, 7, 8]
    whole = prepare([f], f.shown, smol_tokenizer, rules, 10, workers=1)
    for s in range(6):
        want = [x.key for x in whole.chunks()[s]] if s % 2 else []
        assert [x.key for x in part.chunks()[s]] == want
    assert [len(c) for c in part.chunks()] == [0, 9, 0, 9, 0, 10]
    assert part.skipped_in(1) == [11] and part.skipped_in(3) == [32]
    part.close()
    whole.close()
