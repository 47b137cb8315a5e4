"""``distill-ctl teacher-cloud``: price it, provision it, watch it, always tear it down.

The flow, SkyPilot-style (show the cost before spending, clean up after):

1. **Check, spending nothing**: credentials, project, bucket access (a list of
   ``job.output``), every zone offers an L4, the teacher fits the L4 resident or layered
   (the cost estimate refuses otherwise; ``teacher.mode = "auto"`` is pinned to the way it
   estimated), and whether the shard set is already complete.
2. **Price**: the ``cost-estimate`` table; ``cloud.budget_usd`` refuses a job over budget;
   the user confirms (``--yes`` skips the question).
3. **Stage**: the dataset (and a local teacher directory) go to ``<output>/inputs/`` under
   content-addressed names (create-only); the VM's job file points at the staged copies.
4. **Provision** the :class:`~distill.cloud.spec.VmSpec` in the first zone; a stockout
   (``ZONE_RESOURCE_POOL_EXHAUSTED``) moves to the next zone, round after round, until
   ``cloud.provision_timeout_minutes``; a quota error stops with how to fix it.
5. **Watch** the bucket (shards done of total, tokens/s, ETA) and the VM (status, spend so
   far). A preempted or vanished VM is relaunched, same zone first, up to
   ``cloud.max_preemptions`` times; the new VM resumes from the bucket.
6. **Tear down** in a ``finally``: on success, failure, Ctrl-C and SIGTERM the VM is deleted
   and the deletion confirmed (signals are held off meanwhile). If this process is killed
   outright, the VM deletes itself when the teacher ends, and its ``maxRunDuration``
   (``cloud.max_run_hours``) deletes it if the teacher hangs.
7. **Record** the attempts, VM seconds and actual cost beside the estimate in
   ``<output>/cloud/run-*.json`` (create-only; ``distill-ctl cost-report`` shows them).

An instance of this job that is already running (a controller that died) is adopted, not
duplicated: the VM name is a function of ``job.name``. :func:`collect_garbage` is
``distill-ctl gc``, for what is left when even that fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from distill.cloud.backend import (
    AlreadyExists,
    Backend,
    CloudError,
    GceBackend,
    LocalBackend,
    Needs,
    Stockout,
    VmState,
)
from distill.cloud.batch import BatchApi, JobState, leftover_jobs
from distill.cloud.cost import (
    HOURS_PER_MONTH,
    CostEstimate,
    CostOptions,
    estimate_cost,
    render_table,
)
from distill.cloud.preemption import in_main_thread
from distill.cloud.progress import BucketProgress, Rate, Snapshot
from distill.cloud.report import estimated_vm_usd
from distill.cloud.spec import (
    ACCELERATOR_COUNT,
    DEFAULT_MAX_RUN_S,
    IMAGE_FAMILY,
    IMAGE_PROJECT,
    MACHINE_VCPUS,
    VmSpec,
    boot_disk_gb,
    default_subnetwork,
    instance_name,
    job_labels,
    label_value,
    region_of,
)
from distill.config import Job
from distill.errors import DistillError
from distill.shardset import split_fingerprints, stored_manifest
from distill.store.cache import sha256_file
from distill.store.storage import ObjectExists, open_store

RECORD_PREFIX = "cloud"  # <output>/cloud/run-*.json and <output>/cloud/status/*.json


_T = TypeVar("_T")


class TeacherFailed(DistillError):
    """The teacher exited with an error on the VM (not a preemption)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the controller: tear down, then exit."""


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


@dataclass
class Attempt:
    n: int
    zone: str
    requested: str = ""  # UTC times, ISO
    running: str = ""
    ended: str = ""
    vm_id: str = ""
    outcome: str = ""  # done | preempted | vanished | failed | interrupted
    _t_running: float | None = None  # monotonic
    _t_ended: float | None = None

    def mark_running(self) -> None:
        if self._t_running is None:
            self._t_running, self.running = time.monotonic(), _now()

    def mark_ended(self) -> None:
        if self._t_ended is None:
            self._t_ended, self.ended = time.monotonic(), _now()

    def live_seconds(self) -> float:
        """VM time billed (RUNNING until gone), as the controller saw it."""
        if self._t_running is None:
            return 0.0
        return (self._t_ended or time.monotonic()) - self._t_running

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
        return {**d, "seconds": self.live_seconds()}


@dataclass
class CloudRun:
    """The run's metadata: written to ``<output>/cloud/run-<time>-<id>.json`` at the end."""

    job: str
    backend: str
    project: str
    zones: list[str]
    instance: str
    spot: bool
    started: str
    estimate: dict[str, Any]
    price_per_hour: float
    disk_per_hour: float
    attempts: list[Attempt] = field(default_factory=list)
    ended: str = ""
    outcome: str = ""
    message: str = ""
    preemptions: int = 0
    stockouts: list[str] = field(default_factory=list)

    @property
    def vm_seconds(self) -> float:
        return sum(a.live_seconds() for a in self.attempts)

    @property
    def estimated_usd(self) -> float:
        """The estimate's VM + disk dollars (as :attr:`usd` counts them; cost-report too)."""
        return estimated_vm_usd(self.estimate, self.spot)

    @property
    def usd(self) -> float:
        return self.vm_seconds / 3600 * (self.price_per_hour + self.disk_per_hour)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("attempts", "estimate")}
        return {
            **d,
            "attempts": [a.to_dict() for a in self.attempts],
            "vm_seconds": self.vm_seconds,
            "actual_usd": self.usd,
            "estimate": self.estimate,
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


def default_image(project: str, zones: list[str]) -> str:
    from distill import __version__

    return f"{region_of(zones[0])}-docker.pkg.dev/{project}/distill/teacher:{__version__}"


def make_backend(opts: CloudOptions, project: str) -> Backend:
    if opts.backend == "local":
        return LocalBackend(opts.state_dir / "vms", preempt_grace_s=opts.local_preempt_grace_s)
    if opts.backend == "gce":
        return GceBackend(project, endpoint=opts.endpoint, read_retry_s=opts.api_retry_s)
    raise DistillError(f"--backend {opts.backend!r}: one of gce, local")


# --- staging --------------------------------------------------------------------------------


def stage_inputs(
    job: Job, console: Console, gpu: bool = True
) -> tuple[dict[str, Any], tuple[tuple[str, str], ...]]:
    """Upload the dataset (and a local teacher directory) under ``<output>/inputs/``.

    Returns the VM's job table (paths pointing at the staged copies) and the
    ``(gs://src, dest)`` pairs for the VM spec. Names are content-addressed and writes are
    create-only, so a rerun uploads nothing twice. ``gpu``: the job runs on an L4, so it says
    ``teacher.device = "cuda"``: a VM whose GPU the teacher cannot see fails in seconds instead
    of running on the CPU, billed, until its max run duration."""
    from distill.config import splits

    store = open_store(job.output.rstrip("/"))
    present = set(store.list("inputs/"))  # one listing, not one lookup per file

    def upload(name: str, path: Path) -> None:
        if name not in present:
            console.print(f"staging {path} -> {store.join(name)}")
            with contextlib.suppress(ObjectExists):  # a concurrent run staged it first
                store.put_file(name, path)

    raw = job.to_dict()
    inputs: list[tuple[str, str]] = []
    for split, path in splits(job).items():
        name = f"inputs/{sha256_file(path)[:16]}-{path.name}"
        upload(name, path)
        dest = f"data/{split}/{path.name}"  # the same file name: sample keys use its stem
        raw["data"][split] = dest
        inputs.append((store.join(name), dest))
    model = job.teacher.model
    if vm_teacher(model) != model:
        src = Path(model).expanduser()
        files = sorted(p for p in src.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(src)}\0{p.stat().st_size}\0".encode())
        h.update((src / "config.json").read_bytes())
        prefix = f"inputs/model-{h.hexdigest()[:16]}"
        for p in files:
            upload(f"{prefix}/{p.relative_to(src).as_posix()}", p)
        raw["teacher"]["model"] = vm_teacher(model)
        inputs.append((store.join(prefix) + "/", "model"))
    if gpu:
        raw["teacher"]["device"] = "cuda"
    raw.pop("cloud", None)  # the VM needs none of it
    return raw, tuple(inputs)


def vm_teacher(model: str) -> str:
    """``teacher.model`` as the VM's job names it: a local directory is staged as ``model``."""
    return model if model.startswith(("builtin:", "gs://")) else "model"


def expected_fingerprints(job: Job) -> dict[str, str]:
    """Each split's job fingerprint as the teacher VM computes it (from its job: the staged
    teacher's name, the same dataset bytes, tokenizer and settings)."""
    from distill import models  # the tokenizer's fingerprint needs the tokenizer

    teacher_dir = models.resolve_model(job.teacher.model)
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(teacher_dir))
    teacher = job.teacher.model_copy(update={"model": vm_teacher(job.teacher.model)})
    return split_fingerprints(job.model_copy(update={"teacher": teacher}), teacher_dir, tok_fp)


def staged_disk_gb(job: Job) -> int:
    """The boot disk for ``job``'s teacher VM: sized from the teacher directory's bytes (the
    checkpoint each VM stages) and the datasets' (:func:`~distill.cloud.spec.boot_disk_gb`)."""
    from distill import models
    from distill.config import splits

    teacher_dir = models.resolve_model(job.teacher.model)
    checkpoint = sum(p.stat().st_size for p in teacher_dir.rglob("*") if p.is_file())
    inputs = sum(p.stat().st_size for p in splits(job).values())
    return boot_disk_gb(checkpoint, inputs)


def vm_job_toml(raw: dict[str, Any]) -> str:
    import tomli_w

    header = "# Written by distill-ctl teacher-cloud: the job as the teacher VM runs it.\n"
    return header + tomli_w.dumps(raw)


# --- the controller --------------------------------------------------------------------------


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


class Contact:
    """A watch loop's reads: a blip of the API or the network is retried after a poll, and
    contact lost for longer than ``grace_s`` raises :class:`CloudError` (the caller tears
    down ``what``)."""

    def __init__(self, api: str, what: str, grace_s: float, poll_s: float, bar: Progress) -> None:
        self.api, self.what, self.grace_s, self.poll_s, self.bar = api, what, grace_s, poll_s, bar
        self.since: float | None = None

    def read(self, fn: Callable[[], _T]) -> _T | None:
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


class Controller:
    """One ``teacher-cloud`` run (see the module docstring)."""

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
        self.cloud = job.cloud
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
        self.zones = list(self.cloud.zones)
        self.backend = backend or make_backend(opts, self.project)
        self.name = instance_name(job.name)
        self.labels = job_labels(job.name)
        self.poll = opts.poll_seconds or self.cloud.poll_seconds
        self.estimate: CostEstimate | None = None
        self.run: CloudRun | None = None
        self.spec: VmSpec | None = None
        self.zone: str | None = None  # where the current VM is
        self.current: Attempt | None = None
        self.progress: BucketProgress | None = None
        self.fingerprints: dict[str, str] = {}  # split -> job fingerprint (the preflight's)

    # --- 1. checks ------------------------------------------------------------------------

    def preflight(self) -> None:
        """Everything that can be refused before spending anything."""
        store = open_store(self.output)
        store.list("inputs/")  # credentials, bucket existence and access
        for z in self.zones:
            self.backend.check_zone(z)
        # the disk each VM gets (and is priced): the staged checkpoint and inputs
        cost = dataclasses.replace(self.opts.cost, boot_disk_gb=staged_disk_gb(self.job))
        self.opts = dataclasses.replace(self.opts, cost=cost)
        # refuses a teacher that fits the L4 in no way the job allows (resident, layered)
        self.estimate = estimate_cost(self.job, self.opts.cost)
        if self.job.teacher.mode == "auto":  # the VM runs the way that was estimated
            teacher = self.job.teacher.model_copy(update={"mode": self.estimate.way.mode})
            self.job = self.job.model_copy(update={"teacher": teacher})
        region = region_of(self.zones[0])
        vms = self.vms_at_once()
        self.backend.check_project(  # boot image, quotas (the VMs run at once), subnet
            Needs(
                region=region,
                gpus=vms * ACCELERATOR_COUNT,
                spot=self.cloud.spot,
                image_project=IMAGE_PROJECT,
                image_family=IMAGE_FAMILY,
                network=self.cloud.network,
                subnetwork=self.cloud.subnetwork or default_subnetwork(self.cloud.network, region),
                cpus=vms * MACHINE_VCPUS,
                disk_gb=vms * self.opts.cost.boot_disk_gb,
            )
        )
        self.fingerprints = expected_fingerprints(self.job)

    def vms_at_once(self) -> int:
        """VMs the run uses at once (the preflight's quota check): one."""
        return 1

    def complete(self) -> bool:
        """Every split has its manifest (refused if one is another job's)."""
        return all(
            stored_manifest(open_store(f"{self.output}/{split}"), fp) is not None
            for split, fp in self.fingerprints.items()
        )

    # --- 2. price ---------------------------------------------------------------------------

    def price_and_confirm(self) -> None:
        est = self.estimate
        assert est is not None
        self.console.print(render_table(est))
        usd = est.usd["total_spot" if self.cloud.spot else "total_on_demand"]
        if self.cloud.budget_usd and usd > self.cloud.budget_usd:
            raise CloudError(
                f"the estimate (${usd:,.2f}) is above cloud.budget_usd "
                f"(${self.cloud.budget_usd:,.2f}): raise the budget or shrink the job; nothing "
                "was spent"
            )
        if self.opts.yes:
            return
        if self.confirm is None or not sys.stdin.isatty():
            raise DistillError("teacher-cloud spends money: confirm with --yes (no terminal here)")
        if not self.confirm(f"Start the teacher on {self.project} for about ${usd:,.2f}?"):
            raise DistillError("cancelled; nothing was spent")

    # --- 3. stage and spec ------------------------------------------------------------------

    def max_run_s(self, hours_estimate: float) -> int:
        """Each VM's dead-man switch: cloud.max_run_hours, else 2 x the estimate + 1 h."""
        hours = self.cloud.max_run_hours or (2 * hours_estimate + 1)
        return int(min(max(hours * 3600, 30), 120 * 86400))

    def image(self) -> str:
        return self.opts.image or self.cloud.image or default_image(self.project, self.zones)

    def service_account(self) -> str:
        return (
            self.opts.service_account
            or self.cloud.service_account
            or f"distill-teacher@{self.project}.iam.gserviceaccount.com"
        )

    def make_spec(self) -> VmSpec:
        est = self.estimate
        assert est is not None
        raw, inputs = stage_inputs(self.job, self.console, gpu=self.opts.backend == "gce")
        max_run_s = self.max_run_s(est.spot_hours)
        image, sa = self.image(), self.service_account()
        return VmSpec(
            project=self.project,
            name=self.name,
            job_name=self.job.name,
            job_toml=vm_job_toml(raw),
            image=image,
            service_account_email=sa,
            zones=tuple(self.zones),
            provisioning_model="SPOT" if self.cloud.spot else "STANDARD",
            max_run_duration_s=max_run_s,
            inputs=inputs,
            status_url=f"{self.output}/{RECORD_PREFIX}/status",
            network=self.cloud.network,
            subnetwork=self.cloud.subnetwork,
            boot_disk_gb=est.opts.boot_disk_gb,
        )

    # --- 4. provision ------------------------------------------------------------------------

    def provision(self, first: int) -> str:
        """Create the VM, trying zones from ``first`` on; returns the zone."""
        assert self.spec is not None and self.run is not None
        deadline = time.monotonic() + self.cloud.provision_timeout_minutes * 60
        order = self.zones[first:] + self.zones[:first]
        backoff = 5.0
        while True:
            for z in order:
                self.console.print(f"creating {self.name} in {z} ({self.spec.provisioning_model})")
                try:
                    self._create_or_adopt(z)
                    return z
                except Stockout as e:
                    self.run.stockouts.append(z)
                    self.console.print(f"[yellow]{z}: no L4 capacity now[/yellow] ({e})")
            if time.monotonic() + backoff > deadline:
                raise Stockout(
                    f"no L4 capacity in {', '.join(self.zones)} for "
                    f"{self.cloud.provision_timeout_minutes:g} min: try later, other zones of "
                    "the region or another region (cloud.zones), or raise "
                    "cloud.provision_timeout_minutes; no VM was created"
                )
            self.console.print(f"all zones stocked out; retrying in {backoff:.0f} s")
            time.sleep(backoff)
            backoff = min(backoff * 2, 120.0)

    def _create_or_adopt(self, zone: str) -> None:
        """Create the VM in ``zone``; one of this name there already is adopted if it runs, else
        deleted and created anew (a stockout then fails over like any other)."""
        assert self.spec is not None
        try:
            self.backend.create(self.spec, zone)
        except AlreadyExists:
            st = self.backend.get(self.name, zone)
            if st is not None and st.live:
                self.console.print(f"{self.name} already runs in {zone}: adopting it")
                return
            self.backend.delete(self.name, zone)
            self.backend.create(self.spec, zone)

    # --- 5. watch ----------------------------------------------------------------------------

    def _status_object(self, attempt: Attempt) -> dict[str, Any] | None:
        if not attempt.vm_id:
            return None
        store = open_store(f"{self.output}/{RECORD_PREFIX}/status")
        name = f"{self.name}-{attempt.vm_id}.json"
        try:
            return json.loads(store.read_bytes(name))
        except DistillError:
            return None

    def _vm_log(self, attempt: Attempt, status: dict[str, Any]) -> str:
        """The VM's whole startup log (the record's ``log`` object), else its serial console."""
        store = open_store(f"{self.output}/{RECORD_PREFIX}/status")
        name = status.get("log") or f"{self.name}-{attempt.vm_id}.log"
        try:
            return store.read_bytes(name).decode(errors="replace")
        except DistillError:
            return self.backend.console(self.name, attempt.zone)

    def _ended(self, attempt: Attempt, last_guest: str) -> str:
        """Why the VM is gone or stopped: done | preempted | vanished (or raise on failure)."""
        # (the watch listed the bucket after it saw the VM gone: a complete set was seen there)
        status = self._status_object(attempt) or {}
        outcome = status.get("status") or last_guest
        # A preemption can kill the teacher before it handles SIGTERM (an error exit): the
        # preemption, not the exit code, is why the VM ended.
        if outcome == "preempted" or self.backend.was_preempted(
            self.name, attempt.zone, attempt.vm_id
        ):
            return "preempted"
        if outcome == "failed":
            tail = self._vm_log(attempt, status)
            full = (
                f" (the whole log: {self.output}/{RECORD_PREFIX}/status/{status['log']})"
                if status.get("log")
                else ""
            )
            raise TeacherFailed(
                f"the teacher VM {self.name} failed (exit code "
                f"{status.get('exit_code', '?')}); its last output{full}:\n"
                + "\n".join(tail.strip().splitlines()[-25:])
            )
        if outcome == "done":
            raise CloudError(
                f"{self.name} reported done but {self.output} has no manifest for every split"
            )
        max_run = self.spec.max_run_duration_s if self.spec else DEFAULT_MAX_RUN_S
        if attempt.live_seconds() >= max_run - 2 * self.poll:
            raise CloudError(
                f"{self.name} reached its max run duration ({max_run / 3600:.2f} h) and was "
                "deleted before the teacher finished: raise cloud.max_run_hours and rerun "
                "(the teacher resumes from the shards already in the bucket)"
            )
        return "vanished"

    def watch_bar(self) -> Progress:
        """The watch loops' bar: shards done of the total, then a line of progress info."""
        cols = (
            TextColumn("teacher-cloud"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
        )
        return Progress(*cols, console=self.console, transient=False)

    def watch(self, attempt: Attempt) -> str:
        """Poll until the shard set is complete or this VM ends; returns the outcome."""
        progress = self.progress
        assert progress is not None
        rate = Rate()
        last_guest = ""
        last_status = ""
        with self.watch_bar() as bar:
            snap = progress.poll()
            task = bar.add_task("", total=snap.shards_total, completed=snap.shards_done, info="")
            contact = Contact("Compute API", "the VM", self.opts.watch_grace_s, self.poll, bar)
            while True:
                got = contact.read(
                    lambda: (self.backend.get(self.name, attempt.zone), progress.poll())
                )
                if got is None:
                    continue
                st, snap = got
                if st is not None:
                    attempt.vm_id = attempt.vm_id or st.id
                    if st.status in ("STAGING", "RUNNING"):
                        attempt.mark_running()
                    last_guest = st.guest.get("distill/status", last_guest)
                    shown = f"{st.status}" + (f"/{last_guest}" if last_guest else "")
                    if shown != last_status:
                        bar.console.print(f"{self.name} in {attempt.zone}: {shown}")
                        last_status = shown
                if attempt._t_running is not None:
                    tps, eta = rate.update(snap)
                else:
                    tps, eta = 0.0, None
                bar.update(task, completed=snap.shards_done, info=self._info(snap, tps, eta, st))
                if snap.complete:
                    return "done"
                if st is None or st.status == "TERMINATED":
                    attempt.mark_ended()
                    return self._ended(attempt, last_guest)
                time.sleep(self.poll)

    def _let_it_finish(self, attempt: Attempt) -> None:
        """The shard sets are complete: give the teacher a moment to exit, record its outcome
        and delete its own VM, so the record says done rather than killed by our teardown
        (which follows, whatever happens here)."""
        deadline = time.monotonic() + self.opts.finish_grace_s
        while time.monotonic() < deadline:
            try:
                st = self.backend.get(self.name, attempt.zone)
            except (DistillError, OSError):
                return
            if st is None or st.status in ("STOPPING", "TERMINATED"):
                return
            if st.guest.get("distill/status") in ("done", "failed", "preempted"):
                return
            time.sleep(min(self.poll, 5.0))

    def _info(self, snap: Snapshot, tps: float, eta: float | None, st: VmState | None) -> str:
        assert self.run is not None
        parts = [
            f"shards {snap.shards_done}/{snap.shards_total}",
            f"{tps:,.0f} tok/s" if tps else "- tok/s",
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}" if eta is not None else "ETA -",
            f"${self.run.usd:,.4f} spent",
        ]
        if st is not None:
            parts.append(f"{st.status} in {st.zone}")
        return " · ".join(parts)

    # --- 6. teardown -------------------------------------------------------------------------

    def teardown(self) -> None:
        """Delete every VM of this job that still exists, and confirm that it is gone.

        Errors (an API outage) are retried with backoff for ``opts.teardown_timeout_s``: a VM
        left running costs more than a controller that waits."""
        deadline = time.monotonic() + self.opts.teardown_timeout_s
        pause = 1.0
        with signals_held(self.console):
            while True:
                try:
                    where = {(s.name, s.zone) for s in self.backend.list(self.labels)}
                    where = {w for w in where if w[0] == self.name}
                    if self.zone:
                        where.add((self.name, self.zone))
                    for name, zone in sorted(where):
                        if self.backend.get(name, zone) is not None:
                            self.console.print(f"deleting {name} in {zone}")
                            self.backend.delete(name, zone)
                    if all(self.backend.get(n, z) is None for n, z in where):
                        if self.current is not None:
                            self.current.mark_ended()
                        return
                except (DistillError, OSError) as e:
                    self.console.print(f"[red]teardown: {e}; retrying[/red]")
                if time.monotonic() + pause > deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 30.0)
            self.console.print(
                f"[red bold]could not confirm that {self.name} is deleted: run "
                f"`distill-ctl gc --yes` or `gcloud compute instances delete {self.name} "
                f"--zone {self.zone} --project {self.project}` now"
            )

    # --- 7. record ---------------------------------------------------------------------------

    def record(self) -> None:
        run = self.run
        if run is None:
            return
        run.ended = _now()
        data = json.dumps(run.to_dict(), indent=1).encode()
        stamp = run.started.replace(":", "").replace("-", "")
        name = f"run-{stamp}-{uuid.uuid4().hex[:8]}.json"
        local = self.opts.state_dir / "records" / label_value(self.job.name) / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        try:
            open_store(f"{self.output}/{RECORD_PREFIX}").put_bytes(name, data)
            where = f"{self.output}/{RECORD_PREFIX}/{name}"
        except DistillError as e:
            where = f"{local} (the bucket refused it: {e})"
        self.console.print(
            f"run record: {where}: {run.outcome}, {len(run.attempts)} VM(s), "
            f"{run.vm_seconds / 60:,.1f} VM-minutes, ${run.usd:,.4f} "
            f"(VM + disk estimated ${run.estimated_usd:,.4f})"
        )

    # --- all together --------------------------------------------------------------------------

    def _adopt(self) -> Attempt | None:
        """A live VM of this job from an earlier controller: watch it instead of a new one."""
        for st in self.backend.list(self.labels):
            if st.name != self.name:
                continue
            if st.live:
                self.console.print(
                    f"{st.name} is already running in {st.zone} (an earlier teacher-cloud ended "
                    "without tearing down): watching it"
                )
                self.zone = st.zone
                return Attempt(n=1, zone=st.zone, requested=st.created, vm_id=st.id)
            self.console.print(f"deleting stopped leftover {st.name} in {st.zone}")
            self.backend.delete(st.name, st.zone)
        return None

    def execute(self) -> CloudRun | None:
        """The whole run; returns its record (None when there was nothing to do)."""
        self.console.print(
            f"teacher-cloud: job {self.job.name}, project {self.project}, "
            f"zones {', '.join(self.zones)}, backend {self.backend.name}"
        )
        self.preflight()
        if self.complete():
            self.console.print(f"[green]{self.output}: every split is complete; nothing to do")
            return None
        adopted = self._adopt()
        if adopted is None:
            self.price_and_confirm()
        self.run = self.new_record(self.name)
        self.progress = self.bucket_progress()

        def body() -> None:
            self.spec = self.make_spec()
            self._loop(adopted)

        return self.supervised(body)

    def new_record(self, instance: str) -> CloudRun:
        """The run record, priced per VM-second from the estimate's price table."""
        est = self.estimate
        assert est is not None
        prices = est.prices
        return CloudRun(
            job=self.job.name,
            backend=self.backend.name,
            project=self.project,
            zones=self.zones,
            instance=instance,
            spot=self.cloud.spot,
            started=_now(),
            estimate=est.to_dict(),
            price_per_hour=prices.vm_spot_per_hour
            if self.cloud.spot
            else prices.vm_on_demand_per_hour,
            disk_per_hour=est.opts.boot_disk_gb * prices.boot_disk_per_gb_month / HOURS_PER_MONTH,
        )

    def bucket_progress(self) -> BucketProgress:
        """Shards done of each split's total (the estimate's sample counts)."""
        est = self.estimate
        assert est is not None
        per = self.job.teacher.samples_per_shard
        totals = {s: (-(-c["samples"] // per), c["tokens"]) for s, c in est.data.per_split.items()}
        return BucketProgress(self.output, totals)

    def supervised(self, body: Callable[[], None]) -> CloudRun:
        """Run ``body`` (SIGTERM raising), record its outcome; tear down and record always."""
        assert self.run is not None
        try:
            with sigterm_raises():
                body()
            self.run.outcome = "done"
            self.console.print(f"[green]teacher-cloud: shard sets complete in {self.output}")
        except KeyboardInterrupt:
            self.run.outcome = "interrupted"
            self.run.message = "Ctrl-C or SIGTERM"
            if self.current is not None:
                self.current.outcome = self.current.outcome or "interrupted"
            raise
        except DistillError as e:
            self.run.outcome = "failed"
            self.run.message = str(e)
            if self.current is not None:
                self.current.outcome = self.current.outcome or "failed"
            raise
        finally:
            self.teardown()
            self.record()
        return self.run

    def _loop(self, adopted: Attempt | None) -> None:
        assert self.run is not None
        zone_index = 0
        attempt = adopted
        while True:
            if attempt is None:
                attempt = Attempt(n=len(self.run.attempts) + 1, zone="", requested=_now())
            self.current = attempt
            self.run.attempts.append(attempt)
            if not attempt.zone:
                self.zone = attempt.zone = self.provision(zone_index)
            outcome = self.watch(attempt)
            attempt.outcome = outcome
            if outcome == "done":
                self._let_it_finish(attempt)
                return
            self.run.preemptions += 1
            self.console.print(
                f"[yellow]{self.name} was {outcome} in {attempt.zone} "
                f"(after {attempt.live_seconds() / 60:.1f} min); "
                f"relaunching ({self.run.preemptions}/{self.cloud.max_preemptions})"
            )
            if self.run.preemptions > self.cloud.max_preemptions:
                raise CloudError(
                    f"{self.name} was preempted {self.run.preemptions} times: giving up (raise "
                    "cloud.max_preemptions, or set cloud.spot = false for an on-demand VM); "
                    "rerun to resume from the shards in the bucket"
                )
            # the VM is gone (DELETE on preemption) or stopped: make sure before relaunching
            if self.backend.get(self.name, attempt.zone) is not None:
                self.backend.delete(self.name, attempt.zone)
            zone_index = self.zones.index(attempt.zone) if attempt.zone in self.zones else 0
            attempt = None


def teacher_cloud(
    job: Job,
    opts: CloudOptions,
    console: Console | None = None,
    confirm: Callable[[str], bool] | None = None,
) -> CloudRun | None:
    """One VM (``cloud.engine = "vm"``), or a Batch job of ``cloud.vms`` tasks."""
    if job.cloud.engine == "batch":
        if opts.backend != "gce":
            raise DistillError('cloud.engine = "batch" (--vms) runs on Google Cloud only')
        from distill.cloud.fanout import FanoutController

        return FanoutController(job, opts, console, confirm).execute()
    return Controller(job, opts, console, confirm).execute()


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
        deadline = time.monotonic() + opts.teardown_timeout_s
        while time.monotonic() < deadline and any(batch_api.get(j.name) for j in jobs):
            time.sleep(1.0)
        left += [j.name for j in jobs if batch_api.get(j.name) is not None]
    left += [s.name for s in found if backend.get(s.name, s.zone) is not None]
    if left:
        raise DistillError(f"still there after deletion: {', '.join(left)}")
    out.print(f"deleted {what}")
