"""Dataset files -> records: the non-blank lines of JSONL (plain, ``.gz``, ``.zst``) and the
rows of Parquet, numbered as the user sees them (line / row, from 1), without parsing JSON.

A split's records are numbered 0, 1, ... over its files in order (:func:`iter_split`); that
number alone decides a record's shard, so no record needs to be parsed or tokenised to know
where it goes. A selection (:class:`Select`) reads only some records; every record is still
counted. Parquet files are checked for their columns and types when opened (one error names the
file and the column) and only the row groups holding selected rows are read.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from distill.errors import DistillError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PARQUET = ".parquet"
# what a directory or glob of data files may hold (other files are ignored)
DATA_SUFFIXES = (
    *JSONL_SUFFIXES,
    *(j + c for j in JSONL_SUFFIXES for c in COMPRESSED),
    PARQUET,
)
FIELDS = ("messages", "prompt", "response", "system")  # the columns a Parquet file is read for
_BLANK = b" \t\r\n\x0b\x0c"


def data_suffix(name: str) -> str:
    """The data suffix ``name`` ends with (``.jsonl.gz``, ``.parquet``, ...), or ``""``."""
    low = name.lower()
    return max((s for s in DATA_SUFFIXES if low.endswith(s)), key=len, default="")


def key_stem(name: str) -> str:
    """A sample key's file part: ``name`` without its data suffix (else its last suffix), with
    ``/`` and every other character but ``[A-Za-z0-9_-]`` as ``_`` (``train.jsonl`` ->
    ``train``; ``a/part-1.jsonl.zst`` -> ``a_part-1``)."""
    suffix = data_suffix(name)
    base = name[: -len(suffix)] if suffix else str(Path(name).with_suffix(""))
    return re.sub(r"[^A-Za-z0-9_-]", "_", base)


@dataclass(frozen=True)
class DataFile:
    """One file of a split: ``name`` (relative to the split's root: sample keys use it),
    ``path`` (where it is read, locally) and ``shown`` (how messages name it). ``indexed``: its
    entry in the split's record index, when a fan-out task reads it
    (:func:`~distill.data.record_index.open_indexed`): its records are counted from the index,
    a file holding none of the task's records is not read, and ``path`` of a plain JSONL file
    holds only the strides with the task's records."""

    name: str
    path: Path
    shown: str
    indexed: Any = None

    @property
    def stem(self) -> str:
        return key_stem(self.name)

    @property
    def parquet(self) -> bool:
        return self.name.lower().endswith(PARQUET)

    @property
    def compression(self) -> str | None:
        return next((c for s, c in COMPRESSED.items() if self.name.lower().endswith(s)), None)

    def where(self, n: int, group: int | None = None) -> str:
        """How an error names record ``n`` (a line, or a Parquet row and its row group)."""
        if group is None:
            return f"{self.shown}:{n}"
        return f"{self.shown}: row {n} (row group {group})"


class Select:
    """Which of a split's records (numbered from 0) to read: those ``owns`` says (a rule
    constant over each run of ``granule`` records: a shard), below ``stop``, not in
    ``exclude``."""

    def __init__(
        self,
        owns: Callable[[int], bool] | None = None,
        stop: int = 0,
        exclude: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        self.owns, self.stop, self.exclude = owns, stop, exclude

    def __contains__(self, i: int) -> bool:
        return (
            (not self.stop or i < self.stop)
            and (self.owns is None or self.owns(i))
            and i not in self.exclude
        )

    def any_in(self, lo: int, hi: int, step: int = 1) -> bool:
        """Whether some record in ``[lo, hi)`` may be selected (``step``: the granule of
        ``owns``; excluded records are not looked at)."""
        if self.stop:
            hi = min(hi, self.stop)
        if lo >= hi:
            return False
        return self.owns is None or any(self.owns(i) for i in range(lo - lo % step, hi, step))


@dataclass(frozen=True)
class Record:
    """Record ``index`` of the split: line / row ``n`` of file ``file`` (its index)."""

    index: int
    file: int
    n: int
    where: str
    raw: bytes | dict[str, Any]  # a JSONL line's bytes, or a Parquet row


def iter_split(
    files: list[DataFile], select: Select | None = None, granule: int = 1
) -> Iterator[Record]:
    """The selected records of ``files`` in order. Stops at ``select.stop``.

    ``granule``: the run of records the selection decides together (``samples_per_shard``),
    so whole Parquet row groups of unselected records are skipped."""
    select = select or Select()
    base = 0
    for fi, f in enumerate(files):
        if select.stop and base >= select.stop:
            return
        if f.indexed is not None:
            from distill.data.record_index import indexed_records

            yield from indexed_records(f, fi, base, select, granule)
            base += f.indexed.records
            continue
        if f.parquet:
            yield from _parquet_records(f, fi, base, select, granule)
            base += parquet_rows(f)
            continue
        for n, raw in _lines(f):
            if base in select:
                yield Record(base, fi, n, f.where(n), raw)
            base += 1
            if select.stop and base >= select.stop:
                return


def count_records(files: list[DataFile], stop: int = 0) -> list[int]:
    """Each file's records (non-blank lines, rows); with ``stop``, counting ends there."""
    counts: list[int] = []
    total = 0
    for f in files:
        if stop and total >= stop:
            counts.append(0)
            continue
        if f.indexed is not None:
            c = f.indexed.records if not stop else min(f.indexed.records, stop - total)
        elif f.parquet:
            c = parquet_rows(f) if not stop else min(parquet_rows(f), stop - total)
        else:
            c = 0
            for _ in _lines(f):
                c += 1
                if stop and total + c >= stop:
                    break
        counts.append(c)
        total += c
    return counts


def _open(f: DataFile) -> IO[bytes]:
    if not f.path.is_file():
        raise DistillError(f"dataset file {f.shown} not found")
    raw = f.path.open("rb")
    if f.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if f.compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _lines(f: DataFile) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line; a line of only Unicode whitespace is
    blank too (as ``str.strip`` says)."""
    broken: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if f.compression == "zstd":
        import zstandard

        broken += (zstandard.ZstdError,)
    try:
        with _open(f) as fh:
            for n, raw in enumerate(fh, start=1):
                if not is_blank(raw):
                    yield n, raw
    except broken as e:  # a truncated or corrupt gzip / zstd stream
        raise DistillError(f"{f.shown}: cannot read ({e})") from None


def is_blank(raw: bytes) -> bool:
    """Whether a line is blank: JSON whitespace only, or Unicode whitespace only (as
    ``str.strip`` says); a blank line is no record but keeps its line number."""
    s = raw.strip(_BLANK)
    return not s or (s[0] >= 0x80 and not raw.decode("utf-8", "replace").strip())


# --- Parquet -----------------------------------------------------------------------------------


def _parquet(f: DataFile) -> Any:
    """The opened Parquet file, its columns checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not f.path.is_file():
        raise DistillError(f"dataset file {f.shown} not found")
    try:
        pf = pq.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as e:
        raise DistillError(f"{f.shown}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    names = set(schema.names)
    if "messages" not in names and not {"prompt", "response"} <= names:
        raise DistillError(
            f"{f.shown}: expected a 'messages' column (chat) or 'prompt' and 'response' columns "
            f"(instruction); its columns: {', '.join(schema.names) or 'none'}"
        )
    for col in FIELDS:
        if col not in names:
            continue
        t = schema.field(col).type
        ok = _is_chat(t) if col == "messages" else _is_text(t)
        if not ok:
            want = "list<struct<role: string, content: string>>" if col == "messages" else "string"
            raise DistillError(f"{f.shown}: column '{col}' is {t}, expected {want}")
    return pf


def _is_text(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t))


def _is_chat(t: Any) -> bool:
    import pyarrow as pa

    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    v = t.value_type
    if not pa.types.is_struct(v):
        return False
    fields = {v.field(i).name: v.field(i).type for i in range(v.num_fields)}
    return all(k in fields and _is_text(fields[k]) for k in ("role", "content"))


def parquet_rows(f: DataFile) -> int:
    return int(_parquet(f).metadata.num_rows)


def _parquet_records(
    f: DataFile, fi: int, base: int, select: Select, granule: int
) -> Iterator[Record]:
    pf = _parquet(f)
    columns = [c for c in FIELDS if c in pf.schema_arrow.names]
    lo = base
    for g in range(pf.metadata.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        if select.any_in(lo, lo + size, granule):
            rows = pf.read_row_group(g, columns=columns).to_pylist()
            for j, row in enumerate(rows):
                i = lo + j
                if i in select:
                    n = i - base + 1
                    obj = {k: v for k, v in row.items() if v is not None}
                    yield Record(i, fi, n, f.where(n, g), obj)
        lo += size
