"""ShardCache streaming shards from the GCS emulator through a bounded local cache."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from distill.store.cache import CacheError, ChecksumMismatch, ShardCache, ShardRef
from distill.store.storage import LocalStore, Store, open_store

SIZE = 10_000


def upload(store: Store, name: str, data: bytes) -> ShardRef:
    store.put_bytes(name, data)
    return ShardRef(name, hashlib.sha256(data).hexdigest(), len(data))


def make_shards(store: Store, n: int, prefix: str = "shards") -> tuple[list[ShardRef], list[bytes]]:
    datas = [os.urandom(SIZE) for _ in range(n)]
    refs = [upload(store, f"{prefix}/shard-{i:03d}.tar", d) for i, d in enumerate(datas)]
    return refs, datas


def disk_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def disk_bytes(root: Path) -> int:
    """Bytes on disk under root; files may vanish meanwhile (temp files being renamed)."""
    total = 0
    for p in disk_files(root):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def cache_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("distill-cache")]


@pytest.fixture
def store(gcs_bucket: str) -> Store:
    return open_store(gcs_bucket + "/run1")


def test_streams_in_order(store: Store, tmp_path: Path) -> None:
    refs, datas = make_shards(store, 5)
    cache = ShardCache(store, tmp_path / "cache", max_bytes=10 * SIZE)
    got = [p.read_bytes() for p in cache.iter_local(refs)]
    assert got == datas
    assert (cache.hits, cache.downloads, cache.bytes_downloaded) == (0, 5, 5 * SIZE)
    assert cache.wait_seconds >= 0
    path = cache.path_for(refs[0])
    assert path == tmp_path / "cache" / refs[0].sha256[:2] / f"{refs[0].sha256}.tar"


@pytest.mark.parametrize("max_shards,prefetch", [(2.5, 2), (1, 2), (4, 3)])
def test_stays_within_max_bytes(
    store: Store, tmp_path: Path, max_shards: float, prefetch: int
) -> None:
    refs, datas = make_shards(store, 7)
    cache_dir = tmp_path / "cache"
    max_bytes = int(max_shards * SIZE)
    # a file left by an earlier run is evicted first
    ShardCache(store, cache_dir, max_bytes).iter_local(refs[-1:]).__next__()
    cache = ShardCache(store, cache_dir, max_bytes, prefetch=prefetch)
    for i, path in enumerate(cache.iter_local(refs[:6])):
        assert path.read_bytes() == datas[i]
        assert disk_bytes(cache_dir) <= max_bytes
        time.sleep(0.01)  # let prefetches progress
        assert disk_bytes(cache_dir) <= max_bytes
    assert cache.downloads == 6


def test_prefetches_ahead(store: Store, tmp_path: Path) -> None:
    refs, _ = make_shards(store, 5)
    cache = ShardCache(store, tmp_path / "cache", max_bytes=10 * SIZE, prefetch=2)
    it = cache.iter_local(refs)
    next(it)
    deadline = time.monotonic() + 5
    while cache.downloads < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.downloads == 3  # the yielded shard and two ahead, not more
    it.close()


def test_second_pass_hits_cache(store: Store, tmp_path: Path) -> None:
    refs, datas = make_shards(store, 4)
    cache = ShardCache(store, tmp_path / "cache", max_bytes=4 * SIZE)
    assert [p.read_bytes() for p in cache.iter_local(refs)] == datas
    again = ShardCache(store, tmp_path / "cache", max_bytes=4 * SIZE)
    assert [p.read_bytes() for p in again.iter_local(refs)] == datas
    assert (again.hits, again.downloads, again.bytes_downloaded) == (4, 0, 0)


def test_checksum_mismatch(store: Store, tmp_path: Path) -> None:
    good = upload(store, "ok.tar", b"fine")
    bad = ShardRef("bad.tar", hashlib.sha256(b"expected").hexdigest(), 7)
    store.put_bytes("bad.tar", b"corrupt")  # same size, different bytes
    cache_dir = tmp_path / "cache"
    cache = ShardCache(store, cache_dir, max_bytes=1000)
    it = cache.iter_local([good, bad])
    assert next(it).read_bytes() == b"fine"
    with pytest.raises(ChecksumMismatch) as err:
        next(it)
    msg = str(err.value)
    assert store.join("bad.tar") in msg and bad.sha256 in msg
    assert hashlib.sha256(b"corrupt").hexdigest() in msg
    assert cache.bytes_downloaded == 4 + 2 * 7  # retried once
    assert [p.name for p in disk_files(cache_dir)] == [cache.path_for(good).name]
    assert not cache_threads()


def test_same_basename_different_prefixes(gcs_bucket: str, tmp_path: Path) -> None:
    a, b = open_store(gcs_bucket + "/runA"), open_store(gcs_bucket + "/runB")
    ref_a = upload(a, "shard-000.tar", b"from run A")
    ref_b = upload(b, "shard-000.tar", b"from run B")
    cache_dir = tmp_path / "cache"
    got_a = [p.read_bytes() for p in ShardCache(a, cache_dir, 1000).iter_local([ref_a])]
    got_b = [p.read_bytes() for p in ShardCache(b, cache_dir, 1000).iter_local([ref_b])]
    assert (got_a, got_b) == ([b"from run A"], [b"from run B"])
    assert len(disk_files(cache_dir)) == 2


def test_duplicate_shard_downloaded_once(store: Store, tmp_path: Path) -> None:
    ref = upload(store, "x.tar", b"same")
    cache = ShardCache(store, tmp_path / "cache", max_bytes=100)
    assert [p.read_bytes() for p in cache.iter_local([ref, ref, ref])] == [b"same"] * 3
    assert cache.downloads == 1


def test_early_close_cleans_up(store: Store, tmp_path: Path) -> None:
    refs, datas = make_shards(store, 6)
    cache_dir = tmp_path / "cache"
    cache = ShardCache(store, cache_dir, max_bytes=3 * SIZE, prefetch=2)
    it = cache.iter_local(refs)
    assert next(it).read_bytes() == datas[0]
    it.close()
    for t in cache_threads():
        t.join(timeout=2)
    assert not cache_threads()
    leftovers = [p for p in disk_files(cache_dir) if p.name.endswith(".part") or ".tmp-" in p.name]
    assert leftovers == []
    assert disk_bytes(cache_dir) <= 3 * SIZE


def test_shard_bigger_than_cache(store: Store, tmp_path: Path) -> None:
    ref = upload(store, "big.tar", b"x" * 100)
    with pytest.raises(CacheError, match="cache_max_bytes"):
        next(ShardCache(store, tmp_path / "cache", max_bytes=99).iter_local([ref]))


def test_local_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    refs, datas = make_shards(store, 3)
    cache = ShardCache(store, tmp_path / "cache", max_bytes=2 * SIZE, prefetch=1)
    assert [p.read_bytes() for p in cache.iter_local(refs)] == datas
