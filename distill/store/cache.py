"""Stream shards from a Store through a bounded, checksum-verified local disk cache.

Cache files are content-addressed (``cache_dir/ab/abcdef....tar``), so shards with equal
basenames from different runs never collide. Use one cache_dir per iterating process (e.g.
per data-loader worker): the size bound is tracked in memory, and leftover temporary files
of an interrupted run are removed when iteration starts.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from distill.errors import DistillError
from distill.store.storage import TMP_PREFIX, Store

PART_SUFFIX = ".part"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CacheError(DistillError):
    """The shard cache cannot do what was asked."""


class ChecksumMismatch(DistillError):
    """A downloaded shard's sha256 differs from the expected one (after one retry)."""


@dataclass(frozen=True)
class ShardRef:
    """A shard's object name in the store, its sha256 (hex) and its size in bytes."""

    name: str
    sha256: str
    nbytes: int


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (:func:`hashlib.file_digest`)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ShardCache:
    """Yields local, verified copies of shards, prefetching up to `prefetch` ahead.

    Files in `cache_dir` never total more than `max_bytes`: least-recently-used files are
    evicted, except the shard currently yielded and those being prefetched; if there is no
    room, fewer shards are prefetched.

    Stats: `hits` (shards reused from disk), `downloads` (shards fetched and verified),
    `bytes_downloaded` (all bytes fetched, retries included) and `wait_seconds` (time the
    consumer spent blocked waiting for a shard).
    """

    def __init__(self, store: Store, cache_dir: Path, max_bytes: int, prefetch: int = 2) -> None:
        if max_bytes <= 0 or prefetch < 0:
            raise CacheError(
                f"need cache_max_bytes > 0 and prefetch >= 0, got {max_bytes}, {prefetch}"
            )
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self.prefetch = prefetch
        self.hits = 0
        self.downloads = 0
        self.bytes_downloaded = 0
        self.wait_seconds = 0.0
        self._stats_lock = threading.Lock()
        self._files: OrderedDict[Path, int] = OrderedDict()  # finished files, LRU first
        self._pins: Counter[Path] = Counter()
        self._reserved = 0  # bytes set aside for downloads in flight

    def path_for(self, ref: ShardRef) -> Path:
        """The content-addressed cache path of a shard."""
        suffix = re.sub(r"[^A-Za-z0-9.]", "", PurePosixPath(ref.name).suffix)
        return self.cache_dir / ref.sha256[:2] / f"{ref.sha256}{suffix}"

    def iter_local(self, shards: Sequence[ShardRef]) -> Iterator[Path]:
        """Yield, in order, a local path to each shard's verified bytes.

        A yielded path stays valid until the next one is requested. Closing the generator
        early cancels queued prefetches and waits for downloads already running.
        """
        refs = list(shards)
        for ref in refs:
            self._check_ref(ref)
        self._scan()
        pool = ThreadPoolExecutor(self.prefetch + 1, thread_name_prefix="distill-cache")
        started: list[tuple[Path, Future[None] | None, int]] = []  # (path, future, reserved)
        try:
            for i in range(len(refs)):
                if len(started) == i and not self._start(refs[i], pool, started):
                    raise CacheError("internal error: no room for the next shard")
                while len(started) < min(len(refs), i + 1 + self.prefetch):
                    if not self._start(refs[len(started)], pool, started):
                        break  # no room now: prefetch fewer, try again next shard
                t0 = time.perf_counter()
                path = self._finish(started, i)
                self.wait_seconds += time.perf_counter() - t0
                yield path
                self._pins[path] -= 1
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for i in range(len(started)):
                if started[i][2] or started[i][1] is not None:
                    self._finish(started, i, raise_errors=False)
            self._pins.clear()

    def _check_ref(self, ref: ShardRef) -> None:
        if not _SHA256.fullmatch(ref.sha256):
            raise CacheError(
                f"shard {self.store.join(ref.name)} has an invalid sha256 "
                f"{ref.sha256!r} (expected 64 lowercase hex digits)"
            )
        if ref.nbytes > self.max_bytes:
            raise CacheError(
                f"shard {self.store.join(ref.name)} is {ref.nbytes} bytes, more than the whole "
                f"cache ({self.max_bytes} bytes): raise cache_max_bytes to at least {ref.nbytes}"
            )

    def _scan(self) -> None:
        """Index finished cache files by last use; remove leftovers of interrupted runs."""
        found = []
        for p in self.cache_dir.glob("*/*"):
            if p.name.startswith(TMP_PREFIX) or p.name.endswith(PART_SUFFIX):
                p.unlink(missing_ok=True)
            elif p.is_file():
                st = p.stat()
                found.append((st.st_mtime_ns, p, st.st_size))
        self._files = OrderedDict((p, size) for _, p, size in sorted(found))
        self._reserved = 0

    def _start(self, ref: ShardRef, pool: ThreadPoolExecutor, started: list) -> bool:
        """Pin the shard and begin fetching it unless cached; False if there is no room."""
        path = self.path_for(ref)
        in_flight = next((s for s in reversed(started) if s[0] == path and s[1]), None)
        if in_flight:  # the same content is already on its way
            started.append((path, in_flight[1], 0))
        elif self._files.get(path) == ref.nbytes:
            self.hits += 1
            self._files.move_to_end(path)
            started.append((path, None, 0))
        else:
            if path in self._files and not self._pins[path]:  # wrong size: refetch
                self._evict(path)
            if not self._make_room(ref.nbytes):
                return False
            self._reserved += ref.nbytes
            started.append((path, pool.submit(self._fetch, ref, path), ref.nbytes))
        self._pins[path] += 1
        return True

    def _make_room(self, nbytes: int) -> bool:
        used = sum(self._files.values()) + self._reserved
        for victim in [p for p in self._files if not self._pins[p]]:
            if used + nbytes <= self.max_bytes:
                break
            used -= self._evict(victim)
        return used + nbytes <= self.max_bytes

    def _evict(self, path: Path) -> int:
        path.unlink(missing_ok=True)
        return self._files.pop(path)

    def _finish(self, started: list, i: int, raise_errors: bool = True) -> Path:
        """Wait for shard `i`, then account its file as finished."""
        path, future, reserved = started[i]
        if future is not None:
            try:
                future.result()
            except BaseException:
                if raise_errors:
                    raise
            finally:
                self._reserved -= reserved
                started[i] = (path, None, 0)
                if reserved and path.is_file():
                    self._files[path] = path.stat().st_size
        if path in self._files:
            self._files.move_to_end(path)
            os.utime(path)  # last-use time for LRU across runs
        return path

    def _fetch(self, ref: ShardRef, path: Path) -> None:
        """Download, verify and move into place (runs in a worker thread)."""
        url = self.store.join(ref.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        got = ""
        for _ in range(2):  # one retry on mismatch
            part = path.with_name(f"{path.name}.{uuid.uuid4().hex}{PART_SUFFIX}")
            try:
                self.store.download(ref.name, part)
                size = part.stat().st_size
                with self._stats_lock:
                    self.bytes_downloaded += size
                got = sha256_file(part)
                if got == ref.sha256 and size == ref.nbytes:
                    os.replace(part, path)
                    with self._stats_lock:
                        self.downloads += 1
                    return
                if got == ref.sha256:
                    got = f"{got} but {size} bytes instead of {ref.nbytes}"
            finally:
                part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"shard {url} is corrupt: expected sha256 {ref.sha256}, got {got} "
            "(after one retry); re-upload the shard or fix its recorded checksum"
        )
