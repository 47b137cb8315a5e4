"""The real bash startup script of the teacher VM, run on the Compute stub's "VMs".

Each stub VM runs distill/cloud/scripts/startup.sh with bash; the host commands a
Container-Optimized OS VM has (docker, cos-extensions, mount, docker-credential-gcr, shutdown)
are the fakes of tests/fakes/vm_tools.py, and ``docker run`` runs the real teacher entrypoint
against fake-gcs-server. The script reaches the stub's metadata server, the stub's Compute API (to
delete its own VM) and the emulator's JSON API with curl, as it does GCE's on a VM.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.vm_tools import calls, make_bin
from helpers import (
    NAME,
    SYSTEM_TMP,
    assert_exact,
    controller,
    guest_env,
    no_vm_left,
    run_in_thread,
    shards_in,
)

from distill.cloud.errors import TeacherFailed
from distill.cloud.startup import SCRIPTS, STARTUP_SCRIPT
from distill.config import load_job
from distill.store.storage import open_store

pytestmark = [
    pytest.mark.wire,
    pytest.mark.skipif(
        shutil.which("curl") is None, reason="the VM's startup script talks to the APIs with curl"
    ),
]


class ScriptGuests:
    """What the stub's VMs run: bash startup.sh, one fresh host directory per VM."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.script = Path(str(SCRIPTS / "startup.sh"))  # the package data file itself
        assert self.script.read_text() == STARTUP_SCRIPT
        self.env: dict[str, str] = {"SLOW_TEACHER_S": "0"}
        self.vms: list[Path] = []
        self.gpu_devices = True  # False: the VM has no /dev/nvidia* (no GPU for the container)

    def __call__(self, inst) -> tuple[list[str], dict[str, str]]:
        vm = self.root / f"vm-{inst.id}"
        self.vms.append(vm)
        env = make_bin(vm)
        if not self.gpu_devices:
            for d in (vm / "dev").glob("nvidia*"):
                d.unlink()
        return ["bash", str(self.script)], guest_env(**env, **self.env)


@pytest.fixture
def guests() -> Iterator[ScriptGuests]:
    """The VMs' host directories, traversable by every user like a VM's /var/lib (pytest's
    tmp_path is not), so the containers run as the image's user reach their bind mounts."""
    root = Path(tempfile.mkdtemp(prefix="distill-vms-", dir=SYSTEM_TMP))
    root.chmod(0o755)
    try:
        yield ScriptGuests(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def image_user_reaches_the_checkout() -> None:
    """The fake docker runs the teacher as the image's user (10001), which reads the code and
    the venv from this checkout, as the real image reads its own copy. A checkout under a
    directory others cannot enter (``mktemp -d`` makes them 0700) is out of its reach: skip,
    saying so, rather than fail on the permission."""
    for path in (Path(__file__).resolve().parent, Path(sys.prefix)):
        for d in (path, *path.parents):
            if not d.stat().st_mode & 0o001:
                pytest.skip(
                    f"{d} is not traversable by other users, so the container's user (10001) "
                    "cannot reach the checkout; clone it under a traversable directory"
                )


def status_objects(job: Path) -> dict[str, bytes]:
    store = open_store(f"{load_job(job).output}/cloud/status")
    return {n: store.read_bytes(n) for n in store.list()}


def test_the_startup_script_runs_the_teacher_and_deletes_its_vm(
    compute, guests, cloud_job, tmp_path, image_user_reaches_the_checkout
):
    run = controller(cloud_job, compute, tmp_path).run()
    assert run is not None and run.outcome == "done"
    assert no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)
    assert "deleted" in [e for _, n, e in compute.events if n == NAME]
    (vm,) = guests.vms
    argv = calls(vm)
    cmds = [a[0] if a[0] != "docker" else f"docker {a[1]}" for a in argv]
    assert cmds[:4] == ["cos-extensions", "mount", "mount", "docker-credential-gcr"]
    # stage, then the teacher; then either its own DELETE went through or (the controller's
    # delete already in flight) it powers off
    assert cmds[4:7] == ["docker pull", "docker run", "docker run"]
    assert cmds[7:] in ([], ["shutdown"])
    assert argv[0][1:] == ["install", "gpu", "--", "-version=latest"]
    stage, teacher = argv[5], argv[6]
    # staging writes into the root-owned job directory as root; the teacher runs as the
    # image's USER (the fake docker runs each as Docker would: tests/fakes/vm_tools.py)
    assert stage[stage.index("--user") + 1] == "0:0"
    assert "--user" not in teacher
    dev, nvidia = vm / "dev", vm / "nvidia"
    for flag, value in (
        ("--device", f"{dev}/nvidia0:/dev/nvidia0"),
        ("--device", f"{dev}/nvidia-uvm:/dev/nvidia-uvm"),
        ("--device", f"{dev}/nvidiactl:/dev/nvidiactl"),
        ("--volume", f"{nvidia}/lib64:/usr/local/nvidia/lib64"),
        ("--volume", f"{nvidia}/bin:/usr/local/nvidia/bin"),
        ("-e", "DISTILL_WATCH_PREEMPTION=1"),
    ):
        assert any(teacher[i : i + 2] == [flag, value] for i in range(len(teacher))), value
    assert "--gpus" not in teacher  # COS has no NVIDIA container toolkit
    objs = status_objects(cloud_job)
    (log_name,) = [n for n in objs if n.endswith(".log")]
    (json_name,) = [n for n in objs if n.endswith(".json")]
    assert json_name.removesuffix(".json") == log_name.removesuffix(".log")
    log = objs[log_name].decode()
    for needle in (
        "distill-startup: installing the NVIDIA driver",
        "Driver Version: 570.172.08",
        "Status: Downloaded newer image",
        "staging gs://",
        "distill-startup: finished with exit code 0 (done)",
    ):
        assert needle in log, needle
    assert b'"status": "done", "exit_code": 0' in objs[json_name]


@pytest.mark.parametrize(
    "knob, value, needle",
    [
        (
            "FAKE_PULL_ERROR",
            "Error response from daemon: denied: Permission "
            "'artifactregistry.repositories.downloadArtifacts' denied on resource",
            "artifactregistry.repositories.downloadArtifacts' denied",
        ),
        ("FAKE_DRIVER", "535.104.05", "NVIDIA driver '535.104.05' is older than 570"),
        ("FAKE_COS_ERROR", "cos-extensions: no GPU driver for this COS version", "no GPU driver"),
    ],
)
def test_a_failure_before_the_teacher_reaches_the_user(
    compute, guests, cloud_job, tmp_path, knob, value, needle
):
    """No driver, an old driver, a pull denied: the user sees the line that says why."""
    guests.env[knob] = value
    with pytest.raises(TeacherFailed) as e:
        controller(cloud_job, compute, tmp_path).run()
    msg = str(e.value)
    assert needle in msg and "distill-startup: finished with exit code" in msg
    assert "/cloud/status/distill-teacher-job-" in msg  # where the whole log is
    assert no_vm_left(compute)
    job = load_job(cloud_job)
    assert not [n for n in open_store(f"{job.output}/train").list() if n.endswith(".tar")]
    (log_name,) = [n for n in status_objects(cloud_job) if n.endswith(".log")]
    assert needle in status_objects(cloud_job)[log_name].decode()


def test_a_preempted_script_vm_is_relaunched_and_loses_nothing(
    compute, guests, cloud_job, tmp_path, image_user_reaches_the_checkout
):
    guests.env["SLOW_TEACHER_S"] = "0.4"
    t, result = run_in_thread(controller(cloud_job, compute, tmp_path))
    train = f"{load_job(cloud_job).output}/train"
    assert compute.wait_for(lambda: shards_in(train) >= 2, 120)
    compute.preempt(NAME)
    t.join(300)
    assert "error" not in result, result.get("error")
    run = result["run"]
    assert run.outcome == "done" and run.preemptions == 1
    assert no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)
    objs = status_objects(cloud_job)
    statuses = sorted(v.decode() for n, v in objs.items() if n.endswith(".json"))
    assert any('"status": "preempted"' in s for s in statuses), statuses
    assert any('"status": "done"' in s for s in statuses), statuses


def test_a_vm_whose_container_cannot_see_the_gpu_fails_in_seconds(
    compute, guests, cloud_job, tmp_path, image_user_reaches_the_checkout
):
    """The job on the VM says teacher.device = "cuda": without the GPU in its container the
    teacher stops before any work, and the user reads why, instead of a CPU run billed until
    the max run duration."""
    guests.gpu_devices = False
    t0 = time.monotonic()
    with pytest.raises(TeacherFailed) as e:
        controller(cloud_job, compute, tmp_path).run()
    assert time.monotonic() - t0 < 120
    assert "sees no CUDA device" in str(e.value), str(e.value)
    assert no_vm_left(compute)
    job = load_job(cloud_job)
    assert not [n for n in open_store(f"{job.output}/train").list() if n.endswith(".tar")]
