"""What the cloud stubs' "machines" run: a local process group, its output as the serial
console, and the two-step stop of a VM going away (SIGTERM to the group, SIGKILL after a
grace period). Shared by tests/fakes/compute.py (VMs) and tests/fakes/batch.py (Batch tasks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable


def spawn(
    argv: list[str],
    env: dict[str, str],
    lines: list[str],
    on_exit: Callable[[int], None],
) -> subprocess.Popen:
    """Start ``argv`` in a new session (its processes form one group, like a VM); its stdout
    and stderr go to ``lines``; ``on_exit(returncode)`` runs once it has ended."""
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
        on_exit(proc.wait())

    threading.Thread(target=pump, daemon=True).start()
    return proc


def kill_group(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM the process group (ACPI soft-off), SIGKILL it after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_container(proc: subprocess.Popen | None, grace: float) -> None:
    """``docker stop``: SIGTERM to the container's main process alone (its PID 1; its children
    hear nothing unless it passes the signal on), SIGKILL to all of it after ``grace`` s."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the main process left behind
    proc.wait()
