"""The fan-out's Google Cloud Batch job: its spec, and the API calls the controller makes.

One job, one task group of N tasks (``parallelism`` N), each a container runnable with the
teacher image running :mod:`distill.cloud.batch_task` on its own Spot ``g2-standard-8`` with
one L4 (``installGpuDrivers``). Task i computes the shards ``s % N == i``
(``BATCH_TASK_INDEX`` / ``BATCH_TASK_COUNT``, which Batch sets). A preempted task (Batch's
exit code 50001, or the teacher's own :data:`EXIT_PREEMPTED` when it stopped on the notice)
is retried up to ``maxRetryCount`` times, on a new VM, and resumes from the bucket; any other
exit is mapped to :data:`EXIT_TASK_FAILED`, which fails the task. ``maxRunDuration`` bounds
each attempt (Batch's exit code 50005 fails the task too: a hung teacher is not retried).
Batch deletes its VMs itself; the job carries the labels ``gc`` finds it by.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from distill.cloud.backend import CloudError, QuotaExceeded, Stockout, quota_message
from distill.cloud.preemption import EXIT_PREEMPTED
from distill.cloud.spec import (
    ACCELERATOR_COUNT,
    ACCELERATOR_TYPE,
    BOOT_DISK_GB,
    CLOUD_PLATFORM,
    MACHINE_TYPE,
    job_labels,
    region_of,
)

EXIT_VM_PREEMPTED = 50001  # Batch's reserved exit code: the task's Spot VM was preempted
# Batch retries any exit code that no lifecycle policy names: the task maps every exit but 0
# and EXIT_PREEMPTED to this one (after logging the teacher's), which fails the task at once
EXIT_TASK_FAILED = 3
# Batch's reserved exit code: the attempt ran past maxRunDuration (a hung teacher: not retried)
EXIT_MAX_RUN = 50005
JOB_ENV = "DISTILL_JOB_TOML"  # the task's job file (TOML text)
INPUTS_ENV = "DISTILL_INPUTS"  # gs://SRC DEST lines, as the VM's distill-inputs metadata
TASK_MODULE = "distill.cloud.batch_task"
# Batch's status events name VM creation failures by these codes (in the description)
STOCKOUT_EVENT = "CODE_GCE_ZONE_RESOURCE_POOL_EXHAUSTED"
QUOTA_EVENT = "CODE_GCE_QUOTA_EXCEEDED"


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
            },
            "environment": {
                "variables": {
                    JOB_ENV: self.job_toml,
                    INPUTS_ENV: "\n".join(f"{s} {d}" for s, d in self.inputs),
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
                                "actionCondition": {
                                    "exitCodes": [EXIT_VM_PREEMPTED, EXIT_PREEMPTED]
                                },
                            },
                            {
                                "action": "FAIL_TASK",
                                "actionCondition": {"exitCodes": [EXIT_TASK_FAILED, EXIT_MAX_RUN]},
                            },
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
                                {"type": ACCELERATOR_TYPE, "count": str(ACCELERATOR_COUNT)}
                            ],
                            "bootDisk": {"sizeGb": str(self.boot_disk_gb)},
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
    state: str  # QUEUED | SCHEDULED | RUNNING | SUCCEEDED | FAILED | DELETION_IN_PROGRESS
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
        """This project's jobs in ``region`` that carry ``labels``."""
        from google.cloud import batch_v1

        flt = " AND ".join(f'labels.{k}="{v}"' for k, v in sorted(labels.items()))
        with self._errors():
            parent = f"projects/{self.project}/locations/{region}"
            req = batch_v1.ListJobsRequest(parent=parent, filter=flt)
            jobs = list(self.client.list_jobs(request=req))
        return [_job_state(j) for j in jobs]


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


def allocation_error(project: str, events: list[str]) -> CloudError | None:
    """A VM creation failure in the job's status events: quota (fatal), or a stockout."""
    for text in reversed(events):
        if QUOTA_EVENT in text:
            return QuotaExceeded(quota_message(project, text))
        if STOCKOUT_EVENT in text:
            return Stockout(text)
    return None


def _json(body: dict[str, Any]) -> str:
    import json

    return json.dumps(body)
