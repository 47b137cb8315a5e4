"""Sequence packing: several samples per row, with no attention across samples.

``pack_collate`` fills rows of at most ``row_tokens`` tokens with whole samples, in the given
order (a new row starts when the next sample does not fit; a sample longer than ``row_tokens``
gets a row of its own). Because the order is kept, ``hidden[target_mask]`` (row-major) lines
up with ``t_ids``/``t_logprobs``/``labels`` exactly as in :func:`distill.student.loader.collate`.

Isolation comes from two tensors that the train step must both pass to the model::

    hidden = model.base_model(
        input_ids=b.input_ids,
        attention_mask=b.attention_mask,  # [B, 1, T, T] additive float mask
        position_ids=b.position_ids,      # [B, T], restarts at 0 for every sample
        use_cache=False,
    ).last_hidden_state

Transformers (5.x ``masking_utils``) returns a 4D ``attention_mask`` as-is, so the mask goes
straight to the attention kernel. It is additive (0 = attend, ``finfo(float32).min`` = blocked)
and not boolean, because ``eager`` attention *adds* the mask to the scores (a boolean mask is
silently wrong there) while ``sdpa`` accepts either; float32 also works for bfloat16 models and
under bfloat16 autocast. Padding tokens attend only to themselves, so no row of the mask is
fully blocked (no NaN), and no real token attends to padding.

``flash_attention_2`` ignores 4D masks: with it, pass ``attention_mask=None`` and
``position_ids`` only; transformers then detects the packed layout from the position resets
(padding has position 0, so each pad token is its own one-token sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distill.errors import DistillError
from distill.format.shards import TargetSample
from distill.student.loader import Batch

PAD_SEQ = -1  # seq_ids value of padding positions


@dataclass
class PackedBatch(Batch):
    """A :class:`Batch` whose rows hold several samples.

    ``attention_mask`` is the 4D additive block-diagonal causal mask ``[B, 1, T, T]`` (float32);
    ``position_ids`` ``[B, T]`` restart at 0 per sample (0 on padding); ``seq_ids`` ``[B, T]``
    numbers the samples of each row from 0 (``-1`` on padding). ``keys`` are in row-major order.
    """

    position_ids: torch.Tensor
    seq_ids: torch.Tensor

    @property
    def token_mask(self) -> torch.Tensor:
        """``[B, T]`` long, 1 on real tokens (the 2D mask an unpacked batch would have)."""
        return (self.seq_ids != PAD_SEQ).long()

    @property
    def tokens(self) -> int:
        return int((self.seq_ids != PAD_SEQ).sum())

    @property
    def padding(self) -> int:
        """Number of padding positions in the batch."""
        return self.seq_ids.numel() - self.tokens

    def to(self, device: str) -> PackedBatch:
        """Move to ``device``; the O(T^2) mask is rebuilt there rather than copied."""
        seq_ids = self.seq_ids.to(device, non_blocking=True)
        return PackedBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=block_causal_mask(seq_ids),
            target_mask=self.target_mask.to(device, non_blocking=True),
            t_ids=self.t_ids.to(device, non_blocking=True),
            t_logprobs=self.t_logprobs.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            keys=self.keys,
            position_ids=self.position_ids.to(device, non_blocking=True),
            seq_ids=seq_ids,
        )


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive ``[B, 1, T, T]`` mask from ``seq_ids`` ``[B, T]`` (``-1`` = padding).

    Query q may attend key k iff k <= q and both belong to the same sample; a padding query
    attends only to itself.
    """
    t = seq_ids.shape[1]
    pos = torch.arange(t, device=seq_ids.device)
    causal = pos[None, :] <= pos[:, None]  # [T(q), T(k)]
    same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, :, None] != PAD_SEQ)
    allowed = (same & causal) | torch.eye(t, dtype=torch.bool, device=seq_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Sample indices per row: in order, a new row when the next sample does not fit."""
    if row_tokens < 1:
        raise DistillError(f"row_tokens must be >= 1, got {row_tokens}")
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not rows or used + n > row_tokens:
            rows.append([i])
            used = n
        else:
            rows[-1].append(i)
            used += n
    return rows


def pack_collate(samples: Sequence[TargetSample], row_tokens: int, pad_id: int = 0) -> PackedBatch:
    """Pack ``samples`` (in order) into rows of at most ``row_tokens`` tokens.

    Rows are right-padded to the longest row, which is at most ``max(row_tokens, longest
    sample)``. Targets are concatenated in sample order, which is also row-major order.
    """
    if not samples:
        raise DistillError("pack_collate needs at least one sample")
    rows = pack_rows([len(s.input_ids) for s in samples], row_tokens)
    t = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long)
    seq = torch.full((b, t), PAD_SEQ, dtype=torch.long)
    tmask = torch.zeros((b, t), dtype=torch.bool)
    labels, order = [], []
    for r, row in enumerate(rows):
        off = 0
        for j, i in enumerate(row):
            s = samples[i]
            n = len(s.input_ids)
            x = torch.from_numpy(s.input_ids.astype(np.int64))
            ids[r, off : off + n] = x
            pos[r, off : off + n] = torch.arange(n)
            seq[r, off : off + n] = j
            m = torch.from_numpy(s.loss_mask[1:].astype(bool))
            tmask[r, off : off + n - 1] = m  # the last token never predicts the next sample
            labels.append(x[1:][m])
            order.append(s)
            off += n
    return PackedBatch(
        input_ids=ids,
        attention_mask=block_causal_mask(seq),
        target_mask=tmask,
        t_ids=torch.from_numpy(np.concatenate([s.target_ids.astype(np.int64) for s in order])),
        t_logprobs=torch.from_numpy(
            np.concatenate([s.target_logprobs for s in order]).astype(np.float32)
        ),
        labels=torch.cat(labels),
        keys=[s.key for s in order],
        position_ids=pos,
        seq_ids=seq,
    )
