"""A split's records -> checked, tokenised samples by shard, for all of a split or one fan-out
task's share.

The shard rule: a split's records (non-blank lines, Parquet rows, over its files in order;
the first ``data.max_samples`` when set) are numbered from 0, and record ``i`` belongs to shard
``i // samples_per_shard``. It needs no parsing or tokenising, so a task reads, checks and
tokenises only the records of its own shards. A record left out as invalid
(``data.on_invalid = "skip"``) leaves its shard one sample short; no other sample moves.

:func:`prepare` runs two passes over the selected records, both on every core
(:class:`~distill.data.encode.Encoder`) and both before any model loads:

1. the whole-record checks (UTF-8, JSON, shape, roles): every bad record of the selection is
   reported at once (``on_invalid = "error"``), before any tokenising;
2. the chat template and the tokenizer, in blocks, into a :class:`TokenStore` on local disk,
   with the checks that need tokens (over-long, nothing to learn).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.data.dataset import (
    MAX_REPORTED,
    ON_INVALID,
    LineError,
    Sample,
    TokenizeStats,
    list_bad_lines,
)
from distill.data.encode import MIN_PARALLEL, Bad, Encoder, blocks, cores, items
from distill.data.records import DataFile, Select, count_records, iter_split
from distill.data.tokens import TokenStore
from distill.errors import DistillError


@dataclass(frozen=True)
class Rules:
    """The job's ``[data]`` settings that decide which records become which samples."""

    max_length: int
    truncation: str = "error"
    max_samples: int = 0
    on_invalid: str = "error"
    alignment: bool = False  # targets.alignment: keep the offsets and content spans

    def __post_init__(self) -> None:
        if self.on_invalid not in ON_INVALID:
            raise DistillError(
                f"data.on_invalid = {self.on_invalid!r}: one of {', '.join(ON_INVALID)}"
            )


@dataclass
class Prepared:
    """One split as this run holds it: ``records`` (the split's, capped by max_samples), the
    owned records' samples in ``store``, the invalid ones (``skipped``: record index -> the
    line as the manifest names it) and the stats of the owned records."""

    files: list[DataFile]
    records: int
    per: int
    owns: Callable[[int], bool] | None
    store: TokenStore
    stats: TokenizeStats
    skipped: dict[int, int | str] = field(default_factory=dict)
    read: str = ""  # how the records were read, when not whole files (a task's record index)
    _by_shard: dict[int, list[int | str]] | None = field(default=None, init=False, repr=False)

    @property
    def shards(self) -> int:
        return -(-self.records // self.per)

    def chunks(self) -> ShardChunks:
        return ShardChunks(self)

    def skipped_in(self, shard: int) -> list[int | str]:
        """The records of ``shard`` left out as invalid, as the manifest names them."""
        if self._by_shard is None:
            self._by_shard = {}
            for i, v in sorted(self.skipped.items()):
                self._by_shard.setdefault(i // self.per, []).append(v)
        return self._by_shard.get(shard, [])

    def close(self) -> None:
        self.store.close()


class ShardChunks(Sequence[list[Sample]]):
    """A split's samples by shard, read from the token store when asked for: shard ``s`` holds
    the valid samples of records ``[s * per, (s + 1) * per)``; another task's shards are empty."""

    def __init__(self, prepared: Prepared) -> None:
        self.p = prepared

    def __len__(self) -> int:
        return self.p.shards

    def owned(self, s: int) -> bool:
        return self.p.owns is None or self.p.owns(s * self.p.per)

    def __getitem__(self, s: int) -> list[Sample]:  # type: ignore[override]
        if not 0 <= s < len(self):
            raise IndexError(s)
        if not self.owned(s):
            return []
        return self.p.store.samples(s * self.p.per, (s + 1) * self.p.per)

    def __iter__(self) -> Iterator[list[Sample]]:
        return (self[s] for s in range(len(self)))

    def tokens(self, s: int) -> int:
        """Real tokens of shard ``s`` (no samples read)."""
        if not self.owned(s):
            return 0
        return self.p.store.tokens_in(s * self.p.per, (s + 1) * self.p.per)


def prepare(
    files: list[DataFile],
    shown: str,
    tokenizer: Any,
    rules: Rules,
    per: int,
    owns: Callable[[int], bool] | None = None,
    workers: int = 0,
    scratch: Path | None = None,
) -> Prepared:
    """Check and tokenise the records of ``files`` that ``owns`` (record index -> whether this
    run computes its shard; None: all) into a token store; ``shown`` names the split in errors.

    ``on_invalid = "error"``: every bad owned record is reported (the whole-record checks
    first, then the token checks), one :class:`DistillError`. ``workers``: processes (0: every
    core; fewer than :data:`MIN_PARALLEL` records run in this process)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DistillError("the teacher's tokenizer has no chat template; cannot render chats")
    counts = count_records(files, rules.max_samples)  # one fast pass: no JSON parsed
    records = sum(counts)
    select = Select(owns, rules.max_samples)
    n_workers = workers or (cores() if records >= MIN_PARALLEL else 1)
    with Encoder(tokenizer, n_workers) as enc:
        bad = [b for bs in enc.check(blocks(items(iter_split(files, select, per)))) for b in bs]
        if bad and rules.on_invalid == "error":
            raise DistillError(list_bad_lines(Path(shown), _errors(bad)))
        skip = {i for i, _, _ in bad}
        keep = Select(owns, rules.max_samples, skip)
        store = TokenStore([f.stem for f in files], scratch)
        try:
            stats, token_bad = _encode(enc, files, keep, per, rules, store)
        except BaseException:
            store.close()
            raise
    if token_bad and rules.on_invalid == "error":
        store.close()
        raise DistillError(list_bad_lines(Path(shown), _errors(token_bad)))
    starts = list(itertools.accumulate(counts, initial=0))
    one_file = len(files) == 1
    skipped: dict[int, int | str] = {
        i: n if one_file else f"{files[bisect.bisect_right(starts, i) - 1].name}:{n}"
        for i, n, _ in sorted(bad + token_bad)
    }
    stats.invalid = len(skipped)
    stats.invalid_lines = list(skipped.values())[:MAX_REPORTED]
    p = Prepared(files, records, per, owns, store, stats, skipped)
    _no_empty_shard(p, shown)
    return p


def check(files: list[DataFile], shown: str, rules: Rules, workers: int = 0) -> int:
    """The whole-record checks (UTF-8, JSON, shape, roles) of every record, on every core, no
    tokenizer: what a controller runs before it spends anything. ``on_invalid = "error"``:
    every bad record in one :class:`DistillError`; else the number of bad records."""
    counts = count_records(files, rules.max_samples)
    n_workers = workers or (cores() if sum(counts) >= MIN_PARALLEL else 1)
    select = Select(None, rules.max_samples)
    with Encoder(None, n_workers) as enc:
        bad = [b for bs in enc.check(blocks(items(iter_split(files, select)))) for b in bs]
    if bad and rules.on_invalid == "error":
        raise DistillError(list_bad_lines(Path(shown), _errors(bad)))
    if sum(counts) == 0:
        raise DistillError(f"{shown}: no samples")
    return len(bad)


def _no_empty_shard(p: Prepared, shown: str) -> None:
    """A shard holds at least one sample: refuse one whose every record was skipped (and a
    split without any sample, as before)."""
    n = p.stats.invalid
    if p.records == 0 or (p.owns is None and p.stats.samples == 0):
        p.close()
        raise DistillError(f"{shown}: no samples" + (f" ({n} invalid lines skipped)" if n else ""))
    chunks = p.chunks()
    for s in range(p.shards):
        lo, hi = p.store.span(s * p.per, (s + 1) * p.per)
        if chunks.owned(s) and lo == hi:
            lines = p.skipped_in(s)
            p.close()
            raise DistillError(
                f"{shown}: shard {s} would hold no sample: all {len(lines)} of its lines are "
                f"invalid (lines {lines[0]} to {lines[-1]}); a shard needs one valid sample: "
                "fix or remove those lines"
            )


def _errors(bad: list[Bad]) -> list[LineError]:
    return [LineError(msg, n) for _, n, msg in sorted(bad)]


def _encode(
    enc: Encoder, files: list[DataFile], keep: Select, per: int, rules: Rules, store: TokenStore
) -> tuple[TokenizeStats, list[Bad]]:
    """Tokenise the kept records into ``store``; their stats and the ones the token checks
    refuse."""
    stats = TokenizeStats()
    bad: list[Bad] = []
    file_of: dict[int, tuple[int, int]] = {}

    def tracked() -> Iterator[tuple[int, int, str, Any]]:
        for r in iter_split(files, keep, per):
            file_of[r.index] = (r.file, r.n)
            yield r.index, r.n, r.where, r.raw

    encoded = enc.encode(blocks(tracked()), rules.max_length, rules.truncation, rules.alignment)
    for results in encoded:
        for res in results:
            if len(res) == 3:
                bad.append(res)  # type: ignore[arg-type]
                file_of.pop(res[0], None)
                continue
            i, ids, mask, truncated = res[:4]  # type: ignore[misc]
            f, n = file_of.pop(i)
            store.append(i, f, n, ids, mask, *(res[4] if len(res) == 5 else ()))  # type: ignore[misc]
            stats.samples += 1
            stats.tokens += len(ids)
            stats.target_tokens += int(mask[1:].sum())
            stats.truncated += int(truncated)
    return stats, bad


def tokenize_files(
    files: list[DataFile],
    shown: str,
    tokenizer: Any,
    rules: Rules,
    stats: TokenizeStats | None = None,
    workers: int = 0,
) -> list[Sample]:
    """Every sample of ``files`` in memory (the cost estimate's count, the tests): all errors
    surface before any work; no samples at all is an error."""
    p = prepare(files, shown, tokenizer, rules, per=1 << 30, workers=workers)
    with contextlib.closing(p):
        samples = p.store.samples(0, p.records)
    if stats is not None:
        stats.samples += p.stats.samples
        stats.tokens += p.stats.tokens
        stats.target_tokens += p.stats.target_tokens
        stats.truncated += p.stats.truncated
        stats.invalid += p.stats.invalid
        stats.invalid_lines += p.stats.invalid_lines[: MAX_REPORTED - len(stats.invalid_lines)]
    return samples
