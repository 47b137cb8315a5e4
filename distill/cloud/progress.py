"""How far the teacher is, read from the bucket: shard sidecars and manifests.

The teacher writes ``shard-NNNNNN.tar``, then its stats sidecar ``shard-NNNNNN.json``, per
shard, and ``manifest.json`` last, per split (see :mod:`distill.shardset`). The controller
never talks to the VM for progress: it lists the bucket, so what it shows is what a new VM
would resume from.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from distill.format.manifest import MANIFEST
from distill.shardset import is_sidecar
from distill.store.storage import Store, open_store


@dataclass
class Snapshot:
    shards_done: int
    shards_total: int
    tokens_done: int
    tokens_total: int
    complete: bool  # every split has its manifest
    at: float = field(default_factory=time.monotonic)


class BucketProgress:
    """Polls ``<output>/<split>/`` for each split; ``totals`` maps split -> (shards, tokens)."""

    def __init__(self, output: str, totals: dict[str, tuple[int, int]]) -> None:
        self.totals = totals
        self.stores: dict[str, Store] = {s: open_store(f"{output.rstrip('/')}/{s}") for s in totals}
        self._tokens: dict[tuple[str, str], int] = {}  # sidecars read once

    def poll(self) -> Snapshot:
        shards = tokens = 0
        complete = True
        for split, store in self.stores.items():
            names = set(store.list())
            complete &= MANIFEST in names
            for name in sorted(n for n in names if is_sidecar(n)):
                key = (split, name)
                if key not in self._tokens:
                    try:
                        self._tokens[key] = int(json.loads(store.read_bytes(name))["tokens"])
                    except (ValueError, KeyError):
                        self._tokens[key] = 0
                shards += 1
                tokens += self._tokens[key]
        return Snapshot(
            shards_done=shards,
            shards_total=sum(s for s, _ in self.totals.values()),
            tokens_done=tokens,
            tokens_total=sum(t for _, t in self.totals.values()),
            complete=complete,
        )


class Rate:
    """Tokens/s over the snapshots since the VM started running, and the ETA."""

    def __init__(self) -> None:
        self.first: Snapshot | None = None

    def update(self, snap: Snapshot) -> tuple[float, float | None]:
        """(tokens/s, seconds left or None while unknown)."""
        if self.first is None:
            self.first = snap
            return 0.0, None
        dt = snap.at - self.first.at
        done = snap.tokens_done - self.first.tokens_done
        if dt <= 0 or done <= 0:
            return 0.0, None
        rate = done / dt
        return rate, max(snap.tokens_total - snap.tokens_done, 0) / rate
