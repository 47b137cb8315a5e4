"""A split's record index: what lets a fan-out task read only its own shards' records.

Without it every Batch task would download its whole split and read every record to number
them (O(dataset) on every VM). The controller already reads every record once for its checks
(:func:`distill.cloud.session.check_datasets`); it writes what that pass learns, per file, as
one small create-only object beside the staged inputs (:func:`build_index`):

- ``records``: the file's records (non-blank lines, Parquet rows), so a task numbers the
  split's records without reading a file it owns none of;
- for plain JSONL, the byte offset and line number of every :data:`STRIDE`-th record, so a
  task fetches its shards' records by byte ranges (:func:`open_indexed`), at most a stride of
  other records around each run of its own;
- the object each file is read from (its ``gs://`` URL, or the staged copy of a local file).

A compressed or Parquet file is downloaded by a task only when it holds one of the task's
records (:func:`open_indexed`). The records a task reads, their numbers, lines and bytes are
exactly those of :func:`~distill.data.records.iter_split` over the whole file (tested), so its
shards are the single VM's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.data.records import (
    DataFile,
    Record,
    Select,
    _open,
    count_records,
    is_blank,
    iter_split,
)
from distill.errors import DistillError

STRIDE = 256  # records between two indexed offsets, at most: ~16 bytes of index each
MAX_READ = 16 * 2**20  # bytes fetched by one ranged read, at most
READERS = 8  # ranged reads in flight at once
VERSION = 1


@dataclass(frozen=True)
class FileIndex:
    """One data file of a split: ``name`` (relative to the split's root), ``url`` (where a task
    reads it), ``size`` (bytes), ``records``; plain JSONL: ``offsets`` / ``lines``, the byte
    offset and 1-based line number of records 0, STRIDE, 2 x STRIDE, ..."""

    name: str
    url: str
    size: int
    records: int
    offsets: list[int] | None = None
    lines: list[int] | None = None
    shown: str = ""  # how messages name it (the user's path of a staged file)
    generation: int = 0  # the gs:// object's version that was indexed (0: not pinned)

    @property
    def ranged(self) -> bool:
        return self.offsets is not None


@dataclass(frozen=True)
class SplitIndex:
    """A split's files, in order, and the digest of the dataset they were read from."""

    digest: str
    files: list[FileIndex]
    stride: int = STRIDE
    version: int = VERSION

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, shown: str) -> SplitIndex:
        try:
            raw = json.loads(data)
            if raw.get("version") != VERSION:
                raise ValueError(f"version {raw.get('version')!r}, this distill reads {VERSION}")
            files = [FileIndex(**f) for f in raw["files"]]
            return cls(raw["digest"], files, int(raw["stride"]), VERSION)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise DistillError(f"{shown}: not a record index this distill can read ({e})") from None

    def with_urls(self, urls: dict[str, str]) -> SplitIndex:
        """The same index, each file read from ``urls[name]`` (a staged copy)."""
        files = [FileIndex(**{**asdict(f), "url": urls[f.name]}) for f in self.files]
        return SplitIndex(self.digest, files, self.stride)


def build_index(
    files: list[DataFile],
    digest: str,
    per: int = 0,
    listed: dict[str, tuple[int, int]] | None = None,
) -> SplitIndex:
    """Index ``files`` (local copies): one pass over each file's lines (a Parquet file's
    footer only), an offset every ``min(STRIDE, per)`` records (``per``: samples per shard,
    so a shard smaller than the stride is read without its neighbours). ``listed``: each
    ``gs://`` file's stored size and generation; the index pins that generation (a task
    refuses the object once it is overwritten), and a copy of another size (an object stored
    with ``Content-Encoding: gzip`` comes decompressed) is not read by ranges but downloaded
    whole. Each entry's ``url`` is the file's ``shown`` name until the index is staged
    (:meth:`SplitIndex.with_urls`)."""
    stride = min(STRIDE, per) if per > 0 else STRIDE
    out = []
    for f in files:
        size = f.path.stat().st_size
        stored, generation = (listed or {}).get(f.name, (size, 0))
        if f.parquet or f.compression is not None or stored != size:  # read whole
            entry = FileIndex(f.name, f.shown, size, count_records([f])[0], shown=f.shown)
        else:
            entry = _index_jsonl(f, size, stride)
        out.append(dataclasses.replace(entry, generation=generation))
    return SplitIndex(digest, out, stride)


def _index_jsonl(f: DataFile, size: int, stride: int) -> FileIndex:
    offsets: list[int] = []
    lines: list[int] = []
    records = offset = 0
    with _open(f) as fh:
        for n, raw in enumerate(fh, start=1):
            if not is_blank(raw):
                if records % stride == 0:
                    offsets.append(offset)
                    lines.append(n)
                records += 1
            offset += len(raw)
    return FileIndex(f.name, f.shown, size, records, offsets, lines, f.shown)


def open_indexed(
    index: SplitIndex,
    scratch: Path,
    wanted: Callable[[int, int], bool],
    read: Callable[[FileIndex, int, int], bytes],
    download: Callable[[FileIndex, Path], None],
) -> list[DataFile]:
    """The split's files as a task reads them, fetched once under ``scratch``: of a plain JSONL
    file, the strides holding a record that ``wanted(lo, hi)`` asks for (split record numbers
    ``[lo, hi)``), by ranged reads (``read(entry, start, end)``: its ``url``, at its
    ``generation``), into a local file indexed anew; a compressed or Parquet file downloaded
    whole (``download(entry, dest)``) when it holds such a record. :func:`indexed_records`
    reads them (every pass of :func:`~distill.data.prepare.prepare` from the local copy)."""
    out = []
    base = 0
    for f in index.files:
        local, shown = scratch / "data" / f.name, f.shown or f.url
        if f.records and wanted(base, base + f.records):
            local.parent.mkdir(parents=True, exist_ok=True)
            if f.ranged:
                f = _fetch_strides(f, index.stride, base, wanted, read, local)
            else:
                download(f, local)
        out.append(DataFile(f.name, local, shown, _Indexed(f, index.stride)))
        base += f.records
    return out


def _fetch_strides(
    f: FileIndex,
    stride: int,
    base: int,
    wanted: Callable[[int, int], bool],
    read: Callable[[FileIndex, int, int], bytes],
    local: Path,
) -> FileIndex:
    """Copy the wanted strides of ``f`` into ``local`` (:data:`READERS` ranged reads at once,
    written in order); its index entry for the copy (a stride not copied takes no bytes)."""
    assert f.offsets is not None
    ends = [*f.offsets[1:], f.size]
    offsets: list[int] = []
    ranges: list[tuple[int, int]] = []  # byte ranges of f, at most MAX_READ each
    pos = 0
    for k, start in enumerate(f.offsets):
        offsets.append(pos)
        lo = k * stride
        if not wanted(base + lo, base + min(lo + stride, f.records)):
            continue
        pos += ends[k] - start
        if ranges and ranges[-1][1] == start and ranges[-1][1] - ranges[-1][0] < MAX_READ:
            start = ranges.pop()[0]  # adjacent strides: one read
        ranges += [(a, min(a + MAX_READ, ends[k])) for a in range(start, ends[k], MAX_READ)]

    def get(r: tuple[int, int]) -> bytes:
        data = read(f, *r)
        if len(data) != r[1] - r[0]:
            raise DistillError(
                f"{f.shown or f.url}: asked for bytes {r[0]} to {r[1]}, got {len(data)}: the "
                "object changed after teacher-cloud indexed it, or its store does not serve "
                "byte ranges of it (an object uploaded with Content-Encoding: gzip is served "
                "decompressed): rerun teacher-cloud, or store the file without that encoding"
            )
        return data

    with local.open("wb") as out, ThreadPoolExecutor(READERS) as pool:
        for w in range(0, len(ranges), READERS * 2):  # a bounded window in memory
            for data in pool.map(get, ranges[w : w + READERS * 2]):
                out.write(data)
    return FileIndex(f.name, str(local), pos, f.records, offsets, f.lines, f.shown, f.generation)


@dataclass(frozen=True)
class _Indexed:
    """``DataFile.indexed``: the entry of the task's local copy (or of a file it has no
    record in) and the index's stride."""

    entry: FileIndex
    stride: int

    @property
    def records(self) -> int:
        return self.entry.records


def indexed_records(
    f: DataFile, fi: int, base: int, select: Select, granule: int
) -> Iterator[Record]:
    """The selected records of an indexed file whose first record is the split's ``base``:
    none read when it holds none of them; a plain JSONL file from its local copy of the
    fetched strides, a downloaded one as :func:`~distill.data.records.iter_split` reads it."""
    ix: _Indexed = f.indexed
    if not select.any_in(base, base + ix.records, granule):
        return
    if not ix.entry.ranged:
        plain = DataFile(f.name, f.path, f.shown)
        for r in iter_split([plain], _Shifted(select, base), granule):
            yield Record(r.index + base, fi, r.n, r.where, r.raw)
        return
    for lo, hi in _runs(base, ix.records, select, granule):
        yield from _read_run(f, fi, base, lo, hi, select)


class _Shifted(Select):
    """A selection seen from a file whose first record is the split's ``base`` (the granules
    stay the split's)."""

    def __init__(self, select: Select, base: int) -> None:
        super().__init__(None, max(select.stop - base, 1) if select.stop else 0)
        self.inner, self.base = select, base

    def __contains__(self, i: int) -> bool:
        return (i + self.base) in self.inner

    def any_in(self, lo: int, hi: int, step: int = 1) -> bool:
        return self.inner.any_in(lo + self.base, hi + self.base, step)


def _runs(base: int, n: int, select: Select, granule: int) -> list[tuple[int, int]]:
    """The file's record ranks to read (``[lo, hi)`` runs, adjacent granules merged): the
    granules of the split's records ``[base, base + n)`` that hold a selected record."""
    runs: list[tuple[int, int]] = []
    i, end = base, base + n
    if select.stop:
        end = min(end, select.stop)
    while i < end:
        nxt = min((i // granule + 1) * granule, end)
        if select.any_in(i, nxt, granule):
            if runs and runs[-1][1] == i - base:
                runs[-1] = (runs[-1][0], nxt - base)
            else:
                runs.append((i - base, nxt - base))
        i = nxt
    return runs


def _read_run(
    f: DataFile, fi: int, base: int, lo: int, hi: int, select: Select
) -> Iterator[Record]:
    """Records ``[lo, hi)`` of a plain JSONL file (ranks within it), read by lines from its
    local copy: from the indexed offset at or before ``lo`` to the one at or after ``hi``."""
    ix: _Indexed = f.indexed
    e, stride = ix.entry, ix.stride
    assert e.offsets is not None and e.lines is not None
    p, q = lo // stride, -(-hi // stride)
    pos, stop = e.offsets[p], e.offsets[q] if q < len(e.offsets) else e.size
    rank, n = p * stride, e.lines[p]
    with open(e.url, "rb") as fh:
        fh.seek(pos)
        for raw in fh:
            if pos >= stop:
                break
            pos += len(raw)
            if not is_blank(raw):
                if rank >= lo and (base + rank) in select:
                    yield Record(base + rank, fi, n, f.where(n), raw)
                rank += 1
                if rank >= hi:
                    return
            n += 1
    raise DistillError(
        f"{f.shown}: fewer records at its indexed bytes than its record index says: the "
        "object changed after teacher-cloud indexed it; rerun teacher-cloud"
    )
