"""``distill-ctl gc``: what teacher-cloud left behind when even its teardown failed.

Teacher VMs (label ``managed-by=distill``, or one job's labels) and the fan-out's Batch jobs
in the job's (default) region are listed, then deleted with ``--yes`` or the user's consent,
and their deletion confirmed.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

from distill.cloud.batch import BatchApi, JobState, leftover_jobs
from distill.cloud.retry import Backoff, retry_until
from distill.cloud.session import CloudOptions, make_backend, resolve_project
from distill.cloud.spec import job_labels, region_of
from distill.config import Job
from distill.errors import DistillError

WAIT_BACKOFF = Backoff(first=1.0, factor=1.0, cap=1.0)  # poll every second until gone


def collect_garbage(
    job: Job | None,
    opts: CloudOptions,
    out: Console,
    err: Console,
    confirm: Callable[[str], bool],
) -> None:
    """``distill-ctl gc``: list the teacher VMs left behind (label ``managed-by=distill``, or
    ``job``'s own) on ``out`` and delete them, with ``opts.yes`` or ``confirm``'s consent."""
    from rich.table import Table

    project = resolve_project(job if job is not None else Job(), opts)
    backend = make_backend(opts, project)
    labels = job_labels(job.name) if job is not None else {"managed-by": "distill"}
    found = backend.list(labels)
    jobs: list[JobState] = []
    batch_api: BatchApi | None = None
    # the fan-out's Batch jobs (teacher-cloud --vms N) in the job's (default) region; a
    # Compute stub without a Batch one (--compute-endpoint only) has no Batch API to ask
    if opts.backend == "gce" and (opts.batch_endpoint or not opts.endpoint):
        region = region_of((job or Job()).cloud.zones[0])
        batch_api, jobs = leftover_jobs(project, region, labels, opts.batch_endpoint)
    if not found and not jobs:
        out.print("no distill VMs" + (" or Batch jobs" if batch_api is not None else "") + " left")
        return
    t = Table(title=f"distill VMs and Batch jobs ({backend.name})")
    for col in ("name", "zone", "status", "job", "created"):
        t.add_column(col)
    for s in found:
        t.add_row(s.name, s.zone, s.status, s.labels.get("distill-job", ""), s.created)
    for j in jobs:
        loc = j.name.split("/")[3]
        name = f"batch job {j.name.rsplit('/', 1)[-1]}"
        t.add_row(name, loc, j.state, j.labels.get("distill-job", ""), j.created)
    out.print(t)
    what = f"{len(found)} VM(s)" + (f" and {len(jobs)} Batch job(s)" if jobs else "")
    if not opts.yes and not confirm(f"Delete {what}?"):
        err.print("nothing deleted (pass --yes to delete)")
        return
    for s in found:
        err.print(f"deleting {s.name} in {s.zone}")
        backend.delete(s.name, s.zone)
    left = []
    if batch_api is not None and jobs:
        for j in jobs:
            err.print(f"deleting Batch job {j.name}")
            batch_api.delete(j.name)
        api = batch_api
        retry_until(
            lambda: None if any(api.get(j.name) for j in jobs) else True,
            opts.teardown_timeout_s,
            WAIT_BACKOFF,
        )
        left += [j.name for j in jobs if batch_api.get(j.name) is not None]
    left += [s.name for s in found if backend.get(s.name, s.zone) is not None]
    if left:
        raise DistillError(f"still there after deletion: {', '.join(left)}")
    out.print(f"deleted {what}")
