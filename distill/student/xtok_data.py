"""The student's data for cross-tokenizer training (``student.tokenizer`` with ``loss.alm`` /
``loss.xkl``): each stored sample's record, rendered by the student's tokenizer and aligned to
the teacher's stored tokens, batched for :mod:`distill.student.xtok_terms`.

Per sample (CPU, in the loader's collate): the dataset record is re-read by its key
(``<stem>-<line>``), rendered with the student's chat template, its assistant contents cut to
the lengths the teacher stored (the teacher may have truncated), tokenised and aligned once
(:func:`distill.data.align.align`). A batch holds the student's own ids and CE rows (its
assistant tokens), each CE row's ALM chunk (ids offset per sample), the teacher's chunk
log-likelihoods and completeness, and the teacher's stored target rows at the exact pairs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.align import (
    align,
    chunk_logprobs,
    chunk_rows,
    rendered_contents,
    target_pairs,
    tokens_with_offsets,
)
from distill.data.dataset import key
from distill.data.encode import parse
from distill.data.records import iter_split
from distill.errors import DistillError
from distill.format.shards import TargetSample
from distill.sources import open_split


@dataclass
class XSample:
    """One sample on the student's side (numpy, built by :func:`student_sample`)."""

    key: str
    input_ids: np.ndarray  # [T] int64, the student's tokens
    ce_pos: np.ndarray  # [n] positions j whose next token is an assistant token
    row_chunk: np.ndarray  # [n] the chunk of token j + 1, -1: none
    chunk_lp: np.ndarray  # [C] the teacher's chunk log-likelihoods
    complete: np.ndarray  # [C] bool: complete on both sides
    pair_pos: np.ndarray  # [P] student positions of the exact pairs at target rows
    pair_ids: np.ndarray  # [P, k] the teacher's stored target ids at those rows
    pair_lp: np.ndarray  # [P, k] and their log-probs


@dataclass
class XBatch:
    """A padded batch of :class:`XSample`; the student's body reads ``input_ids`` and
    ``attention_mask`` as from a :class:`~distill.student.loader.Batch`."""

    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    ce_index: torch.Tensor  # [N] long, flat indices into [B * T] of the CE rows
    labels: torch.Tensor  # [N] long, the student's own next tokens there
    row_chunk: torch.Tensor  # [N] long, global chunk ids (offset per sample), -1: none
    chunk_lp: torch.Tensor  # [C] float32
    complete: torch.Tensor  # [C] bool
    pair_index: torch.Tensor  # [P] long, flat indices into [B * T]
    pair_ids: torch.Tensor  # [P, k] long
    pair_lp: torch.Tensor  # [P, k] float32
    keys: list[str]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: str) -> XBatch:
        moved = {
            f: getattr(self, f).to(device, non_blocking=True)
            for f in self.__dataclass_fields__
            if f != "keys"
        }
        return XBatch(**moved, keys=self.keys)


class RecordIndex:
    """A split's records by sample key. A plain JSONL file is indexed by its lines' byte
    offsets (8 bytes a line, not the records: a 1B-token split stays tens of MB) and a line is
    read with ``os.pread`` when its sample comes (no shared file position: safe in forked
    loader workers); a compressed or Parquet file cannot be read at an offset, so its records
    are held as read."""

    def __init__(self, spec: str, scratch: Path) -> None:
        files = open_split(spec, scratch)
        self.files = {f.stem: f for f in files}
        self.offsets: dict[str, np.ndarray] = {}
        self.fds: dict[str, int] = {}
        for f in files:
            if not (f.parquet or f.compression):
                self.offsets[f.stem] = line_offsets(f.path)
                self.fds[f.stem] = os.open(f.path, os.O_RDONLY)
        held = [f for f in files if f.stem not in self.offsets]
        self.raw: dict[str, tuple[int, str, Any]] = {}
        for r in iter_split(held):
            self.raw[key(held[r.file].stem, r.n)] = (r.n, r.where, r.raw)

    def messages(self, k: str) -> list[dict[str, str]]:
        if k in self.raw:
            n, where, raw = self.raw[k]
            return parse(raw, n, where)
        stem, _, num = k.rpartition("-")
        off = self.offsets.get(stem)
        n = int(num) if num.isdigit() else 0
        line = b""
        if off is not None and 1 <= n < len(off):
            line = os.pread(self.fds[stem], int(off[n] - off[n - 1]), int(off[n - 1]))
        if not line.strip():
            raise DistillError(
                f"sample {k} of the shard set is not in the job's dataset; cross-tokenizer "
                "training re-reads each record: train with the data the teacher read"
            )
        return parse(line, n, self.files[stem].where(n))


def line_offsets(path: Path) -> np.ndarray:
    """[lines + 1] int64: where each line of ``path`` starts (line n: ``[o[n-1], o[n])``)."""
    starts = [0]
    with path.open("rb") as fh:
        for raw in fh:
            starts.append(starts[-1] + len(raw))
    return np.asarray(starts, dtype=np.int64)


def student_sample(s: TargetSample, messages: list[dict[str, str]], tok: Any) -> XSample:
    """Render, cut, tokenise and align one sample (see the module docstring)."""
    if not s.aligned or s.token_logprobs is None or s.content_spans is None:
        raise DistillError(f"sample {s.key} has no alignment fields (targets.alignment)")
    text, turns, full = rendered_contents(tok, messages, s.key)
    t_sp = [(int(a), int(b)) for a, b in s.content_spans.tolist()]
    # the teacher may have truncated: keep its turns and lengths
    spans = [(a, a + (tb - ta)) for (a, _), (ta, tb) in zip(full, t_sp, strict=False)]
    cut = len(spans) < len(full) or any(b < e for (_, b), (_, e) in zip(spans, full, strict=False))
    ids, off = tokens_with_offsets(tok, text)
    if cut:  # up to the teacher's cut (no content kept: up to the first turn)
        end = spans[-1][1] if spans else turns[0][0]
        keep = off[:, 0] < end
        ids, off = ids[keep], off[keep]
    mask = np.zeros(len(ids), dtype=np.uint8)
    for lo, hi in turns[: len(spans)]:
        mask[(off[:, 0] >= lo) & (off[:, 0] < hi)] = 1
    al = align(s.token_offsets, t_sp, off, spans)
    ce_pos = np.flatnonzero(mask[1:])
    _, _, complete_s = chunk_rows(al.student_chunk, mask, al.n_chunks)
    sums, complete_t = chunk_logprobs(al.teacher_chunk, s.token_logprobs, s.loss_mask, al.n_chunks)
    j, r = target_pairs(al, mask, s.loss_mask)
    return XSample(
        key=s.key,
        input_ids=ids,
        ce_pos=ce_pos,
        row_chunk=al.student_chunk[ce_pos + 1],
        chunk_lp=sums,
        complete=complete_s & complete_t,
        pair_pos=j,
        pair_ids=s.target_ids[r].astype(np.int64),
        pair_lp=s.target_logprobs[r].astype(np.float32),
    )


def collate_x(samples: Sequence[XSample], pad_id: int = 0) -> XBatch:
    """Pad the student's ids; flatten the rows, offsetting positions and chunk ids."""
    t = max(1, max(len(s.input_ids) for s in samples))
    b = len(samples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, t), dtype=torch.long)
    ce, labels, rc, pairs = [], [], [], []
    c0 = 0
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.from_numpy(s.input_ids)
        attn[i, :n] = 1
        ce.append(i * t + s.ce_pos)
        labels.append(s.input_ids[s.ce_pos + 1])
        rc.append(np.where(s.row_chunk >= 0, s.row_chunk + c0, -1))
        pairs.append(i * t + s.pair_pos)
        c0 += len(s.chunk_lp)
    k = max((s.pair_ids.shape[1] for s in samples if s.pair_ids.ndim == 2), default=1)

    def cat(parts: list[np.ndarray], dtype: Any) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(dtype))

    return XBatch(
        input_ids=ids,
        attention_mask=attn,
        ce_index=cat(ce, np.int64),
        labels=cat(labels, np.int64),
        row_chunk=cat(rc, np.int64),
        chunk_lp=cat([s.chunk_lp for s in samples], np.float32),
        complete=cat([s.complete for s in samples], bool),
        pair_index=cat(pairs, np.int64),
        pair_ids=cat([s.pair_ids.reshape(-1, k) for s in samples], np.int64),
        pair_lp=cat([s.pair_lp.reshape(-1, k) for s in samples], np.float32),
        keys=[s.key for s in samples],
    )


class StudentCollate:
    """The loader's ``collate_fn`` for cross-tokenizer training: stored samples -> XBatch."""

    def __init__(self, records: RecordIndex, tokenizer: Any, pad_id: int = 0) -> None:
        self.records, self.tokenizer, self.pad_id = records, tokenizer, pad_id

    def __call__(self, samples: Sequence[TargetSample]) -> XBatch:
        xs = [student_sample(s, self.records.messages(s.key), self.tokenizer) for s in samples]
        return collate_x(xs, self.pad_id)
