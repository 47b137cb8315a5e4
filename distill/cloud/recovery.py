"""Recovery as a named strategy: where the single-VM engine provisions and relaunches.

SkyPilot names its recovery strategies (``FAILOVER``, ``EAGER_NEXT_REGION``); ours is one,
:class:`SameZoneFirst`: provisioning tries the zones in order, round after round; a relaunch
after a preemption tries the zone the VM ran in first (its capacity came back once, and the
bucket and subnet are regional anyway), then the next ones; after ``max_preemptions``
relaunches it gives up. The Batch engine's recovery is Batch's own (its lifecycle policy and
``maxRetryCount``, :mod:`distill.cloud.batch`).

Pure functions of the zone list: tested without a backend.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SameZoneFirst:
    """The zones to try and when to stop relaunching (see the module docstring)."""

    zones: tuple[str, ...]
    max_preemptions: int

    def order(self, start: str | None = None) -> list[str]:
        """Every zone once, from ``start`` (a zone the VM ran in) on, wrapping around."""
        i = self.zones.index(start) if start in self.zones else 0
        return [*self.zones[i:], *self.zones[:i]]

    def give_up(self, preemptions: int) -> bool:
        """Whether ``preemptions`` relaunches so far are too many to try another."""
        return preemptions > self.max_preemptions
