"""A teacher entrypoint for the cloud tests: ``distill-ctl`` with each shard's forward pass
held for ``SLOW_TEACHER_S`` seconds, so a test can preempt or kill it mid-run reliably.

The teacher code itself is unchanged (the delay wraps ``_targets_by_shard``, which both the
resident and the layered teacher go through); the guest runs it as
``DISTILL_ENTRYPOINT="python tests/slow_teacher.py teacher"``. ``FAIL_TASK_INDEX=i``: the
fan-out's Batch task i fails (exit 1, as a CUDA error would) before its first shard.

The cloud paths ship the job with ``teacher.device = "cuda"``. A stub VM whose container can
see its "L4" says so with ``FAKE_GPU=1``, and the CPU stands in for it (``teacher.device =
"cpu"``); without it the teacher runs as asked and fails at once, as on a VM whose container
does not see the GPU.
"""

from __future__ import annotations

import os
import sys
import time

from distill import cli
from distill.teacher import run as teacher_mod

DELAY = float(os.environ.get("SLOW_TEACHER_S", "0"))
_real = teacher_mod._targets_by_shard


def _slow(job, model, chunks, todo, on_batch):
    for idx, targets in _real(job, model, chunks, todo, on_batch):
        time.sleep(DELAY)  # the shard's targets exist but are not uploaded yet: "in flight"
        on_batch(0)  # a stop check after it
        yield idx, targets


teacher_mod._targets_by_shard = _slow

if __name__ == "__main__":
    if os.environ.get("BATCH_TASK_INDEX", "") == os.environ.get("FAIL_TASK_INDEX", "-"):
        print("RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
        sys.exit(1)
    sys.argv = ["distill-ctl", *sys.argv[1:]]
    if os.environ.get("FAKE_GPU") == "1":
        sys.argv += ["--set", 'teacher.device="cpu"']
    cli.main()
