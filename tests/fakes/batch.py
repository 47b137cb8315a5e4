"""A local stand-in for the Google Cloud Batch REST API (``batch/v1``; there is no emulator).

``FakeBatch`` serves what the real ``google-cloud-batch`` client
(``BatchServiceClient(transport="rest", client_options={"api_endpoint": url})``) calls for a
fan-out: ``projects.locations.jobs`` create, get, list (``filter`` on labels), delete;
``jobs.taskGroups.tasks`` list; ``operations`` get. JSON shapes are the API's (camelCase,
int64 as strings, enums by name; errors as ``{"error": {"code", "message", "status"}}``).

Every request body is checked against Batch's discovery document (tests/fakes/discovery.py) and
the rules task.proto states: ``maxRetryCount`` in [0, 10], at most one lifecycle policy.

The lifecycle, as Batch runs it:

- a job is QUEUED, then SCHEDULED while its VMs are allocated, then RUNNING once a task
  runs, then SUCCEEDED (every task succeeded) or FAILED (every task ended, one failed);
- a job whose VMs the quotas cannot hold (``gpu_quota``) stays QUEUED with Batch's "Quota
  checking process decides to delay scheduling ... due to inadequate quotas" event, and fails
  after ``queue_limit_s`` (Batch: 2 days); ``creation_quota_error`` instead makes the VM
  creation fail for quota (``CODE_GCE_QUOTA_EXCEEDED``), which fails the job;
- each task is PENDING -> ASSIGNED -> RUNNING -> SUCCEEDED | FAILED on its own "VM": a local
  process group (tests/fakes/guest.py) running the container runnable through ``guest``, with
  the runnable's environment plus ``BATCH_TASK_INDEX``, ``BATCH_TASK_COUNT`` and
  ``BATCH_TASK_RETRY_ATTEMPT``;
- the VM has a GPU when the instance policy asks for one with ``installGpuDrivers``; the
  container sees it only with ``--gpus all`` in its options (the guest's environment then has
  ``FAKE_GPU=1``), and does not start at all (exit code 125, nvidia-container-cli's
  requirement error) when the driver (``driverVersion``; Batch's default,
  :data:`DEFAULT_DRIVER`, where unset) is older than the image's CUDA needs;
- a failed attempt's exit code goes through the one lifecycle policy: RETRY_TASK retries the
  codes it lists and fails every other, FAIL_TASK fails the codes it lists and retries every
  other, and with no policy every non-zero code is retried; a retry happens while the task's
  retries are under ``maxRetryCount``; a task's status events record each attempt's exit code;
- ``maxRunDuration`` (scaled by ``max_run_scale``): an attempt past it is stopped and ends
  with Batch's exit code 50005;
- :meth:`FakeBatch.preempt`: the task's VM goes away: the container is stopped as ``docker
  stop`` does (SIGTERM to its main process only, SIGKILL after ``preempt_grace_s``) and the
  attempt ends with Batch's exit code 50001;
- allocation errors appear as the job's status events, by Batch's codes: a stockout
  (``CODE_GCE_ZONE_RESOURCE_POOL_EXHAUSTED``) keeps the job SCHEDULED while Batch retries, or
  (``stockout_fails``) fails it;
- cancel: CANCELLATION_IN_PROGRESS, every task's VM goes away, then CANCELLED (the job stays
  until deleted);
- delete: DELETION_IN_PROGRESS, every task's VM goes away, then the job is gone (404).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from typing import Any

from fakes.discovery import problems
from fakes.guest import kill_group, spawn, stop_container
from fakes.http import JsonApi, StubError, serve

EXIT_VM_PREEMPTED = 50001  # Batch's reserved exit codes
EXIT_MAX_RUN = 50005
MAX_RETRY_COUNT = 10  # task.proto: "The valid value range is [0, 10]"
QUEUE_LIMIT_S = 2 * 86400  # Batch fails a job QUEUED this long (its quotas page)
# The driver Batch installs where Accelerator.driverVersion is unset (the compute-gpu-installation
# script's pin), and the oldest the teacher image's CUDA 12.8 starts with (NVIDIA_REQUIRE_CUDA)
DEFAULT_DRIVER = "550.54.15"
IMAGE_MIN_DRIVER = 570
# (runnable, environment) -> (argv, env) of the local process that stands for the container
TaskGuest = Callable[[dict[str, Any], dict[str, str]], tuple[list[str], dict[str, str]]]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(StubError):
    """An HTTP error in Google's JSON error shape (``code``, ``message``, ``status``)."""

    STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 409: "ALREADY_EXISTS", 503: "UNAVAILABLE"}

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def body(self) -> dict[str, Any]:
        name = self.STATUS.get(self.status, "UNKNOWN")
        return {"error": {"code": self.status, "message": self.message, "status": name}}


@dataclass
class FakeTask:
    index: int
    state: str = "PENDING"
    retries: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    serial: list[str] = field(default_factory=list)
    preempted: bool = False
    timed_out: bool = False  # the attempt ran past maxRunDuration
    attempts: int = 0  # VMs this task ran on

    def event(self, state: str, description: str, exit_code: int | None = None) -> None:
        ev: dict[str, Any] = {
            "type": "STATUS_CHANGED",
            "description": description,
            "eventTime": _now(),
            "taskState": state,
        }
        if exit_code is not None:
            ev["taskExecution"] = {"exitCode": exit_code}
        self.events.append(ev)
        self.state = state


@dataclass
class FakeJob:
    name: str
    body: dict[str, Any]
    uid: str
    tasks: list[FakeTask]
    state: str = "QUEUED"
    events: list[dict[str, Any]] = field(default_factory=list)
    created: str = field(default_factory=_now)
    deleting: bool = False
    cancelling: bool = False

    @property
    def group(self) -> dict[str, Any]:
        return self.body["taskGroups"][0]

    @property
    def spec(self) -> dict[str, Any]:
        return self.group["taskSpec"]

    @property
    def labels(self) -> dict[str, str]:
        return self.body.get("labels", {})

    def event(self, description: str, kind: str = "STATUS_CHANGED") -> None:
        self.events.append({"type": kind, "description": description, "eventTime": _now()})

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.event(f"Job state is set from {self.state} to {state} for job {self.name}.")
            self.state = state


class FakeBatch:
    """The stub server; see the module docstring. ``start()`` returns its base URL."""

    def __init__(
        self,
        project: str = "distill-test",
        guest: TaskGuest | None = None,
        step_s: float = 0.05,
        preempt_grace_s: float = 10.0,
    ) -> None:
        self.project = project
        self.guest = guest
        self.step_s = step_s
        self.preempt_grace_s = preempt_grace_s
        self.jobs: dict[str, FakeJob] = {}
        self.history: list[FakeJob] = []  # every job ever created
        self.created: list[dict[str, Any]] = []  # every create body, in order
        self.stockouts = 0  # allocation attempts still to refuse (ZONE_RESOURCE_POOL_EXHAUSTED)
        self.stockout_fails = False  # a stockout fails the job instead of being retried
        self.gpu_quota: float | None = None  # an L4 limit under the job's need: held QUEUED
        self.creation_quota_error = False  # the VMs' creation fails for quota (job FAILED)
        self.queue_limit_s = QUEUE_LIMIT_S  # QUEUED this long (for quota): the job fails
        self.hold_queued = False  # every job stays QUEUED, with no event
        self.failures = 0  # the next N API requests answer 503
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.max_run_scale = 1.0  # < 1 shortens maxRunDuration (tests of a hung task)
        self._lock = threading.RLock()
        self._ops = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # --- control (tests) --------------------------------------------------------------------

    def start(self) -> str:
        self._server, self.url = serve(_Handler, self)
        return self.url

    def stop(self) -> None:
        """Kill every task's processes and stop serving."""
        for job in self.history:
            job.deleting = True
            for t in job.tasks:
                kill_group(t.proc, 0)
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeBatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def live(self) -> list[FakeJob]:
        with self._lock:
            return list(self.jobs.values())

    def vms(self) -> list[FakeTask]:
        """Tasks whose VM (process group) is still there, in any job, deleted ones too."""
        return [t for j in self.history for t in j.tasks if t.proc and t.proc.poll() is None]

    def task(self, index: int, job: FakeJob | None = None) -> FakeTask:
        job = job or self.history[-1]
        return job.tasks[index]

    def preempt(self, index: int, job: FakeJob | None = None) -> None:
        """The Spot VM of task ``index`` is preempted (asynchronously)."""
        t = self.task(index, job)
        if t.state != "RUNNING" or t.proc is None:
            raise KeyError(f"task {index} is not running ({t.state})")
        t.preempted = True
        threading.Thread(
            target=stop_container, args=(t.proc, self.preempt_grace_s), daemon=True
        ).start()

    def wait_for(self, pred: Callable[[], bool], timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return pred()

    # --- lifecycle --------------------------------------------------------------------------

    def create(self, parent: str, job_id: str, body: dict[str, Any]) -> FakeJob:
        m = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)", parent)
        if not m or m.group(1) != self.project:
            raise ApiError(404, f"Resource '{parent}' was not found")
        if not re.fullmatch(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?", job_id or ""):
            raise ApiError(
                400,
                f"job_id '{job_id}' is invalid: it must match ^[a-z]([a-z0-9-]{{0,61}}[a-z0-9])?$",
            )
        groups = body.get("taskGroups") or []
        if len(groups) != 1:
            raise ApiError(400, "TaskGroups in the Job: exactly one TaskGroup is supported")
        spec = groups[0].get("taskSpec", {})
        retries = int(spec.get("maxRetryCount", 0))
        if not 0 <= retries <= MAX_RETRY_COUNT:
            raise ApiError(
                400,
                f"Invalid value for field 'job.task_groups[0].task_spec.max_retry_count': "
                f"{retries}. The valid value range is [0, {MAX_RETRY_COUNT}].",
            )
        if len(spec.get("lifecyclePolicies", [])) > 1:
            raise ApiError(
                400,
                "Invalid value for field 'job.task_groups[0].task_spec.lifecycle_policies': "
                "only one lifecycle policy is supported.",
            )
        name = f"{parent}/jobs/{job_id}"
        with self._lock:
            if name in self.jobs:
                raise ApiError(409, f"Resource '{name}' already exists")
            count = int(groups[0].get("taskCount", 1))
            groups[0]["name"] = f"{name}/taskGroups/group0"
            job = FakeJob(name, body, str(uuid.uuid4()), [FakeTask(i) for i in range(count)])
            self.jobs[name] = job
            self.history.append(job)
            self.created.append(body)
        job.event(f"Job state is set to QUEUED for job {name}.")
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return job

    def _policy(self, job: FakeJob) -> dict[str, Any]:
        return job.body.get("allocationPolicy", {}).get("instances", [{}])[0]

    def _gpus(self, job: FakeJob) -> int:
        pol = self._policy(job).get("policy", {})
        return sum(int(a.get("count", 0)) for a in pol.get("accelerators", []))

    def _driver(self, job: FakeJob) -> str:
        pol = self._policy(job).get("policy", {})
        versions = [a.get("driverVersion") for a in pol.get("accelerators", [])]
        return next((v for v in versions if v), DEFAULT_DRIVER)

    def _quota_short(self, job: FakeJob, region: str) -> str | None:
        """The quota check's delay message, while the L4s the job needs exceed the limit."""
        need = self._gpus(job) * min(int(job.group.get("parallelism", 1)), len(job.tasks))
        if self.gpu_quota is None or need <= self.gpu_quota:
            return None
        return (
            f"Quota checking process decides to delay scheduling for the job {job.uid} due to "
            f"inadequate quotas [Quota: NVIDIA_L4_GPUS, limit: {self.gpu_quota:g}, usage: 0, "
            f"wanted: {need}.]."
        )

    def _fail_unrun(self, job: FakeJob, why: str) -> None:
        for t in job.tasks:
            t.event("FAILED", f"Task state is updated from {t.state} to FAILED: {why}")
        job.set_state("FAILED")

    def _run(self, job: FakeJob) -> None:
        """QUEUED (quota) -> SCHEDULED -> allocation -> tasks, ``parallelism`` at a time."""
        time.sleep(self.step_s)
        region = job.name.split("/")[3]
        queued = time.monotonic()
        while not job.deleting and not job.cancelling:
            if self.hold_queued:  # queued behind other work, no event saying why
                time.sleep(self.step_s)
                continue
            short = self._quota_short(job, region)
            if short is None:
                break
            if not job.events or job.events[-1]["description"] != short:
                job.event(short)
            if time.monotonic() - queued > self.queue_limit_s:
                job.event(
                    f"Job {job.name} exceeded the maximum wait time in QUEUED state and is failed."
                )
                self._fail_unrun(job, "the job was never scheduled")
                return
            time.sleep(self.step_s * 4)
        if job.deleting or job.cancelling:
            return
        job.set_state("SCHEDULED")
        if self.creation_quota_error:
            job.event(
                "Batch Error: code - CODE_GCE_QUOTA_EXCEEDED, description - Instance "
                f"'{job.uid[:8]}-group0-0-abcd' creation failed: Quota 'NVIDIA_L4_GPUS' "
                f"exceeded.  Limit: 0.0 in region {region}.",
                "RESOURCE_ALLOCATION_FAILED",
            )
            self._fail_unrun(job, "its VM could not be created (quota)")
            return
        while not job.deleting and not job.cancelling:
            with self._lock:
                stocked_out = self.stockouts > 0
                self.stockouts -= 1 if stocked_out else 0
            if not stocked_out:
                break
            zone = job.body["allocationPolicy"]["location"]["allowedLocations"][0]
            job.event(
                "Batch Error: code - CODE_GCE_ZONE_RESOURCE_POOL_EXHAUSTED, description - The "
                f"zone 'projects/{self.project}/{zone}' does not have enough resources "
                "available to fulfill the request.  Try a different zone, or try again later.",
                "RESOURCE_ALLOCATION_FAILED",
            )
            if self.stockout_fails:
                self._fail_unrun(job, "no VM could be allocated")
                return
            time.sleep(self.step_s * 4)
        parallel = threading.Semaphore(int(job.group.get("parallelism", len(job.tasks))))
        runners = [
            threading.Thread(target=self._task, args=(job, t, parallel), daemon=True)
            for t in job.tasks
        ]
        for r in runners:
            r.start()
        for r in runners:
            r.join()
        if job.deleting or job.cancelling:
            return
        states = {t.state for t in job.tasks}
        job.set_state("SUCCEEDED" if states == {"SUCCEEDED"} else "FAILED")

    def _action(self, job: FakeJob, code: int) -> str:
        """task.proto: RETRY_TASK retries on a listed code and fails on any other; FAIL_TASK
        fails on a listed code and retries any other; no policy retries every code."""
        policies = job.spec.get("lifecyclePolicies", [])
        if not policies:
            return "RETRY_TASK"
        pol = policies[0]
        listed = code in pol.get("actionCondition", {}).get("exitCodes", [])
        if pol.get("action") == "FAIL_TASK":
            return "FAIL_TASK" if listed else "RETRY_TASK"
        return "RETRY_TASK" if listed else "FAIL_TASK"

    def _task(self, job: FakeJob, t: FakeTask, parallel: threading.Semaphore) -> None:
        with parallel:
            while not job.deleting and not job.cancelling:
                t.event("ASSIGNED", f"Task state is updated from {t.state} to ASSIGNED.")
                time.sleep(self.step_s)
                rc = self._attempt(job, t)
                if job.deleting:
                    return
                if job.cancelling:
                    t.event("FAILED", "Task state is updated from RUNNING to FAILED: cancelled.")
                    return
                if rc == 0:
                    t.event("SUCCEEDED", "Task state is updated from RUNNING to SUCCEEDED.", 0)
                    return
                max_retries = int(job.spec.get("maxRetryCount", 0))
                if self._action(job, rc) == "RETRY_TASK" and t.retries < max_retries:
                    t.retries += 1
                    t.event(
                        "FAILED",
                        f"Task state is updated from RUNNING to FAILED with exit code {rc}; "
                        f"retrying ({t.retries}/{max_retries}).",
                        rc,
                    )
                    t.event("PENDING", "Task state is updated from FAILED to PENDING.")
                    continue
                t.event(
                    "FAILED",
                    f"Task state is updated from RUNNING to FAILED with exit code {rc}.",
                    rc,
                )
                return

    def _container(self, job: FakeJob, runnable: dict[str, Any]) -> tuple[bool, str | None]:
        """(the container sees the GPU, why it cannot start at all or None)."""
        gpu = bool(self._policy(job).get("installGpuDrivers")) and self._gpus(job) > 0
        options = runnable.get("container", {}).get("options", "").split()
        asked = "--gpus=all" in options or any(
            options[i : i + 2] == ["--gpus", "all"] for i in range(len(options))
        )
        visible = gpu and asked
        driver = self._driver(job)
        if visible and int(driver.split(".")[0]) < IMAGE_MIN_DRIVER:
            return visible, (
                "docker: Error response from daemon: failed to create task for container: "
                "nvidia-container-cli: requirement error: unsatisfied condition: cuda>=12.8, "
                f"please update your driver to a newer version (driver {driver})"
            )
        return visible, None

    def _attempt(self, job: FakeJob, t: FakeTask) -> int:
        """One run of the task on a new "VM"; its exit code (50001 when preempted)."""
        runnable = job.spec["runnables"][0]
        env = {
            **runnable.get("environment", {}).get("variables", {}),
            "BATCH_TASK_INDEX": str(t.index),
            "BATCH_TASK_COUNT": str(len(job.tasks)),
            "BATCH_TASK_RETRY_ATTEMPT": str(t.retries),
            "BATCH_JOB_UID": job.uid,
        }
        visible, refused = self._container(job, runnable)
        if visible:
            env["FAKE_GPU"] = "1"
        assert self.guest is not None, "FakeBatch(guest=...) runs the tasks"
        argv, full_env = self.guest(runnable, env)
        if refused is not None:  # the container never starts: docker run's own exit code
            argv = [sys.executable, "-c", f"import sys; print({refused!r}); sys.exit(125)"]
        done = threading.Event()
        with self._lock:
            if job.deleting or job.cancelling:
                return -1
            t.preempted = t.timed_out = False
            t.attempts += 1
            t.serial.append(f"--- attempt {t.attempts} (task {t.index}) ---\n")
            t.proc = spawn(argv, full_env, t.serial, lambda rc: done.set())
        t.event("RUNNING", f"Task state is updated from ASSIGNED to RUNNING (VM {t.attempts}).")
        job.set_state("RUNNING")
        limit = float(job.spec.get("maxRunDuration", "0s").rstrip("s") or 0) * self.max_run_scale
        if limit and not done.wait(limit) and not t.preempted:
            t.timed_out = True
            stop_container(t.proc, 2.0)
        done.wait()
        assert t.proc is not None
        if t.preempted:
            return EXIT_VM_PREEMPTED
        return EXIT_MAX_RUN if t.timed_out else t.proc.returncode

    def _stop_vms(self, job: FakeJob) -> None:
        threads = [
            threading.Thread(target=stop_container, args=(t.proc, 2.0), daemon=True)
            for t in job.tasks
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    def cancel(self, name: str) -> str:
        """``jobs.cancel``: the tasks' VMs go away; the job ends CANCELLED and stays."""
        with self._lock:
            job = self.jobs.get(name)
            if job is None:
                raise ApiError(404, f"Job '{name}' was not found")
            if job.state in ("SUCCEEDED", "FAILED", "CANCELLED", "DELETION_IN_PROGRESS"):
                raise ApiError(400, f"Job '{name}' in state {job.state} cannot be cancelled")
            job.cancelling = True
        job.set_state("CANCELLATION_IN_PROGRESS")

        def run() -> None:
            self._stop_vms(job)
            time.sleep(self.step_s)
            if not job.deleting:
                job.set_state("CANCELLED")

        threading.Thread(target=run, daemon=True).start()
        return f"{name.rsplit('/jobs/', 1)[0]}/operations/operation-{next(self._ops)}"

    def delete(self, name: str) -> str:
        with self._lock:
            job = self.jobs.get(name)
            if job is None:
                raise ApiError(404, f"Job '{name}' was not found")
            job.deleting = True
        job.set_state("DELETION_IN_PROGRESS")

        def run() -> None:
            self._stop_vms(job)
            time.sleep(self.step_s)
            with self._lock:
                self.jobs.pop(name, None)

        threading.Thread(target=run, daemon=True).start()
        return f"{name.rsplit('/jobs/', 1)[0]}/operations/operation-{next(self._ops)}"

    # --- JSON -------------------------------------------------------------------------------

    def job_json(self, job: FakeJob) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for t in job.tasks:
            counts[t.state] = counts.get(t.state, 0) + 1
        return {
            **job.body,
            "name": job.name,
            "uid": job.uid,
            "status": {
                "state": job.state,
                "statusEvents": list(job.events),
                "taskGroups": {"group0": {"counts": {k: str(v) for k, v in counts.items()}}},
            },
            "createTime": job.created,
            "updateTime": _now(),
        }

    def task_json(self, job: FakeJob, t: FakeTask) -> dict[str, Any]:
        return {
            "name": f"{job.name}/taskGroups/group0/tasks/{t.index}",
            "status": {"state": t.state, "statusEvents": list(t.events)},
        }


def _as_job(raw: bytes) -> dict[str, Any]:
    """A request body as the API reads it: its discovery document's Job (unknown fields, wrong
    types and enum values are a 400), then the message (enums sent as numbers read by name)."""
    from google.cloud import batch_v1

    try:
        sent = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"Invalid JSON payload received. {e}") from None
    wrong = problems("batch.v1", "Job", sent)
    if wrong:
        raise ApiError(400, f"Invalid JSON payload received. {'; '.join(wrong)}")
    try:
        job = batch_v1.Job.from_json(raw)
    except Exception as e:  # noqa: BLE001 - the API's answer to a malformed body
        raise ApiError(400, f"Invalid JSON payload received. {e}") from None
    return json.loads(batch_v1.Job.to_json(job, use_integers_for_enums=False))


_TERM = re.compile(r'^\s*labels\.([\w-]+)\s*=\s*"([^"]*)"\s*$')


def _filtered(jobs: list[FakeJob], text: str) -> list[FakeJob]:
    """``labels.KEY="VALUE"`` terms joined by AND; anything else is a 400, never ignored."""
    if not text:
        return jobs
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        m = _TERM.match(part)
        if not m:
            raise ApiError(400, f"Invalid filter: '{text}' (not supported by the stub)")
        terms.append((m.group(1), m.group(2)))
    return [j for j in jobs if all(j.labels.get(k) == v for k, v in terms)]


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile("^/v1/" + p + "$"), h)
    for m, p, h in [
        ("POST", r"(?P<parent>projects/[^/]+/locations/[^/]+)/jobs", "create"),
        ("GET", r"(?P<parent>projects/[^/]+/locations/[^/]+)/jobs", "list"),
        ("GET", r"(?P<name>projects/[^/]+/locations/[^/]+/jobs/[^/:]+)", "get"),
        ("DELETE", r"(?P<name>projects/[^/]+/locations/[^/]+/jobs/[^/:]+)", "delete"),
        ("POST", r"(?P<name>projects/[^/]+/locations/[^/]+/jobs/[^/:]+):cancel", "cancel"),
        (
            "GET",
            r"(?P<name>projects/[^/]+/locations/[^/]+/jobs/[^/]+)/taskGroups/group0/tasks",
            "tasks",
        ),
        ("GET", r"(?P<name>projects/[^/]+/locations/[^/]+/operations/[^/]+)", "op_get"),
    ]
]


class _Handler(JsonApi):
    """Bodies are read as the API's Job message (unknown fields are a 400, enums sent as
    numbers, as the REST client does, read by their names)."""

    stub: FakeBatch
    routes = _ROUTES

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return ApiError(status, message).body()

    def read_body(self, raw: bytes) -> dict[str, Any]:
        return _as_job(raw) if raw else {}

    def _job(self, name: str) -> FakeJob:
        with self.stub._lock:
            job = self.stub.jobs.get(name)
        if job is None:
            raise ApiError(404, f"Job '{name}' was not found")
        return job

    def h_create(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        job = self.stub.create(p["parent"], q.get("jobId", ""), body)
        return 200, self.stub.job_json(job)

    def h_get(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        return 200, self.stub.job_json(self._job(p["name"]))

    def h_list(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        jobs = [j for j in self.stub.live() if j.name.startswith(p["parent"] + "/")]
        return 200, {"jobs": [self.stub.job_json(j) for j in _filtered(jobs, q.get("filter", ""))]}

    def h_delete(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        op = self.stub.delete(p["name"])
        return 200, {"name": op, "done": False}

    def h_cancel(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        op = self.stub.cancel(p["name"])
        return 200, {"name": op, "done": False}

    def h_tasks(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        job = self._job(p["name"])
        return 200, {"tasks": [self.stub.task_json(job, t) for t in job.tasks]}

    def h_op_get(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        return 200, {
            "name": p["name"],
            "done": True,
            "response": {"@type": "type.googleapis.com/google.protobuf.Empty"},
        }
