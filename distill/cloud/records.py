"""A ``teacher-cloud`` run's record: its VM attempts, their billed seconds, the outcome.

Written create-only to ``<output>/cloud/run-<time>-<id>.json`` at the end (and a copy under
the local state directory); ``distill-ctl cost-report`` shows them beside their estimates.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from distill.cloud.report import estimated_vm_usd

RECORD_PREFIX = "cloud"  # <output>/cloud/run-*.json and <output>/cloud/status/*.json


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second: the time stamps of records and local VMs."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Attempt:
    n: int
    zone: str
    requested: str = ""  # UTC times, ISO
    running: str = ""
    ended: str = ""
    vm_id: str = ""
    outcome: str = ""  # done | preempted | vanished | failed | interrupted
    _t_running: float | None = None  # monotonic
    _t_ended: float | None = None

    def mark_running(self) -> None:
        if self._t_running is None:
            self._t_running, self.running = time.monotonic(), utc_now()

    def mark_ended(self) -> None:
        if self._t_ended is None:
            self._t_ended, self.ended = time.monotonic(), utc_now()

    @property
    def in_progress(self) -> bool:
        """Not ended (yet): a VM of this attempt may still run."""
        return self._t_ended is None

    def live_seconds(self) -> float:
        """VM time billed (RUNNING until gone), as the controller saw it."""
        if self._t_running is None:
            return 0.0
        return (self._t_ended or time.monotonic()) - self._t_running

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
        return {**d, "seconds": self.live_seconds()}


@dataclass
class CloudRun:
    """The run's metadata: written to ``<output>/cloud/run-<time>-<id>.json`` at the end."""

    job: str
    backend: str
    project: str
    zones: list[str]
    instance: str
    spot: bool
    started: str
    estimate: dict[str, Any]
    price_per_hour: float
    disk_per_hour: float
    attempts: list[Attempt] = field(default_factory=list)
    ended: str = ""
    outcome: str = ""
    message: str = ""
    preemptions: int = 0
    stockouts: list[str] = field(default_factory=list)

    @property
    def vm_seconds(self) -> float:
        return sum(a.live_seconds() for a in self.attempts)

    @property
    def estimated_usd(self) -> float:
        """The estimate's VM + disk dollars (as :attr:`usd` counts them; cost-report too)."""
        return estimated_vm_usd(self.estimate, self.spot)

    @property
    def usd(self) -> float:
        return self.vm_seconds / 3600 * (self.price_per_hour + self.disk_per_hour)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("attempts", "estimate")}
        return {
            **d,
            "attempts": [a.to_dict() for a in self.attempts],
            "vm_seconds": self.vm_seconds,
            "actual_usd": self.usd,
            "estimate": self.estimate,
        }
