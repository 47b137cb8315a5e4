"""The cost estimate's counts in seconds on any dataset size (:func:`estimate_data`): a uniform
sample of each split's lines, tokenised, and extrapolated with a 95% bound.

1. One pass over the split's bytes (numpy over blocks: no JSON, no tokenizer) counts its
   non-blank lines N (the first ``data.max_samples``, when set) and keeps a uniform sample of
   ``sample_lines`` of them, without replacement: every line draws a random key (a fixed seed)
   and the lowest keys stay (bottom-k), so memory follows the sample, not the file.
2. The sampled lines, lowest key first, up to :data:`SAMPLE_BYTES` of text (a prefix of a
   bottom-k sample is a uniform sample too), are read by seeking and tokenised as the teacher
   does, in one batched call (:func:`distill.data.encode.encode_block`); an invalid one is refused
   (``data.on_invalid = "error"``) or is a line without a sample (``"skip"``).
3. Their samples, in file order and ``samples_per_shard`` at a time, go through the teacher's
   token-budget batches (:func:`~distill.teacher.batching.token_budget_batches`): each sample's
   padded row is its batch's longest.
4. Each count is N x the sample's mean per line (sample 0/1, tokens, targets, padded row, padded
   row squared), with a 95% bound of 1.96 x N x sqrt((1 - n/N) s^2 / n), s^2 the sample
   variance of that per-line value: the normal-approximation confidence interval of a total
   under simple random sampling (:func:`extrapolate`). Padded tokens are thus tokens x the
   sample's own padding ratio.

A split that is not one local ``.jsonl`` file (a directory, a glob, a compressed or Parquet
file, a ``gs://`` dataset) is sampled the same way from its records (:func:`scan_records`:
one pass that reads every record, decompressing, but parses and tokenises none but the
sample; a ``gs://`` file is read from its bucket into a scratch folder first). A split whose
lines all fit the sample is counted exactly (:func:`~distill.cloud.counting.count_split`), as
is every split with ``sample_lines = 0``.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.cloud.counting import DEFAULT_SAMPLE_LINES, DataCounts, SplitSample, count_split
from distill.config import Job
from distill.data.dataset import LineError, list_bad_lines
from distill.data.encode import encode_block
from distill.errors import DistillError

SAMPLE_BYTES = 8 * 2**20  # per split: the sampled lines tokenised stop at this much text
MIN_SAMPLE_LINES = 100  # ... unless fewer lines than this would be left
SEED = 0
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BLOCK = 8 * 2**20  # bytes read at a time by the line pass
SEGMENT_SAMPLES = 64  # a shard's size: the mean of at least this many sampled samples near it
SAMPLED_SUFFIXES = (".jsonl",)  # read by byte offsets; other formats record by record
BLOCK_RECORDS = 65536  # random keys drawn at a time by the record pass
WHITESPACE = np.frombuffer(b" \t\r\n", np.uint8)  # JSON's: a line of only these is blank


@dataclass
class LineScan:
    """One pass over a split's bytes: its non-blank lines and a uniform sample of them, lowest
    key first."""

    lines: int  # non-blank lines (the first max_lines of them, when set)
    nbytes: int  # bytes up to the end of the last of them
    keys: np.ndarray  # the sample: random keys,
    offsets: np.ndarray  # byte offsets,
    numbers: np.ndarray  # 1-based line numbers (blank lines counted, as read_jsonl's),
    ranks: np.ndarray  # 0-based positions among the non-blank lines,
    sizes: np.ndarray  # and bytes (with the newline)

    def take(self, max_bytes: int) -> np.ndarray:
        """The sample's first lines within ``max_bytes`` (at least MIN_SAMPLE_LINES), as
        indices into its arrays in file order."""
        n = int(np.searchsorted(np.cumsum(self.sizes), max_bytes, side="right"))
        n = max(n, min(MIN_SAMPLE_LINES, len(self.sizes)))
        return np.argsort(self.offsets[:n], kind="stable")


def scan_lines(path: Path, k: int, max_lines: int = 0, seed: int = SEED) -> LineScan:
    """Count ``path``'s non-blank lines (JSON whitespace only is blank) and draw a uniform
    sample of ``k`` of them (all when fewer), reading blocks of :data:`BLOCK` bytes."""
    rng = np.random.default_rng(seed)
    cols = [np.empty(0, np.float64), *(np.empty(0, np.int64) for _ in range(4))]
    lines = physical = pos = nbytes = 0
    carry = b""
    with path.open("rb") as f:
        while True:
            block = f.read(BLOCK)
            buf = carry + block if carry else block
            if not buf:
                break
            cut = buf.rfind(b"\n") + 1 if block else len(buf)  # whole lines only, but the last
            if cut == 0:
                carry = buf
                continue
            a = np.frombuffer(buf, np.uint8, count=cut)
            carry = buf[cut:]
            starts = np.concatenate(([0], np.flatnonzero(a[:-1] == 10) + 1))
            sizes = np.diff(starts, append=cut)
            filled = ~np.isin(a[starts], WHITESPACE)  # starts with ink: not blank
            for i in np.flatnonzero(~filled):  # the rest (rare), one by one
                filled[i] = bool(buf[starts[i] : starts[i] + sizes[i]].strip(b" \t\r\n"))
            idx = np.flatnonzero(filled)
            if max_lines:
                idx = idx[: max_lines - lines]
            m = len(idx)
            keys = rng.random(m)
            new = [keys, pos + starts[idx], physical + idx + 1, lines + np.arange(m), sizes[idx]]
            if len(cols[0]) >= k:  # only keys below the sample's highest can enter it
                keep = keys < cols[0].max()
                new = [c[keep] for c in new]
            cols = [np.concatenate((c, n)) for c, n in zip(cols, new, strict=True)]
            if len(cols[0]) > k:
                lowest = np.argpartition(cols[0], k - 1)[:k]
                cols = [c[lowest] for c in cols]
            if m:
                nbytes = pos + int(starts[idx[-1]] + sizes[idx[-1]])
            lines += m
            physical += len(starts)
            pos += cut
            if not block or (max_lines and lines >= max_lines):
                break
    order = np.argsort(cols[0], kind="stable")
    return LineScan(lines, nbytes, *(c[order] for c in cols))


def extrapolate(values: np.ndarray, population: int) -> tuple[int, int]:
    """(total, 95% half-width) of a per-line value over ``population`` lines from its values
    on a uniform sample of them without replacement: N x mean, and 1.96 x N x the standard
    error sqrt((1 - n/N) s^2 / n) (finite-population corrected; 0 when n = N)."""
    n = len(values)
    mean = float(values.mean())
    var = float(values.var(ddof=1)) if n > 1 else 0.0
    half = Z95 * population * math.sqrt(max(1 - n / population, 0.0) * var / n)
    return round(population * mean), math.ceil(half)


def padded_rows(lengths: np.ndarray, per: int, batch_tokens: int) -> np.ndarray:
    """Each sample's padded row (its batch's longest) when ``lengths``, in file order, are
    grouped ``per`` a shard and batched as the teacher batches a shard."""
    from distill.teacher.batching import token_budget_batches

    rows = np.zeros(len(lengths))
    for lo in range(0, len(lengths), per):
        chunk = [int(x) for x in lengths[lo : lo + per]]
        for batch in token_budget_batches(chunk, batch_tokens):
            rows[[lo + i for i in batch]] = chunk[batch[0]]
    return rows


def shard_sizes(
    samples: int, per: int, tokens: int, ranks: np.ndarray, lengths: np.ndarray, lines: int
) -> list[int]:
    """Each shard's tokens: its samples x the mean tokens of the sampled samples in its stretch
    of the file (segments of shards holding :data:`SEGMENT_SAMPLES` sampled samples or more),
    scaled to the split's ``tokens``. ``ranks``: the sampled samples' places among ``lines``."""
    shards = -(-samples // per)
    if shards == 0 or len(lengths) == 0:
        return [0] * shards
    counts = np.full(shards, per, np.float64)
    counts[-1] = samples - per * (shards - 1)
    at = np.minimum(ranks * shards // max(lines, 1), shards - 1)
    group = max(1, -(-SEGMENT_SAMPLES * shards // len(lengths)))  # shards a segment
    seg = at // group
    nseg = -(-shards // group)
    sums = np.bincount(seg, weights=lengths, minlength=nseg)
    seen = np.bincount(seg, minlength=nseg)
    mean = np.where(seen > 0, sums / np.maximum(seen, 1), float(lengths.mean()))
    est = counts * mean[np.arange(shards) // group]
    return [int(x) for x in np.rint(est * tokens / est.sum())]


@dataclass
class RecordScan:
    """:class:`LineScan`'s twin for a split read record by record: its records and a uniform
    sample of them, lowest key first."""

    lines: int  # records (the first max_lines of them, when set)
    keys: np.ndarray
    ranks: np.ndarray  # 0-based places among the records
    records: list[Any]  # the sampled records (distill.data.records.Record), key order
    sizes: np.ndarray  # each sampled record's bytes (a Parquet row: its JSON's)

    def take(self, max_bytes: int) -> np.ndarray:
        n = int(np.searchsorted(np.cumsum(self.sizes), max_bytes, side="right"))
        n = max(n, min(MIN_SAMPLE_LINES, len(self.sizes)))
        return np.argsort(self.ranks[:n], kind="stable")


def scan_records(files: list[Any], k: int, max_lines: int = 0, seed: int = SEED) -> RecordScan:
    """Every record of ``files`` (:class:`distill.data.records.DataFile`) counted and a uniform
    sample of ``k`` kept (bottom-k of a random key each, keys drawn a block at a time)."""
    from distill.data.records import Select, iter_split

    rng = np.random.default_rng(seed)
    heap: list[tuple[float, int, Any]] = []  # max-heap by key (negated) of the k lowest
    lines = 0
    keys = rng.random(BLOCK_RECORDS)
    for rec in iter_split(files, Select(stop=max_lines)):
        if lines and lines % BLOCK_RECORDS == 0:
            keys = rng.random(BLOCK_RECORDS)
        key = float(keys[lines % BLOCK_RECORDS])
        if len(heap) < k:
            heapq.heappush(heap, (-key, lines, rec))
        elif key < -heap[0][0]:
            heapq.heapreplace(heap, (-key, lines, rec))
        lines += 1
    chosen = sorted(((-nk, rank, rec) for nk, rank, rec in heap), key=lambda t: t[0])

    def size(raw: Any) -> int:
        return len(raw) if isinstance(raw, bytes) else len(json.dumps(raw, default=str))

    return RecordScan(
        lines=lines,
        keys=np.array([c[0] for c in chosen]),
        ranks=np.array([c[1] for c in chosen], np.int64),
        records=[c[2] for c in chosen],
        sizes=np.array([size(c[2].raw) for c in chosen], np.int64),
    )


def sample_split(
    c: DataCounts,
    job: Job,
    split: str,
    path: Path,
    scan: LineScan,
    tokenizer: Any,
    max_bytes: int = SAMPLE_BYTES,
) -> None:
    """Tokenise ``scan``'s sample (up to ``max_bytes`` of it) and add the split's extrapolated
    counts, their bounds and its shard sizes to ``c``."""
    idx = scan.take(max_bytes)
    block = []
    with path.open("rb") as f:
        for j, i in enumerate(idx):
            f.seek(int(scan.offsets[i]))
            num = int(scan.numbers[i])
            block.append((j, num, f"{path}:{num}", f.readline()))
    _add_sampled(c, job, split, path, block, scan.ranks[idx], scan.lines, tokenizer, "lines")


def sample_records(
    c: DataCounts,
    job: Job,
    split: str,
    spec: str,
    scan: RecordScan,
    tokenizer: Any,
    max_bytes: int = SAMPLE_BYTES,
) -> None:
    """:func:`sample_split` for a split sampled record by record (:func:`scan_records`)."""
    idx = scan.take(max_bytes)
    block = [
        (j, scan.records[i].n, scan.records[i].where, scan.records[i].raw)
        for j, i in enumerate(idx)
    ]
    _add_sampled(
        c, job, split, Path(spec), block, scan.ranks[idx], scan.lines, tokenizer, "records"
    )


def _add_sampled(
    c: DataCounts,
    job: Job,
    split: str,
    where_split: Path,
    block: list[Any],
    sample_ranks: np.ndarray,
    lines: int,
    tokenizer: Any,
    unit: str,
) -> None:
    """Tokenise the sampled ``block`` in one call; add the extrapolated counts to ``c``."""
    d, t = job.data, job.teacher
    n = len(block)
    valid = np.zeros(n, bool)
    tokens, targets = np.zeros(n), np.zeros(n)
    errors: list[LineError] = []
    for out in encode_block(tokenizer, block, d.max_length, d.truncation):
        if isinstance(out[2], str):  # (j, line, why): invalid
            errors.append(LineError(out[2], int(out[1])))
            continue
        j, ids, mask = out[0], out[1], out[2]
        valid[j], tokens[j], targets[j] = True, len(ids), int(mask[1:].sum())
    where = f"in a sample of {n:,} of its {lines:,} {unit}"
    if errors and d.on_invalid == "error":
        errors.sort(key=lambda e: e.line)
        raise DistillError(f"{list_bad_lines(where_split, errors)} [{where}: there may be more]")
    if not valid.any():
        raise DistillError(f"{where_split}: no samples {where} ({len(errors)} invalid)")
    rows = padded_rows(tokens[valid], t.samples_per_shard, t.batch_tokens)
    padded = np.zeros(n)
    padded[valid] = rows
    per_line = {
        "samples": valid.astype(np.float64),
        "tokens": tokens,
        "target_tokens": targets,
        "padded_tokens": padded,
        "attention_token_ctx": padded * padded,
    }
    est, bounds = {}, {}
    for name, values in per_line.items():
        est[name], bounds[name] = extrapolate(values, lines)
    ranks = sample_ranks[valid]
    sizes = shard_sizes(
        est["samples"], t.samples_per_shard, est["tokens"], ranks, tokens[valid], lines
    )
    c.add_split(split, **est, shard_tokens=sizes)
    c.sampled[split] = SplitSample(
        lines=lines,
        sampled=n,
        skipped=n - int(valid.sum()),
        padding=float(rows.sum() / tokens[valid].sum()),
        bounds=bounds,
    )


def estimate_data(
    job: Job,
    tokenizer: Any,
    sample_lines: int = DEFAULT_SAMPLE_LINES,
    max_bytes: int = SAMPLE_BYTES,
    scratch: Path | None = None,
) -> DataCounts:
    """The job's counts: each split estimated from a uniform sample of ``sample_lines`` of its
    lines (up to ``max_bytes`` of them), or counted exactly when they all fit (or
    ``sample_lines`` is 0: ``cost-estimate --exact``). ``scratch``: where a ``gs://`` split's
    copy is (or goes), kept for the caller (teacher-cloud's checks read the same copy)."""
    from distill.config import splits
    from distill.sources import open_split, scratch_dir

    c = DataCounts()
    for split, spec in splits(job).items():
        path = Path(spec)
        if sample_lines == 0:
            count_split(c, job, split, spec, tokenizer)
            continue
        if "://" not in spec and path.is_file() and path.suffix.lower() in SAMPLED_SUFFIXES:
            scan = scan_lines(path, sample_lines, job.data.max_samples)
            if scan.lines <= sample_lines and scan.nbytes <= max_bytes:
                count_split(c, job, split, spec, tokenizer)
            else:
                sample_split(c, job, split, path, scan, tokenizer, max_bytes)
            continue
        with scratch_dir(scratch, "distill-estimate-") as tmp:
            # a gs:// file is read into the scratch folder (once, when the caller keeps it)
            files = open_split(spec, tmp / split)
            rscan = scan_records(files, sample_lines, job.data.max_samples)
            if rscan.lines <= sample_lines and int(rscan.sizes.sum()) <= max_bytes:
                count_split(c, job, split, spec, tokenizer)
            else:
                sample_records(c, job, split, spec, rscan, tokenizer, max_bytes)
    return c
