"""The L4 VM as the estimates see it: its facts (distill/hardware/l4.toml), the assumed MFU,
and the way a job's teacher runs on it (:func:`plan_l4`)."""

from __future__ import annotations

from distill.config import Job
from distill.hardware import l4
from distill.teacher.fit import HOST_MARGIN_BYTES, TeacherProfile, Way, choose, usable_bytes

L4_NAME = l4().gpu.name
L4_PEAK_FLOPS = l4().gpu.peak_flops  # dense, per dtype (the datasheet)
L4_MEMORY_BYTES = l4().gpu.memory_bytes  # what nvidia-smi reports as total
L4_VM_RAM_BYTES = l4().machine.memory_bytes  # g2-standard-8's host memory
DEFAULT_MFU = 0.35  # an assumption, until a calibration file measures it


def l4_usable_bytes() -> int:
    return usable_bytes(L4_MEMORY_BYTES)


def plan_l4(job: Job, p: TeacherProfile) -> Way:
    """How the job's teacher runs on one L4 (:func:`distill.teacher.fit.choose`): resident,
    quantised or layered; DistillError when no way the job allows fits."""
    return choose(job, p, L4_MEMORY_BYTES, L4_VM_RAM_BYTES - HOST_MARGIN_BYTES, where="one L4")
