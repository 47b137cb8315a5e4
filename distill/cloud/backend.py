"""Where teacher VMs come from, behind one small interface.

A :class:`Backend` checks a zone and the project (:class:`Needs`: image, quotas, subnet),
creates a VM from a :class:`~distill.cloud.spec.VmSpec`, reads its state, deletes it, lists
VMs by label, tells a preemption from other ends, and reads its console. The implementations:
:class:`~distill.cloud.gce.GceBackend` (Compute Engine through google-cloud-compute, or its
stub) and :class:`~distill.cloud.local.LocalBackend` (local process groups). Errors a user can
act on are :mod:`distill.cloud.errors`; a stockout is
:class:`~distill.cloud.errors.Stockout` (the controller tries the next zone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from distill.cloud.spec import ACCELERATOR_TYPE, VmSpec

LIVE = ("PROVISIONING", "STAGING", "RUNNING", "STOPPING", "SUSPENDING", "REPAIRING")


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
        cpu_quota = regional.get("CPUS")
        if not spot_fits and cpu_quota is not None and not room(cpu_quota, needs.cpus):
            return _refusal(project, "CPU", "CPUS", cpu_quota, f"in {needs.region}", cpus)
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
