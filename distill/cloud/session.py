"""One ``teacher-cloud`` invocation's shared parts, whichever engine runs it.

A :class:`Session` holds the options, the console, the user's confirmation and the backend
the checks go to. :meth:`Session.preflight` refuses, spending nothing, everything that can be
refused without a VM (credentials, project, bucket access, zones, the teacher's fit on the
L4, the project's image, quotas and subnet), and returns a frozen :class:`Plan`: the job as
the VMs will run it (``teacher.mode = "auto"`` pinned to the estimated way), its estimate,
the VMs it runs at once and each split's job fingerprint. The engines
(:mod:`distill.cloud.vm`, :mod:`distill.cloud.fanout`) take the plan from there; the session
prices and confirms it, stages its inputs, supervises the run (SIGTERM raises, the teardown
and the record always run) and writes the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from distill.cloud.backend import Backend, Needs
from distill.cloud.cost import CostEstimate, CostOptions, estimate_cost
from distill.cloud.errors import CloudError
from distill.cloud.preemption import in_main_thread
from distill.cloud.prices import HOURS_PER_MONTH
from distill.cloud.progress import BucketProgress
from distill.cloud.records import RECORD_PREFIX, Attempt, CloudRun, utc_now
from distill.cloud.spec import (
    ACCELERATOR_COUNT,
    IMAGE_FAMILY,
    IMAGE_PROJECT,
    MACHINE_VCPUS,
    default_subnetwork,
    label_value,
    region_of,
)
from distill.cloud.staging import (
    expected_fingerprints,
    pin_teacher,
    stage_inputs,
    staged_disk_gb,
    vm_job_toml,
)
from distill.config import Job, splits
from distill.errors import DistillError
from distill.shardset import stored_manifest
from distill.store.storage import open_store

T = TypeVar("T")


@dataclass
class CloudOptions:
    backend: str = "gce"  # gce | local
    endpoint: str | None = None  # the Compute API's base URL (the stub's in tests)
    project: str | None = None
    image: str | None = None
    service_account: str | None = None
    yes: bool = False
    state_dir: Path = Path("runs/cloud")  # local VMs, and a copy of each run record
    cost: CostOptions = field(default_factory=CostOptions)
    poll_seconds: float | None = None  # default: cloud.poll_seconds
    local_preempt_grace_s: float = 30.0
    watch_grace_s: float = 300.0  # API or bucket errors while watching are retried this long
    api_retry_s: float = 60.0  # one Compute API read retries transient errors this long
    teardown_timeout_s: float = 900.0  # deleting the VM is retried this long
    finish_grace_s: float = 60.0  # after the last manifest: the VM's own exit and record
    batch_endpoint: str | None = None  # the Batch API's base URL (the stub's in tests)


# --- settings -------------------------------------------------------------------------------


def resolve_project(job: Job, opts: CloudOptions) -> str:
    """--project, cloud.project, GOOGLE_CLOUD_PROJECT, CLOUDSDK_CORE_PROJECT, gcloud's config."""
    if opts.backend == "local":
        return opts.project or job.cloud.project or "local"
    for candidate in (
        opts.project,
        job.cloud.project,
        os.environ.get("GOOGLE_CLOUD_PROJECT"),
        os.environ.get("CLOUDSDK_CORE_PROJECT"),
    ):
        if candidate:
            return candidate
    if shutil.which("gcloud") and not os.environ.get("DISTILL_NO_GCLOUD_CONFIG"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(
                ["gcloud", "config", "get-value", "project"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip()
    raise CloudError(
        "no Google Cloud project: set cloud.project in the job file, pass --project, or run "
        "`gcloud config set project PROJECT`; nothing was spent"
    )


def default_image(project: str, zones: list[str] | tuple[str, ...]) -> str:
    from distill import __version__

    return f"{region_of(zones[0])}-docker.pkg.dev/{project}/distill/teacher:{__version__}"


def make_backend(opts: CloudOptions, project: str) -> Backend:
    if opts.backend == "local":
        from distill.cloud.local import LocalBackend

        return LocalBackend(opts.state_dir / "vms", preempt_grace_s=opts.local_preempt_grace_s)
    if opts.backend == "gce":
        from distill.cloud.gce import GceBackend

        return GceBackend(project, endpoint=opts.endpoint, read_retry_s=opts.api_retry_s)
    raise DistillError(f"--backend {opts.backend!r}: one of gce, local")


# --- signals --------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the controller: tear down, then exit."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM -> :class:`Terminated` in the main thread (so ``finally`` tears down)."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    if in_main_thread():
        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        yield


@contextlib.contextmanager
def signals_held(console: Console) -> Iterator[None]:
    """Ctrl-C and SIGTERM are held off (with a message) while the VM is deleted."""
    if not in_main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        console.print("[yellow]tearing down the VM first; it will be gone in a moment[/yellow]")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- watching ---------------------------------------------------------------------------------


class Contact:
    """A watch loop's reads: a blip of the API or the network is retried after a poll, and
    contact lost for longer than ``grace_s`` raises :class:`CloudError` (the caller tears
    down ``what``)."""

    def __init__(self, api: str, what: str, grace_s: float, poll_s: float, bar: Progress) -> None:
        self.api, self.what, self.grace_s, self.poll_s, self.bar = api, what, grace_s, poll_s, bar
        self.since: float | None = None

    def read(self, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None after a failed read still within the grace period."""
        try:
            out = fn()
        except (DistillError, OSError) as e:
            self.since = self.since or time.monotonic()
            if time.monotonic() - self.since > self.grace_s:
                raise CloudError(
                    f"lost contact with the {self.api} or the bucket for "
                    f"{self.grace_s / 60:.0f} min ({e}); {self.what} is being deleted; rerun "
                    "to resume from the shards in the bucket"
                ) from e
            self.bar.console.print(f"[yellow]watch: {e}; retrying[/yellow]")
            time.sleep(self.poll_s)
            return None
        self.since = None
        return out


def watch_bar(console: Console) -> Progress:
    """The watch loops' bar: shards done of the total, then a line of progress info."""
    cols = (
        TextColumn("teacher-cloud"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
    )
    return Progress(*cols, console=console, transient=False)


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What :meth:`Session.preflight` decided, frozen for the engines."""

    job: Job  # as the VMs run it: teacher.mode pinned to the estimated way
    project: str
    zones: tuple[str, ...]
    output: str  # job.output without a trailing slash
    estimate: CostEstimate  # priced on the disk each VM gets (estimate.opts.boot_disk_gb)
    fingerprints: dict[str, str]  # split -> job fingerprint, as the VMs compute it
    vms: int  # VMs run at once: 1, or the Batch job's tasks
    image: str
    service_account: str
    # teacher-cloud --vms N: each split's record index, written beside the inputs at staging
    record_indexes: dict[str, Any] = field(default_factory=dict)

    @property
    def region(self) -> str:
        return region_of(self.zones[0])

    @property
    def cloud(self) -> Any:
        return self.job.cloud

    def max_run_s(self, hours_estimate: float) -> int:
        """Each VM's dead-man switch: cloud.max_run_hours, else 2 x the estimate + 1 h."""
        hours = self.job.cloud.max_run_hours or (2 * hours_estimate + 1)
        return int(min(max(hours * 3600, 30), 120 * 86400))


class Session:
    """See the module docstring. ``backend``: the checks' (and the single VM's) backend;
    default: the one ``opts.backend`` names."""

    def __init__(
        self,
        job: Job,
        opts: CloudOptions,
        console: Console | None = None,
        confirm: Callable[[str], bool] | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.job, self.opts = job, opts
        self.console = console or Console(stderr=True)
        self.confirm = confirm
        self.output = job.output.rstrip("/")
        if not self.output.startswith("gs://"):
            raise DistillError(
                f"{job.path}: job.output = {job.output!r} must be a gs:// URL for "
                "teacher-cloud (the VM and its disk go away); e.g. --output gs://BUCKET/runs/JOB"
            )
        bucket_path = self.output[len("gs://") :].partition("/")[2]
        if opts.backend == "gce" and not bucket_path.startswith("runs/"):
            self.console.print(
                f"[yellow]warning:[/yellow] {self.output} is not under gs://BUCKET/runs/: the "
                "teacher's service account of infra/terraform/base may create objects only "
                "there"
            )
        self.project = resolve_project(job, opts)
        self.backend = backend or make_backend(opts, self.project)
        self.poll = opts.poll_seconds or job.cloud.poll_seconds

    # --- 1. checks ----------------------------------------------------------------------------

    def cost_options(self, job: Job | None = None) -> CostOptions:
        """The estimate's options: N VMs for the Batch engine, the disk each VM gets."""
        job = job or self.job
        cost = self.opts.cost
        if job.cloud.engine == "batch":
            cost = dataclasses.replace(cost, vms=job.cloud.vms, engine="batch")
        return dataclasses.replace(cost, boot_disk_gb=staged_disk_gb(job))

    def preflight(self) -> Plan:
        """Everything that can be refused before spending anything; the plan it leaves."""
        job, cloud = self.job, self.job.cloud
        open_store(self.output).list("inputs/")  # credentials, bucket existence and access
        # a Hub teacher at one commit (a bucket one at one listing) for the whole run; only
        # its config and tokenizer come to this machine
        job = pin_teacher(job)
        with tempfile.TemporaryDirectory(prefix="distill-preflight-") as tmp:
            # every line's JSON, shape and roles, on every core: no tokenizer; a fan-out's
            # tasks get what this pass learns (record index) so each reads only its shards'
            # records; a gs:// split is copied here once, for this and the estimate
            indexes = check_datasets(job, index=cloud.engine == "batch", scratch=Path(tmp))
            for z in cloud.zones:
                self.backend.check_zone(z)
            # refuses a teacher that fits the L4 in no way the job allows (resident, layered)
            estimate = estimate_cost(job, self.cost_options(job), data_scratch=Path(tmp))
        if job.teacher.mode == "auto":  # the VMs run the way that was estimated
            teacher = job.teacher.model_copy(update={"mode": estimate.way.mode})
            job = job.model_copy(update={"teacher": teacher})
        region = region_of(cloud.zones[0])
        vms = estimate.tasks if cloud.engine == "batch" else 1
        self.backend.check_project(  # boot image, quotas (the VMs run at once), subnet
            Needs(
                region=region,
                gpus=vms * ACCELERATOR_COUNT,
                spot=cloud.spot,
                image_project=IMAGE_PROJECT,
                image_family=IMAGE_FAMILY,
                network=cloud.network,
                subnetwork=cloud.subnetwork or default_subnetwork(cloud.network, region),
                cpus=vms * MACHINE_VCPUS,
                disk_gb=vms * estimate.opts.boot_disk_gb,
            )
        )
        zones = tuple(cloud.zones)
        return Plan(
            job=job,
            project=self.project,
            zones=zones,
            output=self.output,
            estimate=estimate,
            fingerprints=expected_fingerprints(job),
            vms=vms,
            image=self.opts.image or cloud.image or default_image(self.project, zones),
            service_account=self.opts.service_account
            or cloud.service_account
            or f"distill-teacher@{self.project}.iam.gserviceaccount.com",
            record_indexes=indexes,
        )

    def complete(self, plan: Plan) -> bool:
        """Every split has its manifest (refused if one is another job's)."""
        return all(
            stored_manifest(open_store(f"{plan.output}/{split}"), fp) is not None
            for split, fp in plan.fingerprints.items()
        )

    # --- 2. price -------------------------------------------------------------------------------

    def price_and_confirm(self, plan: Plan) -> None:
        from distill.cloud.cost_table import render_table

        est = plan.estimate
        self.console.print(render_table(est))
        usd = est.usd["total_spot" if plan.cloud.spot else "total_on_demand"]
        budget = plan.cloud.budget_usd
        if budget and usd > budget:
            raise CloudError(
                f"the estimate (${usd:,.2f}) is above cloud.budget_usd (${budget:,.2f}): "
                "raise the budget or shrink the job; nothing was spent"
            )
        if self.opts.yes:
            return
        if self.confirm is None or not sys.stdin.isatty():
            raise DistillError("teacher-cloud spends money: confirm with --yes (no terminal here)")
        if not self.confirm(f"Start the teacher on {plan.project} for about ${usd:,.2f}?"):
            raise DistillError("cancelled; nothing was spent")

    # --- 3. stage -------------------------------------------------------------------------------

    def stage(self, plan: Plan) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Upload the inputs; the VM's job file (TOML) and the ``(gs://src, dest)`` pairs. A
        cloud VM's job asks for the GPU (``teacher.device = "cuda"``); a local one's does
        not."""
        raw, inputs = stage_inputs(
            plan.job,
            self.console,
            gpu=self.opts.backend == "gce",
            project=plan.project,
            indexes=plan.record_indexes,
        )
        return vm_job_toml(raw), inputs

    # --- the run and its record -----------------------------------------------------------------

    def new_record(self, plan: Plan, instance: str) -> CloudRun:
        """The run record, priced per VM-second from the estimate's price table."""
        est = plan.estimate
        prices = est.prices
        return CloudRun(
            job=plan.job.name,
            backend=self.backend.name,
            project=plan.project,
            zones=list(plan.zones),
            instance=instance,
            spot=plan.cloud.spot,
            started=utc_now(),
            estimate=est.to_dict(),
            price_per_hour=prices.vm_spot_per_hour
            if plan.cloud.spot
            else prices.vm_on_demand_per_hour,
            disk_per_hour=est.opts.boot_disk_gb * prices.boot_disk_per_gb_month / HOURS_PER_MONTH,
        )

    def bucket_progress(self, plan: Plan) -> BucketProgress:
        """Shards done of each split's total (the estimate's sample counts)."""
        per = plan.job.teacher.samples_per_shard
        per_split = plan.estimate.data.per_split
        totals = {s: (-(-c["samples"] // per), c["tokens"]) for s, c in per_split.items()}
        return BucketProgress(plan.output, totals)

    def supervise(
        self,
        run: CloudRun,
        plan: Plan,
        body: Callable[[], None],
        teardown: Callable[[], None],
        current: Callable[[], Attempt | None] = lambda: None,
    ) -> CloudRun:
        """Run ``body`` (SIGTERM raising) and record its outcome; ``teardown`` and the record
        always follow. ``current``: the attempt an interruption or a failure ends."""
        try:
            with sigterm_raises():
                body()
            run.outcome = "done"
            self.console.print(f"[green]teacher-cloud: shard sets complete in {plan.output}")
        except KeyboardInterrupt:
            run.outcome, run.message = "interrupted", "Ctrl-C or SIGTERM"
            attempt = current()
            if attempt is not None:
                attempt.outcome = attempt.outcome or "interrupted"
            raise
        except DistillError as e:
            run.outcome, run.message = "failed", str(e)
            attempt = current()
            if attempt is not None:
                attempt.outcome = attempt.outcome or "failed"
            raise
        finally:
            teardown()
            self.write_record(run, plan)
        return run

    def write_record(self, run: CloudRun, plan: Plan) -> None:
        run.ended = utc_now()
        data = json.dumps(run.to_dict(), indent=1).encode()
        stamp = run.started.replace(":", "").replace("-", "")
        name = f"run-{stamp}-{uuid.uuid4().hex[:8]}.json"
        local = self.opts.state_dir / "records" / label_value(plan.job.name) / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        try:
            open_store(f"{plan.output}/{RECORD_PREFIX}").put_bytes(name, data)
            where = f"{plan.output}/{RECORD_PREFIX}/{name}"
        except DistillError as e:
            where = f"{local} (the bucket refused it: {e})"
        self.console.print(
            f"run record: {where}: {run.outcome}, {len(run.attempts)} VM(s), "
            f"{run.vm_seconds / 60:,.1f} VM-minutes, ${run.usd:,.4f} "
            f"(VM + disk estimated ${run.estimated_usd:,.4f})"
        )


def check_datasets(job: Job, index: bool = False, scratch: Path | None = None) -> dict[str, Any]:
    """The whole-file checks of every split (:func:`distill.data.prepare.check`), read from
    where the job names it (a ``gs://`` split from its bucket), before anything is spent; the
    checks that need tokens run on the VMs, each on its own shards. ``index``: also each
    split's record index (:func:`distill.data.record_index.build_index`) from the same copy,
    returned by split. ``scratch``: where a ``gs://`` split's copy goes, kept for the caller
    (else a temporary directory)."""
    from distill.data.prepare import Rules, check
    from distill.data.record_index import build_index
    from distill.sources import digest, list_files, open_split, scratch_dir

    d = job.data
    rules = Rules(d.max_length, d.truncation, d.max_samples, d.on_invalid)
    indexes: dict[str, Any] = {}
    with scratch_dir(scratch, "distill-check-") as tmp:
        for split, spec in splits(job).items():
            listed = list_files(spec)  # one listing: the index describes the copies read
            files = open_split(spec, tmp / split, listed)
            check(files, spec, rules)
            if index:
                indexes[split] = build_index(
                    files,
                    digest(spec, listed),
                    job.teacher.samples_per_shard,
                    {f.name: (f.size, f.generation) for f in listed if f.remote},
                )
    return indexes
