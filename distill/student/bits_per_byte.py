"""Held-out bits per byte of assistant text: a score that compares students across tokenizers.

Each record is rendered with the student's own chat template and tokenised whole (no
truncation); the scored tokens are those whose characters overlap an assistant turn's content
(stripped, as :func:`distill.data.align.rendered_contents` finds it), from the second token on;
bits per byte = the sum over them of ``-log2 q(token | prefix)`` / the UTF-8 bytes of those
contents, over all records. Template tokens, end-of-turn included, are not scored (the stop
decision is not measured). A byte-level BPE's first content token may carry the template's
space before it: a byte the denominator does not count, predictable from the template.

Used by ``distill-ctl eval`` for a student with its own tokenizer (the shards' held-out
metrics index the teacher's vocabulary) and by ``bench/cross_tokenizer.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.align import rendered_contents, tokens_with_offsets
from distill.data.encode import parse
from distill.data.records import iter_split
from distill.sources import open_split


def scored_tokens(
    tokenizer: Any, messages: list[dict[str, str]], where: str = "record"
) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids [T], scored [T] bool, content bytes): the rendered record's tokens, which of them
    overlap an assistant content, and the UTF-8 bytes of those contents."""
    text, _, spans = rendered_contents(tokenizer, messages, where)
    ids, off = tokens_with_offsets(tokenizer, text)
    scored = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        scored |= (off[:, 1] > a) & (off[:, 0] < b)
    if len(scored):
        scored[0] = False  # the first token has no prefix to predict it from
    nbytes = sum(len(text[a:b].encode("utf-8")) for a, b in spans)
    return ids, scored, nbytes


@torch.no_grad()
def bits_per_byte(
    model: Any, tokenizer: Any, records: Iterable[list[dict[str, str]]]
) -> dict[str, float]:
    """Held-out bits per byte of assistant text (module docstring), one record at a time:
    ``bpb``, and the ``bits``, ``bytes`` and ``tokens`` behind it."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bits = 0.0
    nbytes = tokens = 0
    for i, msgs in enumerate(records):
        ids, scored, nb = scored_tokens(tokenizer, msgs, f"held-out record {i + 1}")
        if len(ids) < 2:
            continue
        x = torch.from_numpy(ids)[None].to(device)
        logits = model(input_ids=x, use_cache=False).logits[0].double()
        logq = torch.log_softmax(logits[:-1], dim=-1)
        pos = torch.from_numpy(np.flatnonzero(scored[1:])).to(device)  # row j predicts j + 1
        bits += float(-logq[pos, x[0, pos + 1]].sum()) / math.log(2)
        nbytes += nb
        tokens += int(pos.numel())
    model.train(was_training)
    return {
        "bpb": bits / max(nbytes, 1),
        "bits": bits,
        "bytes": float(nbytes),
        "tokens": float(tokens),
        "bytes_per_token": nbytes / max(tokens, 1),
    }


def split_messages(spec: str, scratch: Path, limit: int = 0) -> Iterator[list[dict[str, str]]]:
    """The message lists of a dataset split (any format ``data.eval`` takes), the first
    ``limit`` records (0: all)."""
    for n, r in enumerate(iter_split(open_split(spec, scratch)), 1):
        yield parse(r.raw, r.n, r.where)
        if limit and n >= limit:
            return
