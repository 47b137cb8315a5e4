"""A local stand-in for the Compute Engine REST API (there is no official emulator).

``FakeCompute`` serves the subset of ``compute/v1`` that distill and ``gcloud compute
instances create`` use, with the real API's JSON shapes, so the real ``google-cloud-compute``
client (``client_options={"api_endpoint": url}``) and the real gcloud CLI
(``CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE``) talk to it unchanged:

- instances: insert, get, list, aggregatedList, delete, getGuestAttributes,
  getSerialPortOutput; zone operations: get, wait, list; acceleratorTypes: get, list;
  images: getFromFamily (an image can be made DEPRECATED/OBSOLETE/DELETED); zones: get;
  regions: get and projects: get with their quotas (``NVIDIA_L4_GPUS``,
  ``PREEMPTIBLE_NVIDIA_L4_GPUS``, ``CPUS``, ``PREEMPTIBLE_CPUS``, ``SSD_TOTAL_GB``,
  ``GPUS_ALL_REGIONS``, ``CPUS_ALL_REGIONS``; usage = the live VMs', a Spot VM's in the
  preemptible quota where the region grants one);
  subnetworks: get (``subnets``: which exist, their network and Private Google Access);
- the lifecycle: an insert's operation is PENDING, then RUNNING, then DONE, while the
  instance goes PROVISIONING -> STAGING -> RUNNING; a guest shutdown gives TERMINATED (the
  instance stays, as on GCE); delete gives STOPPING -> TERMINATED -> gone (404);
- Spot preemption (:meth:`FakeCompute.preempt`): the metadata server's ``instance/preempted``
  turns TRUE, the guest gets SIGTERM (ACPI soft-off), then SIGKILL after a grace period
  (30 s on GCE), the instance is TERMINATED and, with ``instanceTerminationAction: DELETE``,
  deleted; a ``compute.instances.preempted`` operation records it;
- ``scheduling.maxRunDuration``: a RUNNING instance past it gets its termination action (the
  dead-man switch); the timer stops when the instance stops, as on GCE;
- errors, with the real codes and messages: stockouts (the insert operation ends with
  ``ZONE_RESOURCE_POOL_EXHAUSTED``), GPU quota (``QUOTA_EXCEEDED``, ``Quota
  'GPUS_ALL_REGIONS' exceeded``), an accelerator the zone does not offer (400), a name that
  exists (409), an unknown project or zone (404); a delete while another operation on the
  instance is in flight (its insert, a preemption's DELETE) is refused, 400
  ``resourceNotReady``, as on GCE; any insert error can be injected (:meth:`fail_inserts`),
  as the HTTP reply (with its ``errors[].reason``) or as the operation's error.

Each RUNNING instance can run a real guest: ``guest`` returns the argv and environment of a
process (normally ``python -m distill.cloud.vm_agent``, the startup script's local twin).
It gets its own metadata server (``GCE_METADATA_HOST``) serving the instance's metadata
attributes, ``instance/preempted`` (with ``wait_for_change``), a token, and guest-attribute
writes. Its stdout and stderr are the serial port. A guest that deletes its own instance
through this API (with the bearer token the metadata server gave it) is allowed only if
``allow_self_delete`` (the service account's IAM), else 403 as on GCE.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from fakes.discovery import problems
from fakes.guest import kill_group, spawn
from fakes.http import JsonApi, StubError, reply, serve

GuestFactory = Callable[["FakeInstance"], tuple[list[str], dict[str, str]] | None]
DEFAULT_ZONES = {
    "us-central1-a": ("nvidia-l4", "nvidia-tesla-t4"),
    "us-central1-b": ("nvidia-l4",),
    "us-central1-c": ("nvidia-l4",),
    "us-central1-f": ("nvidia-tesla-t4",),  # no L4: a zone to refuse
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class ApiError(StubError):
    """An HTTP error in the Compute API's JSON error shape."""

    def __init__(self, status: int, message: str, reason: str = "invalid", domain: str = "global"):
        super().__init__(message)
        self.status, self.message, self.reason, self.domain = status, message, reason, domain

    def body(self) -> dict[str, Any]:
        err = {"message": self.message, "domain": self.domain, "reason": self.reason}
        return {"error": {"code": self.status, "message": self.message, "errors": [err]}}


@dataclass(frozen=True)
class InsertError:
    """An error GCE gives an insert: ``sync`` as the HTTP reply (reason = a camelCase reason),
    else as the insert operation's error (reason = its UPPER_CASE code)."""

    reason: str
    message: str
    status: int = 400
    sync: bool = False


@dataclass
class FakeOperation:
    name: str
    zone: str
    op_type: str
    target: str  # the instance's selfLink
    target_id: str
    status: str = "PENDING"
    error: dict[str, Any] | None = None  # {"code": ..., "message": ...}
    http_status: int = 0
    insert_time: str = field(default_factory=_now)
    end_time: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, error: dict[str, Any] | None = None, http_status: int = 0) -> None:
        self.error, self.http_status = error, http_status
        self.status, self.end_time = "DONE", _now()
        self.done.set()

    def to_json(self, base: str, project: str) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(abs(hash(self.name)) % 10**18),
            "name": self.name,
            "zone": f"{base}/projects/{project}/zones/{self.zone}",
            "operationType": self.op_type,
            "targetLink": self.target,
            "targetId": self.target_id,
            "status": self.status,
            "progress": 100 if self.status == "DONE" else 0,
            "insertTime": self.insert_time,
            "selfLink": f"{base}/projects/{project}/zones/{self.zone}/operations/{self.name}",
        }
        if self.end_time:
            d["endTime"] = self.end_time
        if self.error:
            d["error"] = {"errors": [self.error]}
            d["httpErrorStatusCode"] = self.http_status
            d["httpErrorMessage"] = {403: "FORBIDDEN", 503: "SERVICE UNAVAILABLE"}.get(
                self.http_status, "ERROR"
            )
        return d


@dataclass
class FakeInstance:
    name: str
    zone: str
    body: dict[str, Any]  # the resource as inserted (camelCase JSON)
    id: str
    status: str = "PROVISIONING"
    created: str = field(default_factory=_now)
    running_since: float | None = None
    last_start: str = ""
    last_stop: str = ""
    preempted: bool = False
    guest_attributes: dict[str, str] = field(default_factory=dict)
    serial: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    metadata_server: ThreadingHTTPServer | None = None
    token: str = field(default_factory=lambda: f"fake-token-{uuid.uuid4().hex}")
    changed: threading.Condition = field(default_factory=threading.Condition)
    ended: bool = False  # deleted: no longer listed

    @property
    def metadata(self) -> dict[str, str]:
        items = self.body.get("metadata", {}).get("items", [])
        return {i["key"]: i.get("value", "") for i in items}

    @property
    def gpus(self) -> int:
        accs = self.body.get("guestAccelerators", [])
        return sum(int(a.get("acceleratorCount", 0)) for a in accs)

    @property
    def cpus(self) -> int:
        """vCPUs of the machine type (``g2-standard-8`` -> 8)."""
        mt = self.body.get("machineType", "").rsplit("/", 1)[-1]
        return int(mt.rsplit("-", 1)[-1]) if mt.rsplit("-", 1)[-1].isdigit() else 1

    @property
    def disk_gb(self) -> int:
        return sum(
            int(d.get("initializeParams", {}).get("diskSizeGb", 0) or 0)
            for d in self.body.get("disks", [])
        )

    @property
    def spot(self) -> bool:
        return self.body.get("scheduling", {}).get("provisioningModel") == "SPOT"

    @property
    def termination_action(self) -> str:
        return self.body.get("scheduling", {}).get("instanceTerminationAction", "STOP")

    @property
    def max_run_s(self) -> float | None:
        mrd = self.body.get("scheduling", {}).get("maxRunDuration")
        return float(mrd["seconds"]) if mrd and "seconds" in mrd else None

    @property
    def metadata_host(self) -> str:
        assert self.metadata_server is not None
        return f"127.0.0.1:{self.metadata_server.server_address[1]}"


class FakeCompute:
    """The stub server; see the module docstring. ``start()`` returns its base URL."""

    def __init__(
        self,
        project: str = "distill-test",
        zones: dict[str, tuple[str, ...]] | None = None,
        guest: GuestFactory | None = None,
        gpu_quota: int = 8,
        step_s: float = 0.2,
        preempt_grace_s: float = 30.0,
        allow_self_delete: bool = True,
    ) -> None:
        self.project = project
        self.zones = dict(zones or DEFAULT_ZONES)
        self.guest = guest
        self.gpu_quota = gpu_quota
        self.step_s = step_s
        self.preempt_grace_s = preempt_grace_s
        self.allow_self_delete = allow_self_delete
        # region -> metric -> limit; a Spot L4 uses PREEMPTIBLE_NVIDIA_L4_GPUS if > 0
        # CPUS / PREEMPTIBLE_CPUS likewise; SSD_TOTAL_GB holds the pd-balanced boot disks
        self.region_quotas: dict[str, dict[str, float]] = {
            "us-central1": {
                "NVIDIA_L4_GPUS": 8.0,
                "PREEMPTIBLE_NVIDIA_L4_GPUS": 0.0,
                "CPUS": 72.0,
                "PREEMPTIBLE_CPUS": 0.0,
                "SSD_TOTAL_GB": 4096.0,
            }
        }
        self.cpus_all_regions = 512.0
        # (region, name) -> (network, privateIpGoogleAccess)
        self.subnets: dict[tuple[str, str], tuple[str, bool]] = {
            ("us-central1", "distill-us-central1"): ("distill", True),
            ("us-central1", "default"): ("default", False),  # as GCE makes it
        }
        self.deprecated_families: dict[str, tuple[str, str]] = {}  # family -> (state, replacement)
        self.instances: dict[tuple[str, str], FakeInstance] = {}
        self.history: list[FakeInstance] = []  # every instance ever inserted, deleted ones too
        self.max_run_scale = 1.0  # < 1 shortens maxRunDuration (tests of the dead-man switch)
        self.failures = 0  # the next N API requests answer 503 (an outage)
        self.operations: dict[str, FakeOperation] = {}
        self.stockouts: dict[str, int] = {}  # zone -> inserts still to refuse
        self.insert_errors: dict[str, list[InsertError]] = {}  # zone -> the next inserts' errors
        self.events: list[tuple[float, str, str]] = []  # (time, instance, event)
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.inserted: list[dict[str, Any]] = []  # every insert body, in order
        self._lock = threading.RLock()
        self._ids = itertools.count(1000)
        self._server: ThreadingHTTPServer | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.url = ""

    # --- control (tests) --------------------------------------------------------------------

    def start(self) -> str:
        self._server, self.url = serve(_ApiHandler, self)
        t = threading.Thread(target=self._tick_loop, daemon=True, name="fake-compute-tick")
        t.start()
        self._threads.append(t)
        return self.url

    def stop(self) -> None:
        """Kill every guest and stop serving."""
        self._stop.set()
        with self._lock:
            insts = list(self.instances.values())
        for inst in insts:
            self._kill_guest(inst, grace=0)
            if inst.metadata_server:
                inst.metadata_server.shutdown()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeCompute:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stockout(self, zone: str, times: int = 1_000_000) -> None:
        """The next ``times`` inserts in ``zone`` end with ZONE_RESOURCE_POOL_EXHAUSTED."""
        self.stockouts[zone] = times

    def fail_inserts(self, zone: str, *errors: InsertError) -> None:
        """The next inserts in ``zone`` fail with these errors, in order (then succeed)."""
        self.insert_errors.setdefault(zone, []).extend(errors)

    def live(self) -> list[FakeInstance]:
        """Instances that exist (any status but deleted)."""
        with self._lock:
            return [i for i in self.instances.values() if not i.ended]

    def running(self) -> list[FakeInstance]:
        return [i for i in self.live() if i.status in ("PROVISIONING", "STAGING", "RUNNING")]

    def get(self, name: str) -> FakeInstance | None:
        for inst in self.live():
            if inst.name == name:
                return inst
        return None

    def preempt(self, name: str) -> None:
        """Preempt a Spot instance as GCE does (asynchronously; see the module docstring)."""
        inst = self.get(name)
        if inst is None or inst.status not in ("PROVISIONING", "STAGING", "RUNNING"):
            raise KeyError(f"no running instance {name}")
        op = self._new_op(inst, "compute.instances.preempted")
        self._event(inst, "preempted")
        with self._lock, inst.changed:
            inst.preempted = True
            inst.changed.notify_all()

        def run() -> None:
            self._power_down(inst, grace=self.preempt_grace_s)
            op.finish()
            if inst.termination_action == "DELETE":
                time.sleep(self.step_s)
                self._remove(inst)

        threading.Thread(target=run, daemon=True).start()

    def wait_for(self, pred: Callable[[], bool], timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return pred()

    # --- lifecycle --------------------------------------------------------------------------

    def _event(self, inst: FakeInstance, what: str) -> None:
        self.events.append((time.time(), inst.name, what))

    def _set_status(self, inst: FakeInstance, status: str) -> None:
        with self._lock:
            inst.status = status
            if status == "RUNNING":
                inst.running_since, inst.last_start = time.monotonic(), _now()
            elif status in ("STOPPING", "TERMINATED"):
                inst.running_since = None  # the max-run-duration timer stops with the VM
                inst.last_stop = inst.last_stop or _now()
        self._event(inst, status)

    def _new_op(self, inst: FakeInstance, op_type: str) -> FakeOperation:
        op = FakeOperation(
            name=f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}",
            zone=inst.zone,
            op_type=op_type,
            target=self._self_link(inst.zone, inst.name),
            target_id=inst.id,
        )
        with self._lock:
            self.operations[op.name] = op
        return op

    def _self_link(self, zone: str, name: str) -> str:
        return f"{self.url}/compute/v1/projects/{self.project}/zones/{zone}/instances/{name}"

    def _remove(self, inst: FakeInstance) -> None:
        with self._lock:
            if inst.ended:
                return
            inst.ended = True
            self.instances.pop((inst.zone, inst.name), None)
            self._event(inst, "deleted")
        if inst.metadata_server:
            inst.metadata_server.shutdown()
            inst.metadata_server.server_close()

    def _boot(self, inst: FakeInstance, op: FakeOperation) -> None:
        """PROVISIONING -> STAGING -> RUNNING, or a stockout; then start the guest."""
        op.status = "RUNNING"
        time.sleep(self.step_s)
        with self._lock:
            left = self.stockouts.get(inst.zone, 0)
            if left > 0:
                self.stockouts[inst.zone] = left - 1
        if left > 0:
            self._remove(inst)
            op.finish(
                {
                    "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                    "message": (
                        f"The zone 'projects/{self.project}/zones/{inst.zone}' does not have "
                        "enough resources available to fulfill the request.  Try a different "
                        "zone, or try again later."
                    ),
                },
                503,
            )
            return
        if inst.ended or inst.preempted:
            op.finish()
            return
        self._set_status(inst, "STAGING")
        time.sleep(self.step_s)
        with self._lock:  # a preemption or deletion in between wins
            if inst.ended or inst.preempted or inst.status != "STAGING":
                op.finish()
                return
            self._set_status(inst, "RUNNING")
        op.finish()
        self._start_guest(inst)

    def _start_guest(self, inst: FakeInstance) -> None:
        handler = type("MetadataHandler", (_MetadataHandler,), {"stub": self, "inst": inst})
        inst.metadata_server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        inst.metadata_server.daemon_threads = True
        threading.Thread(target=inst.metadata_server.serve_forever, daemon=True).start()
        spec = self.guest(inst) if self.guest else None
        if spec is None:
            return
        argv, env = spec
        env = {
            **env,
            "GCE_METADATA_HOST": inst.metadata_host,
            "GCE_METADATA_IP": inst.metadata_host,
            "DISTILL_COMPUTE_ENDPOINT": self.url,
        }
        with self._lock:  # never boot a guest on a VM that is already going away
            if inst.ended or inst.preempted or inst.status != "RUNNING":
                return
            inst.proc = spawn(argv, env, inst.serial, lambda rc: self._guest_exited(inst, rc))
        self._event(inst, "guest-started")

    def _guest_exited(self, inst: FakeInstance, rc: int) -> None:
        self._event(inst, f"guest-exit-{rc}")
        # The guest powered off (or was killed by a stop/preemption/delete).
        if not inst.ended and inst.status == "RUNNING":
            self._set_status(inst, "STOPPING")
            time.sleep(self.step_s / 2)
            self._set_status(inst, "TERMINATED")

    def _kill_guest(self, inst: FakeInstance, grace: float) -> None:
        kill_group(inst.proc, grace)

    def _power_down(self, inst: FakeInstance, grace: float) -> None:
        """STOPPING, the guest's SIGTERM (SIGKILL after ``grace``), TERMINATED; an instance
        already TERMINATED stays as it is."""
        with self._lock:
            if inst.status == "TERMINATED":
                return
            self._set_status(inst, "STOPPING")
        self._kill_guest(inst, grace=grace)
        self._set_status(inst, "TERMINATED")

    def _delete(self, inst: FakeInstance, op: FakeOperation) -> None:
        op.status = "RUNNING"
        self._power_down(inst, grace=min(self.preempt_grace_s, 2.0))
        time.sleep(self.step_s / 2)
        self._remove(inst)
        op.finish()

    def _tick_loop(self) -> None:
        """Enforce maxRunDuration on RUNNING instances."""
        while not self._stop.wait(0.05):
            now = time.monotonic()
            for inst in self.live():
                limit, since = inst.max_run_s, inst.running_since
                if limit is None or since is None or now - since < limit * self.max_run_scale:
                    continue
                self._event(inst, "max-run-duration")
                inst.running_since = None
                op = self._new_op(inst, "compute.instances.stop")

                def expire(inst: FakeInstance = inst, op: FakeOperation = op) -> None:
                    self._power_down(inst, grace=min(self.preempt_grace_s, 2.0))
                    op.finish()
                    if inst.termination_action == "DELETE":
                        self._remove(inst)

                threading.Thread(target=expire, daemon=True).start()

    # --- API --------------------------------------------------------------------------------

    def _check_project_zone(self, project: str, zone: str | None = None) -> None:
        if project != self.project:
            raise ApiError(404, f"The resource 'projects/{project}' was not found", "notFound")
        if zone is not None and zone not in self.zones:
            raise ApiError(
                404, f"The resource 'projects/{project}/zones/{zone}' was not found", "notFound"
            )

    def _find(self, project: str, zone: str, name: str) -> FakeInstance:
        self._check_project_zone(project, zone)
        with self._lock:
            inst = self.instances.get((zone, name))
        if inst is None:
            raise ApiError(
                404,
                f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
                "notFound",
            )
        return inst

    def instance_json(self, inst: FakeInstance) -> dict[str, Any]:
        base = f"{self.url}/compute/v1/projects/{self.project}"
        d = {
            **inst.body,
            "kind": "compute#instance",
            "id": inst.id,
            "name": inst.name,
            "zone": f"{base}/zones/{inst.zone}",
            "status": inst.status,
            "creationTimestamp": inst.created,
            "selfLink": self._self_link(inst.zone, inst.name),
        }
        if inst.last_start:
            d["lastStartTimestamp"] = inst.last_start
        if inst.last_stop:
            d["lastStopTimestamp"] = inst.last_stop
        return d

    def insert(self, project: str, zone: str, body: dict[str, Any]) -> FakeOperation:
        self._check_project_zone(project, zone)
        wrong = problems("compute.v1", "Instance", body)
        if wrong:  # the API's own schema: unknown fields, wrong types, values outside an enum
            raise ApiError(400, f"Invalid value for field 'resource': {'; '.join(wrong)}")
        name = body.get("name", "")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise ApiError(
                400,
                f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
            )
        for n, acc in enumerate(body.get("guestAccelerators", [])):
            kind = str(acc.get("acceleratorType", "")).rsplit("/", 1)[-1]
            if kind not in self.zones[zone]:
                raise ApiError(
                    400,
                    f"Invalid value for field 'resource.guestAccelerators[{n}].acceleratorType':"
                    f" '{acc.get('acceleratorType')}'. Accelerator type '{kind}' does not exist "
                    f"in zone {zone}.",
                )
        with self._lock:
            injected = self.insert_errors.get(zone) or []
            failure = injected.pop(0) if injected else None
        if failure is not None and failure.sync:
            raise ApiError(failure.status, failure.message, failure.reason)
        with self._lock:
            if (zone, name) in self.instances:
                raise ApiError(
                    409,
                    f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already "
                    "exists",
                    "alreadyExists",
                )
            inst = FakeInstance(name=name, zone=zone, body=body, id=str(next(self._ids)))
            self.inserted.append(body)
            self.history.append(inst)
            in_use = sum(i.gpus for i in self.instances.values() if i.status != "TERMINATED")
            over_quota = in_use + inst.gpus > self.gpu_quota
            self.instances[(zone, name)] = inst
        self._event(inst, "inserted")
        op = self._new_op(inst, "insert")
        if failure is not None:
            self._remove(inst)
            op.finish({"code": failure.reason, "message": failure.message}, failure.status)
            return op
        if over_quota:
            self._remove(inst)
            op.finish(
                {
                    "code": "QUOTA_EXCEEDED",
                    "message": (
                        f"Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: {float(self.gpu_quota)} "
                        "globally."
                    ),
                },
                403,
            )
            return op
        threading.Thread(target=self._boot, args=(inst, op), daemon=True).start()
        return op

    def delete(self, project: str, zone: str, name: str, token: str | None) -> FakeOperation:
        inst = self._find(project, zone, name)
        link = self._self_link(zone, name)
        with self._lock:
            busy = [o for o in self.operations.values() if o.target == link and o.status != "DONE"]
        if busy:  # as GCE: one operation at a time on an instance (e.g. a preemption's DELETE)
            self._event(inst, f"delete-refused ({busy[0].op_type} in flight)")
            what = f"projects/{project}/zones/{zone}/instances/{name}"
            raise ApiError(400, f"The resource '{what}' is not ready", "resourceNotReady")
        if token is not None and token.startswith("fake-token-"):
            owner = next((i for i in self.live() if i.token == token), None)
            if owner is None or owner is not inst or not self.allow_self_delete:
                raise ApiError(
                    403,
                    f"Required 'compute.instances.delete' permission for "
                    f"'projects/{project}/zones/{zone}/instances/{name}'",
                    "forbidden",
                )
        op = self._new_op(inst, "delete")
        self._event(inst, "delete-requested" + (" by guest" if token else ""))
        threading.Thread(target=self._delete, args=(inst, op), daemon=True).start()
        return op


# --- HTTP -----------------------------------------------------------------------------------

_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile("^/compute/v1/projects/" + p + "$"), h)
    for m, p, h in [
        ("GET", r"(?P<p>[^/]+)/aggregated/instances", "aggregated"),
        ("GET", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/instances", "list"),
        ("POST", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/instances", "insert"),
        ("GET", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/instances/(?P<i>[^/]+)", "get"),
        ("DELETE", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/instances/(?P<i>[^/]+)", "delete"),
        (
            "GET",
            r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/instances/(?P<i>[^/]+)/getGuestAttributes",
            "guest_attributes",
        ),
        ("GET", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/instances/(?P<i>[^/]+)/serialPort", "serial"),
        ("GET", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/operations", "op_list"),
        ("GET", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/operations/(?P<o>[^/]+)", "op_get"),
        ("POST", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/operations/(?P<o>[^/]+)/wait", "op_wait"),
        ("GET", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/acceleratorTypes/(?P<a>[^/]+)", "acc_get"),
        ("GET", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)/acceleratorTypes", "acc_list"),
        ("GET", r"(?P<p>[^/]+)/zones/(?P<z>[^/]+)", "zone_get"),
        ("GET", r"(?P<p>[^/]+)/global/images/family/(?P<f>[^/]+)", "image_family"),
        ("GET", r"(?P<p>[^/]+)/regions/(?P<r>[^/]+)", "region_get"),
        ("GET", r"(?P<p>[^/]+)/regions/(?P<r>[^/]+)/subnetworks/(?P<s>[^/]+)", "subnet_get"),
        ("GET", r"(?P<p>[^/]+)", "project_get"),
    ]
]


_TERM = re.compile(r'^\s*([A-Za-z][\w.]*)\s*=\s*"([^"]*)"\s*$')


def _filtered(items: list[dict[str, Any]], text: str | None) -> list[dict[str, Any]]:
    """The API's ``filter`` for the subset this stub supports: ``field = "value"`` terms
    joined by ``AND``; anything else is a 400, never silently ignored."""
    if not text:
        return items
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        m = _TERM.match(part.strip("() "))
        if not m:
            raise ApiError(400, f"Invalid value for field 'filter': '{text}' (not supported here)")
        terms.append((m.group(1).split("."), m.group(2)))

    def value(item: Any, path: list[str]) -> Any:
        for key in path:
            item = item.get(key) if isinstance(item, dict) else None
        return item

    return [i for i in items if all(str(value(i, f)) == v for f, v in terms)]


class _ApiHandler(JsonApi):
    stub: FakeCompute
    routes = _ROUTES

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        if status == 503:
            return ApiError(503, "Backend Error", "backendError").body()
        return ApiError(status, message).body()

    # handlers: (path params, query, body) -> (status, json)

    def h_insert(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        op = self.stub.insert(p["p"], p["z"], body)
        return 200, op.to_json(self.stub.url + "/compute/v1", self.stub.project)

    def h_get(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        return 200, self.stub.instance_json(self.stub._find(p["p"], p["z"], p["i"]))

    def h_delete(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer fake-token-") else None
        op = self.stub.delete(p["p"], p["z"], p["i"], token)
        return 200, op.to_json(self.stub.url + "/compute/v1", self.stub.project)

    def _items(self, zone: str | None) -> list[dict]:
        return [
            self.stub.instance_json(i)
            for i in sorted(self.stub.live(), key=lambda i: (i.zone, i.name))
            if zone is None or i.zone == zone
        ]

    def h_list(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        self.stub._check_project_zone(p["p"], p["z"])
        items = _filtered(self._items(p["z"]), q.get("filter"))
        return 200, {"kind": "compute#instanceList", "items": items}

    def h_aggregated(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        self.stub._check_project_zone(p["p"])
        items: dict[str, Any] = {}
        for z in self.stub.zones:
            found = _filtered(self._items(z), q.get("filter"))
            items[f"zones/{z}"] = (
                {"instances": found}
                if found
                else {"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "no results"}}
            )
        return 200, {"kind": "compute#instanceAggregatedList", "items": items}

    def h_guest_attributes(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        inst = self.stub._find(p["p"], p["z"], p["i"])
        path = q.get("queryPath", "")
        ns = path.rstrip("/").split("/")[0] if path else ""
        items = [
            {"namespace": k.split("/")[0], "key": k.split("/", 1)[1], "value": v}
            for k, v in sorted(inst.guest_attributes.items())
            if not ns or k.split("/")[0] == ns
        ]
        if not items:
            raise ApiError(
                404, f"The resource '{path}' of type 'Guest Attribute' was not found.", "notFound"
            )
        return 200, {
            "kind": "compute#guestAttributes",
            "queryPath": path,
            "selfLink": self.stub._self_link(inst.zone, inst.name) + "/guestAttributes/" + path,
            "queryValue": {"items": items},
        }

    def h_serial(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        inst = self.stub._find(p["p"], p["z"], p["i"])
        text = "".join(inst.serial)
        start = int(q.get("start", 0))
        return 200, {
            "kind": "compute#serialPortOutput",
            "contents": text[start:],
            "start": str(start),
            "next": str(len(text)),
        }

    def _op(self, p: dict) -> FakeOperation:
        self.stub._check_project_zone(p["p"], p["z"])
        op = self.stub.operations.get(p["o"])
        if op is None or op.zone != p["z"]:
            raise ApiError(
                404,
                f"The resource 'projects/{p['p']}/zones/{p['z']}/operations/{p['o']}' was not "
                "found",
                "notFound",
            )
        return op

    def h_op_get(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        return 200, self._op(p).to_json(self.stub.url + "/compute/v1", self.stub.project)

    def h_op_wait(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        op = self._op(p)
        op.done.wait(timeout=2.0)  # GCE returns after at most ~2 minutes; a short wait here
        return 200, op.to_json(self.stub.url + "/compute/v1", self.stub.project)

    def h_op_list(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        self.stub._check_project_zone(p["p"], p["z"])
        base = self.stub.url + "/compute/v1"
        ops = [
            o.to_json(base, self.stub.project)
            for o in list(self.stub.operations.values())
            if o.zone == p["z"]
        ]
        return 200, {"kind": "compute#operationList", "items": _filtered(ops, q.get("filter"))}

    def _acc(self, zone: str, name: str) -> dict:
        return {
            "kind": "compute#acceleratorType",
            "name": name,
            "zone": f"{self.stub.url}/compute/v1/projects/{self.stub.project}/zones/{zone}",
            "maximumCardsPerInstance": 8,
        }

    def h_acc_get(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        self.stub._check_project_zone(p["p"], p["z"])
        if p["a"] not in self.stub.zones[p["z"]]:
            raise ApiError(
                404,
                f"The resource 'projects/{p['p']}/zones/{p['z']}/acceleratorTypes/{p['a']}' was "
                "not found",
                "notFound",
            )
        return 200, self._acc(p["z"], p["a"])

    def h_acc_list(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        self.stub._check_project_zone(p["p"], p["z"])
        items = [self._acc(p["z"], a) for a in self.stub.zones[p["z"]]]
        return 200, {"kind": "compute#acceleratorTypeList", "items": items}

    def h_zone_get(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        self.stub._check_project_zone(p["p"], p["z"])
        return 200, {"kind": "compute#zone", "name": p["z"], "status": "UP"}

    def h_image_family(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        base = f"{self.stub.url}/compute/v1/projects/{p['p']}/global/images"
        name = f"{p['f']}-v20261101"
        return 200, {
            "kind": "compute#image",
            "name": name,
            "family": p["f"],
            "status": "READY",
            "selfLink": f"{base}/{name}",
            **self._deprecation(p["f"], base),
        }

    def _deprecation(self, family: str, base: str) -> dict:
        if family not in self.stub.deprecated_families:
            return {}
        state, replacement = self.stub.deprecated_families[family]
        return {"deprecated": {"state": state, "replacement": f"{base}/{replacement}"}}

    def _gpus_in_use(self) -> float:
        return self._usage()["GPUS_ALL_REGIONS"]

    def _usage(self, region: str | None = None) -> dict[str, float]:
        """What the live instances (of ``region``) take of each quota, as Compute counts it:
        a Spot VM takes the preemptible quota where the region grants it, else the standard."""
        with self.stub._lock:
            live = [i for i in self.stub.instances.values() if i.status != "TERMINATED"]
        limits = self.stub.region_quotas.get(region or "", {})
        use: dict[str, float] = {"GPUS_ALL_REGIONS": 0.0, "CPUS_ALL_REGIONS": 0.0}
        for i in live:
            use["GPUS_ALL_REGIONS"] += i.gpus
            use["CPUS_ALL_REGIONS"] += i.cpus
            if region is None or not i.zone.startswith(region + "-"):
                continue
            for metric, n in (("NVIDIA_L4_GPUS", i.gpus), ("CPUS", i.cpus)):
                pre = f"PREEMPTIBLE_{metric}"
                key = pre if i.spot and limits.get(pre, 0.0) > 0 else metric
                use[key] = use.get(key, 0.0) + n
            use["SSD_TOTAL_GB"] = use.get("SSD_TOTAL_GB", 0.0) + i.disk_gb
        return use

    def h_region_get(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        self.stub._check_project_zone(p["p"])
        if not any(z.startswith(p["r"] + "-") for z in self.stub.zones):
            raise ApiError(
                404, f"The resource 'projects/{p['p']}/regions/{p['r']}' was not found", "notFound"
            )
        used = self._usage(p["r"])
        quotas = [
            {"metric": m, "limit": limit, "usage": used.get(m, 0.0)}
            for m, limit in self.stub.region_quotas.get(p["r"], {}).items()
        ]
        return 200, {"kind": "compute#region", "name": p["r"], "status": "UP", "quotas": quotas}

    def h_project_get(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        self.stub._check_project_zone(p["p"])
        used = self._usage()
        quotas = [
            {
                "metric": "GPUS_ALL_REGIONS",
                "limit": float(self.stub.gpu_quota),
                "usage": used["GPUS_ALL_REGIONS"],
            },
            {
                "metric": "CPUS_ALL_REGIONS",
                "limit": self.stub.cpus_all_regions,
                "usage": used["CPUS_ALL_REGIONS"],
            },
        ]
        return 200, {"kind": "compute#project", "name": p["p"], "quotas": quotas}

    def h_subnet_get(self, p: dict, q: dict, body: dict) -> tuple[int, dict]:
        self.stub._check_project_zone(p["p"])
        key = (p["r"], p["s"])
        if key not in self.stub.subnets:
            raise ApiError(
                404,
                f"The resource 'projects/{p['p']}/regions/{p['r']}/subnetworks/{p['s']}' was "
                "not found",
                "notFound",
            )
        network, pga = self.stub.subnets[key]
        base = f"{self.stub.url}/compute/v1/projects/{p['p']}"
        return 200, {
            "kind": "compute#subnetwork",
            "name": p["s"],
            "region": f"{base}/regions/{p['r']}",
            "network": f"{base}/global/networks/{network}",
            "privateIpGoogleAccess": pga,
        }


class _MetadataHandler(BaseHTTPRequestHandler):
    """One instance's metadata server (``GCE_METADATA_HOST``)."""

    stub: FakeCompute
    inst: FakeInstance
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, text: str, ctype: str = "application/text") -> None:
        reply(self, status, text.encode(), ctype, {"Metadata-Flavor": "Google"})

    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if self.headers.get("Metadata-Flavor") != "Google":
            self._send(403, "Missing required header: Metadata-Flavor")
            return
        path = url.path.removeprefix("/computeMetadata/v1/")
        inst = self.inst
        if method == "PUT" and path.startswith("instance/guest-attributes/"):
            length = int(self.headers.get("Content-Length") or 0)
            key = path.removeprefix("instance/guest-attributes/")
            inst.guest_attributes[key] = self.rfile.read(length).decode()
            self._send(200, "")
            return
        if method != "GET":
            self._send(405, "method not allowed")
            return
        if path == "instance/preempted":
            with inst.changed:
                if q.get("wait_for_change") == "true" and not inst.preempted:
                    inst.changed.wait(timeout=float(q.get("timeout_sec", 60)))
            self._send(200, "TRUE" if inst.preempted else "FALSE")
        elif path.startswith("instance/attributes/"):
            key = path.removeprefix("instance/attributes/")
            md = inst.metadata
            if key in md:
                self._send(200, md[key])
            else:
                self._send(404, "not found")
        elif path == "instance/name":
            self._send(200, inst.name)
        elif path == "instance/id":
            self._send(200, inst.id)
        elif path == "instance/zone":
            self._send(200, f"projects/123456789/zones/{inst.zone}")
        elif path == "project/project-id":
            self._send(200, self.stub.project)
        elif path == "instance/service-accounts/default/token":
            tok = {"access_token": inst.token, "expires_in": 3599, "token_type": "Bearer"}
            self._send(200, json.dumps(tok), "application/json")
        elif path in ("", "instance/"):
            self._send(200, "ok")
        else:
            self._send(404, "not found")

    def do_GET(self) -> None:
        self._route("GET")

    def do_PUT(self) -> None:
        self._route("PUT")
