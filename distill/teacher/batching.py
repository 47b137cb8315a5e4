"""Teacher inputs: a split tokenized as the job says, then length-sorted samples grouped by a
token budget, right-padded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import Job
from distill.data.dataset import Sample, TokenizeStats, tokenize_file


def tokenize_split(job: Job, path: Path, tokenizer: Any) -> tuple[list[Sample], TokenizeStats]:
    """One split's samples with the job's length, truncation, sample cap and invalid-line rule
    (the teacher pass and the cost estimate must count the same tokens)."""
    stats = TokenizeStats()
    samples = tokenize_file(
        path,
        tokenizer,
        job.data.max_length,
        job.data.truncation,
        job.data.max_samples,
        stats,
        job.data.on_invalid,
    )
    return samples, stats


def token_budget_batches(
    lengths: Sequence[int], batch_tokens: int, min_fill: float = 0.9
) -> list[list[int]]:
    """Group indices, longest first, so that len(batch) * longest <= batch_tokens and no
    sample is shorter than ``min_fill`` x its batch's longest (bounding padding to ~10%)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        longest = lengths[batches[-1][0]] if batches else 0
        if (
            batches
            and (len(batches[-1]) + 1) * longest <= batch_tokens
            and lengths[i] >= min_fill * longest
        ):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad int arrays to a [B, T] long tensor and its attention mask."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), t), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.from_numpy(s.astype(np.int64))
        attn[b, : len(s)] = 1
    return ids, attn
