"""How fast records become samples: the one-sample loop against the batched encoder on every
core (what bench/ times on a teacher VM's 8 vCPUs)."""

from __future__ import annotations

import time
from typing import Any

from distill.data.encode import Encoder, blocks, cores, encode_serial, items
from distill.data.records import DataFile, iter_split


def tokens_per_second(
    files: list[DataFile],
    tokenizer: Any,
    max_length: int,
    truncation: str = "right",
    workers: int = 0,
    serial: bool = True,
) -> dict[str, float]:
    """Tokens/s of ``files`` encoded one sample at a time in this process (``serial``; the
    loop before issue #22) and by :class:`~distill.data.encode.Encoder` on ``workers``
    processes (0: every core), the workers' start included. The records are read into memory
    first: neither time includes reading."""
    recs = list(items(iter_split(files)))
    out: dict[str, float] = {"records": len(recs), "workers": workers or cores()}
    if serial:
        t = time.perf_counter()
        done = encode_serial(tokenizer, recs, max_length, truncation)
        out["serial"] = _tokens(done) / (time.perf_counter() - t)
    t = time.perf_counter()
    with Encoder(tokenizer, int(out["workers"])) as enc:
        done = [r for bs in enc.encode(blocks(recs), max_length, truncation) for r in bs]
    out["parallel"] = _tokens(done) / (time.perf_counter() - t)
    out["tokens"] = _tokens(done)
    if serial:
        out["speedup"] = out["parallel"] / out["serial"]
    return out


def _tokens(done: list[Any]) -> int:
    return sum(len(r[1]) for r in done if len(r) == 4)
