"""One teacher-VM spec, written once and rendered three ways.

``VmSpec`` holds every field of the VM that runs the teacher pass: a g2-standard-8 with one
NVIDIA L4, Spot provisioning deleted on preemption, a ``maxRunDuration`` dead-man switch, a
Container-Optimized OS boot image (its ``cos-extensions`` installs the NVIDIA driver), a
least-privilege service account, labels naming the job, and the startup script that runs the
teacher container.

Renderings, all from the same fields (tests/test_vm_spec.py checks that they agree):

- :meth:`VmSpec.insert_request`: a ``google.cloud.compute_v1.InsertInstanceRequest``;
- :meth:`VmSpec.tfvars`: ``terraform.tfvars.json`` for ``infra/terraform/teacher_vm``;
- :meth:`VmSpec.gcloud`: the ``gcloud compute instances create`` argv (plus the metadata
  files it reads with ``--metadata-from-file``).

:func:`render_vm` is ``distill-ctl vm-render``: a job file's spec, in one of the three.

The zone list is for failover: each rendering takes one zone (default: the first).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.checkpoints import is_pinned_ref
from distill.cloud.startup import SHUTDOWN_SCRIPT, STARTUP_SCRIPT
from distill.config import region_of
from distill.errors import DistillError
from distill.hardware import l4

if TYPE_CHECKING:
    from google.cloud import compute_v1
    from rich.console import Console

# The machine and its GPU: distill/hardware/l4.toml (g2-standard-8: 8 vCPU, 32 GB, one L4)
MACHINE_TYPE = l4().machine.type
MACHINE_VCPUS = l4().machine.vcpus  # what each VM takes of the CPUS (or PREEMPTIBLE_CPUS) quota
ACCELERATOR_TYPE = l4().gpu.accelerator_type
ACCELERATOR_COUNT = l4().machine.gpus  # one L4 per VM
DEFAULT_ZONES = ("us-central1-a", "us-central1-b", "us-central1-c")
# Container-Optimized OS: Docker, Private Google Access friendly, and the documented
# `cos-extensions install gpu` driver install (docs/CLOUD.md, "Boot path"). The preflight looks
# the family up (images.getFromFamily) and refuses a deprecated or missing image.
IMAGE_PROJECT = "cos-cloud"
IMAGE_FAMILY = "cos-stable"
GPU_DRIVER = "latest"  # cos-extensions install gpu -- -version=...
# The teacher image's CUDA (docker/teacher.Dockerfile's nvidia/cuda base; a test keeps the two
# in step) and the oldest driver branch each CUDA release supports (NVIDIA's CUDA release notes):
# the VM refuses a driver older than that before it pulls the image.
TEACHER_CUDA = "12.8"
MIN_DRIVER = {"12.4": 550, "12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580}
BOOT_DISK_GB = l4().machine.boot_disk_min_gb  # the least: COS + the teacher image + inputs
IMAGE_DISK_GB = 16  # COS and the teacher image
DISK_MARGIN = 0.2  # scratch shards, logs, the Hugging Face cache's copies; 10 GB at least
BOOT_DISK_TYPE = l4().machine.boot_disk_type  # G2 takes pd-balanced/pd-ssd, not pd-standard
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"  # IAM decides the rest
DEFAULT_MAX_RUN_S = 12 * 3600
NETWORK = "distill"  # infra/terraform/base: a VPC without ingress, Private Google Access on
MAX_METADATA_VALUE = 256 * 1024  # Compute Engine limits: 256 KB a value, 512 KB in all
MAX_METADATA_TOTAL = 512 * 1024

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1035, as instance names
_LABEL_KEY = re.compile(r"^[a-z][-_a-z0-9]{0,62}$")
_LABEL_VALUE = re.compile(r"^[-_a-z0-9]{0,63}$")


def label_value(text: str) -> str:
    """``text`` as a valid label value: lower case, ``[-_a-z0-9]``, at most 63 characters."""
    return re.sub(r"[^-_a-z0-9]", "-", text.lower())[:63]


def job_labels(job_name: str) -> dict[str, str]:
    """The labels every VM of a job carries (``gc`` and the controller find VMs by them)."""
    return {"distill-job": label_value(job_name), "managed-by": "distill"}


def instance_name(job_name: str) -> str:
    """A valid instance name for a job: ``distill-teacher-<job>``."""
    stem = re.sub(r"-+", "-", re.sub(r"[^-a-z0-9]", "-", job_name.lower())).strip("-")
    return f"distill-teacher-{stem}"[:63].rstrip("-")


def default_subnetwork(network: str, region: str) -> str:
    """The subnet a network has in ``region``: ``default`` in the auto-mode ``default`` VPC,
    else ``<network>-<region>`` as infra/terraform/base names it."""
    return "default" if network == "default" else f"{network}-{region}"


@dataclass(frozen=True)
class GcloudCommand:
    """An argv and the files its ``--metadata-from-file`` flag reads (path -> content)."""

    argv: list[str]
    files: dict[Path, str]

    def write_files(self) -> None:
        for path, text in self.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def boot_disk_gb(checkpoint_bytes: int, input_bytes: int) -> int:
    """The boot disk a teacher VM needs: the checkpoint and the inputs it stages there, the OS
    and image, and a margin; never below :data:`BOOT_DISK_GB`."""
    staged = (checkpoint_bytes + input_bytes) / 2**30  # a disk's "GB" is a GiB
    need = IMAGE_DISK_GB + staged + max(10.0, DISK_MARGIN * staged)
    return max(BOOT_DISK_GB, math.ceil(need))


@dataclass(frozen=True)
class VmSpec:
    """Every field of the teacher VM; the renderings below read only these."""

    project: str
    name: str
    job_name: str
    job_toml: str  # the job file's text, as the VM will read it (job.output must be gs://)
    image: str  # the teacher container image, e.g. REGION-docker.pkg.dev/P/distill/teacher:TAG
    service_account_email: str
    zones: tuple[str, ...] = DEFAULT_ZONES
    machine_type: str = MACHINE_TYPE
    accelerator_type: str = ACCELERATOR_TYPE
    accelerator_count: int = ACCELERATOR_COUNT
    provisioning_model: str = "SPOT"
    instance_termination_action: str = "DELETE"
    max_run_duration_s: int = DEFAULT_MAX_RUN_S  # dead-man switch: deleted after this long
    on_host_maintenance: str = "TERMINATE"  # GPUs cannot live-migrate
    automatic_restart: bool = False
    image_project: str = IMAGE_PROJECT
    image_family: str = IMAGE_FAMILY
    gpu_driver: str = GPU_DRIVER
    boot_disk_gb: int = BOOT_DISK_GB
    boot_disk_type: str = BOOT_DISK_TYPE
    scopes: tuple[str, ...] = (CLOUD_PLATFORM,)
    network: str = NETWORK
    subnetwork: str = ""  # "" = default_subnetwork(network, region)
    external_ip: bool = False  # Google APIs through Private Google Access on the subnet
    # Shielded VM: vTPM and integrity monitoring always on; Secure Boot off by default (it
    # refuses kernel modules that are not signed with a key the firmware trusts).
    shielded_secure_boot: bool = False
    # (gs://src or a pinned hf:ORG/NAME@SHA checkpoint, dest relative to the job dir)
    inputs: tuple[tuple[str, str], ...] = ()
    status_url: str = ""  # gs://... prefix for the VM's final status object ("" = none)
    extra_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def for_job(
        cls, job_file: Path, project: str, image: str, service_account_email: str, **kw: Any
    ) -> VmSpec:
        """A spec for a job file (name and labels from ``job.name``)."""
        try:
            text = job_file.read_text()
            raw = tomllib.loads(text)
        except OSError as e:
            raise DistillError(f"job file {job_file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise DistillError(f"{job_file}: not valid TOML: {e}") from None
        job = raw.get("job", {})
        name = job.get("name", "job") if isinstance(job, dict) else "job"
        output = job.get("output", "") if isinstance(job, dict) else ""
        if not str(output).startswith("gs://"):
            raise DistillError(
                f"{job_file}: job.output = {output!r} must be a gs:// URL for a cloud teacher "
                "(the VM and its disk go away)"
            )
        kw.setdefault("name", instance_name(str(name)))
        return cls(
            project=project,
            job_name=str(name),
            job_toml=text,
            image=image,
            service_account_email=service_account_email,
            **kw,
        )

    # --- derived fields -----------------------------------------------------------------------

    @property
    def region(self) -> str:
        return region_of(self.zones[0])

    @property
    def subnet(self) -> str:
        """The subnetwork's name in this spec's region."""
        return self.subnetwork or default_subnetwork(self.network, self.region)

    @property
    def boot_image(self) -> str:
        return f"projects/{self.image_project}/global/images/family/{self.image_family}"

    @property
    def preemptible(self) -> bool:
        return self.provisioning_model == "SPOT"

    def labels(self) -> dict[str, str]:
        return {**job_labels(self.job_name), **self.extra_labels}

    def metadata(self) -> dict[str, str]:
        md = {
            "startup-script": STARTUP_SCRIPT,
            "shutdown-script": SHUTDOWN_SCRIPT,
            "distill-job": self.job_toml,
            "distill-image": self.image,
            "distill-gpu-driver": self.gpu_driver,
            "distill-min-driver": str(MIN_DRIVER[TEACHER_CUDA]),
            "enable-guest-attributes": "TRUE",  # the startup script reports its status there
            "enable-oslogin": "TRUE",
            "block-project-ssh-keys": "TRUE",
            "serial-port-enable": "FALSE",
        }
        if self.inputs:
            md["distill-inputs"] = "".join(f"{src} {dest}\n" for src, dest in self.inputs)
        if self.status_url:
            md["distill-status-url"] = self.status_url
        return md

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise DistillError(
                f"instance name {self.name!r}: 1-63 of [a-z0-9-], starting with a letter"
            )
        if not self.project or not self.image or not self.service_account_email:
            raise DistillError("project, image and service_account_email must be set")
        if not self.zones:
            raise DistillError("at least one zone is needed")
        regions = {region_of(z) for z in self.zones}
        if len(regions) != 1:
            raise DistillError(
                f"zones {', '.join(self.zones)} span regions {', '.join(sorted(regions))}; "
                "the subnet is regional, give zones of one region"
            )
        if self.provisioning_model not in ("SPOT", "STANDARD"):
            raise DistillError(f"provisioning_model {self.provisioning_model!r}: SPOT|STANDARD")
        if self.instance_termination_action not in ("DELETE", "STOP"):
            raise DistillError("instance_termination_action must be DELETE or STOP")
        if not 30 <= self.max_run_duration_s <= 120 * 86400:
            raise DistillError("max_run_duration_s must be between 30 s and 120 days (the API's)")
        if self.on_host_maintenance != "TERMINATE":
            raise DistillError("on_host_maintenance must be TERMINATE for a GPU VM")
        if self.accelerator_count < 1 or self.boot_disk_gb < 10:
            raise DistillError("accelerator_count >= 1 and boot_disk_gb >= 10")
        for key, value in self.labels().items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise DistillError(f"label {key}={value!r}: use [-_a-z0-9], at most 63")
        if self.status_url and not self.status_url.startswith("gs://"):
            raise DistillError(f"status_url {self.status_url!r} must be a gs:// URL")
        for src, dest in self.inputs:
            ok_src = src.startswith("gs://") or is_pinned_ref(src)
            if not ok_src or not dest or dest.startswith("/") or ".." in dest:
                raise DistillError(
                    f"input {src} -> {dest}: need gs://... (or a pinned hf: checkpoint) -> a "
                    "relative path"
                )
            if any(c.isspace() for c in src + dest):
                raise DistillError(f"input {src} -> {dest}: no whitespace in paths")
        md = self.metadata()
        for key, value in md.items():
            if len(value.encode()) > MAX_METADATA_VALUE:
                raise DistillError(f"metadata {key} is over Compute Engine's 256 KB per value")
        if sum(len(k) + len(v.encode()) for k, v in md.items()) > MAX_METADATA_TOTAL:
            raise DistillError("instance metadata is over Compute Engine's 512 KB in all")

    def _zone(self, zone: str | None) -> str:
        zone = zone or self.zones[0]
        if zone not in self.zones:
            raise DistillError(f"zone {zone} is not in the spec's zones ({', '.join(self.zones)})")
        return zone

    # --- rendering (a): the Compute Engine API ------------------------------------------------

    def instance(self, zone: str | None = None) -> compute_v1.Instance:
        """The ``compute_v1.Instance`` for ``zone`` (default: the first of the spec's zones)."""
        from google.cloud import compute_v1

        zone = self._zone(zone)
        access = [compute_v1.AccessConfig(name="external-nat", type_="ONE_TO_ONE_NAT")]
        return compute_v1.Instance(
            name=self.name,
            machine_type=f"zones/{zone}/machineTypes/{self.machine_type}",
            guest_accelerators=[
                compute_v1.AcceleratorConfig(
                    accelerator_type=(
                        f"projects/{self.project}/zones/{zone}/acceleratorTypes/"
                        f"{self.accelerator_type}"
                    ),
                    accelerator_count=self.accelerator_count,
                )
            ],
            scheduling=compute_v1.Scheduling(
                provisioning_model=self.provisioning_model,
                preemptible=self.preemptible,
                instance_termination_action=self.instance_termination_action,
                max_run_duration=compute_v1.Duration(seconds=self.max_run_duration_s),
                on_host_maintenance=self.on_host_maintenance,
                automatic_restart=self.automatic_restart,
            ),
            disks=[
                compute_v1.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=self.boot_image,
                        disk_size_gb=self.boot_disk_gb,
                        disk_type=f"zones/{zone}/diskTypes/{self.boot_disk_type}",
                    ),
                )
            ],
            network_interfaces=[
                compute_v1.NetworkInterface(
                    network=f"projects/{self.project}/global/networks/{self.network}",
                    subnetwork=(
                        f"projects/{self.project}/regions/{region_of(zone)}/subnetworks/"
                        f"{self.subnet}"
                    ),
                    access_configs=access if self.external_ip else [],
                )
            ],
            service_accounts=[
                compute_v1.ServiceAccount(
                    email=self.service_account_email, scopes=list(self.scopes)
                )
            ],
            shielded_instance_config=compute_v1.ShieldedInstanceConfig(
                enable_secure_boot=self.shielded_secure_boot,
                enable_vtpm=True,
                enable_integrity_monitoring=True,
            ),
            labels=self.labels(),
            metadata=compute_v1.Metadata(
                items=[compute_v1.Items(key=k, value=v) for k, v in self.metadata().items()]
            ),
        )

    def insert_request(
        self, zone: str | None = None, request_id: str | None = None
    ) -> compute_v1.InsertInstanceRequest:
        """``instances.insert`` for ``zone``; ``request_id`` makes a retry of the same attempt
        idempotent (a fresh UUID per attempt by default, so a stockout retry is not deduped)."""
        from google.cloud import compute_v1

        zone = self._zone(zone)
        return compute_v1.InsertInstanceRequest(
            project=self.project,
            zone=zone,
            instance_resource=self.instance(zone),
            request_id=request_id or str(uuid.uuid4()),
        )

    # --- rendering (b): Terraform (infra/terraform/teacher_vm) --------------------------------

    def tfvars(self, zone: str | None = None) -> dict[str, Any]:
        """The values of every variable of ``infra/terraform/teacher_vm``."""
        zone = self._zone(zone)
        return {
            "project": self.project,
            "zone": zone,
            "name": self.name,
            "machine_type": self.machine_type,
            "accelerator_type": self.accelerator_type,
            "accelerator_count": self.accelerator_count,
            "provisioning_model": self.provisioning_model,
            "instance_termination_action": self.instance_termination_action,
            "max_run_duration_seconds": self.max_run_duration_s,
            "on_host_maintenance": self.on_host_maintenance,
            "automatic_restart": self.automatic_restart,
            "boot_image": self.boot_image,
            "boot_disk_size_gb": self.boot_disk_gb,
            "boot_disk_type": self.boot_disk_type,
            "service_account_email": self.service_account_email,
            "scopes": list(self.scopes),
            "network": self.network,
            "subnetwork": self.subnet,
            "external_ip": self.external_ip,
            "shielded_secure_boot": self.shielded_secure_boot,
            "labels": self.labels(),
            "metadata": self.metadata(),
        }

    def write_tfvars(self, path: Path, zone: str | None = None) -> Path:
        """Write ``terraform.tfvars.json`` (``terraform apply -var-file=PATH``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.tfvars(zone), indent=2) + "\n")
        return path

    # --- rendering (c): gcloud ----------------------------------------------------------------

    def gcloud(self, files_dir: Path, zone: str | None = None) -> GcloudCommand:
        """``gcloud compute instances create`` for ``zone``; multi-line metadata values go to
        files under ``files_dir`` (write them with :meth:`GcloudCommand.write_files`)."""
        zone = self._zone(zone)
        inline, files = {}, {}
        for key, value in self.metadata().items():
            if any(c in value for c in ",\n=") or len(value) > 200:
                files[key] = files_dir / key
            else:
                inline[key] = value
        nic = f"network={self.network},subnet={self.subnet}"
        if not self.external_ip:
            nic += ",no-address"
        argv = [
            "gcloud",
            "compute",
            "instances",
            "create",
            self.name,
            f"--project={self.project}",
            f"--zone={zone}",
            f"--machine-type={self.machine_type}",
            f"--accelerator=type={self.accelerator_type},count={self.accelerator_count}",
            f"--provisioning-model={self.provisioning_model}",
            f"--instance-termination-action={self.instance_termination_action}",
            f"--max-run-duration={self.max_run_duration_s}s",
            f"--maintenance-policy={self.on_host_maintenance}",
            "--restart-on-failure" if self.automatic_restart else "--no-restart-on-failure",
            f"--image-project={self.image_project}",
            f"--image-family={self.image_family}",
            f"--boot-disk-size={self.boot_disk_gb}GB",
            f"--boot-disk-type={self.boot_disk_type}",
            f"--service-account={self.service_account_email}",
            f"--scopes={','.join(self.scopes)}",
            f"--network-interface={nic}",
            *(["--shielded-secure-boot"] if self.shielded_secure_boot else []),
            "--shielded-vtpm",
            "--shielded-integrity-monitoring",
            "--labels=" + ",".join(f"{k}={v}" for k, v in self.labels().items()),
        ]
        if inline:
            argv.append("--metadata=" + ",".join(f"{k}={v}" for k, v in inline.items()))
        if files:
            argv.append("--metadata-from-file=" + ",".join(f"{k}={p}" for k, p in files.items()))
        md = self.metadata()
        return GcloudCommand(argv, {p: md[k] for k, p in files.items()})


# --- distill-ctl vm-render --------------------------------------------------------------------

RENDER_FORMATS = ("gcloud", "tfvars", "api")


def parse_inputs(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``--input`` values ``gs://SRC=DEST`` as ``(SRC, DEST)`` pairs."""
    inputs = []
    for item in items:
        src, eq, dest = item.partition("=")
        if not eq:
            raise DistillError(f"--input {item!r}: expected gs://SRC=DEST")
        inputs.append((src, dest))
    return tuple(inputs)


def render_vm(
    job_file: Path,
    project: str,
    image: str,
    service_account_email: str,
    *,
    zones: str,
    zone: str | None,
    fmt: str,
    out_dir: Path,
    max_run_hours: float,
    inputs: list[str],
    console: Console,
) -> None:
    """``vm-render``: the job's spec as a gcloud command, Terraform variables (their files
    under ``out_dir/<name>``) or an API request, printed on ``console``."""
    if fmt not in RENDER_FORMATS:
        raise DistillError(f"--format {fmt!r}: one of {', '.join(RENDER_FORMATS)}")
    spec = VmSpec.for_job(
        job_file,
        project,
        image,
        service_account_email,
        zones=tuple(z.strip() for z in zones.split(",") if z.strip()),
        max_run_duration_s=int(max_run_hours * 3600),
        inputs=parse_inputs(inputs),
    )
    where = out_dir / spec.name
    if fmt == "gcloud":
        cmd = spec.gcloud(where, zone)
        cmd.write_files()
        console.print(shlex.join(cmd.argv), soft_wrap=True, highlight=False)
    elif fmt == "tfvars":
        path = spec.write_tfvars(where / "terraform.tfvars.json", zone)
        console.print(
            f"wrote {path}\nterraform -chdir=infra/terraform/teacher_vm apply "
            f"-var-file={path.resolve()} -state={(where / 'terraform.tfstate').resolve()}",
            soft_wrap=True,
            highlight=False,
        )
    else:
        from google.cloud import compute_v1

        console.print_json(compute_v1.InsertInstanceRequest.to_json(spec.insert_request(zone)))
