"""Where teacher VMs come from: Compute Engine (or its stub), or local processes.

Both backends give the controller the same small surface: check a zone, create a VM from a
:class:`~distill.cloud.spec.VmSpec`, read its state, delete it, list VMs by label, tell a
preemption from other ends, and read its console. Errors a user can act on become
:class:`CloudError` subclasses with the fix in the message; a stockout is :class:`Stockout`
(the controller tries the next zone).

- :class:`GceBackend`: google-cloud-compute's REST clients; ``endpoint`` points them at the
  stub (``tests/fake_compute.py``) with anonymous credentials, as tests do.
- :class:`LocalBackend`: the "VM" is ``python -m distill.cloud.vm_agent --local DIR``, a
  process group on this machine running the same teacher entrypoint against the same bucket
  (GCS, or fake-gcs-server through ``STORAGE_EMULATOR_HOST``). Its state lives under
  ``state_dir`` so that ``distill-ctl gc`` finds leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from distill.cloud.spec import ACCELERATOR_TYPE, VmSpec
from distill.errors import DistillError

LIVE = ("PROVISIONING", "STAGING", "RUNNING", "STOPPING", "SUSPENDING", "REPAIRING")
STOCKOUT_CODES = (
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "INSUFFICIENT_CAPACITY",
)
# During an insert these mean "not here, not now" too: a Spot G2 in a zone that cannot place it
# right now (UNSUPPORTED_OPERATION), a zone still busy with the last VM of that name
# (RESOURCE_NOT_READY), too many operations at once (RESOURCE_OPERATION_RATE_EXCEEDED).
CREATE_RETRY_CODES = (
    "UNSUPPORTED_OPERATION",
    "RESOURCE_NOT_READY",
    "RESOURCE_OPERATION_RATE_EXCEEDED",
)


def error_code(reason: str) -> str:
    """An HTTP error's camelCase reason (``resourceNotReady``) as an operation error code."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", reason).upper() if reason else ""


class CloudError(DistillError):
    """A cloud call failed in a way the user can fix (the message says how)."""


class Stockout(CloudError):
    """The zone has no capacity for the VM right now: try another zone or later."""


class QuotaExceeded(CloudError):
    """A quota (e.g. GPUS_ALL_REGIONS) is too small for one more L4 VM."""


class NoAccelerator(CloudError):
    """The zone does not offer the accelerator."""


class AlreadyExists(CloudError):
    """An instance with this name already exists in the zone."""


class NotReady(CloudError):
    """Another operation on the instance is in flight (e.g. GCE deleting a preempted VM)."""


class PreflightFailed(CloudError):
    """The project cannot run the VM as specified (image, quota, network): nothing was spent."""


@dataclass(frozen=True)
class Needs:
    """What the teacher's VMs need from the project, checked before anything is uploaded:
    ``gpus``, ``cpus`` and ``disk_gb`` (pd-balanced) are the totals of the VMs run at once."""

    region: str
    gpus: int
    spot: bool
    image_project: str
    image_family: str
    network: str
    subnetwork: str
    cpus: int = 0
    disk_gb: int = 0


Quotas = dict[str, tuple[float, float]]  # metric -> (limit, usage)


def _refusal(
    project: str,
    kind: str,
    metric: str,
    have: tuple[float, float],
    where: str,
    need: str,
    also: str = "",
) -> str:
    limit, usage = have
    return (
        f"{kind} quota: {metric} is {limit} {where}{also}, {usage:g} in use, so {need} cannot "
        f"start. Request an increase at "
        f"https://console.cloud.google.com/iam-admin/quotas?project={project} (metric "
        f"{metric}), or use fewer VMs (--vms), then rerun; nothing was spent"
    )


def quota_refusal(
    project: str,
    needs: Needs,
    regional: Quotas,
    all_regions: tuple[float, float],
    global_cpus: tuple[float, float] | None = None,
) -> str | None:
    """Why the quotas leave no room for the VMs, or None.

    GPUs: a Spot L4 uses PREEMPTIBLE_NVIDIA_L4_GPUS where the region grants it room, else
    NVIDIA_L4_GPUS (Compute Engine's GPU quota docs); every GPU also counts against
    GPUS_ALL_REGIONS. vCPUs likewise: PREEMPTIBLE_CPUS where granted, else CPUS, and
    CPUS_ALL_REGIONS; a family quota the region reports (G2_CPUS) too. The pd-balanced boot
    disks count against SSD_TOTAL_GB. A metric the region does not report is not checked,
    except the L4s (none reported: none granted)."""
    none = (0.0, 0.0)

    def room(q: tuple[float, float], n: float) -> bool:
        return q[0] - q[1] >= n

    pre = regional.get("PREEMPTIBLE_NVIDIA_L4_GPUS", none)
    vms = f"{needs.gpus} L4 VM(s)" if needs.gpus != 1 else "the L4 VM"
    if not (needs.spot and room(pre, needs.gpus)):
        std = regional.get("NVIDIA_L4_GPUS", none)
        if not room(std, needs.gpus):
            also = (
                f" (PREEMPTIBLE_NVIDIA_L4_GPUS there: {pre[0]:g}, {pre[1]:g} in use)"
                if needs.spot
                else ""
            )
            metric = "NVIDIA_L4_GPUS" + (" or PREEMPTIBLE_NVIDIA_L4_GPUS" if needs.spot else "")
            why = _refusal(project, "GPU", "NVIDIA_L4_GPUS", std, f"in {needs.region}", vms, also)
            return why.replace("(metric NVIDIA_L4_GPUS)", f"(metric {metric})")
    if not room(all_regions, needs.gpus):
        return _refusal(project, "GPU", "GPUS_ALL_REGIONS", all_regions, "globally", vms)
    if needs.cpus:
        cpus = f"{vms} ({needs.cpus} vCPUs)"
        pre_cpus = regional.get("PREEMPTIBLE_CPUS", none)
        spot_fits = needs.spot and room(pre_cpus, needs.cpus)
        std = regional.get("CPUS")
        if not spot_fits and std is not None and not room(std, needs.cpus):
            return _refusal(project, "CPU", "CPUS", std, f"in {needs.region}", cpus)
        for metric in ("G2_CPUS",):  # a family quota, where the region reports one
            if metric in regional and not room(regional[metric], needs.cpus):
                where = f"in {needs.region}"
                return _refusal(project, "CPU", metric, regional[metric], where, cpus)
        if global_cpus is not None and not room(global_cpus, needs.cpus):
            return _refusal(project, "CPU", "CPUS_ALL_REGIONS", global_cpus, "globally", cpus)
    ssd = regional.get("SSD_TOTAL_GB")
    if needs.disk_gb and ssd is not None and not room(ssd, needs.disk_gb):
        disks = f"the boot disks of {vms} ({needs.disk_gb} GB of pd-balanced)"
        return _refusal(project, "disk", "SSD_TOTAL_GB", ssd, f"in {needs.region}", disks)
    return None


@dataclass
class VmState:
    name: str
    zone: str
    status: str  # PROVISIONING | STAGING | RUNNING | STOPPING | TERMINATED
    id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    guest: dict[str, str] = field(default_factory=dict)  # guest attributes "distill/status" ...
    created: str = ""

    @property
    def live(self) -> bool:
        return self.status in LIVE


class Backend(Protocol):
    name: str

    def check_zone(self, zone: str, accelerator: str = ACCELERATOR_TYPE) -> None: ...
    def check_project(self, needs: Needs) -> None: ...
    def create(self, spec: VmSpec, zone: str) -> None: ...
    def get(self, name: str, zone: str) -> VmState | None: ...
    def delete(self, name: str, zone: str) -> None: ...
    def list(self, labels: dict[str, str]) -> list[VmState]: ...
    def was_preempted(self, name: str, zone: str, vm_id: str) -> bool: ...
    def console(self, name: str, zone: str) -> str: ...


# --- errors -----------------------------------------------------------------------------------


_QUOTA_TEXTS = (
    # Compute: "Quota 'NVIDIA_L4_GPUS' exceeded.  Limit: 1.0 in region us-central1."
    # Batch: "... creation failed: Quota NVIDIA_L4_GPUS exceeded. Limit: 1.0 in region R"
    re.compile(
        r"Quota '?([A-Z0-9_]+)'? exceeded\.\s+Limit: ([\d.]+)(?: in (?:region|zone) ([\w-]+))?"
    ),
    # Batch, a job held in QUEUED: "... due to inadequate quotas [Quota: NVIDIA_L4_GPUS,
    # limit: 1, usage: 0, wanted: 3.]"
    re.compile(r"\[Quota: ([A-Z0-9_]+), limit: ([\d.]+)()"),
)


def quota_message(project: str, text: str) -> str:
    """A quota refusal, any of Compute's and Batch's wordings, with the fix."""
    metric, limit, region = "?", "?", None
    for pattern in _QUOTA_TEXTS:
        m = pattern.search(text)
        if m:
            metric, limit, region = m.group(1), m.group(2), m.group(3) or None
            break
    where = f"in region {region}" if region else "globally" if "ALL_REGIONS" in metric else ""
    return (
        f"quota: {metric} is {limit}{' ' + where if where else ''}, too little for the "
        f"teacher's VMs ({text.strip()}). Request an increase at "
        f"https://console.cloud.google.com/iam-admin/quotas?project={project} (metric "
        f"{metric}; a Spot L4 VM needs PREEMPTIBLE_NVIDIA_L4_GPUS or NVIDIA_L4_GPUS, 8 CPUS or "
        "PREEMPTIBLE_CPUS and its boot disk's SSD_TOTAL_GB in the region), or use fewer VMs "
        "(--vms), then rerun; nothing was spent"
    )


def classify(
    project: str, code: str, message: str, http_status: int = 0, creating: bool = False
) -> CloudError:
    """A Compute API error (an operation's, or an HTTP call's by its reason) as the CloudError
    to raise; ``creating``: the error answered an insert."""
    text = f"{code}: {message}" if code else message
    if code in STOCKOUT_CODES or "does not have enough resources available" in message:
        return Stockout(text)
    if code == "QUOTA_EXCEEDED" or re.search(r"Quota '[A-Z0-9_]+' exceeded", message):
        return QuotaExceeded(quota_message(project, message))
    if creating and code in CREATE_RETRY_CODES:
        return Stockout(text)
    if code == "RESOURCE_NOT_READY" or re.search(r"The resource '[^']+' is not ready", message):
        return NotReady(text)
    if "acceleratorType" in message and "does not exist" in message:
        return NoAccelerator(message)
    if code == "ALREADY_EXISTS" or "already exists" in message:
        return AlreadyExists(message)
    if "billing" in message.lower():
        return CloudError(
            f"billing is not enabled for project {project}: link an active billing account at "
            f"https://console.cloud.google.com/billing/linkedaccount?project={project}, then "
            f"rerun; nothing was spent ({message})"
        )
    if "has not been used in project" in message or "is disabled" in message:
        return CloudError(
            f"the Compute Engine API is not enabled in project {project}: run `gcloud services "
            f"enable compute.googleapis.com --project {project}` ({message})"
        )
    if http_status == 403 or "permission" in message.lower():
        return CloudError(
            f"permission denied in project {project}: your account needs "
            "roles/compute.instanceAdmin.v1 on the project and roles/iam.serviceAccountUser on "
            f"the teacher's service account ({message})"
        )
    if http_status == 404 and f"projects/{project}'" in message:
        return CloudError(
            f"project {project} not found or not visible to your account: check cloud.project "
            f"(or --project) and `gcloud projects describe {project}` ({message})"
        )
    return CloudError(f"Compute Engine error in project {project}: {text}")


# --- Compute Engine ----------------------------------------------------------------------------


def _reason(e: Any) -> str:
    """The error code of a synchronous HTTP error, from its JSON ``errors[0].reason``."""
    errors = getattr(e, "errors", None) or []
    first = errors[0] if errors else {}
    reason = first.get("reason", "") if isinstance(first, dict) else getattr(first, "reason", "")
    return error_code(str(reason or getattr(e, "reason", "") or ""))


def _not_found(e: CloudError) -> bool:
    """Whether a classified error was the API's 404 (the instance or operation is gone)."""
    from google.api_core import exceptions as gex

    return isinstance(e.__cause__, gex.NotFound)


class GceBackend:
    """Compute Engine through google-cloud-compute (REST)."""

    name = "gce"

    def __init__(
        self, project: str, endpoint: str | None = None, read_retry_s: float = 60.0
    ) -> None:
        from google.api_core import retry as api_retry
        from google.cloud import compute_v1

        self.project = project
        # Reads retry transient errors (429, 5xx) for at most read_retry_s, so the watcher
        # sees a long outage (and decides) instead of blocking in one call.
        self._read = {
            "retry": api_retry.Retry(
                predicate=api_retry.if_transient_error,
                initial=1.0,
                maximum=10.0,
                timeout=read_retry_s,
            ),
            "timeout": 30.0,
        }
        if endpoint:  # the stub: no credentials
            from google.auth.credentials import AnonymousCredentials

            creds: Any = AnonymousCredentials()
            opts: dict[str, str] | None = {"api_endpoint": endpoint}
        else:
            import google.auth
            import google.auth.exceptions

            try:
                creds, _ = google.auth.default(
                    scopes=["https://www.googleapis.com/auth/cloud-platform"]
                )
            except google.auth.exceptions.DefaultCredentialsError as e:
                raise CloudError(
                    "no Google Cloud credentials: run `gcloud auth application-default login` "
                    "(or set GOOGLE_APPLICATION_CREDENTIALS to a key file); nothing was spent"
                ) from e
            opts = None
        kw = {"credentials": creds, "client_options": opts}
        self.instances = compute_v1.InstancesClient(**kw)
        self.operations = compute_v1.ZoneOperationsClient(**kw)
        self.accelerators = compute_v1.AcceleratorTypesClient(**kw)
        self.images = compute_v1.ImagesClient(**kw)
        self.regions = compute_v1.RegionsClient(**kw)
        self.projects = compute_v1.ProjectsClient(**kw)
        self.subnetworks = compute_v1.SubnetworksClient(**kw)

    @contextlib.contextmanager
    def _errors(self, creating: bool = False) -> Any:
        from google.api_core import exceptions as gex
        from google.auth import exceptions as auth_ex

        try:
            yield
        except gex.GoogleAPICallError as e:
            code, message = _reason(e), e.message or str(e)
            raise classify(self.project, code, message, e.code or 0, creating) from e
        except gex.RetryError as e:  # transient errors until the retry's deadline
            raise CloudError(f"the Compute API kept failing ({e.cause or e})") from e
        except auth_ex.RefreshError as e:
            raise CloudError(
                "Google Cloud credentials expired or invalid: run `gcloud auth "
                "application-default login`"
            ) from e

    def _wait(self, name: str, zone: str, timeout: float = 900.0, creating: bool = False) -> None:
        """Wait for a zone operation; raise its error classified."""
        from google.cloud import compute_v1

        deadline = time.monotonic() + timeout
        while True:
            with self._errors():
                op = self.operations.wait(project=self.project, zone=zone, operation=name)
            if op.status == compute_v1.Operation.Status.DONE:
                break
            if time.monotonic() > deadline:
                raise CloudError(f"operation {name} in {zone} not done after {timeout:.0f} s")
        if op.error and op.error.errors:
            e = op.error.errors[0]
            raise classify(self.project, e.code, e.message, op.http_error_status_code, creating)

    def check_zone(self, zone: str, accelerator: str = ACCELERATOR_TYPE) -> None:
        try:
            with self._errors():
                self.accelerators.get(project=self.project, zone=zone, accelerator_type=accelerator)
            return
        except CloudError as e:
            # a missing project or zone is its own error; only a missing accelerator is ours
            if f"acceleratorTypes/{accelerator}' was not found" not in str(e):
                raise
        raise NoAccelerator(
            f"zone {zone} does not offer {accelerator} (see `gcloud compute accelerator-types "
            f"list --filter=name={accelerator}`): remove it from cloud.zones; nothing was spent"
        )

    def check_project(self, needs: Needs) -> None:
        """The boot image family, the GPU quotas and the subnet, before anything is spent."""
        from google.api_core import exceptions as gex

        family = f"{needs.image_project}/{needs.image_family}"
        try:
            with self._errors():
                image = self.images.get_from_family(
                    project=needs.image_project, family=needs.image_family, **self._read
                )
        except CloudError as e:
            if isinstance(e.__cause__, gex.NotFound):
                raise PreflightFailed(
                    f"boot image family {family} not found (`gcloud compute images "
                    f"describe-from-family {needs.image_family} --project "
                    f"{needs.image_project}`); nothing was spent"
                ) from e
            raise
        state = image.deprecated.state if image.deprecated else ""
        if state and state != "ACTIVE":
            instead = image.deprecated.replacement.rsplit("/", 1)[-1] or "none named"
            raise PreflightFailed(
                f"boot image family {family} resolves to {image.name}, which is {state} "
                f"(replacement: {instead}); nothing was spent"
            )
        with self._errors():
            region = self.regions.get(project=self.project, region=needs.region, **self._read)
            proj = self.projects.get(project=self.project, **self._read)
        quotas = {q.metric: (q.limit, q.usage) for q in region.quotas}
        glob = {q.metric: (q.limit, q.usage) for q in proj.quotas}
        why = quota_refusal(
            self.project,
            needs,
            quotas,
            glob.get("GPUS_ALL_REGIONS", (0.0, 0.0)),
            glob.get("CPUS_ALL_REGIONS"),
        )
        if why:
            raise QuotaExceeded(why)
        self._check_subnet(needs)

    def _check_subnet(self, needs: Needs) -> None:
        from google.api_core import exceptions as gex

        where = f"subnetwork {needs.subnetwork} of network {needs.network} in {needs.region}"
        try:
            with self._errors():
                sub = self.subnetworks.get(
                    project=self.project,
                    region=needs.region,
                    subnetwork=needs.subnetwork,
                    **self._read,
                )
        except CloudError as e:
            if isinstance(e.__cause__, gex.NotFound):
                raise PreflightFailed(
                    f"{where} not found: apply infra/terraform/base with region = "
                    f'"{needs.region}" (it makes {needs.network}-{needs.region}), or set '
                    "cloud.network / cloud.subnetwork to one that exists; nothing was spent"
                ) from e
            raise
        if not sub.network.endswith(f"/networks/{needs.network}"):
            raise PreflightFailed(
                f"{where}: the subnet belongs to {sub.network.rsplit('/', 1)[-1]}; fix "
                "cloud.network / cloud.subnetwork; nothing was spent"
            )
        if not sub.private_ip_google_access:
            raise PreflightFailed(
                f"{where} has Private Google Access off, so the VM (no external IP) could not "
                "reach Cloud Storage or Artifact Registry: run `gcloud compute networks subnets "
                f"update {needs.subnetwork} --region={needs.region} "
                "--enable-private-ip-google-access`, then rerun; nothing was spent"
            )

    def create(self, spec: VmSpec, zone: str) -> None:
        with self._errors(creating=True):
            op = self.instances.insert(spec.insert_request(zone))
        self._wait(op.name, zone, creating=True)

    def _state(self, inst: Any, zone: str) -> VmState:
        return VmState(
            name=inst.name,
            zone=zone,
            status=inst.status,
            id=str(inst.id),
            labels=dict(inst.labels),
            created=inst.creation_timestamp,
        )

    def get(self, name: str, zone: str) -> VmState | None:
        from google.api_core import exceptions as gex

        try:
            with self._errors():
                inst = self.instances.get(
                    project=self.project, zone=zone, instance=name, **self._read
                )
        except CloudError as e:
            if _not_found(e):
                return None
            raise
        state = self._state(inst, zone)
        from google.cloud import compute_v1

        req = compute_v1.GetGuestAttributesInstanceRequest(
            project=self.project, zone=zone, instance=name, query_path="distill/"
        )
        try:
            ga = self.instances.get_guest_attributes(request=req, **self._read)
            state.guest = {f"{i.namespace}/{i.key}": i.value for i in ga.query_value.items}
        except (gex.GoogleAPICallError, gex.RetryError):
            pass  # none reported yet (or unreadable for now: the next poll reads them)
        return state

    def delete(self, name: str, zone: str, timeout: float = 900.0) -> None:
        """Delete and wait; gone already (404) is done. While another operation runs on the
        instance (GCE deleting a preempted Spot VM) the API refuses: wait and check again."""
        deadline, pause = time.monotonic() + timeout, 2.0
        while True:
            try:
                with self._errors():
                    op = self.instances.delete(project=self.project, zone=zone, instance=name)
                self._wait(op.name, zone)
                return
            except NotReady:
                if time.monotonic() + pause > deadline:
                    raise
            except CloudError as e:
                if _not_found(e):
                    return
                raise
            time.sleep(pause)
            pause = min(pause * 2, 30.0)
            if self.get(name, zone) is None:
                return

    def list(self, labels: dict[str, str]) -> list[VmState]:
        from google.cloud import compute_v1

        out = []
        with self._errors():
            pages = self.instances.aggregated_list(
                request=compute_v1.AggregatedListInstancesRequest(project=self.project),
                **self._read,
            )
            for scope, scoped in pages:
                zone = scope.rsplit("/", 1)[-1]
                for inst in scoped.instances:
                    if all(inst.labels.get(k) == v for k, v in labels.items()):
                        out.append(self._state(inst, zone))
        return out

    def was_preempted(self, name: str, zone: str, vm_id: str) -> bool:
        """Whether GCE preempted the instance ``vm_id`` (its ``compute.instances.preempted``
        operation; names repeat across relaunches, ids do not)."""
        from google.cloud import compute_v1

        req = compute_v1.ListZoneOperationsRequest(
            project=self.project,
            zone=zone,
            filter='operationType = "compute.instances.preempted"',
        )
        with self._errors():
            return any(
                op.target_link.rsplit("/", 1)[-1] == name and str(op.target_id) == vm_id
                for op in self.operations.list(req, **self._read)
            )

    def console(self, name: str, zone: str) -> str:
        from google.api_core import exceptions as gex

        try:
            out = self.instances.get_serial_port_output(
                project=self.project, zone=zone, instance=name, **self._read
            )
        except gex.GoogleAPICallError:
            return ""
        return out.contents


# --- local processes -------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True


class LocalBackend:
    """VMs as local process groups (see the module docstring)."""

    name = "local"

    def __init__(self, state_dir: Path, preempt_grace_s: float = 30.0) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.preempt_grace_s = preempt_grace_s
        self._procs: dict[str, subprocess.Popen] = {}
        # create / delete / preempt change a VM's directory: one at a time, as the Compute API
        # serialises operations on an instance (a relaunch waits for the preemption's delete)
        self._ops = threading.RLock()

    def _dir(self, name: str) -> Path:
        return self.state_dir / name

    def check_zone(self, zone: str, accelerator: str = ACCELERATOR_TYPE) -> None:
        return None  # every "zone" is this machine

    def check_project(self, needs: Needs) -> None:
        return None  # no image, quota or network here

    def create(self, spec: VmSpec, zone: str) -> None:
        with self._ops:
            self._create(spec, zone)

    def _create(self, spec: VmSpec, zone: str) -> None:
        d = self._dir(spec.name)
        if (d / "vm.json").exists():
            raise AlreadyExists(f"local VM {spec.name} already exists ({d})")
        d.mkdir(parents=True, exist_ok=True)
        (d / "metadata.json").write_text(json.dumps(spec.metadata()))
        log = (d / "serial.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill.cloud.vm_agent", "--local", str(d)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self._procs[spec.name] = proc
        info = {
            "name": spec.name,
            "zone": zone,
            "pid": proc.pid,
            "id": str(proc.pid),
            "labels": spec.labels(),
            "created": _now(),
        }
        (d / "vm.json").write_text(json.dumps(info))

    def _info(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self._dir(name) / "vm.json").read_text())
        except (OSError, ValueError):
            return None

    def _running(self, info: dict[str, Any]) -> bool:
        proc = self._procs.get(info["name"])
        if proc is not None:
            return proc.poll() is None
        return _alive(int(info["pid"]))

    def get(self, name: str, zone: str) -> VmState | None:
        info = self._info(name)
        return self._state(info) if info is not None else None

    def _state(self, info: dict[str, Any]) -> VmState:
        name = info["name"]
        running = self._running(info)
        ga = self._dir(name) / "guest-attributes.json"
        guest = json.loads(ga.read_text()) if ga.exists() else {}
        return VmState(
            name=name,
            zone=info["zone"],
            status="RUNNING" if running else "TERMINATED",
            id=info["id"],
            labels=info["labels"],
            guest=guest,
            created=info["created"],
        )

    def _signal(self, info: dict[str, Any], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(info["pid"]), sig)

    def _stop(self, info: dict[str, Any], grace: float) -> None:
        if self._running(info):
            self._signal(info, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self._running(info):
                time.sleep(0.05)
        self._signal(info, signal.SIGKILL)
        proc = self._procs.pop(info["name"], None)
        if proc is not None:
            proc.wait()

    def delete(self, name: str, zone: str) -> None:
        with self._ops:
            info = self._info(name)
            if info is None:
                return
            self._stop(info, grace=5.0)
            shutil.rmtree(self._dir(name), ignore_errors=True)

    def preempt(self, name: str) -> None:
        """Simulate a Spot preemption: SIGTERM, the grace period, SIGKILL, deletion."""
        with self._ops:
            info = self._info(name)
            if info is None:
                raise KeyError(name)
            # recorded first, as GCE lists the preemption operation when it starts
            with (self.state_dir / ".preempted").open("a") as f:
                f.write(f"{name} {info['id']}\n")
            self._stop(info, grace=self.preempt_grace_s)
            shutil.rmtree(self._dir(name), ignore_errors=True)

    def list(self, labels: dict[str, str]) -> list[VmState]:
        if not self.state_dir.is_dir():
            return []
        infos = (self._info(d.name) for d in sorted(self.state_dir.iterdir()))
        return [
            self._state(info)
            for info in infos
            if info and all(info["labels"].get(k) == v for k, v in labels.items())
        ]

    def was_preempted(self, name: str, zone: str, vm_id: str) -> bool:
        marker = self.state_dir / ".preempted"
        return marker.exists() and f"{name} {vm_id}" in marker.read_text().splitlines()

    def console(self, name: str, zone: str) -> str:
        p = self._dir(name) / "serial.log"
        return p.read_text(errors="replace") if p.exists() else ""
