"""Noticing that the teacher must stop: SIGTERM, or GCE's ``instance/preempted`` metadata.

A Spot VM gets about 30 seconds between the preemption notice and its end. Two signals
arrive in that window: the metadata server's ``instance/preempted`` turns ``TRUE``, and the
guest OS gets an ACPI soft-off, which stops Docker's containers with SIGTERM. Either one sets
:attr:`StopWatch.reason`; the teacher checks it after every forward batch, abandons the shard
in flight, lets finished shards' uploads complete, and exits with :data:`EXIT_PREEMPTED`
(writes are create-only and the manifest comes last, so the shard set stays consistent and a
new VM resumes from it).

The metadata watch runs only where ``DISTILL_WATCH_PREEMPTION=1`` (the startup script sets it
in the container); ``GCE_METADATA_HOST`` (as google-auth reads it) points it elsewhere, e.g.
at the Compute stub's per-instance metadata server in tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import urllib.error
import urllib.request
from types import FrameType
from typing import Any

from distill.errors import DistillError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again (on a new VM); the startup script reports it
WATCH_ENV = "DISTILL_WATCH_PREEMPTION"


def in_main_thread() -> bool:
    """Signal handlers can only be installed (and run) in the main thread."""
    return threading.current_thread() is threading.main_thread()


class Preempted(DistillError):
    """The teacher stopped early on request (preemption or SIGTERM); a rerun resumes."""


def metadata_host() -> str:
    return os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")


def metadata_get(path: str, params: str = "", timeout: float = 10.0) -> str:
    """GET ``computeMetadata/v1/<path>`` from the metadata server."""
    url = f"http://{metadata_host()}/computeMetadata/v1/{path}" + (f"?{params}" if params else "")
    req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (fixed scheme)
        return r.read().decode()


class StopWatch:
    """Context manager: ``reason`` becomes non-empty once the process should stop.

    SIGTERM is caught only in the main thread (a second SIGTERM exits at once). The metadata
    watch is a daemon thread long-polling ``instance/preempted?wait_for_change=true``.
    """

    def __init__(self, watch_metadata: bool | None = None) -> None:
        if watch_metadata is None:
            watch_metadata = os.environ.get(WATCH_ENV) == "1"
        self.watch_metadata = watch_metadata
        self.reason = ""
        self._event = threading.Event()
        self._closed = threading.Event()
        self._previous: Any = None
        self._installed = False

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def request_stop(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.stopped:  # a second SIGTERM: no more waiting
            raise SystemExit(128 + signum)
        self.request_stop("SIGTERM")

    def _watch(self) -> None:
        params = "wait_for_change=true&timeout_sec=60"
        while not (self._event.is_set() or self._closed.is_set()):
            try:
                if metadata_get("instance/preempted", params, timeout=70).strip() == "TRUE":
                    self.request_stop("preempted (metadata instance/preempted = TRUE)")
                    return
            except (OSError, urllib.error.URLError):
                if self._closed.wait(5.0):  # metadata server not reachable (yet): retry
                    return

    def check(self, where: str) -> None:
        """Raise :class:`Preempted` if a stop was requested."""
        if self.stopped:
            raise Preempted(
                f"{where}: stopped on {self.reason}; finished shards are in the bucket, "
                "rerun the same command (or a new VM) to resume"
            )

    def __enter__(self) -> StopWatch:
        if in_main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        if self.watch_metadata:
            threading.Thread(target=self._watch, name="preemption-watch", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()  # ends the watch thread
        if self._installed:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, self._previous)
