"""One Batch task of a fan-out, inside the teacher image: ``python -m distill.cloud.batch_task``.

1. write the job file from ``DISTILL_JOB_TOML``, stage ``DISTILL_INPUTS`` (as the single VM's
   startup does: :func:`distill.cloud.vm_agent.stage_inputs`);
2. run the teacher (``distill-ctl teacher --job job.toml``; ``DISTILL_ENTRYPOINT`` overrides
   it) with Batch's ``BATCH_TASK_INDEX`` / ``BATCH_TASK_COUNT``: it computes only its shards;
3. exit 0, :data:`~distill.cloud.preemption.EXIT_PREEMPTED` (Batch retries the task on a new
   VM) or :data:`~distill.cloud.batch.EXIT_TASK_FAILED` for anything else (Batch fails it;
   the teacher's own exit code is logged first).

SIGTERM (the VM's soft-off on preemption) reaches the teacher, which stops cleanly.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from distill.cloud.batch import EXIT_TASK_FAILED, INPUTS_ENV, JOB_ENV
from distill.cloud.preemption import EXIT_PREEMPTED
from distill.cloud.vm_agent import ENTRYPOINT_ENV, log, stage_inputs


def main() -> int:
    job_text = os.environ.get(JOB_ENV, "")
    if not job_text:
        log(f"no {JOB_ENV} in the task's environment")
        return EXIT_TASK_FAILED
    job_dir = Path(tempfile.mkdtemp(prefix="distill-task-")) / "job"
    job_dir.mkdir(parents=True)
    (job_dir / "job.toml").write_text(job_text)
    task = f"task {os.environ.get('BATCH_TASK_INDEX', '?')}/{os.environ.get('BATCH_TASK_COUNT')}"
    try:
        stage_inputs(os.environ.get(INPUTS_ENV, ""), job_dir)
    except SystemExit as e:
        log(f"{task}: {e.code}")
        return EXIT_TASK_FAILED
    entry = shlex.split(os.environ.get(ENTRYPOINT_ENV, "")) or [
        sys.executable,
        "-m",
        "distill.cli",
        "teacher",
    ]
    log(f"{task}: running {shlex.join(entry)} --job job.toml")
    child = subprocess.Popen([*entry, "--job", str(job_dir / "job.toml")], cwd=job_dir)
    # the soft-off's SIGTERM reaches the teacher (same process group): wait for it
    signal.signal(signal.SIGTERM, lambda *_: log(f"{task}: SIGTERM: waiting for the teacher"))
    rc = child.wait()
    if rc in (0, EXIT_PREEMPTED):
        log(f"{task}: teacher exit code {rc} ({'done' if rc == 0 else 'preempted: retry'})")
        return rc
    log(f"{task}: teacher failed with exit code {rc}; failing the task")
    return EXIT_TASK_FAILED


if __name__ == "__main__":
    sys.exit(main())
