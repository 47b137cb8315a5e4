"""The host commands a Container-Optimized OS VM gives the startup script, as local fakes.

``make_bin(dir)`` writes ``docker``, ``cos-extensions``, ``mount``, ``docker-credential-gcr``
and ``shutdown`` into ``dir/bin`` and a fake NVIDIA install tree, so that the real bash startup
script (distill/cloud/scripts/startup.sh) runs on the Compute stub's "VMs". Each fake appends
its argv to ``dir/calls.jsonl``.

``docker run`` runs the image's entrypoint as a local process: bind mounts become path
rewrites (``dst`` -> ``src`` in the arguments and the working directory), ``-e`` variables are
passed on, ``--entrypoint python3`` is this interpreter, and the teacher image's own entrypoint
(``distill-ctl teacher``) is ``tests/slow_teacher.py teacher``. As Docker does, the process runs
as the image's ``USER`` (docker/teacher.Dockerfile's, 10001:10001) unless ``--user`` says
otherwise, with the image's ``HOME`` (a directory of its own under the fake's root, owned by that
user): when the tests run as root it drops to that uid/gid with ``setpriv``, so a bind mount the
user may not write is refused as on a VM. Unprivileged, the fake cannot switch users and runs the
process as the caller (:data:`ENFORCES_USER` says which). Knobs (environment):
``FAKE_PULL_ERROR`` (``docker pull`` prints it and fails), ``FAKE_DRIVER`` (the version
``nvidia-smi`` reports; default 570.172.08), ``FAKE_COS_ERROR`` (``cos-extensions`` fails).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Whether ``docker run`` really runs as the image's user (it needs root to switch users).
ENFORCES_USER = hasattr(os, "geteuid") and os.geteuid() == 0 and bool(shutil.which("setpriv"))


def image_user(dockerfile: Path = REPO / "docker" / "teacher.Dockerfile") -> str:
    """The last ``USER`` of the teacher image (``uid:gid``), as ``docker run`` uses it."""
    users = [
        line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")
    ]
    return users[-1] if users else "0:0"


_DOCKER = r"""#!__PYTHON__
import json, os, signal, subprocess, sys
calls = os.environ["FAKE_CALLS"]
with open(calls, "a") as f:
    f.write(json.dumps(["docker", *sys.argv[1:]]) + "\n")
args = sys.argv[1:]
if args[0] == "pull":
    err = os.environ.get("FAKE_PULL_ERROR")
    if err:
        print(err, file=sys.stderr)
        sys.exit(1)
    print(f"{args[1]}: Pulling from fake registry\nStatus: Downloaded newer image")
    sys.exit(0)
if args[0] == "stop":
    sys.exit(0)
assert args[0] == "run", args
i, mounts, env, entry, workdir, user = 1, [], {}, None, None, os.environ["FAKE_IMAGE_USER"]
volumes, devices = [], []
takes_value = {"--network", "--name", "--stop-timeout", "--volume", "--device", "-e",
               "--mount", "--workdir", "--entrypoint", "--user"}
while args[i].startswith("-"):
    flag = args[i]
    if flag not in takes_value:
        i += 1
        continue
    value = args[i + 1]
    i += 2
    if flag == "--mount":
        kv = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
        mounts.append((kv["dst"], kv["src"]))
    elif flag == "-e":
        k, _, v = value.partition("=")
        env[k] = v
    elif flag == "--entrypoint":
        entry = value
    elif flag == "--workdir":
        workdir = value
    elif flag == "--user":
        user = value
    elif flag == "--volume":
        src, _, dst = value.partition(":")
        volumes.append((dst.split(":")[0], src))
    elif flag == "--device":
        devices.append(value)
image, rest = args[i], args[i + 1:]
uid, _, gid = user.partition(":")
uid, gid = int(uid), int(gid or uid)
# the image's HOME: its own directory, owned by the image's user (useradd --create-home)
home = os.path.join(os.environ["FAKE_ROOT"], "image-home", str(uid))
os.makedirs(home, exist_ok=True)
if os.geteuid() == 0:
    os.chown(home, uid, gid)
env.setdefault("HOME", home)
env.setdefault("DISTILL_CACHE", os.path.join(home, ".cache", "distill"))
env.setdefault("HF_HOME", os.path.join(home, ".cache", "huggingface"))

def host(p):
    for dst, src in mounts:
        if p == dst or p.startswith(dst + "/"):
            return src + p[len(dst):]
    return p

# the GPU reaches the container as COS gives it: the driver's libraries and the device nodes
if "/usr/local/nvidia/lib64" in [dst for dst, _ in volumes] and any(
    d.rsplit(":", 1)[-1] == "/dev/nvidia0" for d in devices
):
    env["FAKE_GPU"] = "1"
if entry == "python3":
    argv = [sys.executable]
else:
    argv = [sys.executable, "__REPO__/tests/slow_teacher.py", "teacher"]
argv += [host(a) for a in rest]
if os.geteuid() == 0 and uid != 0 and os.environ.get("FAKE_SETPRIV"):
    # the container's process runs as the image's user, not as the host's root
    argv = [os.environ["FAKE_SETPRIV"], f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--", *argv]
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the container's process handles it
child = subprocess.Popen(argv, cwd=host(workdir) if workdir else None,
                         env={**os.environ, **env}, restore_signals=True,
                         preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
sys.exit(child.wait())
"""

_SIMPLE = r"""#!/bin/bash
__PYTHON__ -c 'import json, os, sys
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")' "$(basename "$0")" "$@"
"""

_COS = (
    _SIMPLE
    + r"""if [[ -n ${FAKE_COS_ERROR:-} ]]; then echo "$FAKE_COS_ERROR" >&2; exit 1; fi
echo "Installing GPU driver version ${3#-version=}"
"""
)

_NVIDIA_SMI = r"""#!/bin/bash
v=${FAKE_DRIVER:-570.172.08}
if [[ ${1:-} == --query-gpu=driver_version ]]; then echo "$v"; exit 0; fi
echo "NVIDIA-SMI $v   Driver Version: $v   CUDA Version: 12.8"
echo "|   0  NVIDIA L4   Off |   00000000:00:03.0 Off |   0 |"
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = text.replace("__PYTHON__", sys.executable).replace("__REPO__", str(REPO))
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def make_bin(root: Path) -> dict[str, str]:
    """The fakes under ``root``; returns the environment the startup script needs for them."""
    bin_dir = root / "bin"
    _write(bin_dir / "docker", _DOCKER)
    _write(bin_dir / "cos-extensions", _COS)
    for name in ("mount", "docker-credential-gcr", "shutdown"):
        _write(bin_dir / name, _SIMPLE)
    nvidia, dev = root / "nvidia", root / "dev"
    _write(nvidia / "bin" / "nvidia-smi", _NVIDIA_SMI)
    (nvidia / "lib64").mkdir(parents=True, exist_ok=True)
    dev.mkdir(exist_ok=True)
    for d in ("nvidia0", "nvidia-uvm", "nvidiactl"):
        (dev / d).touch()
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_CALLS": str(root / "calls.jsonl"),
        "FAKE_ROOT": str(root),
        "FAKE_IMAGE_USER": image_user(),
        "FAKE_SETPRIV": shutil.which("setpriv") or "",
        "DISTILL_STATE_DIR": str(root / "state"),
        "DISTILL_NVIDIA_DIR": str(nvidia),
        "DISTILL_DEV_DIR": str(dev),
    }


def calls(root: Path) -> list[list[str]]:
    path = root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
