"""Where a split's data is: ``data.train`` / ``data.eval`` as files to read, and its digest.

A split is one file, a directory (every data file under it, recursively) or a glob (``*``,
``?``, ``[...]``, ``**`` for any depth), local or ``gs://bucket/...``; files are taken in
sorted order of their names relative to the directory (or the glob's fixed part). Data files
are JSONL (``.jsonl``, ``.json``, ``.ndjson``; a single named file of any suffix is read as
JSONL), compressed JSONL (``+ .gz`` / ``.zst``) and Parquet (``.parquet``); a directory's or
glob's other files are ignored. Sample keys are ``<name without its data suffix>-<line>``
(:func:`~distill.data.records.key_stem`): two files that would give the same keys are refused.

A ``gs://`` split is read where it runs (:func:`open_split` downloads it to a scratch
directory; nothing is copied through another machine), and its digest is read from the
bucket's listing (GCS keeps each object's MD5, or CRC32C): no byte of it is read to
fingerprint it. A local split's digest is the sha256 of its one file (as before), or of every
file's name and sha256.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import hashlib
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.data.records import DATA_SUFFIXES, DataFile, data_suffix, key_stem
from distill.errors import DistillError
from distill.store.cache import sha256_file
from distill.store.storage import ObjectInfo, ObjectNotFound, open_store

if TYPE_CHECKING:
    from distill.data.record_index import FileIndex, SplitIndex

_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class SourceFile:
    """One data file of a split: ``name`` relative to the split's root, ``url`` (a local path
    or ``gs://``), its size and, for ``gs://``, the content hash the bucket keeps."""

    name: str
    url: str
    size: int
    content_hash: str = ""
    generation: int = 0  # gs://: the listed version

    @property
    def remote(self) -> bool:
        return self.url.startswith("gs://")


def is_remote(spec: str) -> bool:
    return spec.startswith("gs://")


def list_files(spec: str) -> list[SourceFile]:
    """The data files of a split spec, in order; refused: nothing there, no data file, two
    files whose sample keys would collide."""
    files = _gcs_files(spec) if is_remote(spec) else _local_files(spec)
    stems: dict[str, str] = {}
    for f in files:
        other = stems.setdefault(key_stem(f.name), f.name)
        if other != f.name:
            raise DistillError(
                f"{spec}: {other} and {f.name} would give the same sample keys "
                f"({key_stem(f.name)}-<line>); rename one"
            )
    return files


def _local_files(spec: str) -> list[SourceFile]:
    path = Path(spec).expanduser()
    if _GLOB.search(spec):
        root = _fixed_root(str(path))
        paths = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        found = [p for p in paths if data_suffix(p.name)]
        if not found:
            raise DistillError(f"dataset {spec}: the pattern matches no data file ({_suffixes()})")
        return sorted(
            (SourceFile(p.relative_to(root).as_posix(), str(p), p.stat().st_size) for p in found),
            key=lambda f: f.name,
        )
    if path.is_file():
        return [SourceFile(path.name, str(path), path.stat().st_size)]
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file() and data_suffix(p.name)]
        if not found:
            raise DistillError(f"dataset directory {spec} holds no data file ({_suffixes()})")
        return sorted(
            (SourceFile(p.relative_to(path).as_posix(), str(p), p.stat().st_size) for p in found),
            key=lambda f: f.name,
        )
    raise DistillError(f"dataset file {spec} not found")


def _fixed_root(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if _GLOB.search(p))]]
    return Path(*fixed) if fixed else Path(".")


def _gcs_files(spec: str) -> list[SourceFile]:
    bucket, _, key = spec[len("gs://") :].partition("/")
    if not bucket:
        raise DistillError(f"dataset {spec}: expected gs://BUCKET/PATH")
    store = open_store(f"gs://{bucket}")
    if _GLOB.search(key):
        parts = key.split("/")
        first = next(i for i, p in enumerate(parts) if _GLOB.search(p))
        root = "/".join(parts[:first])
        prefix = f"{root}/" if root else ""
        infos = [
            i
            for i in store.list_info(prefix)
            if data_suffix(i.name) and _glob_match(i.name[len(prefix) :], parts[first:])
        ]
        if not infos:
            raise DistillError(f"dataset {spec}: the pattern matches no data file ({_suffixes()})")
        return [_gcs_file(bucket, i, prefix) for i in infos]
    key = key.rstrip("/")
    infos = store.list_info(key)
    exact = [i for i in infos if i.name == key]
    if exact:
        return [_gcs_file(bucket, exact[0], key.rpartition("/")[0] + "/" if "/" in key else "")]
    under = [i for i in infos if i.name.startswith(f"{key}/") and data_suffix(i.name)]
    if not under:
        raise DistillError(f"dataset {spec} not found (no such object, nor data files under it)")
    return [_gcs_file(bucket, i, f"{key}/") for i in under]


def _gcs_file(bucket: str, info: ObjectInfo, prefix: str) -> SourceFile:
    return SourceFile(
        info.name[len(prefix) :],
        f"gs://{bucket}/{info.name}",
        info.size,
        info.content_hash,
        info.generation,
    )


def _glob_match(name: str, pattern: list[str]) -> bool:
    """``name`` (``/``-separated) against pattern parts, ``**`` matching any number of parts."""
    parts = name.split("/")

    def match(i: int, j: int) -> bool:
        if j == len(pattern):
            return i == len(parts)
        if pattern[j] == "**":
            return any(match(k, j + 1) for k in range(i, len(parts) + 1))
        return i < len(parts) and fnmatch.fnmatchcase(parts[i], pattern[j]) and match(i + 1, j + 1)

    return match(0, 0)


def _suffixes() -> str:
    return ", ".join(DATA_SUFFIXES)


def digest(spec: str, files: list[SourceFile] | None = None) -> str:
    """The split's dataset digest (a job fingerprint's ``dataset_sha256``): one local file's
    sha256 (as before); else the sha256 of each file's name and its sha256 (local) or the
    bucket's content hash and size (``gs://``, read from the listing)."""
    files = list_files(spec) if files is None else files
    if len(files) == 1 and not files[0].remote and not is_remote(spec):
        return file_sha256(Path(files[0].url))
    h = hashlib.sha256()
    for f in files:
        content = f"{f.content_hash}:{f.size}" if f.remote else file_sha256(Path(f.url))
        h.update(f"{f.name}\t{content}\n".encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """A local file's sha256, read once per (path, size, mtime) in this process: the preflight
    and the staging both need it."""
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def open_split(spec: str, scratch: Path, files: list[SourceFile] | None = None) -> list[DataFile]:
    """The split's files to read (``files``: its listing, when the caller has it): local ones
    where they are, ``gs://`` ones downloaded under ``scratch`` (messages still name their
    ``gs://`` URL). A copy already there from an earlier call with the same ``scratch`` (the
    controller's checks, then its estimate) is read again if it has the object's listed size,
    not downloaded twice."""
    out = []
    for f in list_files(spec) if files is None else files:
        if not f.remote:
            out.append(DataFile(f.name, Path(f.url), f.url))
            continue
        local = scratch / "data" / f.name
        if not (local.is_file() and local.stat().st_size == f.size):
            local.parent.mkdir(parents=True, exist_ok=True)
            bucket, _, key = f.url[len("gs://") :].partition("/")
            open_store(f"gs://{bucket}").download(key, local)
        out.append(DataFile(f.name, local, f.url))
    return out


@contextlib.contextmanager
def scratch_dir(scratch: Path | None, prefix: str) -> Iterator[Path]:
    """``scratch`` (the caller keeps it), else a temporary directory removed on exit."""
    if scratch is not None:
        yield scratch
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


class IndexedReads:
    """What a task read of its split through the record index: bytes by ranged reads (and
    how many), files downloaded whole (compressed, Parquet) and their bytes."""

    def __init__(self) -> None:
        self.ranged_bytes = self.ranged_reads = self.downloaded = self.downloaded_bytes = 0
        self._stores: dict[str, Any] = {}  # one client per bucket for all the reads

    def _object(self, url: str) -> tuple[Any, str]:
        bucket, _, key = url[len("gs://") :].partition("/")
        if bucket not in self._stores:
            self._stores[bucket] = open_store(f"gs://{bucket}")
        return self._stores[bucket], key

    def read(self, f: FileIndex, start: int, end: int) -> bytes:
        store, key = self._object(f.url)
        with self._pinned(f):
            data = store.read_range(key, start, end, f.generation)
        self.ranged_bytes += len(data)
        self.ranged_reads += 1
        return data

    def download(self, f: FileIndex, dest: Path) -> None:
        store, key = self._object(f.url)
        with self._pinned(f):
            store.download(key, dest, f.generation)
        self.downloaded += 1
        self.downloaded_bytes += dest.stat().st_size

    @staticmethod
    @contextlib.contextmanager
    def _pinned(f: FileIndex) -> Iterator[None]:
        """A pinned version that is gone: the object was overwritten or deleted."""
        try:
            yield
        except ObjectNotFound:
            if not f.generation:
                raise
            raise DistillError(
                f"{f.shown or f.url}: the version teacher-cloud indexed (generation "
                f"{f.generation}) is gone: the object changed after it was indexed; rerun "
                "teacher-cloud (or keep the dataset unchanged while a run uses it)"
            ) from None

    def summary(self, index: SplitIndex) -> str:
        total = sum(f.size for f in index.files)
        got = self.ranged_bytes + self.downloaded_bytes
        return (
            f"read {human_bytes(got)} of the split's {human_bytes(total)} through its record "
            f"index ({self.ranged_reads} ranged reads, {self.downloaded} of "
            f"{sum(not f.ranged for f in index.files)} compressed or Parquet files downloaded)"
        )


def human_bytes(n: float) -> str:
    """``n`` bytes in kB, MB or GB (decimal), three significant figures or more."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"


def open_split_indexed(
    index_url: str, digest: str, scratch: Path, wanted: Callable[[int, int], bool]
) -> tuple[list[DataFile], SplitIndex, IndexedReads]:
    """A fan-out task's split, from the record index at ``index_url`` (``gs://``) that the
    controller wrote for the dataset of ``digest``: only the files and byte ranges holding the
    records ``wanted(lo, hi)`` asks for are read
    (:func:`~distill.data.record_index.open_indexed`)."""
    from distill.data.record_index import SplitIndex, open_indexed

    bucket, _, key = index_url[len("gs://") :].partition("/")
    if not index_url.startswith("gs://") or not key:
        raise DistillError(f"data.record_index {index_url!r}: expected a gs:// object")
    index = SplitIndex.from_json(open_store(f"gs://{bucket}").read_bytes(key), index_url)
    if digest and index.digest != digest:
        raise DistillError(
            f"{index_url} indexes another dataset (digest {index.digest[:12]}, the job's "
            f"{digest[:12]}): rerun teacher-cloud, which indexes the dataset it checks"
        )
    reads = IndexedReads()
    return open_indexed(index, scratch, wanted, reads.read, reads.download), index, reads


# the token store a run writes: 5 bytes a token (int32 id, uint8 mask); a token is about 4
# bytes of JSONL text, and compressed JSONL or Parquet holds about 4 bytes of text a byte
STORE_PER_BYTE = {"plain": 1.25, "packed": 5.0}


def staged_bytes(files: list[SourceFile]) -> int:
    """The disk a run on a VM takes for these files: the files (staged or downloaded) and
    about their token store."""
    total = 0.0
    for f in files:
        packed = f.name.lower().endswith((".parquet", ".gz", ".zst", ".zstd"))
        total += f.size * (1 + STORE_PER_BYTE["packed" if packed else "plain"])
    return int(total)
