"""Benchmark: what a fan-out task fetches of a ``gs://`` split before its first forward pass,
through the split's record index (ours) against the baseline that every task ran before it:
download the split whole, then count every record. Side by side in one run, against
fake-gcs-server with the real google-cloud-storage client, on synthetic chats
(bench/data_scale.py's, SmolLM2's tokenizer).

For task 0 of N (N = 1, 4, 16), each arm runs the teacher's own preparation
(:func:`distill.teacher.batching.prepare_split`: fetch, count, check and tokenise its shards'
records into the token store) in this process, in turn, and reports the bytes it fetched onto
the VM's disk and its seconds; then the controller's one-time cost: building the index (one
pass over the local copy its checks read anyway) and the index's size.

    python bench/task_reads.py                  # 100k lines (~80 MB), about 3 min on 2 cores
    python bench/task_reads.py --tiny           # 600 lines (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import data_scale  # noqa: E402  (bench/data_scale.py: the synthetic chats, the machine)

TASKS = (1, 4, 16)
PER = 256  # samples per shard: the job default
TINY_LINES = 600


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def write_job(path: Path, train: str, output: str, per: int) -> Path:
    path.write_text(
        "[job]\n"
        f'name = "task-reads"\noutput = "{output}"\n'
        f'[teacher]\nmodel = "{data_scale.MODEL}"\nsamples_per_shard = {per}\n'
        f'[data]\ntrain = "{train}"\nmax_length = {data_scale.MAX_LENGTH}\n'
        'truncation = "right"\n'
    )
    return path


def arm(job: Any, tokenizer: Any, tasks: int, scratch: Path, index_url: str, digest: str) -> dict:
    """Task 0 of ``tasks``: prepare_split with or without the index; fetched bytes, seconds."""
    from distill.shardset import Part
    from distill.teacher.batching import prepare_split

    scratch.mkdir(parents=True)
    t = time.perf_counter()
    p = prepare_split(job, job.data.train, tokenizer, scratch, Part(0, tasks), index_url, digest)
    seconds = time.perf_counter() - t
    try:
        out = {
            "seconds": seconds,
            "fetched_bytes": du(scratch / "data"),
            "task_samples": p.stats.samples,
            "task_tokens": p.stats.tokens,
            "keys": [s.key for c in p.chunks() for s in c][:3],
        }
    finally:
        p.close()
        shutil.rmtree(scratch)
    return out


def run(args: argparse.Namespace, tokenizer: Any = None) -> dict[str, Any]:
    from distill.cloud.staging import put_index
    from distill.config import load_job
    from distill.data.record_index import build_index
    from distill.data.records import DataFile
    from distill.demo.fake_gcs import emulator_client, start_server
    from distill.sources import digest as split_digest
    from distill.store.storage import open_store

    lines = TINY_LINES if args.tiny else args.lines
    per = 8 if args.tiny else PER
    tokenizer = tokenizer or data_scale.tokenizer_of()
    server = start_server()
    try:
        with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
            tmp_path = Path(tmp)
            local = tmp_path / "train.jsonl"
            size = data_scale.write_chats(local, lines)
            emulator_client().create_bucket("bench")
            open_store("gs://bench").put_file("data/train.jsonl", local)
            spec = "gs://bench/data/train.jsonl"
            job = load_job(write_job(tmp_path / "job.toml", spec, "gs://bench/out", per))
            digest = split_digest(spec)
            t = time.perf_counter()  # the controller: one pass over the copy its checks read
            index = build_index([DataFile("train.jsonl", local, spec)], digest, per)
            build_s = time.perf_counter() - t
            index = index.with_urls({"train.jsonl": spec})
            index_url = put_index(open_store("gs://bench/out"), index)
            rows = []
            for n in TASKS:
                base = arm(job, tokenizer, n, tmp_path / f"b{n}", "", "")
                ours = arm(job, tokenizer, n, tmp_path / f"o{n}", index_url, digest)
                assert ours["keys"] == base["keys"] and ours["task_tokens"] == base["task_tokens"]
                rows.append(
                    {
                        "tasks": n,
                        "baseline": {k: v for k, v in base.items() if k != "keys"},
                        "ours": {k: v for k, v in ours.items() if k != "keys"},
                        "bytes_ratio": ours["fetched_bytes"] / base["fetched_bytes"],
                        "seconds_ratio": ours["seconds"] / base["seconds"],
                    }
                )
    finally:
        server.stop()
    return {
        "bench": "task_reads",
        "mode": "tiny" if args.tiny else "full",
        "machine": data_scale.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "lines": lines,
        "split_bytes": size,
        "samples_per_shard": per,
        "index": {
            "build_s": build_s,
            "bytes": len(index.to_json()),
            "stride": index.stride,
            "records": index.records,
        },
        "rows": rows,
    }


def report(r: dict[str, Any]) -> None:
    mb = 1e6
    print(
        f"task reads: {r['lines']:,} lines, {r['split_bytes'] / mb:,.1f} MB of JSONL in a gs:// "
        f"bucket (fake-gcs-server), {r['samples_per_shard']} samples a shard; {r['machine']}"
    )
    print(
        f"  controller, once: index built in {r['index']['build_s']:.2f} s, "
        f"{r['index']['bytes'] / 1e3:,.1f} kB (an offset every {r['index']['stride']} records)"
    )
    print("  task 0 of N | fetched: ours / baseline (ratio) | seconds: ours / baseline (ratio)")
    for row in r["rows"]:
        b, o = row["baseline"], row["ours"]
        print(
            f"  {row['tasks']:>4}        | {o['fetched_bytes'] / mb:,.2f} MB / "
            f"{b['fetched_bytes'] / mb:,.2f} MB ({row['bytes_ratio']:.3f}) | "
            f"{o['seconds']:.2f} / {b['seconds']:.2f} ({row['seconds_ratio']:.2f})"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100_000, help="synthetic records in the split")
    ap.add_argument("--tiny", action="store_true", help=f"{TINY_LINES} lines (the tests)")
    ap.add_argument("--scratch", type=Path, default=None, help="where the dataset goes")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/task_reads.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, tokenizer: Any = None) -> dict[str, Any]:
    args = parse_args(argv)
    r = run(args, tokenizer)
    report(r)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=1) + "\n")
    return r


if __name__ == "__main__":
    main()
