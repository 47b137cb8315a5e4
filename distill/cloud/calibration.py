"""``--calibration FILE``: the MFU a measured run achieved, applied to the job on the L4.

Measured on an L4, or on another GPU whose dense peak the file states (``gpu_peak_flops``):
its MFU is then measured against that peak and assumed on the L4, i.e. its throughput is
scaled by the FLOP ratio (bench/gpu/check.py writes such a file), and the estimate says so."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.cloud.counting import DataCounts
from distill.cloud.l4 import L4_NAME, L4_PEAK_FLOPS
from distill.cloud.prices import read_table
from distill.config import Job
from distill.errors import DistillError
from distill.teacher.fit import TeacherProfile, teacher_profile


@dataclass
class Calibration:
    path: Path
    model: str
    gpu: str
    tokens_per_s: float
    mfu: float  # achieved: tokens/s x FLOPs per token / the measuring GPU's peak
    peak_flops: float = L4_PEAK_FLOPS["bfloat16"]  # that GPU's dense peak at the run's dtype
    on_l4: bool = True  # False: measured on another GPU, scaled to the L4 by the FLOP ratio


def _positive(raw: dict[str, Any], key: str) -> float | None:
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise DistillError(f"{key} must be > 0, got {v!r}")
    return float(v)


def load_calibration(path: Path, job: Job, p: TeacherProfile, c: DataCounts) -> Calibration:
    """MFU achieved by a run measured on an L4 (``tokens_per_s`` of real tokens, ``model``).

    Also reads bench/teacher_pass.py's summary (``ours_tokens_per_s``, ``machine.cuda_device``).
    Its FLOPs per token are ``flops_per_token`` if given, else computed from the named model's
    config with the job's padding and attention context and the run's target share (its
    ``tokens``/``target_tokens`` if given, else the job's).

    A run on another GPU (``gpu`` not an L4) needs ``gpu_peak_flops``, that GPU's dense peak
    FLOP/s at the run's ``dtype``: its MFU is measured against that peak and assumed on the L4.
    """
    raw = read_table(path, "calibration file")
    tps = raw.get("tokens_per_s", raw.get("ours_tokens_per_s"))
    if isinstance(tps, bool) or not isinstance(tps, int | float) or not tps > 0:
        raise DistillError(f"{path}: needs tokens_per_s > 0 (real tokens per second on an L4)")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise DistillError(f"{path}: needs 'model', the teacher the throughput was measured with")
    machine_raw = raw.get("machine")
    machine = machine_raw if isinstance(machine_raw, dict) else {}
    gpu = raw.get("gpu") or raw.get("cuda_device") or machine.get("cuda_device") or ""
    on_l4 = isinstance(gpu, str) and "L4" in re.split(r"[^A-Z0-9]+", gpu.upper())
    try:
        other_peak = _positive(raw, "gpu_peak_flops")
    except DistillError as e:
        raise DistillError(f"{path}: {e}") from None
    if not isinstance(gpu, str) or not gpu or (not on_l4 and other_peak is None):
        raise DistillError(
            f"{path}: measured on {gpu or 'an unnamed device'!r}, not an {L4_NAME} "
            "(set 'gpu' to the device name, e.g. \"NVIDIA L4\"; a run on another GPU also needs "
            "'gpu_peak_flops', its dense peak FLOP/s at the run's dtype, to be scaled to the L4)"
        )
    dtype = raw.get("dtype", job.teacher.dtype)
    if dtype not in L4_PEAK_FLOPS:
        raise DistillError(f"{path}: dtype {dtype!r} is not one of {', '.join(L4_PEAK_FLOPS)}")
    peak = L4_PEAK_FLOPS[dtype] if on_l4 or other_peak is None else other_peak
    if "flops_per_token" in raw:
        fpt = raw["flops_per_token"]
        if isinstance(fpt, bool) or not isinstance(fpt, int | float) or not fpt > 0:
            raise DistillError(f"{path}: flops_per_token must be > 0, got {fpt!r}")
    else:
        cp = p if model == job.teacher.model else _profile_of(model, path)
        share = c.target_tokens / c.tokens
        if isinstance(raw.get("tokens"), int) and isinstance(raw.get("target_tokens"), int):
            share = raw["target_tokens"] / max(raw["tokens"], 1)
        pad = c.padded_tokens / c.tokens
        ctx = c.attention_token_ctx / max(c.padded_tokens, 1)
        fpt = pad * (2 * cp.non_embedding_params + 2 * cp.layers * cp.q_dim * ctx)
        fpt += share * 2 * cp.hidden * cp.vocab
    mfu = float(tps) * float(fpt) / peak
    if not 0 < mfu <= 1:
        raise DistillError(
            f"{path}: {tps:,.0f} tokens/s of {model} means MFU {mfu:.2f} on "
            f"{'an L4' if on_l4 else gpu}, which is impossible; check tokens_per_s, model and "
            "flops_per_token" + ("" if on_l4 else " and gpu_peak_flops")
        )
    return Calibration(path, model, gpu, float(tps), mfu, peak, on_l4)


def _profile_of(model: str, where: Path) -> TeacherProfile:
    from transformers import AutoConfig

    from distill import models

    try:
        planning = models.resolve_model(model, weights=False)
        return teacher_profile(AutoConfig.from_pretrained(planning))
    except DistillError as e:
        raise DistillError(
            f"{where}: cannot size model {model!r} ({e}); add flops_per_token"
        ) from None
