"""The GPU check's measurements, one function per step: ``step_<name>(params, result)``.

check.py runs each step in its own process (``check.py --run-step NAME``) under a time limit;
a step writes its :class:`Result` to disk after every measurement, so one stopped for time
keeps what it had measured, and a step that fails takes nothing of the others with it.

    env          versions, the GPU and its dense peak FLOP/s (NVIDIA's datasheets)
    student      the student's KD step (LM head + loss, forward + backward) at 8,192 tokens,
                 vocab 151,936, hidden 896 and 2,048: distill's fused loss against the seeds'
                 full-logit loss and Liger-Kernel's LigerFusedLinearKLDivLoss, same inputs
    teacher      the teacher pass on random SmolLM2-135M- and Llama-3.2-1B-shaped models in
                 bfloat16: distill's pass against the seeds' loop (bench/teacher_pass.py)
    layered      the layered pass on the 1B model under a memory cap it does not fit in
    calibration  calibration files for ``distill-ctl cost-estimate --calibration``, checked by
                 pricing the demo job with them
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (ROOT, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import synth  # noqa: E402

GiB = 2**30
# Dense (no 2:4 sparsity) peak FLOP/s from NVIDIA's datasheets, matched against the name torch
# reports, most specific first: bf16/fp16 tensor cores, fp32 without TF32. The L4's as
# distill/cloud/cost.py has it.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12}),
    ("H200", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12}),
    ("H100 NVL", {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12}),
    ("H100 PCIE", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12}),  # SXM5
    ("L4", {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12}),
)
# a CPU dry run has no datasheet figure: a nominal peak, so that its numbers go through the
# same code (MFU, the calibration file) without meaning anything
CPU_NOMINAL_PEAK = 1e12

# Sizes: the GPU run's, and the CPU dry run's (--tiny), which only checks that the code runs.
FULL: dict[str, dict[str, Any]] = {
    "student": dict(tokens=8192, vocab=151936, hiddens=[896, 2048], k=16, chunk=1024, repeats=3),
    "teacher": dict(
        models=["smollm2-135m", "llama-1b"],
        samples=0,  # all 879 demo samples ...
        repeat=4,  # ... 4 times (218k tokens with SmolLM2's tokenizer)
        max_length=384,  # the demo job's teacher settings (jobs/demo.toml)
        batch_tokens=4096,
        head_chunk=256,
        samples_per_shard=128,
        big_batch_tokens=16384,
        k=16,
        naive_batch=8,
        repeats=2,
        dtype="bfloat16",
    ),
    "layered": dict(
        model="llama-1b",
        samples=0,
        repeat=2,
        max_length=384,
        batch_tokens=4096,
        head_chunk=256,
        samples_per_shard=128,
        k=16,
        cap_share=0.6,  # the memory cap: 60% of the checkpoint's bytes
        chunk_tokens=[2**20, 32768],  # teacher.chunk_tokens' default, and a small one
        dtype="bfloat16",
    ),
}
TINY: dict[str, dict[str, Any]] = {
    "student": dict(tokens=256, vocab=2048, hiddens=[32, 64], k=8, chunk=64, repeats=1),
    "teacher": dict(
        FULL["teacher"],
        samples=8,
        repeat=1,
        max_length=256,
        batch_tokens=512,
        head_chunk=64,
        samples_per_shard=8,
        big_batch_tokens=0,  # not measured
        k=8,
        naive_batch=4,
        repeats=1,
        dtype="float32",
    ),
    "layered": dict(
        FULL["layered"],
        samples=8,
        repeat=1,
        max_length=256,
        batch_tokens=512,
        head_chunk=64,
        samples_per_shard=4,
        k=8,
        chunk_tokens=[2**20, 256],
        dtype="float32",
    ),
}


@dataclasses.dataclass
class Params:
    """What check.py hands a step (as JSON)."""

    device: str  # "cuda" or "cpu"
    tiny: bool  # the dry run's sizes
    work: str  # scratch directory (checkpoints, shards)
    out: str  # $OUT: the calibration files go there
    tokenizer: str | None  # the carried SmolLM2 tokenizer (None: a synthetic one)
    deadline: float  # time.time() by which the step should be done: optional parts are skipped
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # earlier steps' results

    def left(self) -> float:
        return self.deadline - time.time()

    def sizes(self, step: str) -> dict[str, Any]:
        return (TINY if self.tiny else FULL)[step]

    def tokenizer_dir(self) -> tuple[Path, str]:
        # the tiny models' vocab (512) only fits the synthetic tokenizer's 259 ids
        carried = None if self.tiny or not self.tokenizer else Path(self.tokenizer)
        return synth.tokenizer_dir(carried, Path(self.work))

    def peak_flops(self, dtype: str) -> float | None:
        peaks = (self.inputs.get("env") or {}).get("peak_flops") or {}
        return peaks.get(dtype)

    @classmethod
    def load(cls, path: Path) -> Params:
        return cls(**json.loads(path.read_text()))


class Result:
    """A step's result: a dict rewritten to its file at every change (a step stopped for time
    keeps what it had); nested values changed in place need :meth:`flush`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def note(self, text: str) -> None:
        self.data.setdefault("notes", []).append(text)
        self.flush()

    def failed(self, where: str) -> str:
        """Record the exception being handled (the step goes on with its other measurements,
        and :meth:`check` fails it at the end); returns its last line."""
        import traceback

        text = traceback.format_exc(limit=6)
        self.data.setdefault("failures", []).append({"where": where, "traceback": text[-2000:]})
        self.flush()
        return text.strip().splitlines()[-1][:300]

    def check(self) -> None:
        """Fail the step if a measurement failed (the others' numbers are kept)."""
        failures = self.data.get("failures") or []
        if failures:
            last = failures[-1]["traceback"].strip().splitlines()[-1]
            where = ", ".join(f["where"] for f in failures)
            raise RuntimeError(f"{len(failures)} measurement(s) failed ({where}): {last}")

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def gpu_peak(name: str) -> tuple[str, dict[str, float]] | None:
    """(the datasheet entry, dense peak FLOP/s by dtype) for a GPU name, None if unknown."""
    upper = name.upper()
    for key, peaks in GPU_PEAKS:
        if key in upper:
            return key, peaks
    return None


@functools.cache
def load_bench(name: str) -> Any:
    """bench/<name>.py as a module (its helpers are reused: same loops, same comparisons)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def free(device: str) -> None:
    """Return freed CUDA memory to the device (a CPU run skips it: gc.collect alone takes
    ~0.3 s once transformers is imported)."""
    if device.startswith("cuda"):
        import torch

        gc.collect()
        torch.cuda.empty_cache()


class Peak:
    """Peak memory above a baseline taken at construction: CUDA allocator statistics, or on
    a CPU the RSS high-water mark (bench/teacher_pass.py's PeakMemory without its gc.collect)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            tp = load_bench("teacher_pass")
            tp.reset_hwm()
            self.base = tp.proc_status_kib()["VmRSS"] * 1024

    def peak(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return load_bench("teacher_pass").proc_status_kib()["VmHWM"] * 1024 - self.base


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc)


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"


# --- env ---------------------------------------------------------------------------------------

VERSIONS = (
    "torch",
    "transformers",
    "triton",
    "accelerate",
    "safetensors",
    "tokenizers",
    "numpy",
    "pydantic",
    "rich",
    "typer",
    "zstandard",
    "pytest",
    "liger-kernel",
    "bitsandbytes",
    "matplotlib",
)


def step_env(p: Params, r: Result) -> None:
    """Versions, CPU, the GPU and its peak FLOP/s (the MFU's denominator)."""
    from importlib import metadata

    import torch

    tp = load_bench("teacher_pass")
    versions: dict[str, str | None] = {}
    for dist in VERSIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    r["python"] = platform.python_version()
    r["versions"] = versions
    r["torch_cuda"] = torch.version.cuda
    r["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)  # fp32 sides: full fp32?
    r["cpu"] = tp.cpu_model()
    r["cores"] = os.cpu_count()
    if p.device != "cuda":
        r["gpu"] = None
        r["peak_flops"] = dict.fromkeys(("bfloat16", "float16", "float32"), CPU_NOMINAL_PEAK)
        r["peak_source"] = "nominal 1 TFLOP/s: a CPU dry run, not a datasheet figure"
        return
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"--device cuda, but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
            "CUDA device"
        )
    props = torch.cuda.get_device_properties(0)
    r["gpu"] = {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_bytes": props.total_memory,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
    }
    found = gpu_peak(props.name)
    r["peak_flops"] = found[1] if found else None
    r["peak_source"] = (
        f"NVIDIA datasheet, dense (no sparsity), {found[0]}"
        if found
        else f"{props.name} is not in bench/gpu/steps.py's GPU_PEAKS: no MFU"
    )
    if shutil.which("nvidia-smi"):
        import subprocess

        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        r["nvidia_smi"] = q.stdout.strip()


# --- student: the KD step ----------------------------------------------------------------------


def _student_inputs(cfg: dict[str, Any], hidden: int, device: str) -> tuple[Any, ...]:
    """bench/student_step.py's seeded inputs, the teacher's log-probs renormalised over its k
    ids (float32): its tail bucket is empty, so the bucketed forward KL of distill and the seeds
    equals the full-vocab KL(p || q) that Liger computes from the dense target, and all three
    must give the same loss."""
    ss = load_bench("student_step")
    h, w, ids, lps, labels = ss.make_inputs(
        cfg["tokens"], cfg["vocab"], hidden, cfg["k"], 0, device
    )
    lps = lps.float()
    lps = lps - lps.logsumexp(-1, keepdim=True)
    return h, w, ids, lps, labels


def _liger(device: str) -> tuple[Any, str]:
    """(Liger's fused linear KL loss, a description) or (None, why not). Imported here only:
    it needs Triton and a GPU."""
    if device != "cuda":
        return None, "skipped: Liger-Kernel needs CUDA (Triton); this is a CPU run"
    try:
        from importlib import metadata

        from liger_kernel.transformers import LigerFusedLinearKLDivLoss
    except Exception as e:  # not installed, or not importable with this torch/transformers
        return None, f"skipped: liger-kernel is not importable ({first_line(e)})"
    return (
        LigerFusedLinearKLDivLoss(reduction="batchmean"),
        f"liger-kernel {metadata.version('liger-kernel')}: LigerFusedLinearKLDivLoss "
        "(reduction batchmean) on the dense [tokens, vocab] fp32 target scattered from the "
        "sparse one inside the step",
    )


def _student_side(side: str, chunk: int, liger: Any, ss: Any) -> Any:
    """The step function of one side: (h, w, ids, lps, labels) -> loss, after backward
    (``ss``: bench/student_step.py, the seeds' loss)."""

    def naive(h: Any, w: Any, ids: Any, lps: Any, labels: Any) -> float:
        loss = ss.naive_kd_loss(h, w, ids, lps, labels, kd_weight=1.0, tail="complement")
        loss.backward()
        return loss.item()

    def ours(h: Any, w: Any, ids: Any, lps: Any, labels: Any) -> float:
        from distill.config import LossWeights
        from distill.student.losses import chunked_distill_loss

        weights = LossWeights(forward_kl=1.0, ce=0.0)
        loss = chunked_distill_loss(h, w, ids, lps, labels, weights, chunk)[0]
        loss.backward()
        return loss.item()

    def liger_step(h: Any, w: Any, ids: Any, lps: Any, labels: Any) -> float:
        import torch

        dense = torch.zeros((h.shape[0], w.shape[0]), dtype=torch.float32, device=h.device)
        dense.scatter_(1, ids, lps.exp())
        loss = liger(h, w, dense)
        loss.backward()
        return loss.item()

    return {"naive": naive, "ours": ours, "liger": liger_step}[side]


def _measure(fn: Any, inputs: tuple[Any, ...], repeats: int, device: str) -> dict[str, Any]:
    """Warm-up step, then ``repeats`` timed steps: best tokens/s, peak memory above the inputs."""
    h, w = inputs[0], inputs[1]
    try:
        fn(*inputs)  # warm-up at full size (Triton JIT, cuBLAS heuristics, allocator)
        h.grad = w.grad = None
        free(device)
        mem = Peak(device)
        seconds, loss = [], float("nan")
        for _ in range(repeats):
            h.grad = w.grad = None
            sync(device)
            t0 = time.perf_counter()
            loss = fn(*inputs)
            sync(device)
            seconds.append(time.perf_counter() - t0)
        peak = mem.peak()
    except Exception as e:
        if not is_oom(e):
            raise
        h.grad = w.grad = None
        free(device)
        return {"error": f"out of memory: {first_line(e)}"}
    out = {
        "tokens_per_s": h.shape[0] / min(seconds),
        "best_seconds": min(seconds),
        "seconds": seconds,
        "peak_bytes": peak,
        "loss": loss,
        "grad_h_norm": float(h.grad.double().norm()),
        "grad_w_norm": float(w.grad.double().norm()),
    }
    h.grad = w.grad = None
    free(device)
    return out


def _same_loss(sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each side's loss and gradient norms against the seeds' (naive) ones."""
    ref = sides.get("naive", {})
    if "loss" not in ref:
        return {"ok": None, "why": "naive was not measured"}
    out: dict[str, Any] = {"ok": True, "loss_rtol": 1e-4, "grad_norm_rtol": 1e-3}
    for side, m in sides.items():
        if side == "naive" or "loss" not in m:
            continue
        d_loss = abs(m["loss"] - ref["loss"]) / abs(ref["loss"])
        d_grad = max(abs(m[g] - ref[g]) / ref[g] for g in ("grad_h_norm", "grad_w_norm"))
        out[side] = {"loss_rel_diff": d_loss, "grad_norm_rel_diff": d_grad}
        out["ok"] = out["ok"] and d_loss <= 1e-4 and d_grad <= 1e-3
    return out


def step_student(p: Params, r: Result) -> None:
    """The KD step at each hidden size: naive, ours, Liger on the same inputs."""
    cfg = p.sizes("student")
    device = p.device
    liger, liger_what = _liger(device)
    ss = load_bench("student_step")
    r["config"] = {
        **{k: v for k, v in cfg.items()},
        "loss": "forward KL (top-k + tail bucket) at temperature 1, kd_weight 1 (no CE: "
        "Liger's fused linear KL has none); fp32 hidden and LM head; the teacher's top-k "
        "renormalised (empty tail), so all sides compute the same KL(p || q)",
        "naive": "bench/student_step.py naive_kd_loss: full [tokens, vocab] fp32 logits, "
        "log_softmax, gather, tail log(1 - sum_S q)",
        "ours": f"distill chunked_distill_loss (fused kernel), chunk {cfg['chunk']}",
        "liger": liger_what,
        "peak_memory": "max_memory_allocated above the inputs (hidden, weight, targets), "
        "gradients included"
        if device == "cuda"
        else "peak RSS above the inputs",
        "tokens_per_s": f"best of {cfg['repeats']} after a full-size warm-up step",
    }
    for hidden in cfg["hiddens"]:
        row: dict[str, Any] = {"hidden": hidden, "sides": {}}
        r[f"hidden_{hidden}"] = row
        inputs = _student_inputs(cfg, hidden, device)
        row["logits_bytes"] = cfg["tokens"] * cfg["vocab"] * 4
        for side in ("naive", "ours", "liger"):
            if side == "liger" and liger is None:
                row["sides"][side] = {"skipped": liger_what}
            elif p.left() < 15:
                row["sides"][side] = {"skipped": "out of time"}
            else:
                fn = _student_side(side, cfg["chunk"], liger, ss)
                try:
                    row["sides"][side] = _measure(fn, inputs, cfg["repeats"], device)
                except Exception:
                    row["sides"][side] = {"error": r.failed(f"student {side} {hidden}")}
                    inputs[0].grad = inputs[1].grad = None
                    free(device)
            r.flush()
        row["check"] = _same_loss(row["sides"])
        r.flush()
        del inputs
        free(device)
    r.check()


# --- teacher: the teacher pass -----------------------------------------------------------------


def _counts(samples: list[Any], batch_tokens: int, per_shard: int) -> Any:
    """distill/cloud/cost.py's DataCounts for the pass over ``samples`` as the job batches it."""
    from distill.cloud.cost import DataCounts
    from distill.teacher.batching import token_budget_batches

    c = DataCounts(samples=len(samples))
    for lo in range(0, len(samples), per_shard):
        lengths = [len(s.input_ids) for s in samples[lo : lo + per_shard]]
        c.shards += 1
        for batch in token_budget_batches(lengths, batch_tokens):
            longest = lengths[batch[0]]
            c.padded_tokens += len(batch) * longest
            c.attention_token_ctx += len(batch) * longest * longest
    c.tokens = sum(len(s.input_ids) for s in samples)
    c.target_tokens = sum(s.n_targets for s in samples)
    return c


def _timed(fn: Any, device: str, tokens: int) -> dict[str, Any]:
    """One pass: seconds, tokens/s, peak memory above the memory before it."""
    free(device)
    mem = Peak(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_bytes": mem.peak()}


def _pass_with_targets(
    model: Any, samples: list[Any], spec: Any, codec: Any, cfg: dict[str, Any], outdir: Path
) -> None:
    """distill's pass with a job's targets and codec (the demo job's): compute_targets per
    shard, then write_shard, as bench/teacher_pass.py run_ours does for top-k."""
    from distill.format.codec import ShardFormat
    from distill.format.shards import shard_name, write_shard
    from distill.teacher.extract import compute_targets

    fmt = ShardFormat(codec, spec, int(model.get_output_embeddings().weight.shape[0]))
    per = cfg["samples_per_shard"]
    outdir.mkdir(parents=True, exist_ok=True)
    for idx, lo in enumerate(range(0, len(samples), per)):
        targets = compute_targets(
            model, samples[lo : lo + per], spec, cfg["batch_tokens"], cfg["head_chunk"]
        )
        write_shard(outdir / shard_name(idx), targets, fmt)


def _teacher_model(
    p: Params, cfg: dict[str, Any], name: str, samples: list[Any], job: Any, r: Result
) -> None:
    """ours vs naive (alternating, best of ``repeats``) on one model; MFU; target agreement:
    ``r[name]``, flushed after every pass."""
    from distill.cloud.cost import total_flops
    from distill.teacher.fit import teacher_profile

    tp = load_bench("teacher_pass")
    device, dtype = p.device, cfg["dtype"]
    fields = synth.shape(name, p.tiny)
    t0 = time.perf_counter()
    model = synth.build_model(fields, device, dtype)
    build_s = time.perf_counter() - t0
    prof = teacher_profile(model.config)
    counts = _counts(samples, cfg["batch_tokens"], cfg["samples_per_shard"])
    fpt = total_flops(prof, counts) / counts.tokens
    peak = p.peak_flops(dtype)
    tokens = counts.tokens
    k, bt, hc, per = cfg["k"], cfg["batch_tokens"], cfg["head_chunk"], cfg["samples_per_shard"]
    tmp = Path(tempfile.mkdtemp(prefix=f"teacher-{name}-", dir=p.work))
    out: dict[str, Any] = {
        "shape": fields,
        "params": prof.params,
        "non_embedding_params": prof.non_embedding_params,
        "build_seconds": build_s,
        "flops_per_token": fpt,
        "tokens": tokens,
        "target_tokens": counts.target_tokens,
        "padded_tokens": counts.padded_tokens,
        "runs": [],
    }
    r[name] = out

    def ours(outdir: Path | None, batch_tokens: int = bt) -> None:
        tp.run_ours(model, samples, k, batch_tokens, hc, per, outdir)

    def naive(outdir: Path | None) -> None:
        tp.run_naive(model, samples, k, cfg["naive_batch"], outdir)

    tp.run_naive(model, samples[:2], k, cfg["naive_batch"], None)  # warm-up: one tiny batch
    tp.run_ours(model, samples[:2], k, bt, hc, per, None)
    for rep in range(cfg["repeats"]):
        for side, fn in (("naive", naive), ("ours", ours)):
            if rep and p.left() < 30:
                out.setdefault("notes", []).append(f"{side} repeat {rep + 1}: out of time")
                continue
            d = tmp / f"{side}-{rep}"
            d.mkdir()
            out["runs"].append({"side": side, **_timed(lambda f=fn, d=d: f(d), device, tokens)})
            r.flush()
    big = cfg["big_batch_tokens"]
    extras = (
        ("ours_no_write", lambda: ours(None)),  # the pass alone: encoding the shards costs
        *([(f"ours_batch_tokens_{big}", lambda: ours(None, big))] if big else []),
        (
            "ours_demo_targets",
            lambda: _pass_with_targets(
                model, samples, job.targets.spec(), job.targets.codec_spec(), cfg, tmp / "demo"
            ),
        ),
    )
    for key, fn in extras:
        if p.left() < 20:
            out.setdefault("notes", []).append(f"{key}: out of time")
            continue
        out[key] = _timed(fn, device, tokens)
        r.flush()
    for side in ("ours", "naive"):
        mine = [x for x in out["runs"] if x["side"] == side]
        if mine:
            out[side] = {
                **max(mine, key=lambda x: x["tokens_per_s"]),
                "peak_bytes": max(x["peak_bytes"] for x in mine),
            }
    for key in ("ours", "naive", *(k_ for k_, _ in extras)):
        if key in out and peak:
            out[key]["mfu"] = out[key]["tokens_per_s"] * fpt / peak
    if "ours" in out and "naive" in out:
        out["tokens_per_s_ratio"] = out["ours"]["tokens_per_s"] / out["naive"]["tokens_per_s"]
        # ours: the default codec's log8 codes (|error| <= 20/510 = 0.039); the seeds': float16
        tol = max(tp.LOGPROB_TOL[dtype], 0.05)
        out["agreement"] = tp.compare_targets(tmp / "ours-0", tmp / "naive-0", tol)
    if "ours_demo_targets" in out:
        out["ours_demo_targets"]["targets"] = job.targets.spec().info()
    r.flush()
    shutil.rmtree(tmp, ignore_errors=True)  # the model goes with this frame: the caller frees it


def step_teacher(p: Params, r: Result) -> None:
    """The teacher pass on each model shape, against the seeds' loop."""
    from distill import models
    from distill.config import load_job

    cfg = p.sizes("teacher")
    tok_dir, tok_what = p.tokenizer_dir()
    tokenizer = models.load_tokenizer(tok_dir)
    samples = synth.demo_samples(tokenizer, cfg["samples"], cfg["max_length"], cfg["repeat"])
    job = load_job(ROOT / "jobs" / "demo.toml")  # its targets and codec for ours_demo_targets
    r["config"] = {
        **cfg,
        "tokenizer": tok_what,
        "samples": len(samples),
        "data": f"data/demo/train.jsonl x {cfg['repeat']}, truncated right at "
        f"{cfg['max_length']} tokens",
        "ours": f"distill's pass (bench/teacher_pass.py run_ours): top-{cfg['k']} written in "
        "the default codec (synchronously; the product overlaps it with the next shard), "
        f"batch_tokens {cfg['batch_tokens']}, head_chunk {cfg['head_chunk']}, "
        f"samples_per_shard {cfg['samples_per_shard']} (jobs/demo.toml's teacher settings)",
        "naive": f"the seeds' loop (bench/teacher_pass.py run_naive): batches of "
        f"{cfg['naive_batch']} samples, full logits, top-{cfg['k']} everywhere",
        "mfu": "tokens/s x FLOPs per token / the GPU's dense peak; FLOPs per token by "
        "distill/cloud/cost.py's formula over ours' batches, for both sides",
        "tokens_per_s": "real (unpadded) tokens over the pass, writing the results included, "
        f"model built before; best of {cfg['repeats']} alternating rounds",
    }
    for name in cfg["models"]:
        if p.left() < 40:
            r.note(f"{name}: out of time")
            continue
        try:
            _teacher_model(p, cfg, name, samples, job, r)
        except Exception:
            (r.data.get(name) or {})["error"] = r.failed(f"teacher {name}")
            r.flush()
        free(p.device)
    r.check()


# --- layered: a teacher that does not fit ------------------------------------------------------


def _layered_run(
    p: Params,
    r: Result,
    ckpt: Path,
    shards: list[list[Any]],
    sizes: list[int],
    spec: Any,
    chunk_tokens: int,
) -> list[Any] | None:
    """One layered pass over ``shards`` at ``chunk_tokens``: ``r[layered_<chunk_tokens>]``,
    and its targets (None if it ran out of memory under the cap)."""
    from distill.teacher.layered import LayeredTeacher, chunk_groups

    cfg, device = p.sizes("layered"), p.device
    teacher = LayeredTeacher(ckpt, cfg["dtype"], device)
    results: list[Any] = []

    def run() -> None:
        for group in chunk_groups(sizes, chunk_tokens):
            results.extend(
                teacher.compute_groups(
                    [shards[i] for i in group], spec, cfg["batch_tokens"], cfg["head_chunk"]
                )
            )

    tokens = sum(sizes)
    key = f"layered_{chunk_tokens}"
    try:
        m = _timed(run, device, tokens)
    except Exception as e:
        if not is_oom(e):
            raise
        r[key] = {"chunk_tokens": chunk_tokens, "error": f"out of memory: {first_line(e)}"}
        free(device)
        return None
    st = teacher.stats
    r[key] = {
        **m,
        "chunk_tokens": chunk_tokens,
        "chunks": st.chunks,
        "wait_share": st.wait_seconds / m["seconds"],
        "read_share": st.load_seconds / m["seconds"],
        "weight_bytes_read": st.weight_bytes,
        "weight_bytes_per_token": st.weight_bytes / tokens,
    }
    return results


def step_layered(p: Params, r: Result) -> None:
    """The layered pass on a checkpoint larger than the memory it is given."""
    import torch

    from distill import models
    from distill.format.spec import TargetSpec

    cfg = p.sizes("layered")
    device, dtype = p.device, cfg["dtype"]
    tok_dir, tok_what = p.tokenizer_dir()
    tokenizer = models.load_tokenizer(tok_dir)
    samples = synth.demo_samples(tokenizer, cfg["samples"], cfg["max_length"], cfg["repeat"])
    per = cfg["samples_per_shard"]
    shards = [samples[i : i + per] for i in range(0, len(samples), per)]
    sizes = [sum(len(s.input_ids) for s in g) for g in shards]
    tokens = sum(sizes)
    spec = TargetSpec("topk", cfg["k"])
    t0 = time.perf_counter()
    ckpt = synth.save_model(
        synth.shape(cfg["model"], p.tiny), Path(p.work) / "layered-model", tok_dir
    )
    weight_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    r["config"] = {
        **cfg,
        "tokenizer": tok_what,
        "samples": len(samples),
        "tokens": tokens,
        "checkpoint_bytes": weight_bytes,
        "checkpoint_write_seconds": time.perf_counter() - t0,
        "tokens_per_s": "real tokens over the whole pass, reading the weights included "
        "(the resident side: its load too)",
        "weights": "a safetensors checkpoint just written: read from the page cache, not a disk",
    }
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        cap = int(cfg["cap_share"] * weight_bytes)
        torch.cuda.set_per_process_memory_fraction(cap / total)
        r["cap_bytes"] = cap
        try:
            m = models.load_model(ckpt, dtype, device)
            r["resident_under_cap"] = "loaded: the cap does not bind"
            del m
        except Exception as e:
            if is_oom(e):
                r["resident_under_cap"] = f"does not fit, as intended ({first_line(e)[:160]})"
            else:
                r["resident_under_cap"] = "failed: " + r.failed("resident under the cap")
        free(device)
    else:
        r["cap_bytes"] = None
        r["resident_under_cap"] = "not tried: a CPU run has no device memory to cap"
    first: list[Any] | None = None
    try:
        for chunk_tokens in cfg["chunk_tokens"]:
            if p.left() < 25:
                r.note(f"layered at chunk_tokens {chunk_tokens}: out of time")
                continue
            try:
                results = _layered_run(p, r, ckpt, shards, sizes, spec, chunk_tokens)
            except Exception:
                r[f"layered_{chunk_tokens}"] = {"error": r.failed(f"layered {chunk_tokens}")}
                free(device)
                continue
            if first is None:
                first = results
    finally:
        if device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    if p.left() < 20:
        r.note("resident (uncapped) comparison: out of time")
    else:
        try:
            _resident_against(p, r, ckpt, shards, spec, first)
        except Exception:
            r["resident"] = {"error": r.failed("resident")}
    free(device)
    r.check()


def _resident_against(
    p: Params, r: Result, ckpt: Path, shards: list[list[Any]], spec: Any, first: list[Any] | None
) -> None:
    """The resident pass without a cap (load included): ``r["resident"]``, the layered passes'
    ratios to it, and the targets' agreement with the first layered pass."""
    import numpy as np

    from distill import models
    from distill.teacher.extract import compute_targets

    cfg, device = p.sizes("layered"), p.device
    dtype, tokens = cfg["dtype"], sum(len(s.input_ids) for g in shards for s in g)
    holder: dict[str, Any] = {}

    def resident() -> None:
        t1 = time.perf_counter()
        holder["model"] = models.load_model(ckpt, dtype, device).eval()
        holder["load_s"] = time.perf_counter() - t1
        holder["targets"] = [
            t
            for g in shards
            for t in compute_targets(
                holder["model"], g, spec, cfg["batch_tokens"], cfg["head_chunk"]
            )
        ]

    m = _timed(resident, device, tokens)
    r["resident"] = {**m, "load_seconds": holder["load_s"], "cap_bytes": None}
    if first is not None:
        want = holder["targets"]
        got = [t for group in first for t in group]
        ids = np.concatenate([t.target_ids for t in want]) == np.concatenate(
            [t.target_ids for t in got]
        )
        diff = np.abs(
            np.concatenate([t.target_logprobs for t in want])
            - np.concatenate([t.target_logprobs for t in got])
        )
        r["agreement"] = {"ids_equal": float(ids.mean()), "max_logprob_diff": float(diff.max())}
    for key, v in list(r.data.items()):
        if key.startswith("layered_") and "tokens_per_s" in v:
            v["tokens_per_s_ratio"] = v["tokens_per_s"] / m["tokens_per_s"]
    r.flush()
    holder.clear()


# --- calibration -------------------------------------------------------------------------------

CALIBRATIONS = {"calibration.json": "smollm2-135m", "calibration-1b.json": "llama-1b"}


def calibration_body(p: Params, name: str, m: dict[str, Any]) -> dict[str, Any] | None:
    """The calibration file of one model's teacher pass (the demo job's targets if measured,
    else top-k), in the format ``cost-estimate --calibration`` reads."""
    env = p.inputs.get("env") or {}
    teacher = p.inputs.get("teacher") or {}
    cfg = teacher.get("config") or {}
    run = m.get("ours_demo_targets") or m.get("ours")
    dtype = cfg.get("dtype", "bfloat16")
    peak = p.peak_flops(dtype)
    if run is None or peak is None:
        return None
    gpu = (env.get("gpu") or {}).get("name") or "cpu (dry run)"
    targets = run.get("targets") or {"kind": "topk", "k": cfg.get("k")}
    return {
        "model": f"{name} shape, random weights (bench/gpu/synth.py)",
        "tokens_per_s": run["tokens_per_s"],
        "gpu": gpu,
        "gpu_peak_flops": peak,
        "dtype": dtype,
        "flops_per_token": m["flops_per_token"],
        "tokens": m["tokens"],
        "target_tokens": m["target_tokens"],
        "mfu": run["tokens_per_s"] * m["flops_per_token"] / peak,
        "targets": targets,
        "batch_tokens": cfg.get("batch_tokens"),
        "head_chunk": cfg.get("head_chunk"),
        "tokenizer": cfg.get("tokenizer"),
        "measured_by": "bench/gpu/check.py (teacher step)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": ((env.get("versions") or {}).get("torch")),
        "dry_run": p.tiny,
        "note": f"measured on {gpu}, not an NVIDIA L4: distill-ctl cost-estimate --calibration "
        "scales it to the L4 by the dense-peak FLOP ratio (the same MFU assumed on the L4)",
    }


def step_calibration(p: Params, r: Result) -> None:
    """Write the calibration files into $OUT and price the demo job with the first one."""
    from distill.cloud.cost import CostOptions, estimate_cost
    from distill.config import load_job

    teacher = p.inputs.get("teacher") or {}
    written = {}
    for fname, name in CALIBRATIONS.items():
        body = calibration_body(p, name, teacher.get(name) or {})
        if body is None:
            r.note(f"{fname}: no teacher-pass measurement of {name} (or no peak FLOP/s)")
            continue
        path = Path(p.out) / fname
        path.write_text(json.dumps(body, indent=1) + "\n")
        written[fname] = body
    r["written"] = list(written)
    if "calibration.json" not in written:
        raise RuntimeError("no calibration.json: the teacher step measured no SmolLM2-shaped pass")
    # price the demo job with it, as `distill-ctl cost-estimate --job jobs/demo.toml
    # --calibration calibration.json` would (a config + tokenizer stand in for SmolLM2)
    tok_dir, tok_what = p.tokenizer_dir()
    model_dir = Path(p.work) / "smollm2-135m-config"
    synth.llama_config(synth.shape("smollm2-135m", p.tiny)).save_pretrained(model_dir)
    synth.copy_tokenizer(tok_dir, model_dir)
    sets = [f'teacher.model="{model_dir}"']
    if p.tiny or "carried" not in tok_what:  # the byte-level tokenizer's samples run longer
        sets += ['data.truncation="right"']
    if p.tiny:
        sets += ["data.max_samples=32"]
    job = load_job(ROOT / "jobs" / "demo.toml", sets)
    cal = Path(p.out) / "calibration.json"
    est = estimate_cost(job, CostOptions(calibration=cal))
    base = estimate_cost(job)
    r["demo_job_estimate"] = {
        "job": "jobs/demo.toml" + (f" with {', '.join(sets[1:])}" if sets[1:] else ""),
        "tokenizer": tok_what,
        "mfu": est.mfu,
        "l4_tokens_per_s": est.tokens_per_s,
        "compute_hours": est.compute_hours,
        "spot_usd": est.usd["total_spot"],
        "uncalibrated_l4_tokens_per_s": base.tokens_per_s,
        "uncalibrated_mfu": base.mfu,
        "mfu_row": dict(est.assumptions())["MFU (model FLOPs utilisation)"],
    }


STEPS = {
    "env": step_env,
    "student": step_student,
    "teacher": step_teacher,
    "layered": step_layered,
    "calibration": step_calibration,
}
