"""Local "VMs": the :class:`~distill.cloud.backend.Backend` of ``teacher-cloud --backend
local``. A VM is ``python -m distill.cloud.vm_agent --local DIR``, a process group on this
machine running the same teacher entrypoint against the same bucket (GCS, or fake-gcs-server
through ``STORAGE_EMULATOR_HOST``). Its state lives under ``state_dir`` so that ``distill-ctl
gc`` finds leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from distill.cloud.backend import Needs, VmState
from distill.cloud.errors import AlreadyExists
from distill.cloud.records import utc_now
from distill.cloud.spec import ACCELERATOR_TYPE, VmSpec


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True


class LocalBackend:
    """VMs as local process groups (see the module docstring)."""

    name = "local"

    def __init__(self, state_dir: Path, preempt_grace_s: float = 30.0) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.preempt_grace_s = preempt_grace_s
        self._procs: dict[str, subprocess.Popen] = {}
        # create / delete / preempt change a VM's directory: one at a time, as the Compute API
        # serialises operations on an instance (a relaunch waits for the preemption's delete)
        self._ops = threading.RLock()

    def _dir(self, name: str) -> Path:
        return self.state_dir / name

    def check_zone(self, zone: str, accelerator: str = ACCELERATOR_TYPE) -> None:
        return None  # every "zone" is this machine

    def check_project(self, needs: Needs) -> None:
        return None  # no image, quota or network here

    def create(self, spec: VmSpec, zone: str) -> None:
        with self._ops:
            self._create(spec, zone)

    def _create(self, spec: VmSpec, zone: str) -> None:
        d = self._dir(spec.name)
        if (d / "vm.json").exists():
            raise AlreadyExists(f"local VM {spec.name} already exists ({d})")
        d.mkdir(parents=True, exist_ok=True)
        (d / "metadata.json").write_text(json.dumps(spec.metadata()))
        log = (d / "serial.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill.cloud.vm_agent", "--local", str(d)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self._procs[spec.name] = proc
        info = {
            "name": spec.name,
            "zone": zone,
            "pid": proc.pid,
            "id": str(proc.pid),
            "labels": spec.labels(),
            "created": utc_now(),
        }
        (d / "vm.json").write_text(json.dumps(info))

    def _info(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self._dir(name) / "vm.json").read_text())
        except (OSError, ValueError):
            return None

    def _running(self, info: dict[str, Any]) -> bool:
        proc = self._procs.get(info["name"])
        if proc is not None:
            return proc.poll() is None
        return _alive(int(info["pid"]))

    def get(self, name: str, zone: str) -> VmState | None:
        info = self._info(name)
        return self._state(info) if info is not None else None

    def _state(self, info: dict[str, Any]) -> VmState:
        name = info["name"]
        running = self._running(info)
        ga = self._dir(name) / "guest-attributes.json"
        guest = json.loads(ga.read_text()) if ga.exists() else {}
        return VmState(
            name=name,
            zone=info["zone"],
            status="RUNNING" if running else "TERMINATED",
            id=info["id"],
            labels=info["labels"],
            guest=guest,
            created=info["created"],
        )

    def _signal(self, info: dict[str, Any], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(info["pid"]), sig)

    def _stop(self, info: dict[str, Any], grace: float) -> None:
        if self._running(info):
            self._signal(info, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self._running(info):
                time.sleep(0.05)
        self._signal(info, signal.SIGKILL)
        proc = self._procs.pop(info["name"], None)
        if proc is not None:
            proc.wait()

    def delete(self, name: str, zone: str) -> None:
        with self._ops:
            info = self._info(name)
            if info is None:
                return
            self._stop(info, grace=5.0)
            shutil.rmtree(self._dir(name), ignore_errors=True)

    def preempt(self, name: str) -> None:
        """Simulate a Spot preemption: SIGTERM, the grace period, SIGKILL, deletion."""
        with self._ops:
            info = self._info(name)
            if info is None:
                raise KeyError(name)
            # recorded first, as GCE lists the preemption operation when it starts
            with (self.state_dir / ".preempted").open("a") as f:
                f.write(f"{name} {info['id']}\n")
            self._stop(info, grace=self.preempt_grace_s)
            shutil.rmtree(self._dir(name), ignore_errors=True)

    def list(self, labels: dict[str, str]) -> list[VmState]:
        if not self.state_dir.is_dir():
            return []
        infos = (self._info(d.name) for d in sorted(self.state_dir.iterdir()))
        return [
            self._state(info)
            for info in infos
            if info and all(info["labels"].get(k) == v for k, v in labels.items())
        ]

    def was_preempted(self, name: str, zone: str, vm_id: str) -> bool:
        marker = self.state_dir / ".preempted"
        return marker.exists() and f"{name} {vm_id}" in marker.read_text().splitlines()

    def console(self, name: str, zone: str) -> str:
        p = self._dir(name) / "serial.log"
        return p.read_text(errors="replace") if p.exists() else ""
