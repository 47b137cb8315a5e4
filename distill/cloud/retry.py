"""The one way the cloud code waits: a deadline, and exponential backoff between tries.

Provisioning rounds over stocked-out zones, tearing a VM or a Batch job down, ``gc`` waiting
for deletions and a delete refused while another operation runs all go through
:func:`retry_until`. ``sleep`` and ``clock`` are parameters, so the loops' logic is tested
without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from distill.errors import DistillError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Pauses of ``first`` seconds, times ``factor`` after each, at most ``cap``."""

    first: float = 1.0
    factor: float = 2.0
    cap: float = 30.0

    def pauses(self) -> Iterator[float]:
        pause = self.first
        while True:
            yield pause
            pause = min(pause * self.factor, self.cap)


def retry_until(
    attempt: Callable[[], T | None],
    timeout_s: float,
    backoff: Backoff,
    *,
    retry_on: tuple[type[BaseException], ...] = (DistillError, OSError),
    on_error: Callable[[BaseException], None] | None = None,
    on_pause: Callable[[float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T | None:
    """``attempt()`` until it returns something other than None; None once ``timeout_s`` has
    passed. An error in ``retry_on`` goes to ``on_error`` (or is raised when there is none)
    and is tried again; ``on_pause(seconds)`` hears each pause before it is slept. A pause
    that would end past the deadline is not taken."""
    deadline = clock() + timeout_s
    for pause in backoff.pauses():
        try:
            out = attempt()
        except retry_on as e:
            if on_error is None:
                raise
            on_error(e)
        else:
            if out is not None:
                return out
        if clock() + pause > deadline:
            return None
        if on_pause is not None:
            on_pause(pause)
        sleep(pause)
    return None  # pragma: no cover - pauses() never ends
