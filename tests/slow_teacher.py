"""A teacher entrypoint for the cloud tests: ``distill-ctl`` with each shard's forward pass
held for ``SLOW_TEACHER_S`` seconds, so a test can preempt or kill it mid-run reliably.

The teacher code itself is unchanged (the delay wraps ``compute_targets``); the guest runs it
as ``DISTILL_ENTRYPOINT="python tests/slow_teacher.py teacher"``. ``FAIL_TASK_INDEX=i``: the
fan-out's Batch task i fails (exit 1, as a CUDA error would) before its first shard.
"""

from __future__ import annotations

import os
import sys
import time

from distill import cli
from distill.teacher import run as teacher_mod

DELAY = float(os.environ.get("SLOW_TEACHER_S", "0"))
_real = teacher_mod.compute_targets


def _slow(*args, **kwargs):
    out = _real(*args, **kwargs)
    time.sleep(DELAY)  # the shard's targets exist but are not uploaded yet: "in flight"
    kwargs.get("on_batch", args[5] if len(args) > 5 else None)(0)  # a stop check after it
    return out


teacher_mod.compute_targets = _slow

if __name__ == "__main__":
    if os.environ.get("BATCH_TASK_INDEX", "") == os.environ.get("FAIL_TASK_INDEX", "-"):
        print("RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
        sys.exit(1)
    sys.argv = ["distill-ctl", *sys.argv[1:]]
    cli.main()
