"""One Batch task of a fan-out, inside the teacher image: ``python -m distill.cloud.batch_task``.

1. write the job file from ``DISTILL_JOB_TOML_B64``, stage ``DISTILL_INPUTS_B64`` (as the single
   VM's startup does: :func:`distill.cloud.vm_agent.stage_inputs`); both are base64, so the
   multi-line texts pass through Batch's environment as one line each;
2. run the teacher (``distill-ctl teacher --job job.toml``; ``DISTILL_ENTRYPOINT`` overrides
   it) with Batch's ``BATCH_TASK_INDEX`` / ``BATCH_TASK_COUNT``: it computes only its shards;
3. exit 0, :data:`~distill.cloud.preemption.EXIT_PREEMPTED` (the one lifecycle policy
   retries it on a new VM) or :data:`~distill.cloud.batch.EXIT_TASK_FAILED` for anything else
   (a code the policy does not list: Batch fails the task; the teacher's own exit code is
   logged first).

This process is the container's main process: when the VM goes away (a preemption's
soft-off), ``docker stop`` sends SIGTERM to it alone. It passes the signal on to the teacher,
which stops after the batch in flight and exits 75; the teacher also watches the metadata
server's preemption notice (``DISTILL_WATCH_PREEMPTION=1``, set by the job).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from distill.cloud.batch import EXIT_TASK_FAILED, INPUTS_ENV, JOB_ENV, decode_env
from distill.cloud.preemption import EXIT_PREEMPTED
from distill.cloud.vm_agent import ENTRYPOINT_ENV, log, stage_inputs


def main() -> int:
    task = f"task {os.environ.get('BATCH_TASK_INDEX', '?')}/{os.environ.get('BATCH_TASK_COUNT')}"
    try:
        job_text = decode_env(os.environ.get(JOB_ENV, ""))
        inputs = decode_env(os.environ.get(INPUTS_ENV, ""))
    except ValueError as e:
        log(f"{task}: {JOB_ENV} / {INPUTS_ENV} are not base64 text: {e}")
        return EXIT_TASK_FAILED
    if not job_text:
        log(f"{task}: no {JOB_ENV} in the task's environment")
        return EXIT_TASK_FAILED
    scratch = Path(tempfile.mkdtemp(prefix="distill-task-"))
    try:
        return _run_task(task, job_text, inputs, scratch / "job")
    finally:  # Batch may run the next task on this VM: the staged job goes with this one
        shutil.rmtree(scratch, ignore_errors=True)


def _run_task(task: str, job_text: str, inputs: str, job_dir: Path) -> int:
    """Stage the job in ``job_dir``, run the teacher there, and map its exit code."""
    job_dir.mkdir(parents=True)
    (job_dir / "job.toml").write_text(job_text)
    try:
        stage_inputs(inputs, job_dir)
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

    def forward(signum: int, frame: object) -> None:
        log(f"{task}: SIGTERM: passing it to the teacher and waiting for it to stop")
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    rc = child.wait()
    if rc in (0, EXIT_PREEMPTED):
        log(f"{task}: teacher exit code {rc} ({'done' if rc == 0 else 'preempted: retry'})")
        return rc
    log(f"{task}: teacher failed with exit code {rc}; failing the task")
    return EXIT_TASK_FAILED


if __name__ == "__main__":
    sys.exit(main())
