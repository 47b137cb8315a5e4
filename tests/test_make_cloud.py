"""`make teacher-cloud` and `make train-local`: the Makefile's wiring and the two scripts it
calls (docker/build-push.sh, docker/train-local.sh). No Docker engine runs here, so the
container paths are checked with DRY_RUN=1 and a `docker` on PATH that answers `info` the way
a Docker with the NVIDIA runtime does; the native path really runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fake_bin(tmp_path: Path, name: str, script: str) -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(0o755)
    return d


def base_path(tmp_path: Path, *extra: Path) -> str:
    """A PATH with only what the scripts need (this machine has a docker client in /usr/bin,
    but no engine): ``extra`` directories first, then links to bash and a few coreutils."""
    d = tmp_path / "sysbin"
    if not d.exists():
        d.mkdir()
        for tool in ("bash", "sh", "dirname", "grep", "id", "cat"):
            (d / tool).symlink_to(shutil.which(tool))
    return os.pathsep.join([*map(str, extra), str(d)])


def sh(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_make_teacher_cloud_builds_pushes_then_runs():
    r = sh(["make", "-n", "teacher-cloud", "PROJECT=p1", "OUTPUT=gs://b/runs/demo"])
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if "build-push.sh" in x or "teacher-cloud" in x]
    build = next(i for i, x in enumerate(lines) if "docker/build-push.sh" in x)
    run = next(i for i, x in enumerate(lines) if "distill-ctl teacher-cloud" in x)
    assert build < run
    image = lines[build].split()[-1]
    assert image.startswith("us-central1-docker.pkg.dev/p1/distill/teacher:")
    text = r.stdout.replace("\\\n", " ")
    assert f"--image {image}" in text and "--project p1" in text
    assert "--output gs://b/runs/demo" in text
    # an image that exists already, or the local backend: no build
    r = sh(["make", "-n", "teacher-cloud", "PROJECT=p1", "SKIP_BUILD=1"])
    assert "build-push.sh" not in r.stdout and "teacher-cloud --job" in r.stdout
    r = sh(["make", "-n", "teacher-cloud", "BACKEND=local", "PROJECT="])
    assert "build-push.sh" not in r.stdout and "--backend local" in r.stdout
    assert "--image" not in r.stdout


def test_build_push_script(tmp_path):
    image = "us-central1-docker.pkg.dev/p1/distill/teacher:abc"
    bindir = fake_bin(tmp_path, "docker", "exit 1\n")  # `manifest inspect`: not pushed yet
    path = base_path(tmp_path, bindir)
    r = sh(["docker/build-push.sh", "docker/teacher.Dockerfile", image], DRY_RUN="1", PATH=path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"+ docker build --platform linux/amd64 -f docker/teacher.Dockerfile -t {image} .",
        f"+ docker push {image}",
    ]
    # already in the registry (immutable tags): nothing rebuilt
    bindir = fake_bin(tmp_path, "docker", "exit 0\n")
    r = sh(["docker/build-push.sh", "docker/teacher.Dockerfile", image], PATH=path)
    assert r.returncode == 0 and "already in the registry" in r.stdout
    # no engine at all, or an image without a tag or a registry: clear errors
    bare = base_path(tmp_path)
    r = sh(["docker/build-push.sh", "docker/teacher.Dockerfile", image], PATH=bare)
    assert r.returncode == 2 and "neither docker nor podman" in r.stderr
    r = sh(["docker/build-push.sh", "docker/teacher.Dockerfile", "reg/x/teacher"], PATH=path)
    assert r.returncode == 2 and "has no tag" in r.stderr
    r = sh(["docker/build-push.sh", "docker/teacher.Dockerfile", "teacher:1"], PATH=path)
    assert r.returncode == 2 and "names no registry" in r.stderr


def test_build_push_configures_registry_auth_before_asking_the_registry(tmp_path):
    """Without auth, `manifest inspect` answers "not found" for a pushed tag: every run would
    rebuild. gcloud's credential helper is set first; the build targets the VMs' amd64."""
    image = "us-central1-docker.pkg.dev/p1/distill/teacher:abc"
    log = tmp_path / "calls.log"
    fake_bin(tmp_path, "gcloud", f'echo "gcloud $*" >> {log}\n')
    bindir = fake_bin(tmp_path, "docker", f'echo "docker $*" >> {log}\nexit 1\n')
    r = sh(
        ["docker/build-push.sh", "docker/teacher.Dockerfile", image],
        PATH=base_path(tmp_path, bindir),
    )
    calls = log.read_text().splitlines()
    assert r.returncode == 1  # the fake build fails; what matters is the order of the calls
    assert calls[:3] == [
        "gcloud auth configure-docker us-central1-docker.pkg.dev --quiet",
        f"docker manifest inspect {image}",
        f"docker build --platform linux/amd64 -f docker/teacher.Dockerfile -t {image} .",
    ]


def test_train_local_uses_the_gpu_container_where_docker_has_nvidia(tmp_path):
    docker = fake_bin(
        tmp_path,
        "docker",
        'case "$1 $2" in\n'
        '  "info --format") echo \'{"nvidia":{"path":"nvidia-container-runtime"},"runc":{}}\';;\n'
        '  "image inspect") exit 0;;\n'
        "  *) exit 0;;\n"
        "esac\n",
    )
    path = base_path(tmp_path, docker)
    r = sh(["docker/train-local.sh", "jobs/demo.toml"], DRY_RUN="1", PATH=path)
    assert r.returncode == 0, r.stderr
    runs = [x for x in r.stdout.splitlines() if x.startswith("+ docker run")]
    assert len(runs) == 2 and all("--gpus all" in x for x in runs)
    assert runs[0].endswith("distill-student:local train --job jobs/demo.toml")
    assert runs[1].endswith("distill-student:local eval --job jobs/demo.toml")


def test_train_local_runs_natively_without_docker(tmp_path):
    r = sh(
        ["docker/train-local.sh", "jobs/demo.toml", ".venv/bin"],
        DRY_RUN="1",
        PATH=base_path(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert "natively" in r.stdout
    assert r.stdout.splitlines()[-2:] == [
        "+ .venv/bin/distill-ctl train --job jobs/demo.toml",
        "+ .venv/bin/distill-ctl eval --job jobs/demo.toml",
    ]
    # a Docker without the NVIDIA runtime is no GPU container either
    docker = fake_bin(tmp_path, "docker", "echo '{\"runc\":{}}'\n")
    path = base_path(tmp_path, docker)
    r = sh(["docker/train-local.sh", "jobs/demo.toml"], DRY_RUN="1", PATH=path)
    assert "natively" in r.stdout


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_train_local_calls_the_script():
    r = sh(["make", "-n", "train-local", "JOB=jobs/x.toml"])
    assert "docker/train-local.sh jobs/x.toml .venv/bin" in r.stdout
