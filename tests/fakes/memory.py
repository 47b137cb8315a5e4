"""In-memory doubles of a cloud for the engines' logic: no HTTP, no subprocess, no waiting.

:class:`MemoryBackend` (a :class:`~distill.cloud.backend.Backend`) and :class:`MemoryBatchApi`
(the calls :class:`~distill.cloud.fanout.BatchEngine` makes of Batch) keep their VMs, jobs
and tasks in dicts and move them on each time the engine looks: a running VM or task
"computes" its next shard by copying it from a real shard set that the real teacher wrote
once (:class:`ShardWorld`), and ends by writing what the real one writes (the manifest;
a fan-out task's ``parts.json`` and ``task-seconds/``). Faults are one call away:
:meth:`MemoryBackend.preempt`, stockouts per zone, a failing teacher; for Batch, a task
preempted or failed with an exit code, a cancellation, quota and stockout events, a job that
never leaves the queue. The wire-level behaviour (HTTP, guests, the real startup script) is
the HTTP stubs' (:mod:`fakes.compute`, :mod:`fakes.batch`); these hold the engines to the
same rules: Batch's one lifecycle policy retries only :data:`~distill.cloud.batch.RETRY_CODES`
and at most ``maxRetryCount`` times.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distill.cloud.backend import Needs, VmState
from distill.cloud.batch import RETRY_CODES, BatchSpec, JobState, TaskState
from distill.cloud.errors import AlreadyExists, NoAccelerator, Stockout
from distill.cloud.spec import ACCELERATOR_TYPE, VmSpec
from distill.format.manifest import MANIFEST
from distill.store.storage import ObjectExists, open_store

PARTS = "parts.json"
TASK_SECONDS = "task-seconds/"


class ShardWorld:
    """A real shard set (``source``: a directory with ``<split>/`` shard sets) that the
    doubles copy into ``output`` shard by shard, and the job fingerprints their manifests
    carry (the plan's: the job as the VMs run it)."""

    def __init__(self, source: Path, output: str, fingerprints: dict[str, str]) -> None:
        self.source, self.output, self.fingerprints = source, output, fingerprints
        self.manifests = {
            split: json.loads((source / split / MANIFEST).read_text()) for split in fingerprints
        }
        self._written: set[tuple[str, str]] | None = None

    def shards(self, split: str) -> list[str]:
        return [s["name"] for s in self.manifests[split]["shards"]]

    def has(self, split: str, name: str) -> bool:
        """Whether the shard and its sidecar are in the bucket (this world is its only writer:
        what it wrote is remembered, the rest listed once)."""
        if self._written is None:
            self._written = {
                (s, n) for s in self.fingerprints for n in open_store(f"{self.output}/{s}").list()
            }
        return (split, name.replace(".tar", ".json")) in self._written

    def put(self, split: str, name: str, data: bytes) -> None:
        with contextlib.suppress(ObjectExists):
            open_store(f"{self.output}/{split}").put_bytes(name, data)
        if self._written is not None:
            self._written.add((split, name))

    def copy(self, split: str, name: str) -> None:
        """The shard and then its sidecar, as the teacher uploads them."""
        src = self.source / split
        self.put(split, name, (src / name).read_bytes())
        sidecar = name.replace(".tar", ".json")
        self.put(split, sidecar, (src / sidecar).read_bytes())

    def manifest(self, split: str) -> bytes:
        body = {**self.manifests[split], "job_fingerprint": self.fingerprints[split]}
        return json.dumps(body).encode()

    def parts(self, split: str) -> bytes:
        body = {k: v for k, v in self.manifests[split].items() if k != "shards"}
        body = {**body, "shards": [], "job_fingerprint": self.fingerprints[split]}
        return json.dumps({"shards_total": len(self.shards(split)), "manifest": body}).encode()

    def next_missing(self, owns: Callable[[int], bool] = lambda i: True) -> tuple[str, str] | None:
        """(split, shard) of the first shard not yet there among those ``owns(index)``."""
        for split in self.fingerprints:
            for i, name in enumerate(self.shards(split)):
                if owns(i) and not self.has(split, name):
                    return split, name
        return None


# --- one VM at a time (the single-VM engine's Backend) ------------------------------------------


@dataclass
class MemVm:
    name: str
    zone: str
    id: str
    labels: dict[str, str]
    spec: VmSpec
    status: str = "RUNNING"
    guest: dict[str, str] = field(default_factory=dict)


class MemoryBackend:
    """See the module docstring. ``world`` is set once the test knows the plan's output."""

    name = "memory"

    def __init__(
        self, zones: tuple[str, ...] = ("us-central1-a", "us-central1-b", "us-central1-c")
    ) -> None:
        self.world: ShardWorld | None = None
        self.offers = set(zones)  # zones with an L4
        self.stockouts: dict[str, int] = {}  # zone -> creations still refused
        self.vms: dict[tuple[str, str], MemVm] = {}
        self.created: list[tuple[str, str]] = []  # (name, zone), every creation in order
        self.deleted: list[tuple[str, str]] = []
        self.preempted_ids: set[str] = set()
        self.needs: Needs | None = None  # what the preflight asked for
        self.fail_with: str | None = None  # the next running VM's teacher fails, printing it
        self.paused = False  # running VMs compute nothing
        self.on_shard: Callable[[MemVm, int], None] = lambda vm, n: (
            None
        )  # after each shard (n written so far)
        self.consoles: dict[str, str] = {}  # name -> the serial console's text
        self._ids = itertools.count(1000)

    # --- Backend ---------------------------------------------------------------------------

    def check_zone(self, zone: str, accelerator: str = ACCELERATOR_TYPE) -> None:
        if zone not in self.offers:
            raise NoAccelerator(f"zone {zone} does not offer {accelerator}")

    def check_project(self, needs: Needs) -> None:
        self.needs = needs

    def create(self, spec: VmSpec, zone: str) -> None:
        if self.stockouts.get(zone, 0) > 0:
            self.stockouts[zone] -= 1
            raise Stockout(f"ZONE_RESOURCE_POOL_EXHAUSTED: {zone}")
        if (spec.name, zone) in self.vms:
            raise AlreadyExists(f"{spec.name} already exists in {zone}")
        vm = MemVm(spec.name, zone, str(next(self._ids)), spec.labels(), spec)
        self.vms[(spec.name, zone)] = vm
        self.created.append((spec.name, zone))

    def get(self, name: str, zone: str) -> VmState | None:
        vm = self.vms.get((name, zone))
        if vm is None:
            return None
        if vm.status == "RUNNING":
            self._compute(vm)
        return VmState(vm.name, vm.zone, vm.status, vm.id, vm.labels, dict(vm.guest))

    def delete(self, name: str, zone: str) -> None:
        if self.vms.pop((name, zone), None) is not None:
            self.deleted.append((name, zone))

    def list(self, labels: dict[str, str]) -> list[VmState]:
        return [
            VmState(v.name, v.zone, v.status, v.id, v.labels, dict(v.guest))
            for v in self.vms.values()
            if all(v.labels.get(k) == val for k, val in labels.items())
        ]

    def was_preempted(self, name: str, zone: str, vm_id: str) -> bool:
        return vm_id in self.preempted_ids

    def console(self, name: str, zone: str) -> str:
        return self.consoles.get(name, "")

    # --- the world moving on ---------------------------------------------------------------

    def live(self) -> list[MemVm]:
        return [v for v in self.vms.values() if v.status == "RUNNING"]

    def preempt(self, name: str) -> None:
        """GCE preempts the VM: TERMINATED, then deleted (instanceTerminationAction DELETE)."""
        for key, vm in list(self.vms.items()):
            if vm.name == name:
                self.preempted_ids.add(vm.id)
                del self.vms[key]

    def _compute(self, vm: MemVm) -> None:
        """One step of the VM's teacher: its next shard, or its end."""
        world = self.world
        assert world is not None, "MemoryBackend.world is set by the test"
        if self.fail_with is not None:
            self.consoles = {vm.name: self.fail_with}
            vm.guest["distill/status"], vm.status = "failed", "TERMINATED"
            self.fail_with = None
            return
        vm.guest["distill/status"] = "running"
        if self.paused:
            return
        nxt = world.next_missing()
        if nxt is not None:
            world.copy(*nxt)
            done = sum(1 for s in world.fingerprints for n in world.shards(s) if world.has(s, n))
            self.on_shard(vm, done)
            return
        for split in world.fingerprints:
            world.put(split, MANIFEST, world.manifest(split))
        vm.guest["distill/status"] = "done"


# --- Batch ------------------------------------------------------------------------------------


@dataclass
class MemTask:
    index: int
    state: str = "PENDING"
    exit_codes: list[int] = field(default_factory=list)
    attempts: int = 0


@dataclass
class MemJob:
    name: str
    spec: BatchSpec
    tasks: list[MemTask]
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "QUEUED"
    events: list[str] = field(default_factory=list)

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.events.append(f"Job state is set from {self.state} to {state}.")
            self.state = state


class MemoryBatchApi:
    """The Batch calls of the fan-out (:class:`~distill.cloud.batch.BatchApi`'s), in memory."""

    def __init__(self, project: str = "distill-test") -> None:
        self.project = project
        self.world: ShardWorld | None = None
        self.jobs: dict[str, MemJob] = {}
        self.created: list[BatchSpec] = []
        self.deleted: list[str] = []
        self.stockouts = 0  # allocation rounds still refused (the job stays SCHEDULED)
        self.stockout_fails = False  # ... and Batch fails the job on one
        self.quota_short: str | None = None  # the job is held QUEUED for this quota
        self.hold = False  # jobs stay QUEUED with no event
        self.paused = False  # running tasks compute nothing

    def create(self, spec: BatchSpec) -> str:
        spec.body()  # the body as it would be sent (BatchSpec checks its bounds)
        name = f"{spec.parent}/jobs/{spec.job_id}"
        if name in self.jobs:
            raise AlreadyExists(f"Resource '{name}' already exists")
        self.jobs[name] = MemJob(name, spec, [MemTask(i) for i in range(spec.tasks)])
        self.created.append(spec)
        return name

    def get(self, name: str) -> JobState | None:
        job = self.jobs.get(name)
        if job is None:
            return None
        self._advance(job)
        return JobState(job.name, job.state, list(job.events), dict(self._labels(job)), "", job.uid)

    def tasks(self, name: str) -> list[TaskState]:
        job = self.jobs[name]
        return [
            TaskState(t.index, t.state, len(t.exit_codes), list(t.exit_codes)) for t in job.tasks
        ]

    def delete(self, name: str) -> None:
        if self.jobs.pop(name, None) is not None:
            self.deleted.append(name)

    def list(self, region: str, labels: dict[str, str]) -> list[JobState]:
        out = [self.get(n) for n in list(self.jobs) if f"/locations/{region}/" in n]
        return [j for j in out if j and all(j.labels.get(k) == v for k, v in labels.items())]

    @staticmethod
    def _labels(job: MemJob) -> dict[str, str]:
        return dict(job.spec.body()["labels"])

    # --- faults ------------------------------------------------------------------------------

    def job(self) -> MemJob:
        (job,) = self.jobs.values()
        return job

    def end_attempt(self, index: int, code: int) -> None:
        """Task ``index``'s attempt ends with ``code``: the one lifecycle policy (RETRY_TASK on
        RETRY_CODES) and maxRetryCount decide between a retry and a failure."""
        job = self.job()
        t = job.tasks[index]
        t.exit_codes.append(code)
        retries = len(t.exit_codes)
        if code in RETRY_CODES and retries <= job.spec.max_retries:
            t.state = "RUNNING"
            t.attempts += 1
        else:
            t.state = "FAILED"

    def cancel(self, name: str) -> None:
        job = self.jobs[name]
        for t in job.tasks:
            if t.state in ("PENDING", "RUNNING"):
                t.state = "FAILED"
        job.set_state("CANCELLED")

    # --- the world moving on -------------------------------------------------------------------

    def _advance(self, job: MemJob) -> None:
        world = self.world
        assert world is not None, "MemoryBatchApi.world is set by the test"
        if job.state == "QUEUED":
            if self.quota_short:
                text = (
                    f"Quota checking process decides to delay scheduling for the job {job.uid} "
                    f"due to inadequate quotas [Quota: {self.quota_short}, limit: 0, usage: 0, "
                    f"wanted: {len(job.tasks)}.]."
                )
                if text not in job.events:
                    job.events.append(text)
                return
            if self.hold:
                return
            job.set_state("SCHEDULED")
        if job.state == "SCHEDULED":
            if self.stockouts > 0:
                self.stockouts -= 1
                job.events.append(
                    "Batch Error: code - CODE_GCE_ZONE_RESOURCE_POOL_EXHAUSTED, description - "
                    "The zone does not have enough resources available."
                )
                if self.stockout_fails:
                    job.set_state("FAILED")
                return
            for t in job.tasks:
                t.state, t.attempts = "RUNNING", 1
            job.set_state("RUNNING")
        if job.state != "RUNNING":
            return
        n = len(job.tasks)
        for t in job.tasks:
            if t.state != "RUNNING" or self.paused:
                continue
            nxt = world.next_missing(lambda i, t=t: i % n == t.index)
            if nxt is not None:
                world.copy(*nxt)
                continue
            for split in world.fingerprints:
                world.put(split, PARTS, world.parts(split))
                body = {"task": t.index, "tasks": n, "seconds": 1.0}
                world.put(
                    split,
                    f"{TASK_SECONDS}task-{t.index:04d}-{uuid.uuid4().hex[:8]}.json",
                    json.dumps(body).encode(),
                )
            t.state = "SUCCEEDED"
        if all(t.state in ("SUCCEEDED", "FAILED") for t in job.tasks):
            ok = all(t.state == "SUCCEEDED" for t in job.tasks)
            job.set_state("SUCCEEDED" if ok else "FAILED")
