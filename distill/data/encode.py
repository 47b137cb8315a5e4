"""Records -> checked messages -> token ids and loss masks, a block of records at a time, on
every core.

Two steps, both per block of records (:class:`Encoder` runs the blocks on worker processes,
each holding the tokenizer, or in this process):

- :func:`check_block`: UTF-8, JSON, the line's shape and roles (no tokenizer): the whole-file
  checks, fast;
- :func:`encode_block`: the chat template per record (Python), then one batched call of the
  fast tokenizer over the block's texts (offsets give the assistant-only mask), then
  truncation and the nothing-to-learn check.

The ids and masks are exactly :func:`~distill.data.dataset.render`'s, one sample at a time
(tests/test_encode.py holds them equal); :func:`encode_serial` is that one-sample loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from distill.data.align import content_spans
from distill.data.dataset import LineError, assistant_spans, render, to_messages
from distill.data.records import Record
from distill.errors import DistillError

BLOCK = 256  # records per block sent to a worker
MIN_PARALLEL = 2048  # fewer records than this are encoded in this process

# (record index, line, where, raw): what a block carries to a worker
Item = tuple[int, int, str, Any]
# (record index, line, message): a bad record, as a worker returns it
Bad = tuple[int, int, str]
# (record index, ids, mask, truncated): an encoded record; with alignment, then
# (token offsets [T, 2], assistant content spans [turns, 2]), int32 characters
Good = (
    tuple[int, np.ndarray, np.ndarray, bool]
    | tuple[int, np.ndarray, np.ndarray, bool, tuple[np.ndarray, np.ndarray]]
)


def cores() -> int:
    """The cores this process may use (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def items(records: Iterable[Record]) -> Iterator[Item]:
    return ((r.index, r.n, r.where, r.raw) for r in records)


def parse(raw: bytes | dict[str, Any], n: int, where: str) -> list[dict[str, str]]:
    """One record -> its messages, or a :class:`LineError` naming the record (the messages of
    :func:`~distill.data.dataset.read_jsonl` and :func:`~distill.data.dataset.to_messages`)."""
    if isinstance(raw, bytes):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            byte, col = raw[e.start], e.start + 1
            msg = f"{where}: not UTF-8 (byte 0x{byte:02x} at column {col}); "
            raise LineError(msg + "re-save the file as UTF-8", n) from None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LineError(f"{where}: malformed JSON ({e.msg} at column {e.colno})", n) from None
        if not isinstance(obj, dict):
            raise LineError(f"{where}: expected a JSON object, got {type(obj).__name__}", n)
    else:
        obj = raw
    try:
        return to_messages(obj, where)
    except DistillError as e:
        raise LineError(str(e), n) from None


def check_block(block: list[Item]) -> list[Bad]:
    """The records of ``block`` that fail the whole-file checks (no tokenizer)."""
    bad: list[Bad] = []
    for i, n, where, raw in block:
        try:
            parse(raw, n, where)
        except LineError as e:
            bad.append((i, n, str(e)))
    return bad


def encode_block(
    tokenizer: Any, block: list[Item], max_length: int, truncation: str, alignment: bool = False
) -> list[Good | Bad]:
    """Each record of ``block``, in order: encoded, or why it is invalid. One tokenizer call
    for the whole block. ``alignment``: each good record also carries its tokens' character
    offsets and its assistant contents' spans (truncated with the tokens)."""
    out: list[Good | Bad | None] = [None] * len(block)
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    contents: list[list[tuple[int, int]]] = []
    at: list[int] = []
    for j, (i, n, where, raw) in enumerate(block):
        try:
            msgs = parse(raw, n, where)
            text, sp = assistant_spans(tokenizer, msgs, where)
            if alignment:
                said = [m["content"] for m in msgs if m["role"] == "assistant"]
                contents.append(content_spans(text, said, sp, where))
        except LineError as e:
            out[j] = (i, n, str(e))
            continue
        except DistillError as e:
            if str(e).startswith(where):
                out[j] = (i, n, str(e))
                continue
            raise  # not about this record (no chat template): stop at once
        texts.append(text)
        spans.append(sp)
        at.append(j)
    if texts:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        rows = zip(at, enc["input_ids"], enc["offset_mapping"], spans, strict=True)
        for r, (j, ids_l, offs, sp) in enumerate(rows):
            i, n, where, _ = block[j]
            res = _finish(i, n, where, ids_l, offs, sp, max_length, truncation)
            out[j] = _with_alignment(res, offs, contents[r]) if alignment else res
    return [o for o in out if o is not None]


def _with_alignment(
    res: Good | Bad, offsets: list[tuple[int, int]], content: list[tuple[int, int]]
) -> Good | Bad:
    """A good record with its (truncated) offsets and content spans: a span is cut at the
    last kept token's end, and one starting after it is left out."""
    if len(res) == 3:
        return res
    i, ids, mask, truncated = res[:4]
    off = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)[: len(ids)]
    end = int(off[:, 1].max(initial=0))
    sp = np.asarray(content, dtype=np.int32).reshape(-1, 2)
    sp = sp[sp[:, 0] < end] if truncated else sp
    sp[:, 1] = np.minimum(sp[:, 1], end)
    return i, ids, mask, truncated, (np.ascontiguousarray(off), sp)


def _finish(
    i: int,
    n: int,
    where: str,
    ids_l: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    max_length: int,
    truncation: str,
) -> Good | Bad:
    ids = np.asarray(ids_l, dtype=np.int32)
    starts = np.asarray([s for s, _ in offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for lo, hi in spans:
        mask[(starts >= lo) & (starts < hi)] = 1
    return limit(i, n, where, ids, mask, max_length, truncation)


def limit(
    i: int, n: int, where: str, ids: np.ndarray, mask: np.ndarray, max_length: int, truncation: str
) -> Good | Bad:
    """Truncation (or its error) and the nothing-to-learn check of one encoded record."""
    truncated = len(ids) > max_length
    if truncated:
        if truncation == "error":
            return (
                i,
                n,
                f"{where}: {len(ids)} tokens > data.max_length={max_length} "
                '(raise data.max_length, or set data.truncation = "right")',
            )
        ids, mask = ids[:max_length], mask[:max_length]
    if int(mask[1:].sum()) == 0:
        return (
            i,
            n,
            f"{where}: no assistant tokens left after truncation to {max_length} tokens "
            "(raise data.max_length or shorten the prompt)",
        )
    return i, ids, mask, truncated


def encode_serial(
    tokenizer: Any, block: list[Item], max_length: int, truncation: str
) -> list[Good | Bad]:
    """:func:`encode_block` one record at a time through
    :func:`~distill.data.dataset.render` (a template render and a tokenizer call per record):
    the loop ``tokenize_file`` ran before, the reference the batched path is tested and timed
    against."""
    out: list[Good | Bad] = []
    for i, n, where, raw in block:
        try:
            s = render(tokenizer, parse(raw, n, where), where)
        except LineError as e:
            out.append((i, n, str(e)))
            continue
        except DistillError as e:
            if str(e).startswith(where):
                out.append((i, n, str(e)))
                continue
            raise
        out.append(limit(i, n, where, s.input_ids, s.loss_mask, max_length, truncation))
    return out


# --- the worker processes ----------------------------------------------------------------------

_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _TOKENIZER
    # one process per core: the tokenizer's own threads would only compete with the others
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = tokenizer


def _encode_in_worker(
    block: list[Item], max_length: int, truncation: str, alignment: bool = False
) -> list[Good | Bad]:
    return encode_block(_TOKENIZER, block, max_length, truncation, alignment)


class Encoder:
    """Runs blocks of records on ``workers`` processes (default: every core), or in this
    process when ``workers`` is 1; results come back in order, with at most two blocks per
    worker in flight (memory stays bounded by the blocks, not the dataset).

    Use as a context manager; the processes start on the first block and stop on exit."""

    def __init__(self, tokenizer: Any, workers: int = 0) -> None:
        self.tokenizer = tokenizer
        self.workers = workers or cores()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            # Linux: fork, as torch's DataLoader does (no re-import of __main__, the tokenizer
            # inherited; the workers run only this module's code); spawn elsewhere (macOS)
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=mp.get_context(method),
                initializer=_init_worker,
                initargs=(self.tokenizer,),
            )
        return self._pool

    def check(self, blocks: Iterable[list[Item]]) -> Iterator[list[Bad]]:
        """:func:`check_block` of each block, in order."""
        return self._run(blocks, check_block, check_block)

    def encode(
        self,
        blocks: Iterable[list[Item]],
        max_length: int,
        truncation: str,
        alignment: bool = False,
    ) -> Iterator[list[Good | Bad]]:
        """:func:`encode_block` of each block, in order."""

        def here(b: list[Item]) -> list[Good | Bad]:
            return encode_block(self.tokenizer, b, max_length, truncation, alignment)

        return self._run(blocks, _encode_in_worker, here, max_length, truncation, alignment)

    def _run(
        self,
        blocks: Iterable[list[Item]],
        remote: Callable[..., Any],
        local: Callable[[list[Item]], Any],
        *args: Any,
    ) -> Iterator[Any]:
        if self.workers <= 1:
            yield from map(local, blocks)
            return
        pending: deque[Future[Any]] = deque()
        for b in blocks:
            if self._pool is None:
                with _no_tokenizer_threads():  # the workers start (fork) on the first submit
                    pending.append(self._executor().submit(remote, b, *args))
                continue
            pending.append(self._pool.submit(remote, b, *args))
            while len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextlib.contextmanager
def _no_tokenizer_threads() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM=false`` while the workers fork: they inherit it (and say
    nothing about a fork after parallelism); this process keeps its setting."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def blocks(records: Iterable[Item], size: int = BLOCK) -> Iterator[list[Item]]:
    """``records`` in lists of ``size``."""
    block: list[Item] = []
    for r in records:
        block.append(r)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block
