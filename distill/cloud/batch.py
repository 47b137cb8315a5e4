"""The fan-out's Google Cloud Batch job: its spec, and the API calls the controller makes.

One job, one task group of N tasks (``parallelism`` N), each a container runnable with the
teacher image running :mod:`distill.cloud.batch_task` on its own Spot ``g2-standard-8`` with
one L4. Task i computes the shards ``s % N == i`` (``BATCH_TASK_INDEX`` /
``BATCH_TASK_COUNT``, which Batch sets). The VMs boot ``batch-debian`` with the NVIDIA driver
installed by Batch (``installGpuDrivers``, the version pinned by :data:`DRIVER_VERSION`,
fetched from NVIDIA through the network's Cloud NAT); the container gets the GPU with
``--gpus all``, as on any Docker host with the NVIDIA container toolkit.

Batch takes one lifecycle policy (task.proto: "Currently we only support one lifecycle
policy"), and a RETRY_TASK policy retries the codes it lists and fails every other one. Ours
lists :data:`RETRY_CODES`: the VM went away under the task (Batch's 50001 preemption, 50002 no
VM updates, 50003 VM rebooted, 50006 VM recreated) or the teacher stopped on the preemption
notice (:data:`~distill.cloud.preemption.EXIT_PREEMPTED`). Such a task runs again on a new VM,
up to ``maxRetryCount`` times (at most :data:`MAX_RETRY_COUNT`), and resumes from the bucket.
Anything else fails the task at once: the teacher's error (the task exits
:data:`EXIT_TASK_FAILED`), a container that did not start, an attempt past ``maxRunDuration``
(50005, a hung teacher) or an unresponsive task (50004). Batch deletes its VMs itself; the job
carries the labels ``gc`` finds it by.
"""

from __future__ import annotations

import base64
import contextlib
import re
from dataclasses import dataclass
from typing import Any

from distill.cloud.errors import CloudError, QuotaExceeded, Stockout, quota_message
from distill.cloud.preemption import EXIT_PREEMPTED, WATCH_ENV
from distill.cloud.spec import (
    ACCELERATOR_COUNT,
    ACCELERATOR_TYPE,
    BOOT_DISK_GB,
    CLOUD_PLATFORM,
    MACHINE_TYPE,
    job_labels,
    region_of,
)
from distill.config import BATCH_MAX_RETRIES
from distill.errors import DistillError

# Batch's reserved exit codes (docs: troubleshooting#reserved-exit-codes)
EXIT_VM_PREEMPTED = 50001  # the task's Spot VM was preempted
EXIT_VM_NO_UPDATES = 50002  # Batch no longer receives the VM's updates
EXIT_VM_REBOOTED = 50003  # the VM rebooted during the task
EXIT_UNRESPONSIVE = 50004  # the VM and the task are unresponsive
EXIT_MAX_RUN = 50005  # the attempt ran past maxRunDuration (a hung teacher: not retried)
EXIT_VM_RECREATED = 50006  # the VM was recreated during the task
# The one lifecycle policy: RETRY_TASK on these, every other non-zero exit fails the task.
RETRY_CODES = (
    EXIT_VM_PREEMPTED,
    EXIT_VM_NO_UPDATES,
    EXIT_VM_REBOOTED,
    EXIT_VM_RECREATED,
    EXIT_PREEMPTED,
)
VM_GONE_CODES = frozenset(RETRY_CODES) - {EXIT_PREEMPTED}
MAX_RETRY_COUNT = BATCH_MAX_RETRIES  # task.proto: maxRetryCount's valid range is [0, 10]
# The task maps every teacher exit but 0 and EXIT_PREEMPTED to this one (after logging the
# teacher's), so the controller can tell "the teacher failed" from "the container never ran"
EXIT_TASK_FAILED = 3
BOOT_IMAGE = "batch-debian"  # Batch's Debian image: its driver install + NVIDIA container toolkit
CONTAINER_OPTIONS = "--gpus all"  # the L4 inside the teacher's container
# The NVIDIA driver Batch installs (Accelerator.driverVersion): the R570 branch, the oldest that
# the teacher image's CUDA 12.8 supports (spec.MIN_DRIVER; a test keeps the two in step).
DRIVER_VERSION = "570.172.08"
# What a Batch job needs of the project (infra/terraform/base provides it; a test checks):
# the APIs enabled, and the roles of the job's service account. Without batch.agentReporter,
# Batch fails the job: "No VM has agent reporting correctly within time window".
REQUIRED_APIS = (
    "artifactregistry.googleapis.com",
    "batch.googleapis.com",
    "compute.googleapis.com",
    "logging.googleapis.com",
    "storage.googleapis.com",
)
TASK_ROLES = (
    "roles/artifactregistry.reader",
    "roles/batch.agentReporter",
    "roles/logging.logWriter",
    "roles/storage.objectCreator",
    "roles/storage.objectViewer",
)
JOB_ENV = "DISTILL_JOB_TOML_B64"  # the task's job file (TOML text, base64)
INPUTS_ENV = "DISTILL_INPUTS_B64"  # gs://SRC DEST lines, as the VM's distill-inputs (base64)
TASK_MODULE = "distill.cloud.batch_task"
# Batch's status events name VM creation failures by these codes (in the description)
STOCKOUT_EVENT = "CODE_GCE_ZONE_RESOURCE_POOL_EXHAUSTED"
QUOTA_EVENT = "CODE_GCE_QUOTA_EXCEEDED"
# ... and a job held in QUEUED for quota (Batch fails it after 2 days), or a VM creation refused
# for quota, in the troubleshooting page's words
QUOTA_WORDS = (
    QUOTA_EVENT,
    "due to inadequate quota",
    re.compile(r"Quota '?[A-Z0-9_]+'? exceeded"),
)
STOCKOUT_WORDS = (
    STOCKOUT_EVENT,
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "does not have enough resources available",
)
LIVE = ("QUEUED", "SCHEDULED", "RUNNING")
# A job in one of these will not run a task again: Batch ended it, or it is being cancelled
ENDED = ("SUCCEEDED", "FAILED", "CANCELLATION_IN_PROGRESS", "CANCELLED")


def encode_env(text: str) -> str:
    """Multi-line text (the job TOML, the inputs list) as one base64 line for an env var."""
    return base64.b64encode(text.encode()).decode()


def decode_env(value: str) -> str:
    return base64.b64decode(value.encode(), validate=True).decode()


def batch_job_id(job_name: str) -> str:
    """A valid Batch job ID for a job (``^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$``)."""
    from distill.cloud.spec import instance_name

    return instance_name(job_name)  # distill-teacher-<job>: the same rule


@dataclass(frozen=True)
class BatchSpec:
    """Everything that decides the Batch job's JSON body (:meth:`body`)."""

    project: str
    job_name: str
    job_toml: str
    inputs: tuple[tuple[str, str], ...]
    image: str
    service_account_email: str
    zones: tuple[str, ...]
    tasks: int
    max_retries: int
    max_run_duration_s: int
    spot: bool = True
    network: str = "distill"
    subnetwork: str = ""
    boot_disk_gb: int = BOOT_DISK_GB  # :func:`distill.cloud.spec.boot_disk_gb`

    def __post_init__(self) -> None:
        if not 0 <= self.max_retries <= MAX_RETRY_COUNT:
            raise DistillError(
                f"cloud.max_preemptions = {self.max_retries}: a Batch task is retried at most "
                f"{MAX_RETRY_COUNT} times (maxRetryCount is 0..{MAX_RETRY_COUNT})"
            )

    @property
    def region(self) -> str:
        return region_of(self.zones[0])

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    @property
    def job_id(self) -> str:
        return batch_job_id(self.job_name)

    def body(self) -> dict[str, Any]:
        """The ``projects.locations.jobs`` resource (JSON, camelCase), as the API takes it."""
        subnet = self.subnetwork or f"{self.network}-{self.region}"
        runnable = {
            "container": {
                "imageUri": self.image,
                "entrypoint": "python",
                "commands": ["-m", TASK_MODULE],
                "options": CONTAINER_OPTIONS,
            },
            "environment": {
                "variables": {
                    JOB_ENV: encode_env(self.job_toml),
                    INPUTS_ENV: encode_env("".join(f"{s} {d}\n" for s, d in self.inputs)),
                    # the teacher also stops on the metadata server's preemption notice
                    WATCH_ENV: "1",
                }
            },
        }
        return {
            "taskGroups": [
                {
                    "taskCount": str(self.tasks),
                    "parallelism": str(self.tasks),
                    "taskSpec": {
                        "runnables": [runnable],
                        "computeResource": {"cpuMilli": "7000", "memoryMib": "28000"},
                        "maxRunDuration": f"{self.max_run_duration_s}s",
                        "maxRetryCount": self.max_retries,
                        "lifecyclePolicies": [
                            {
                                "action": "RETRY_TASK",
                                "actionCondition": {"exitCodes": list(RETRY_CODES)},
                            }
                        ],
                    },
                }
            ],
            "allocationPolicy": {
                "location": {
                    "allowedLocations": [f"zones/{z}" for z in self.zones],
                },
                "instances": [
                    {
                        "policy": {
                            "machineType": MACHINE_TYPE,
                            "provisioningModel": "SPOT" if self.spot else "STANDARD",
                            "accelerators": [
                                {
                                    "type": ACCELERATOR_TYPE,
                                    "count": str(ACCELERATOR_COUNT),
                                    "driverVersion": DRIVER_VERSION,
                                }
                            ],
                            "bootDisk": {
                                "image": BOOT_IMAGE,
                                "sizeGb": str(self.boot_disk_gb),
                            },
                        },
                        "installGpuDrivers": True,
                    }
                ],
                "serviceAccount": {
                    "email": self.service_account_email,
                    "scopes": [CLOUD_PLATFORM],
                },
                "network": {
                    "networkInterfaces": [
                        {
                            "network": f"projects/{self.project}/global/networks/{self.network}",
                            "subnetwork": (
                                f"projects/{self.project}/regions/{self.region}/subnetworks/"
                                f"{subnet}"
                            ),
                            "noExternalIpAddress": True,
                        }
                    ]
                },
            },
            "labels": job_labels(self.job_name),
            "logsPolicy": {"destination": "CLOUD_LOGGING"},
        }


@dataclass
class TaskState:
    index: int
    state: str  # PENDING | ASSIGNED | RUNNING | FAILED | SUCCEEDED | UNEXECUTED
    retries: int  # failed attempts so far (exit codes in the status events)
    exit_codes: list[int]


@dataclass
class JobState:
    name: str
    # QUEUED | SCHEDULED | RUNNING | SUCCEEDED | FAILED | DELETION_IN_PROGRESS |
    # CANCELLATION_IN_PROGRESS | CANCELLED
    state: str
    events: list[str]  # the status events' descriptions, oldest first
    labels: dict[str, str]
    created: str
    uid: str = ""  # Batch's job UID: its task logs carry it as labels.job_uid


class BatchApi:
    """The Batch calls of a fan-out, through google-cloud-batch (REST), errors as CloudError."""

    def __init__(self, project: str, endpoint: str | None = None) -> None:
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import batch_v1

        self.project = project
        if endpoint:  # the stub: no credentials
            from google.auth.credentials import AnonymousCredentials

            creds: Any = AnonymousCredentials()
            opts: dict[str, str] | None = {"api_endpoint": endpoint}
        else:
            creds, opts = None, None  # google.auth.default()
        try:
            self.client = batch_v1.BatchServiceClient(
                transport="rest", credentials=creds, client_options=opts
            )
        except DefaultCredentialsError as e:
            raise CloudError(
                "no Google Cloud credentials: run `gcloud auth application-default login` "
                "(or set GOOGLE_APPLICATION_CREDENTIALS to a key file); nothing was spent"
            ) from e

    @contextlib.contextmanager
    def _errors(self) -> Any:
        from google.api_core import exceptions as gex

        try:
            yield
        except gex.GoogleAPICallError as e:
            raise CloudError(f"Batch API error in project {self.project}: {e.message or e}") from e
        except gex.RetryError as e:
            raise CloudError(f"the Batch API kept failing ({e.cause or e})") from e

    def create(self, spec: BatchSpec) -> str:
        """Create the job; returns its name (``projects/P/locations/R/jobs/ID``)."""
        from google.cloud import batch_v1

        job = batch_v1.Job.from_json(_json(spec.body()))
        with self._errors():
            made = self.client.create_job(parent=spec.parent, job=job, job_id=spec.job_id)
        return made.name

    def get(self, name: str) -> JobState | None:
        """The job's state, or None once it is gone."""
        from google.api_core import exceptions as gex

        try:
            with self._errors():
                job = self.client.get_job(name=name)
        except CloudError as e:
            if isinstance(e.__cause__, gex.NotFound):
                return None
            raise
        return _job_state(job)

    def tasks(self, name: str) -> list[TaskState]:
        from google.cloud import batch_v1

        out = []
        with self._errors():
            for t in self.client.list_tasks(parent=f"{name}/taskGroups/group0"):
                codes = [
                    ev.task_execution.exit_code
                    for ev in t.status.status_events
                    if ev.task_execution and ev.task_state == batch_v1.TaskStatus.State.FAILED
                ]
                out.append(
                    TaskState(
                        index=int(t.name.rsplit("/", 1)[-1]),
                        state=batch_v1.TaskStatus.State(t.status.state).name,
                        retries=len(codes),
                        exit_codes=codes,
                    )
                )
        return sorted(out, key=lambda t: t.index)

    def delete(self, name: str) -> None:
        """Ask for the job's deletion (Batch then deletes its VMs); a job already gone is fine."""
        from google.api_core import exceptions as gex

        try:
            with self._errors():
                self.client.delete_job(name=name)
        except CloudError as e:
            if not isinstance(e.__cause__, gex.NotFound):
                raise

    def list(self, region: str, labels: dict[str, str]) -> list[JobState]:
        """This project's jobs in ``region`` that carry ``labels``. Every job of the region is
        listed and the labels matched here: the list filter's syntax for labels is not
        documented, and a filter the API reads otherwise would hide a job left running."""
        with self._errors():
            parent = f"projects/{self.project}/locations/{region}"
            jobs = [_job_state(j) for j in self.client.list_jobs(parent=parent)]
        return [j for j in jobs if all(j.labels.get(k) == v for k, v in labels.items())]


def _job_state(job: Any) -> JobState:
    """A ``batch_v1.Job`` as a :class:`JobState`."""
    from google.cloud import batch_v1

    return JobState(
        name=job.name,
        state=batch_v1.JobStatus.State(job.status.state).name,
        events=[ev.description for ev in job.status.status_events],
        labels=dict(job.labels),
        created=job.create_time.isoformat() if job.create_time else "",
        uid=job.uid,
    )


def leftover_jobs(
    project: str, region: str, labels: dict[str, str], endpoint: str | None
) -> tuple[BatchApi, list[JobState]]:
    """``gc``: the API, and the Batch jobs in ``region`` that carry ``labels``."""
    api = BatchApi(project, endpoint=endpoint)
    return api, api.list(region, labels)


def _says(text: str, words: tuple[str | re.Pattern[str], ...]) -> bool:
    return any(w.search(text) if isinstance(w, re.Pattern) else w in text for w in words)


def allocation_error(project: str, events: list[str]) -> CloudError | None:
    """A VM allocation failure in the job's status events, the newest first: quota (a job held
    in QUEUED for quota, or a VM creation refused for it; fatal), or a stockout."""
    for text in reversed(events):
        if _says(text, QUOTA_WORDS):
            return QuotaExceeded(quota_message(project, text))
        if _says(text, STOCKOUT_WORDS):
            return Stockout(text)
    return None


def _json(body: dict[str, Any]) -> str:
    import json

    return json.dumps(body)
