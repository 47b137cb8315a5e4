"""``distill-ctl plan --teacher``: which ways to run the teacher fit a GPU memory budget, their
peak memory, and the throughput model (compute vs weight streaming vs activation I/O).

Memory and time come from distill/teacher/fit.py; FLOP/s are an L4's at the cost estimate's
MFU (the GPU this tool rents), host memory is the L4 VM's. Nothing is loaded or tokenised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distill.cloud.l4 import DEFAULT_MFU, L4_PEAK_FLOPS, L4_VM_RAM_BYTES
from distill.config import Job, parse_bytes
from distill.errors import DistillError
from distill.teacher.fit import (
    GIB,
    HOST_MARGIN_BYTES,
    Throughput,
    Way,
    choose,
    flops_per_token,
    teacher_profile,
    throughput,
    ways,
)

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class TeacherPlan:
    ways: list[tuple[Way, Throughput]]
    chosen: Way | None  # the way the job runs (None: none it allows fits)
    refusal: str  # why not, when chosen is None
    budget: int
    host_budget: int


def teacher_plan(job: Job, budget: int, mfu: float = DEFAULT_MFU) -> TeacherPlan:
    """Every way, with its memory and throughput at the job's chunk size, and the chosen one."""
    from transformers import AutoConfig

    from distill import models

    teacher_dir = models.resolve_model(job.teacher.model, weights=False)
    try:
        p = teacher_profile(AutoConfig.from_pretrained(teacher_dir), teacher_dir)
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot read the teacher config in {teacher_dir}: {e}") from None
    host = L4_VM_RAM_BYTES - HOST_MARGIN_BYTES
    t = job.teacher
    fpt = flops_per_token(p, job.data.max_length)
    rows = []
    for w in ways(job, p, budget, host):
        dt = t.dtype if w.quantize == "none" or t.dtype != "float32" else "bfloat16"
        sustained = L4_PEAK_FLOPS[dt] * mfu
        rows.append((w, throughput(p, dt, w, t.chunk_tokens, fpt, sustained)))
    try:
        chosen, refusal = choose(job, p, budget, host, where=f"{budget / GIB:.1f} GiB"), ""
    except DistillError as e:
        chosen, refusal = None, str(e)
    return TeacherPlan(rows, chosen, refusal, budget, host)


def show_teacher_plan(job: Job, gpu_mem: str, source: str, console: Console) -> TeacherPlan:
    """The plan as a table, then the line that applies it; :class:`DistillError` (after the
    table) when nothing the job allows fits."""
    from rich.table import Table

    plan = teacher_plan(job, parse_bytes(gpu_mem))
    t = Table(
        title=f"teacher plan for {source}: {job.teacher.model}, {job.teacher.dtype}, "
        f"{plan.budget / GIB:.1f} GiB GPU, {plan.host_budget / GIB:.0f} GiB host"
    )
    for col in (
        "way",
        "fits",
        "GPU peak",
        "host",
        "tok/s (L4)",
        "compute",
        "streaming",
        "act. I/O",
    ):
        t.add_column(col, justify="left" if col == "way" else "right")
    for w, tp in plan.ways:
        t.add_row(*_row(w, tp))
    console.print(t)
    console.print(
        f"throughput: {job.teacher.chunk_tokens:,}-token chunks on an L4 at MFU {DEFAULT_MFU} "
        "(quantised kernels' slowdown not modelled); streaming: share of time waiting on "
        "weights the prefetch cannot hide"
    )
    for w, _ in plan.ways:
        if w.unavailable:
            console.print(f"{w.label()}: {w.unavailable}")
    if plan.chosen is None:
        raise DistillError(plan.refusal)
    w = plan.chosen
    console.print(
        f"teacher.mode = {job.teacher.mode!r} runs {w.label()}: "
        f"--set teacher.mode={w.mode} --set teacher.quantize={w.quantize}"
    )
    return plan


def _row(w: Way, tp: Throughput) -> tuple[Any, ...]:
    layered = w.mode == "layered"
    return (
        w.label(),
        "yes" if w.fits else "no",
        f"{w.peak / GIB:.2f} GiB",
        f"{w.host / GIB:.2f} GiB" if layered else "-",
        f"{tp.tokens_per_s:,.0f}",
        f"{tp.compute_s / tp.seconds:.0%}",
        f"{tp.stream_share:.1%}" if layered else "-",
        f"{tp.activation_io_s / tp.seconds:.1%}" if layered else "-",
    )
