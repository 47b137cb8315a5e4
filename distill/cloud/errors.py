"""The cloud's errors a user can act on, each with the fix in its message.

:func:`classify` turns a Compute API error (an operation's, or an HTTP call's by its reason)
into one of them; :func:`quota_message` reads a quota refusal in any of Compute's and Batch's
wordings.
"""

from __future__ import annotations

import re

from distill.errors import DistillError

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


class TeacherFailed(DistillError):
    """The teacher exited with an error on the VM (not a preemption)."""


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
