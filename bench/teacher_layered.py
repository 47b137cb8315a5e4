"""Benchmark: the layered teacher pass against the resident pass, side by side.

Same teacher, data, dtype, targets and batches; each side in its own fresh subprocess (peak
RSS is a per-process high-water mark), in one run: the resident pass (the whole model loaded,
then ``compute_targets`` per shard) and the layered pass (``LayeredTeacher``, one decoder layer
at a time) at two chunk sizes, the default ``teacher.chunk_tokens`` and a small one.

Per side: tokens/s over the whole pass **including** reading the weights (the resident side's
model load, the layered side's per-chunk streaming), peak memory above the baseline taken
after imports and tokenisation (so the weights count), weight bytes read per token, and for
the layered sides the weight-streaming overhead: the share of the pass's time the compute
waited for a layer's weights (the prefetch hides the rest), and the time spent reading them.
The sides' targets are compared (same ids, log-probs within a tolerance).

On a machine without a GPU the "device" is the CPU and the checkpoint sits in the page cache
after the first read, so streaming reads memory, not a disk: see the README for what that
means for the figures.

    python bench/teacher_layered.py                       # defaults: 256 samples, float32
    python bench/teacher_layered.py --samples 64 --json /tmp/teacher_layered.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from teacher_pass import PeakMemory, cpu_model, data_path, loadavg  # noqa: E402

RESULT_PREFIX = "TEACHER_LAYERED_RESULT "
DEFAULT_CHUNK = 2**20  # teacher.chunk_tokens' default


def side_main(args: argparse.Namespace) -> None:
    """One side in this (fresh) process: measure, write the targets, print one JSON line."""
    import torch

    from distill import models
    from distill.config import TargetsSection
    from distill.data.dataset import tokenize_file
    from distill.format.codec import ShardFormat
    from distill.format.shards import shard_name, write_shard
    from distill.format.spec import TargetSpec
    from distill.teacher.extract import compute_targets
    from distill.teacher.layered import LayeredTeacher, chunk_groups

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    teacher_dir = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(teacher_dir)
    samples = tokenize_file(
        Path(args.data), tokenizer, args.max_length, "right", max_samples=args.samples
    )
    per = args.samples_per_shard
    shards = [samples[i : i + per] for i in range(0, len(samples), per)]
    spec = TargetSpec("topk", args.k)
    mem = PeakMemory("cpu")
    mem.start()  # before the weights: they count
    load0 = loadavg()
    t0 = time.perf_counter()
    stats: dict[str, Any] = {}
    if args.side == "resident":
        model = models.load_model(teacher_dir, args.dtype).eval()
        stats["load_s"] = time.perf_counter() - t0
        results = [
            compute_targets(model, s, spec, args.batch_tokens, args.head_chunk) for s in shards
        ]
        files = list(teacher_dir.glob("*.safetensors"))
        weight_bytes = sum(f.stat().st_size for f in files)  # read once, at load
        vocab = models.vocab_size(model)
    else:
        teacher = LayeredTeacher(teacher_dir, args.dtype)
        results = []
        sizes = [sum(len(x.input_ids) for x in s) for s in shards]
        for group in chunk_groups(sizes, args.chunk_tokens):
            results += teacher.compute_groups(
                [shards[i] for i in group], spec, args.batch_tokens, args.head_chunk
            )
        st = teacher.stats
        weight_bytes = st.weight_bytes
        vocab = teacher.vocab_size
        stats.update(
            chunks=st.chunks, wait_s=st.wait_seconds, read_s=st.load_seconds, pass_s=st.seconds
        )
    seconds = time.perf_counter() - t0
    peak = mem.peak()
    fmt = ShardFormat(TargetsSection(values="f16").codec_spec(), spec, vocab)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for idx, targets in enumerate(results):
        write_shard(outdir / shard_name(idx), targets, fmt)
    tokens = sum(len(s.input_ids) for s in samples)
    result = {
        "side": args.side,
        "chunk_tokens": args.chunk_tokens if args.side == "layered" else None,
        "samples": len(samples),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_bytes": peak,
        "hwm_reset": mem.hwm_reset,
        "weight_bytes_read": weight_bytes,
        "weight_bytes_per_token": weight_bytes / tokens,
        "loadavg": [load0, loadavg()],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **stats,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def spawn_side(args: argparse.Namespace, side: str, chunk: int, outdir: Path) -> dict[str, Any]:
    """Run one side in a fresh Python process and return its result dict."""
    opts = {
        "side": side,
        "outdir": outdir,
        "model": args.model,
        "data": data_path(args.data),
        "samples": args.samples,
        "max-length": args.max_length,
        "dtype": args.dtype,
        "k": args.k,
        "batch-tokens": args.batch_tokens,
        "head-chunk": args.head_chunk,
        "samples-per-shard": args.samples_per_shard,
        "chunk-tokens": chunk,
        "threads": args.threads,
    }
    cmd = [sys.executable, str(Path(__file__).resolve())]
    for k, v in opts.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ)
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stdout}")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    sys.exit(f"{side} side printed no result:\n{proc.stdout}")


def compare(a: Path, b: Path) -> dict[str, float]:
    """Share of equal target ids, and the largest log-prob difference, of two shard dirs."""
    from distill.format.shards import read_shard

    def rows(d: Path) -> tuple[np.ndarray, np.ndarray]:
        s = [t for p in sorted(d.glob("shard-*.tar")) for t in read_shard(p)]
        ids = np.concatenate([t.target_ids for t in s]).astype(np.int64)
        return ids, np.concatenate([t.target_logprobs for t in s]).astype(np.float32)

    (ai, al), (bi, bl) = rows(a), rows(b)
    return {"ids_equal": float((ai == bi).mean()), "max_logprob_diff": float(np.abs(al - bl).max())}


def report(
    args: argparse.Namespace, runs: list[dict[str, Any]], agree: list[dict], every: list[dict]
) -> dict:
    """Print the side-by-side table and return the JSON summary."""
    res = runs[0]
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": res["threads"],
        "torch": res["torch"],
        "device": "cpu",
        "gpu": None,
        "python": platform.python_version(),
    }
    print()
    print(
        f"teacher pass, resident vs layered: {args.model}, {res['samples']} samples of "
        f"{args.data} ({res['tokens']:,} tokens), {args.dtype}, top-{args.k}, "
        f"batch_tokens={args.batch_tokens}, samples_per_shard={args.samples_per_shard}, "
        f"{args.repeats} alternating rounds (best tokens/s, largest peak)"
    )
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), no GPU: the CPU is the device; "
        f"load average {res['loadavg'][0]:.1f}"
    )
    print()
    names = ["resident"] + [f"layered {r['chunk_tokens']:,}" for r in runs[1:]]
    print(f"{'':30}" + "".join(f"{n:>20}" for n in names))

    def line(label: str, cells: list[str]) -> None:
        print(f"{label:30}" + "".join(f"{c:>20}" for c in cells))

    line("tokens/s (weights read incl.)", [f"{r['tokens_per_s']:,.0f}" for r in runs])
    line("  ratio to resident", [f"{r['tokens_per_s'] / res['tokens_per_s']:.2f}x" for r in runs])
    line("peak memory MiB", [f"{r['peak_bytes'] / 2**20:,.0f}" for r in runs])
    line("  ratio to resident", [f"{r['peak_bytes'] / res['peak_bytes']:.2f}x" for r in runs])
    line("weight bytes read / token", [f"{r['weight_bytes_per_token']:,.0f}" for r in runs])
    line("chunks", ["-"] + [str(r["chunks"]) for r in runs[1:]])
    line(
        "waiting on weights",
        ["-"] + [f"{r['wait_s'] / r['seconds']:.1%}" for r in runs[1:]],
    )
    line(
        "reading weights (overlapped)",
        ["-"] + [f"{r['read_s'] / r['seconds']:.1%}" for r in runs[1:]],
    )
    line("ids equal to resident", ["-"] + [f"{a['ids_equal']:.4%}" for a in agree])
    line("max |logprob diff|", ["-"] + [f"{a['max_logprob_diff']:.2g}" for a in agree])
    summary = {
        "resident_tokens_per_s": res["tokens_per_s"],
        "resident_peak_bytes": res["peak_bytes"],
        "layered": [
            {
                "chunk_tokens": r["chunk_tokens"],
                "tokens_per_s": r["tokens_per_s"],
                "tokens_per_s_ratio": r["tokens_per_s"] / res["tokens_per_s"],
                "peak_bytes": r["peak_bytes"],
                "peak_ratio": r["peak_bytes"] / res["peak_bytes"],
                "weight_bytes_per_token": r["weight_bytes_per_token"],
                "streaming_wait_share": r["wait_s"] / r["seconds"],
                "streaming_read_share": r["read_s"] / r["seconds"],
                **a,
            }
            for r, a in zip(runs[1:], agree, strict=True)
        ],
        "machine": machine,
        "model": args.model,
        "data": args.data,
        "dtype": args.dtype,
        "k": args.k,
        "batch_tokens": args.batch_tokens,
        "peak_memory": "peak RSS (VmHWM) above VmRSS after imports + tokenisation (weights count)",
        "repeats": args.repeats,
        "runs": every,
    }
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--data", default="data/demo/train.jsonl")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--head-chunk", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK, help="layered: the default")
    p.add_argument("--small-chunk", type=int, default=2048, help="layered: the second size")
    p.add_argument("--repeats", type=int, default=2, help="rounds; best tokens/s, largest peak")
    # one thread by default: on a shared 2-core machine two OpenMP threads stall at every
    # barrier when another process holds a core, which hits the sides unevenly (measured:
    # resident 3.4 s vs 11.9 s for the same 16 samples at 1 vs 2 threads, layered 3.9 vs 4.7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument("--side", choices=["resident", "layered"], help=argparse.SUPPRESS)
    p.add_argument("--outdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        side_main(args)
        return 0
    chunks = (args.chunk_tokens, args.small_chunk)
    sides = [("resident", 0), *(("layered", c) for c in chunks)]
    every: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-layered-") as tmp:
        t = Path(tmp)
        for r in range(args.repeats):  # rounds alternate the sides (the load drifts)
            for side, c in sides if r % 2 == 0 else sides[::-1]:
                every.append({**spawn_side(args, side, c, t / f"{side}-{c}"), "round": r})
        agree = [compare(t / "resident-0", t / f"layered-{c}") for c in chunks]
    # per side: the best tokens/s of the rounds, the largest peak
    runs = []
    for side, c in sides:
        mine = [x for x in every if x["side"] == side and (x["chunk_tokens"] or 0) == c]
        best = max(mine, key=lambda x: x["tokens_per_s"])
        runs.append({**best, "peak_bytes": max(x["peak_bytes"] for x in mine)})
    summary = report(args, runs, agree, every)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
