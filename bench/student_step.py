"""Benchmark: the student's KD step, distill's chunked loss against the seeds' naive one.

What is measured is one KD step: a fixed hidden-state tensor ``[tokens, hidden]`` (standing in
for the student body's output) and an LM-head weight ``[vocab, hidden]``, both requiring grad,
and forward + backward of ``kd_weight * forward-KL(sparse top-k + tail) + (1 - kd_weight) * CE``
against stored sparse teacher targets. The two sides:

    naive  as the seeds do it: ``logits = hidden @ W.T`` for all tokens at once ([tokens, vocab]
           fp32), ``log_softmax``, gather the teacher's top-k, tail bucket, KL + CE, backward.
    ours   ``distill.student.losses.chunked_distill_loss``: LM head + loss + gradient by chunk.

Both sides get the same seeded random inputs and must give the same loss and gradients: a
small case is checked with ``allclose`` at startup, and the full-size loss and gradient norms
of the two sides are compared afterwards. Each side runs in its own fresh subprocess. Peak
memory is the peak above a baseline taken after allocating the inputs and one warm-up step on
a tiny slice (CPU: VmHWM - VmRSS from /proc/self/status, the high-water mark reset through
/proc/self/clear_refs as in bench/teacher_pass.py; CUDA: max_memory_allocated - allocated).
tokens/s is tokens over the wall time of forward + backward, best of ``--repeats``.

Naive needs several live [tokens, vocab] fp32 buffers. Before running it, its need is
estimated (tokens x vocab x 4 bytes x ``NAIVE_LIVE_BUFFERS``); token counts over
``--max-naive-gb`` are skipped, and a naive run that runs out of memory (each side's process is
capped below the machine's available memory), is killed or passes ``--side-timeout`` is
retried at half the tokens. Both sides are then measured at the token count naive ran at, and
ours alone also at the requested one.

    python bench/student_step.py                          # vocab 49,152 and 151,936, 8,192 tokens
    python bench/student_step.py --vocab 49152 --tokens 2048 --json /tmp/student_step.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/student_step.py` from anywhere
    sys.path.insert(0, str(ROOT))
RESULT_PREFIX = "STUDENT_STEP_RESULT "
OOM_EXIT = 3  # a side's exit code when it ran out of memory (MemoryError / allocator failure)
# [tokens, vocab] fp32 buffers naive keeps alive at once, per --naive-tail: an estimate with a
# margin (measured: 3.0 for complement at vocab 49,152-151,936, 6.3 for masked at vocab 5,000)
NAIVE_LIVE_BUFFERS = {"complement": 4, "masked": 7}
VOCAB_NAMES = {49152: "SmolLM2", 151936: "Qwen"}
TARGETS = {"peak_ratio_max": 0.15, "tokens_per_s_ratio_min": 1.0}
GiB = 2**30


def _teacher_pass() -> Any:
    """bench/teacher_pass.py as a module: its PeakMemory and machine helpers are reused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "teacher_pass", Path(__file__).with_name("teacher_pass.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# Inputs and the naive loss
# --------------------------------------------------------------------------------------------


def make_inputs(
    tokens: int, vocab: int, hidden: int, k: int, seed: int, device: str = "cpu"
) -> tuple[Any, ...]:
    """Seeded (hidden [T, H], weight [V, H], t_ids [T, k], t_logprobs [T, k] fp16, labels [T]).

    Teacher ids are distinct per row (one per vocab stratum of width V // k); the teacher's
    top-k holds a random 50-99% of the mass, so the tail bucket is never empty; log-probs are
    float16, as the shards store them. Half the labels are the teacher's top-1 id.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)
    stride = vocab // k
    t_ids = torch.arange(k) * stride + torch.randint(0, stride, (tokens, k), generator=g)
    mass = 0.5 + 0.49 * torch.rand(tokens, 1, generator=g)
    raw = (torch.randn(tokens, k, generator=g) * 2).log_softmax(-1) + mass.log()
    order = raw.argsort(dim=-1, descending=True)
    t_lps = raw.gather(1, order).half()
    t_ids = t_ids.gather(1, order)
    labels = torch.where(
        torch.rand(tokens, generator=g) < 0.5,
        t_ids[:, 0],
        torch.randint(0, vocab, (tokens,), generator=g),
    )
    out = (h, w, t_ids, t_lps, labels)
    out = tuple(t.to(device) for t in out)
    out[0].requires_grad_()
    out[1].requires_grad_()
    return out


def naive_kd_loss(
    hidden: Any,
    weight: Any,
    t_ids: Any,
    t_logprobs: Any,
    labels: Any,
    kd_weight: float = 0.9,
    tail: str = "complement",
) -> Any:
    """The seeds' KD loss: full [T, V] fp32 logits, log_softmax, gather top-k, KL + CE.

    ``tail`` is how the student's tail bucket log q_tail is formed: ``complement``
    log(1 - sum_S q) (no extra [T, V] buffer: the strongest naive baseline) or ``masked``
    logsumexp of log q over the non-S ids (a scatter(-inf) copy: the formula distill uses).
    """
    import torch

    logits = hidden @ weight.T  # [T, V], all tokens at once
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logq = torch.log_softmax(logits, dim=-1)
    log_q_s = logq.gather(1, t_ids)
    if tail == "complement":
        log_q_tail = torch.log1p(-log_q_s.exp().sum(-1, keepdim=True))
    else:
        log_q_tail = torch.logsumexp(logq.scatter(1, t_ids, float("-inf")), -1, keepdim=True)
    log_q = torch.cat([log_q_s, log_q_tail], dim=-1)
    lp = t_logprobs.to(logq.dtype)
    p_s = lp.exp()
    p_tail = (1.0 - p_s.sum(-1, keepdim=True)).clamp(min=0.0)
    p = torch.cat([p_s, p_tail], dim=-1)
    log_p = torch.cat([lp, p_tail.log()], dim=-1)
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    ce = -logq.gather(1, labels[:, None]).squeeze(1)
    return (kd_weight * kl + (1.0 - kd_weight) * ce).mean()


def step(side: str, inputs: tuple[Any, ...], args: argparse.Namespace) -> float:
    """One forward + backward of ``side``'s loss; returns the loss value."""
    if side == "ours":
        from distill.config import LossWeights
        from distill.student.losses import chunked_distill_loss

        weights = LossWeights(forward_kl=args.kd_weight, ce=1.0 - args.kd_weight)
        loss = chunked_distill_loss(*inputs, weights, args.chunk)[0]
    else:
        loss = naive_kd_loss(*inputs, kd_weight=args.kd_weight, tail=args.naive_tail)
    loss.backward()
    return float(loss.detach())


def check_equivalence(args: argparse.Namespace) -> dict[str, float]:
    """Assert both sides give the same loss and gradients on a small case; the max abs diffs."""
    import torch

    out: dict[str, float] = {}
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        res = {}
        for side in ("naive", "ours"):
            h, w, ids, lps, labels = make_inputs(300, 5000, 64, args.k, args.seed)
            h, w = (t.detach().to(dtype).requires_grad_() for t in (h, w))
            loss = step(side, (h, w, ids, lps, labels), args)
            res[side] = (torch.tensor(loss, dtype=torch.float64), h.grad, w.grad)
        name = str(dtype).removeprefix("torch.")
        for label, a, b in zip(
            ("loss", "grad_h", "grad_w"), res["naive"], res["ours"], strict=True
        ):
            diff = float((a.double() - b.double()).abs().max())
            out[f"{name}_{label}_max_abs_diff"] = diff
            scale = float(a.double().abs().max())
            if not torch.allclose(a.double(), b.double(), rtol=tol, atol=tol * max(scale, 1e-30)):
                sys.exit(f"equivalence check FAILED ({name} {label}): max abs diff {diff:.3e}")
    return out


# --------------------------------------------------------------------------------------------
# One side, in its own process
# --------------------------------------------------------------------------------------------


def cap_address_space(cap_bytes: int) -> bool:
    """Limit this process's address space to its current size + ``cap_bytes`` (CPU safety net).

    An allocation past it fails (MemoryError / torch allocator error) instead of the kernel's
    OOM killer picking a process on a shared machine.
    """
    vm = Path("/proc/self/status").read_text()
    size = next((int(x.split()[1]) for x in vm.splitlines() if x.startswith("VmSize:")), None)
    if size is None or cap_bytes <= 0:
        return False
    limit = size * 1024 + cap_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return True


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (Python, torch's CPU allocator or CUDA)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate" in text or "out of memory" in text)


def side_main(args: argparse.Namespace) -> int:
    """One side in this (fresh) process: inputs, warm-up, measure, print one JSON result line."""
    import torch

    tp = _teacher_pass()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    vocab = args.vocab[0]
    inputs = make_inputs(args.tokens, vocab, args.hidden, args.k, args.seed, device)
    h, w = inputs[0], inputs[1]
    warm = min(64, args.tokens)  # warm-up: one step on a tiny slice, full vocab
    step(
        args.side,
        (h.detach()[:warm].requires_grad_(), w, *(t[:warm] for t in inputs[2:])),
        args,
    )
    w.grad = None
    capped = cap_address_space(args.mem_cap_bytes) if device == "cpu" else False
    mem = tp.PeakMemory(device)
    mem.start()
    load0 = tp.loadavg()
    seconds: list[float] = []
    cpu_seconds: list[float] = []
    sys_seconds: list[float] = []
    loss = float("nan")
    try:
        for _ in range(args.repeats):
            h.grad = w.grad = None
            gc.collect()
            t0, c0 = time.perf_counter(), os.times()
            loss = step(args.side, inputs, args)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
            c1 = os.times()
            cpu_seconds.append(c1.user + c1.system - c0.user - c0.system)
            sys_seconds.append(c1.system - c0.system)
    except Exception as exc:  # only running out of memory is expected; the rest is re-raised
        if not is_oom(exc):
            raise
        print(f"OOM: {str(exc).splitlines()[0][:200]}", flush=True)
        return OOM_EXIT
    peak = mem.peak()
    best = min(seconds)
    result = {
        "side": args.side,
        "vocab": vocab,
        "tokens": args.tokens,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "sys_seconds": sys_seconds,
        "best_seconds": best,
        "tokens_per_s": args.tokens / best,
        "peak_bytes": peak,
        "baseline_bytes": mem.baseline,
        "hwm_reset": mem.hwm_reset,
        "address_space_capped": capped,
        "loadavg": [load0, tp.loadavg()],
        "loss": loss,
        "grad_h_norm": float(h.grad.double().norm()),
        "grad_w_norm": float(w.grad.double().norm()),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Orchestration and report
# --------------------------------------------------------------------------------------------


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def naive_estimate(tokens: int, vocab: int, tail: str) -> int:
    """Bytes naive needs, roughly: ``NAIVE_LIVE_BUFFERS[tail]`` fp32 [tokens, vocab] buffers."""
    return tokens * vocab * 4 * NAIVE_LIVE_BUFFERS[tail]


def spawn_side(
    args: argparse.Namespace, side: str, vocab: int, tokens: int, repeats: int
) -> tuple[dict[str, Any] | None, str]:
    """Run one side in a fresh Python process: (result, "") or (None, why it failed)."""
    cap = max(mem_available() - 2 * GiB, GiB) if args.device == "cpu" else 0
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side]
    cmd += ["--vocab", str(vocab), "--tokens", str(tokens), "--repeats", str(repeats)]
    cmd += ["--hidden", str(args.hidden), "--k", str(args.k), "--chunk", str(args.chunk)]
    cmd += ["--kd-weight", str(args.kd_weight), "--naive-tail", args.naive_tail]
    cmd += ["--seed", str(args.seed), "--threads", str(args.threads), "--device", args.device]
    cmd += ["--mem-cap-bytes", str(cap)]
    env = dict(os.environ)
    if args.threads > 0:  # before torch loads, so every OpenMP/MKL pool gets the same size
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    print(f"  {side}: vocab {vocab:,}, {tokens:,} tokens ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env, timeout=args.side_timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"took longer than --side-timeout {args.side_timeout:.0f} s"
    if proc.returncode == OOM_EXIT:
        oom = [x for x in proc.stdout.splitlines() if x.startswith("OOM:")]
        return None, f"ran out of memory (cap {cap / GiB:.1f} GiB): {(oom or [''])[0][5:]}"
    if proc.returncode < 0:
        return None, f"killed by signal {-proc.returncode}"
    if proc.returncode != 0:
        sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stdout}")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            r = json.loads(line[len(RESULT_PREFIX) :])
            print(
                f"    {r['tokens_per_s']:,.0f} tok/s, peak {r['peak_bytes'] / 2**20:,.1f} MiB",
                file=sys.stderr,
                flush=True,
            )
            return r, ""
    sys.exit(f"{side} side printed no result:\n{proc.stdout}")


def bench_vocab(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Naive at the largest token count (from ``--tokens``, halving) it runs at; ours there too."""
    notes: list[str] = []
    tokens = args.tokens
    naive = None
    while naive is None:
        if tokens < args.min_tokens:
            sys.exit(f"vocab {vocab}: naive ran at no token count >= {args.min_tokens}: {notes}")
        est = naive_estimate(tokens, vocab, args.naive_tail)
        if est > args.max_naive_gb * GiB:
            why = f"estimated {est / GiB:.1f} GiB > --max-naive-gb {args.max_naive_gb:g}"
        else:
            naive, why = spawn_side(args, "naive", vocab, tokens, args.repeats)
        if naive is None:
            notes.append(f"naive at {tokens:,} tokens not measured: {why}")
            print(f"    {notes[-1]}", file=sys.stderr, flush=True)
            tokens //= 2
    ours, why = spawn_side(args, "ours", vocab, tokens, args.repeats)
    if ours is None:
        sys.exit(f"ours failed at vocab {vocab}, {tokens} tokens: {why}")
    ours_requested = None
    if tokens < args.tokens:
        ours_requested, why = spawn_side(args, "ours", vocab, args.tokens, 1)
        if ours_requested is None:
            notes.append(f"ours at {args.tokens:,} tokens not measured: {why}")
    logits_bytes = tokens * vocab * 4
    row: dict[str, Any] = {
        "vocab": vocab,
        "tokens": tokens,
        "naive_peak_bytes": naive["peak_bytes"],
        "ours_peak_bytes": ours["peak_bytes"],
        "naive_tokens_per_s": naive["tokens_per_s"],
        "ours_tokens_per_s": ours["tokens_per_s"],
        "peak_ratio": ours["peak_bytes"] / naive["peak_bytes"],
        "tokens_per_s_ratio": ours["tokens_per_s"] / naive["tokens_per_s"],
        "requested_tokens": args.tokens,
        "chunk": args.chunk,
        "hidden": args.hidden,
        "k": args.k,
        "logits_bytes": logits_bytes,
        "naive_live_logits_buffers": naive["peak_bytes"] / logits_bytes,
        "loss_rel_diff": abs(ours["loss"] - naive["loss"]) / abs(naive["loss"]),
        "grad_norm_rel_diff": max(
            abs(ours[g] - naive[g]) / naive[g] for g in ("grad_h_norm", "grad_w_norm")
        ),
        "notes": notes,
        "naive": naive,
        "ours": ours,
    }
    if ours_requested is not None:
        # naive's peak is (nearly) linear in tokens: scale its measured [T, V]-buffer count
        row["ours_requested_peak_bytes"] = ours_requested["peak_bytes"]
        row["ours_requested_tokens_per_s"] = ours_requested["tokens_per_s"]
        row["naive_requested_peak_bytes_extrapolated"] = (
            row["naive_live_logits_buffers"] * args.tokens * vocab * 4
        )
        row["ours_requested"] = ours_requested
    return row


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_row(row: dict[str, Any]) -> None:
    """The side-by-side table of one vocab size."""
    o, n = row["ours"], row["naive"]
    name = VOCAB_NAMES.get(row["vocab"], "")
    used = f"{row['tokens']:,} tokens"
    if row["tokens"] < row["requested_tokens"]:
        used += f" (requested {row['requested_tokens']:,}: naive not measured there, see notes)"
    print()
    print(
        f"vocab {row['vocab']:,}{f' ({name})' if name else ''}: {used}, hidden {row['hidden']}, "
        f"k {row['k']}, chunk {row['chunk']}"
    )
    print(f"{'':26}{'ours':>12}{'naive':>12}{'ours/naive':>13}   target")
    pr, tr = row["peak_ratio"], row["tokens_per_s_ratio"]
    pmax, tmin = TARGETS["peak_ratio_max"], TARGETS["tokens_per_s_ratio_min"]
    print(
        f"{'peak memory (MiB)':26}{mib(o['peak_bytes']):>12}{mib(n['peak_bytes']):>12}"
        f"{pr:>12.3f}x   <= {pmax:.2f}x {verdict(pr <= pmax)}"
    )
    print(
        f"{'tokens/s':26}{o['tokens_per_s']:>12,.0f}{n['tokens_per_s']:>12,.0f}"
        f"{tr:>12.2f}x   >= {tmin:.2f}x {verdict(tr >= tmin)}"
    )
    print(
        f"{'step wall time (s)':26}{o['best_seconds']:>12.2f}{n['best_seconds']:>12.2f}"
        f"{o['best_seconds'] / n['best_seconds']:>12.2f}x"
    )
    oc, nc = (r["cpu_seconds"][r["seconds"].index(r["best_seconds"])] for r in (o, n))
    osy, nsy = (r["sys_seconds"][r["seconds"].index(r["best_seconds"])] for r in (o, n))
    print(f"{'step CPU time (s)':26}{oc:>12.2f}{nc:>12.2f}{oc / nc:>12.2f}x")
    print(f"{'  of which system (s)':26}{osy:>12.2f}{nsy:>12.2f}")
    print(
        f"{'loss':26}{o['loss']:>12.6f}{n['loss']:>12.6f}   rel diff {row['loss_rel_diff']:.1e}, "
        f"grad norms rel diff {row['grad_norm_rel_diff']:.1e}"
    )
    print(
        f"  [tokens, vocab] fp32 logits: {mib(row['logits_bytes'])} MiB (analytic); naive's peak "
        f"= {row['naive_live_logits_buffers']:.2f} of them"
    )
    for r in (n, o):
        secs = ", ".join(f"{s:.2f}" for s in r["seconds"])
        print(
            f"  {r['side']:<6} runs {secs} s, load {r['loadavg'][0]:.1f}->{r['loadavg'][1]:.1f}, "
            f"baseline RSS {mib(r['baseline_bytes'])} MiB"
        )
    if "ours_requested" in row:
        q = row["ours_requested"]
        est = row["naive_requested_peak_bytes_extrapolated"]
        print(
            f"  ours at {row['requested_tokens']:,} tokens: peak {mib(q['peak_bytes'])} MiB, "
            f"{q['tokens_per_s']:,.0f} tok/s; naive there, extrapolated (not measured): "
            f"{mib(est)} MiB -> {q['peak_bytes'] / est:.3f}x"
        )
    for note in row["notes"]:
        print(f"  note: {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (rows of the loss)")
    p.add_argument("--hidden", type=int, default=576, help="student hidden size (SmolLM2-135M)")
    p.add_argument("--k", type=int, default=16, help="stored teacher top-k")
    p.add_argument("--chunk", type=int, default=1024, help="ours: rows per chunk")
    p.add_argument("--kd-weight", type=float, default=0.9)
    p.add_argument(
        "--naive-tail",
        default="complement",
        choices=("complement", "masked"),
        help="naive's student tail: log(1 - sum_S q), or logsumexp over a scatter(-inf) copy",
    )
    p.add_argument("--repeats", type=int, default=2, help="steps per side (best wall time)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch/OpenMP threads per side (0 = torch default)"
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-naive-gb", type=float, default=16.0, help="skip naive above this est.")
    p.add_argument("--min-tokens", type=int, default=256, help="give up halving below this")
    p.add_argument("--side-timeout", type=float, default=240.0, help="seconds per side process")
    p.add_argument("--json", type=Path, default=None, help="write one row per vocab here")
    p.add_argument("--side", choices=("ours", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--mem-cap-bytes", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        return side_main(args)
    import torch

    tp = _teacher_pass()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    eq = check_equivalence(args)
    print(
        "equivalence (naive vs ours, 300 tokens x 5,000 vocab, hidden 64): max abs diff "
        + ", ".join(f"{k.removesuffix('_max_abs_diff')} {v:.1e}" for k, v in eq.items()),
        flush=True,
    )
    rows = [bench_vocab(args, v) for v in args.vocab]
    o = rows[0]["ours"]
    machine = {
        "cpu": tp.cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": o["threads"],
        "torch": o["torch"],
        "device": o["device"],
        "python": platform.python_version(),
    }
    mem_how = (
        "CUDA max_memory_allocated above allocated after inputs + warm-up"
        if args.device == "cuda"
        else "peak RSS (VmHWM) above VmRSS after inputs + warm-up"
        + (", HWM reset via clear_refs" if o["hwm_reset"] else ", no HWM reset")
    )
    print()
    print(
        f"student KD step (LM head + forward KL top-{args.k}+tail + CE, fwd+bwd), fp32, "
        f"kd_weight {args.kd_weight}, naive tail: {args.naive_tail}"
    )
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), device {machine['device']}, "
        f"python {machine['python']}"
    )
    print(f"peak memory = {mem_how}; tokens/s = best of {args.repeats}")
    for row in rows:
        print_row(row)
    if args.json:
        for row in rows:
            row["machine"] = machine
            row["equivalence"] = eq
            row["naive_tail"] = args.naive_tail
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
