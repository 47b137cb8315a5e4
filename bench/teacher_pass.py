"""Benchmark: distill's teacher pass against a seed-style naive loop, side by side.

Both sides run the same teacher, data, dtype and k, each in its own fresh subprocess (peak RSS
is a per-process high-water mark), alternating naive, ours, naive, ours, ... for ``--repeats``
rounds. Reported per side: tokens/s (real, non-pad dataset tokens over the wall time of the
pass, model load excluded, writing the results included) and peak memory above the baseline
taken after model load and one tiny warm-up batch (CPU: VmHWM - VmRSS from /proc/self/status,
with the high-water mark reset through /proc/self/clear_refs where the kernel allows it; CUDA:
``torch.cuda.max_memory_allocated`` - ``memory_allocated``). The two sides' targets are compared
so the speed-up is for the same output.

    python bench/teacher_pass.py                    # defaults: 256 samples, bfloat16, k=16
    python bench/teacher_pass.py --samples 64 --repeats 2 --json /tmp/teacher_pass.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "TEACHER_PASS_RESULT "
# |ours - naive| log-prob tolerance per dtype (both sides store float16 log-probs). In 16-bit
# dtypes the two sides' hidden states round differently (other batch shapes and padding), and
# the noise adds up over the layers: measured against a float32 run on 64 demo samples, each
# bfloat16 side (ours and naive alike) is off by mean 0.07, p99 0.3, max 0.84 (float32 sides
# agree to 0.004).
LOGPROB_TOL = {"float32": 0.01, "float16": 0.1, "bfloat16": 0.5}
MIN_AGREEMENT = 0.99


# --------------------------------------------------------------------------------------------
# Measurement helpers (run inside the per-side subprocess)
# --------------------------------------------------------------------------------------------


def proc_status_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB (Linux /proc)."""
    fields = dict(
        re.findall(r"^(VmRSS|VmHWM):\s+(\d+)", Path("/proc/self/status").read_text(), re.M)
    )
    return {k: int(v) for k, v in fields.items()}


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    st = proc_status_kib()
    return st["VmHWM"] <= st["VmRSS"] + 1024  # within 1 MiB: the reset took


class PeakMemory:
    """Peak memory above a baseline taken at ``start()``, on CPU (RSS) or CUDA (allocator)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline = 0
        self.hwm_reset = False

    def start(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.hwm_reset = reset_hwm()
            self.baseline = proc_status_kib()["VmRSS"] * 1024

    def peak(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return proc_status_kib()["VmHWM"] * 1024 - self.baseline


# --------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------


def run_ours(
    model: Any,
    samples: list[Any],
    k: int,
    batch_tokens: int,
    head_chunk: int,
    samples_per_shard: int,
    outdir: Path | None,
) -> None:
    """distill's real code path minus upload: compute_targets per shard, then write_shard
    (top-k targets in the job default's codec, packed v2)."""
    from distill.config import TargetsSection
    from distill.format.codec import ShardFormat
    from distill.format.shards import shard_name, write_shard
    from distill.format.spec import TargetSpec
    from distill.teacher.extract import compute_targets

    vocab = int(model.get_output_embeddings().weight.shape[0])
    fmt = ShardFormat(TargetsSection().codec_spec(), TargetSpec("topk", k), vocab)
    for idx, lo in enumerate(range(0, len(samples), samples_per_shard)):
        targets = compute_targets(
            model, samples[lo : lo + samples_per_shard], k, batch_tokens, head_chunk
        )
        if outdir is not None:
            write_shard(outdir / shard_name(idx), targets, fmt)


def run_naive(model: Any, samples: list[Any], k: int, batch_size: int, outdir: Path | None) -> None:
    """The seeds' loop: fixed-size batches in dataset order, full logits, top-k everywhere."""
    import torch

    from distill.format.shards import id_dtype

    device = next(model.parameters()).device
    vdt = id_dtype(model.get_output_embeddings().weight.shape[0])
    with torch.no_grad():
        for bi, lo in enumerate(range(0, len(samples), batch_size)):
            batch = samples[lo : lo + batch_size]
            # Pad every sample of the batch to its longest one (right padding, pad id 0).
            t = max(len(s.input_ids) for s in batch)
            ids = torch.zeros((len(batch), t), dtype=torch.long)
            attn = torch.zeros((len(batch), t), dtype=torch.long)
            for b, s in enumerate(batch):
                ids[b, : len(s.input_ids)] = torch.from_numpy(s.input_ids.astype(np.int64))
                attn[b, : len(s.input_ids)] = 1
            # Full [batch, seq, vocab] logits from the LM head, at every position (pads too).
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            # Normalise over the whole vocab (in float32, as the targets must be accurate).
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            # Top-k at ALL positions, then a synchronous device -> host copy of the lot.
            top = torch.topk(logprobs, k, dim=-1)
            top_ids, top_lps = top.indices.cpu().numpy(), top.values.cpu().numpy()
            # Keep only the target positions (t where token t+1 is an assistant token).
            rows_ids, rows_lps = [], []
            for b, s in enumerate(batch):
                pos = np.flatnonzero(s.loss_mask[1:])
                rows_ids.append(top_ids[b, pos])
                rows_lps.append(top_lps[b, pos])
            # Write this batch's results (same dtypes as the shards store).
            if outdir is not None:
                np.save(outdir / f"batch-{bi:06d}-ids.npy", np.concatenate(rows_ids).astype(vdt))
                np.save(
                    outdir / f"batch-{bi:06d}-lps.npy",
                    np.concatenate(rows_lps).astype(np.float16),
                )


def side_main(args: argparse.Namespace) -> None:
    """One side in this (fresh) process: load, warm up, measure, print one JSON result line."""
    import torch

    from distill import models
    from distill.data.dataset import tokenize_file

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    teacher_dir = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(teacher_dir)
    samples = tokenize_file(
        Path(args.data), tokenizer, args.max_length, "right", max_samples=args.samples
    )
    device = models.pick_device(args.device)
    t0 = time.perf_counter()
    model = models.load_model(teacher_dir, args.dtype, device).eval()
    load_s = time.perf_counter() - t0

    def run(subset: list[Any], outdir: Path | None) -> None:
        if args.side == "ours":
            run_ours(
                model,
                subset,
                args.k,
                args.batch_tokens,
                args.head_chunk,
                args.samples_per_shard,
                outdir,
            )
        else:
            run_naive(model, subset, args.k, args.batch_size, outdir)

    run(samples[:2], None)  # warm-up: ONE tiny batch (2 samples) through this side's path
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    mem = PeakMemory(device)
    mem.start()
    load0 = loadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    run(samples, outdir)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    peak = mem.peak()
    tokens = sum(len(s.input_ids) for s in samples)
    result = {
        "side": args.side,
        "samples": len(samples),
        "tokens": tokens,
        "target_tokens": sum(s.n_targets for s in samples),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "loadavg": [load0, loadavg()],
        "tokens_per_s": tokens / seconds,
        "peak_bytes": peak,
        "baseline_bytes": mem.baseline,
        "hwm_reset": mem.hwm_reset,
        "load_s": load_s,
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Orchestration, comparison, report
# --------------------------------------------------------------------------------------------


def data_path(data: str) -> Path:
    """The dataset path, relative to the working directory or else to the repository."""
    p = Path(data)
    return p if p.is_absolute() or p.exists() else ROOT / p


def spawn_side(args: argparse.Namespace, side: str, outdir: Path) -> dict[str, Any]:
    """Run one side in a fresh Python process and return its result dict."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        side,
        "--outdir",
        str(outdir),
        "--model",
        args.model,
        "--data",
        str(data_path(args.data)),
        "--samples",
        str(args.samples),
        "--max-length",
        str(args.max_length),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--k",
        str(args.k),
        "--batch-size",
        str(args.batch_size),
        "--batch-tokens",
        str(args.batch_tokens),
        "--head-chunk",
        str(args.head_chunk),
        "--samples-per-shard",
        str(args.samples_per_shard),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ)
    if args.threads > 0:  # before torch loads, so every OpenMP/MKL pool gets the same size
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stdout}")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    sys.exit(f"{side} side printed no result:\n{proc.stdout}")


def load_targets(ours_dir: Path, naive_dir: Path) -> tuple[np.ndarray, ...]:
    """All target rows of both sides, in dataset order: (ours ids, ours lps, naive ids, lps)."""
    from distill.format.shards import read_shard

    ours = [s for p in sorted(ours_dir.glob("shard-*.tar")) for s in read_shard(p)]
    o_ids = np.concatenate([s.target_ids for s in ours]).astype(np.int64)
    o_lps = np.concatenate([s.target_logprobs for s in ours]).astype(np.float32)
    n_ids = np.concatenate([np.load(p) for p in sorted(naive_dir.glob("batch-*-ids.npy"))])
    n_lps = np.concatenate([np.load(p) for p in sorted(naive_dir.glob("batch-*-lps.npy"))])
    return o_ids, o_lps, n_ids.astype(np.int64), n_lps.astype(np.float32)


def compare_targets(ours_dir: Path, naive_dir: Path, tol: float) -> dict[str, Any]:
    """How far the two sides' top-k targets agree, row by row (one row = one target position).

    A row agrees when both sides pick the same set of k ids, or when the ids only one side
    picked lie within ``tol`` of that side's k-th log-prob (a near-tie at the cut-off, which
    16-bit rounding may break either way). Log-probs are compared on the ids both sides picked.
    """
    o_ids, o_lps, n_ids, n_lps = load_targets(ours_dir, naive_dir)
    if o_ids.shape != n_ids.shape:
        return {"rows": 0, "ok": False, "error": f"shapes differ: {o_ids.shape} vs {n_ids.shape}"}
    rows, k = o_ids.shape
    same_order = (o_ids == n_ids).all(axis=1)
    top1 = o_ids[:, 0] == n_ids[:, 0]
    same_set = np.empty(rows, dtype=bool)
    tie_ok = np.empty(rows, dtype=bool)
    diffs: list[np.ndarray] = []
    for r in range(rows):
        common, oi, ni = np.intersect1d(o_ids[r], n_ids[r], return_indices=True)
        diffs.append(np.abs(o_lps[r, oi] - n_lps[r, ni]))
        same_set[r] = len(common) == k
        only_o = np.setdiff1d(np.arange(k), oi)
        only_n = np.setdiff1d(np.arange(k), ni)
        tie_ok[r] = bool(
            (o_lps[r, only_o] - o_lps[r].min() <= tol).all()
            and (n_lps[r, only_n] - n_lps[r].min() <= tol).all()
        )
    d = np.concatenate(diffs)
    agreement = float(tie_ok.mean())
    within = float((d <= tol).mean())
    return {
        "rows": int(rows),
        "top1": float(top1.mean()),
        "same_order": float(same_order.mean()),
        "same_set": float(same_set.mean()),
        "agree_tie_tolerant": agreement,
        "logprob_abs_diff_mean": float(d.mean()),
        "logprob_abs_diff_p99": float(np.quantile(d, 0.99)),
        "logprob_abs_diff_max": float(d.max()),
        "logprob_within_tol": within,
        "tol": tol,
        "ok": agreement >= MIN_AGREEMENT and within >= MIN_AGREEMENT,
    }


def loadavg() -> float:
    """1-minute load average (other processes compete for the same cores)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def report(
    args: argparse.Namespace, runs: list[dict[str, Any]], agree: dict[str, Any]
) -> dict[str, Any]:
    """Print the side-by-side table and return the JSON summary."""
    best = {
        side: max((r for r in runs if r["side"] == side), key=lambda r: r["tokens_per_s"])
        for side in ("ours", "naive")
    }
    # Peak memory: the worst (largest) of the repeats, for each side.
    peak = {
        side: max(r["peak_bytes"] for r in runs if r["side"] == side) for side in ("ours", "naive")
    }
    o, n = best["ours"], best["naive"]
    tps_ratio = o["tokens_per_s"] / n["tokens_per_s"]
    peak_ratio = peak["ours"] / peak["naive"] if peak["naive"] > 0 else float("nan")
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": o["threads"],
        "torch": o["torch"],
        "device": o["device"],
        "cuda_device": o["cuda_device"],
        "python": platform.python_version(),
    }
    mem_how = (
        "CUDA max_memory_allocated above allocated after warm-up"
        if o["device"].startswith("cuda")
        else "peak RSS (VmHWM) above VmRSS after load + warm-up"
        + (", HWM reset via clear_refs" if o["hwm_reset"] and n["hwm_reset"] else ", no HWM reset")
    )
    print()
    print(
        f"teacher pass: {args.model}, {o['samples']} samples of {args.data} "
        f"({o['tokens']:,} tokens, {o['target_tokens']:,} target positions), "
        f"{args.dtype}, k={args.k}"
    )
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), device {machine['device']}"
        + (f" ({machine['cuda_device']})" if machine["cuda_device"] else "")
    )
    print(
        f"ours: batch_tokens={args.batch_tokens}, head_chunk={args.head_chunk}, "
        f"samples_per_shard={args.samples_per_shard}   naive: batch_size={args.batch_size}   "
        f"repeats={args.repeats} (best tokens/s, largest peak)"
    )
    print()
    print(f"{'':22}{'ours':>12}{'naive':>12}{'ours/naive':>13}")
    print(
        f"{'tokens/s':22}{o['tokens_per_s']:>12,.0f}{n['tokens_per_s']:>12,.0f}{tps_ratio:>12.2f}x"
    )
    print(
        f"{'peak memory (MiB)':22}{mib(peak['ours']):>12}{mib(peak['naive']):>12}"
        f"{peak_ratio:>12.2f}x"
    )
    print(
        f"{'pass wall time (s)':22}{o['seconds']:>12.2f}{n['seconds']:>12.2f}"
        f"{o['seconds'] / n['seconds']:>12.2f}x"
    )
    print(
        f"{'pass CPU time (s)':22}{o['cpu_seconds']:>12.2f}{n['cpu_seconds']:>12.2f}"
        f"{o['cpu_seconds'] / n['cpu_seconds']:>12.2f}x"
    )
    print(f"  peak memory = {mem_how}")
    print()
    print("runs (in order):")
    for r in runs:
        print(
            f"  {r['side']:<6} {r['tokens_per_s']:>9,.0f} tok/s  {r['seconds']:7.2f} s wall  "
            f"{r['cpu_seconds']:7.2f} s CPU  load {r['loadavg'][0]:.1f}->{r['loadavg'][1]:.1f}  "
            f"peak {mib(r['peak_bytes']):>9} MiB  (baseline {mib(r['baseline_bytes'])} MiB)"
        )
    print()
    if "error" in agree:
        print(f"targets: MISMATCH ({agree['error']})")
    else:
        print(
            f"targets ({agree['rows']:,} rows): top-1 ids equal {agree['top1']:.2%}, "
            f"top-{args.k} same order {agree['same_order']:.2%}, same set {agree['same_set']:.2%}, "
            f"agree up to near-ties at the k-th {agree['agree_tie_tolerant']:.2%}"
        )
        print(
            f"  |log-prob ours - naive| on shared ids: mean {agree['logprob_abs_diff_mean']:.4f}, "
            f"p99 {agree['logprob_abs_diff_p99']:.4f}, max {agree['logprob_abs_diff_max']:.4f}; "
            f"{agree['logprob_within_tol']:.2%} within {agree['tol']} ({args.dtype})"
        )
        print(
            f"  -> {'OK' if agree['ok'] else 'FAILED'}: "
            f"need >= {MIN_AGREEMENT:.0%} rows agreeing and log-probs within tolerance"
        )
    return {
        "ours_tokens_per_s": o["tokens_per_s"],
        "naive_tokens_per_s": n["tokens_per_s"],
        "ours_peak_bytes": peak["ours"],
        "naive_peak_bytes": peak["naive"],
        "tokens_per_s_ratio": tps_ratio,
        "peak_ratio": peak_ratio,
        "machine": machine,
        "model": args.model,
        "data": args.data,
        "samples": o["samples"],
        "tokens": o["tokens"],
        "target_tokens": o["target_tokens"],
        "dtype": args.dtype,
        "k": args.k,
        "batch_size": args.batch_size,
        "batch_tokens": args.batch_tokens,
        "head_chunk": args.head_chunk,
        "samples_per_shard": args.samples_per_shard,
        "repeats": args.repeats,
        "peak_memory": mem_how,
        "runs": runs,
        "topk_agreement": agree,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument(
        "--data", default="data/demo/train.jsonl", help="JSONL (relative: cwd, else repo)"
    )
    p.add_argument("--samples", type=int, default=256, help="first N samples of the dataset")
    p.add_argument("--max-length", type=int, default=384, help="truncation='right' at this")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="naive: samples per batch")
    p.add_argument("--batch-tokens", type=int, default=4096, help="ours: padded tokens/batch")
    p.add_argument("--head-chunk", type=int, default=256, help="ours: LM-head rows per chunk")
    p.add_argument("--samples-per-shard", type=int, default=128, help="ours: shard size")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (naive, ours)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch/OpenMP threads per side (0 = torch's default); 1 is steadier on a shared box",
    )
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument("--side", choices=("ours", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--outdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DISTILL_CACHE", str(ROOT / ".cache" / "distill"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.side:
        side_main(args)
        return 0
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="teacher-pass-bench-") as tmp:
        for rep in range(args.repeats):
            for side in ("naive", "ours"):
                print(f"[{rep + 1}/{args.repeats}] {side} ...", file=sys.stderr, flush=True)
                r = spawn_side(args, side, Path(tmp) / f"{side}-{rep}")
                print(
                    f"  {r['tokens_per_s']:,.0f} tok/s, peak {mib(r['peak_bytes'])} MiB",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(r)
        agree = compare_targets(
            Path(tmp) / "ours-0", Path(tmp) / "naive-0", LOGPROB_TOL[args.dtype]
        )
    summary = report(args, runs, agree)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if agree["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
