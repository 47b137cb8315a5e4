"""``distill-ctl teacher-cloud``: the engine the job asks for, on one session.

``cloud.engine = "vm"`` (the default): one VM the controller provisions, watches and
relaunches (:mod:`distill.cloud.vm`); ``"batch"`` (``--vms N``): one Google Cloud Batch job of
N tasks (:mod:`distill.cloud.fanout`). Both share the session's checks, price, staging,
supervision and record (:mod:`distill.cloud.session`).
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

from distill.cloud.backend import Backend
from distill.cloud.records import CloudRun
from distill.cloud.session import CloudOptions, Session
from distill.config import Job
from distill.errors import DistillError


def teacher_cloud(
    job: Job,
    opts: CloudOptions,
    console: Console | None = None,
    confirm: Callable[[str], bool] | None = None,
    backend: Backend | None = None,
) -> CloudRun | None:
    """One VM (``cloud.engine = "vm"``), or a Batch job of ``cloud.vms`` tasks."""
    if job.cloud.engine == "batch" and opts.backend != "gce":
        raise DistillError('cloud.engine = "batch" (--vms) runs on Google Cloud only')
    session = Session(job, opts, console, confirm, backend)
    if job.cloud.engine == "batch":
        from distill.cloud.fanout import BatchEngine

        return BatchEngine(session).run()
    from distill.cloud.vm import VmEngine

    return VmEngine(session).run()
