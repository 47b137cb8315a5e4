"""The teacher VM's startup and shutdown scripts (instance metadata ``startup-script`` and
``shutdown-script``): ``distill/cloud/scripts/startup.sh`` and ``shutdown.sh``, package data
read here, unchanged, into :data:`STARTUP_SCRIPT` and :data:`SHUTDOWN_SCRIPT`.

The startup script runs as root at boot. The VM boots Container-Optimized OS (COS): it ships
Docker, reaches Google APIs through Private Google Access (no external IP, no NAT), and installs
the NVIDIA driver with the documented ``cos-extensions install gpu`` (the driver comes from
Google's own bucket); a container gets the GPU through the documented device and library mounts
(see docs/CLOUD.md, "Boot path").

The script is static: everything job-specific comes from other metadata keys, so one reviewed
script serves every job. It writes the job file (``distill-job``), installs and checks the
driver (refusing one older than ``distill-min-driver``, which the teacher image's CUDA needs),
configures registry auth, pulls the teacher image (``distill-image``), stages the inputs
(``distill-inputs``: one ``gs://SRC DEST`` per line) with the image's own Python
(:func:`distill.cloud.vm_agent.stage_inputs`; COS has no gcloud), and runs the teacher once with
the job file mounted read-only and ``DISTILL_WATCH_PREEMPTION=1``.

**Everything** it prints, from its first line, goes to ``/var/lib/distill/startup.log`` (and the
serial console), so a failure before the teacher (no driver, pull denied) is as visible as one
inside it. When it ends it records the outcome: guest attributes ``distill/status`` (``done``,
``preempted`` for exit code 75 or a preemption notice, ``failed``) and ``distill/exit-code``,
and, durable after the VM is gone, two create-only objects under ``distill-status-url``:
``<instance>-<id>.log`` (the whole log) and then ``<instance>-<id>.json`` (status, exit code, the
log's name). Then the VM **deletes itself** through the Compute API with its own token (the
service account holds ``compute.instances.delete`` on ``distill-teacher-*`` only, see
``infra/terraform/base``); if that is refused it powers off (only the boot disk is billed;
``distill-ctl gc`` removes it). A reboot reruns the script safely: the teacher resumes from the
shards in the bucket.

The shutdown script runs on the ACPI soft-off of a preemption (about 30 s before the VM is
gone) and stops the container with SIGTERM and a 25 s grace. :mod:`distill.cloud.vm_agent` is
the startup script's Python twin for local "VMs".

The variables the script reads (``GCE_METADATA_HOST``, ``STORAGE_EMULATOR_HOST``,
``DISTILL_COMPUTE_ENDPOINT``, ``DISTILL_*_DIR``) let the test suite run this very script on the
Compute stub's "VMs" against a GCS emulator (tests/test_startup_script.py); a VM sets none.
"""

from __future__ import annotations

from importlib.resources import files

JOB_DIR = "/var/lib/distill/job"  # on the VM (COS: /var is writable)
LOG = "/var/lib/distill/startup.log"
SCRIPTS = files("distill.cloud") / "scripts"  # package data (pyproject.toml)


def read_script(name: str) -> str:
    """A VM script shipped as package data (``distill/cloud/scripts/<name>``), verbatim."""
    return (SCRIPTS / name).read_text(encoding="utf-8")


STARTUP_SCRIPT = read_script("startup.sh")
SHUTDOWN_SCRIPT = read_script("shutdown.sh")
