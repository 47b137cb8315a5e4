"""Compute Engine through google-cloud-compute (REST): the :class:`~distill.cloud.backend.
Backend` of real VMs. ``endpoint`` points the clients at the stub (``tests/fakes/compute.py``)
with anonymous credentials, as tests do."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from distill.cloud.backend import Needs, VmState, quota_refusal
from distill.cloud.errors import (
    CloudError,
    NoAccelerator,
    NotReady,
    PreflightFailed,
    QuotaExceeded,
    classify,
    error_code,
)
from distill.cloud.spec import ACCELERATOR_TYPE, VmSpec


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
        self._read: dict[str, Any] = {
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
