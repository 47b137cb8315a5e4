"""Teacher inputs: a split tokenized as the job says, then length-sorted samples grouped by a
token budget, right-padded."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import Job
from distill.data.dataset import Sample, TokenizeStats
from distill.data.prepare import Prepared, Rules, prepare, tokenize_files
from distill.data.records import Select
from distill.shardset import Part
from distill.sources import open_split, open_split_indexed


def rules(job: Job) -> Rules:
    """The job's ``[data]`` rules for records -> samples."""
    d = job.data
    return Rules(d.max_length, d.truncation, d.max_samples, d.on_invalid, job.targets.alignment)


def prepare_split(
    job: Job,
    spec: str,
    tokenizer: Any,
    scratch: Path,
    part: Part | None = None,
    index_url: str = "",
    digest: str = "",
) -> Prepared:
    """One split as this run computes it: every shard, or ``part``'s (``s % N == i``): only
    those shards' records are read past counting, checked and tokenised, on every core, into
    a token store under ``scratch`` (:func:`~distill.data.prepare.prepare`). ``index_url``:
    the split's record index (``data.record_index``), made from the dataset of ``digest``."""
    per = job.teacher.samples_per_shard
    owns = None if part is None else (lambda i: part.owns(i // per))
    scratch.mkdir(parents=True, exist_ok=True)
    if index_url:  # a fan-out task: only the files and byte ranges of its shards are read
        select = Select(owns, job.data.max_samples)
        files, index, reads = open_split_indexed(
            index_url, digest, scratch, lambda lo, hi: select.any_in(lo, hi, per)
        )
        p = prepare(files, spec, tokenizer, rules(job), per, owns, scratch=scratch)
        p.read = reads.summary(index)
        return p
    files = open_split(spec, scratch)
    return prepare(files, spec, tokenizer, rules(job), per, owns, scratch=scratch)


def tokenize_split(
    job: Job, path: str | Path, tokenizer: Any
) -> tuple[list[Sample], TokenizeStats]:
    """One split's samples, all in memory, with the job's length, truncation, sample cap and
    invalid-line rule (the teacher pass and the cost estimate must count the same tokens)."""
    stats = TokenizeStats()
    with tempfile.TemporaryDirectory(prefix="distill-data-") as tmp:
        files = open_split(str(path), Path(tmp))
        samples = tokenize_files(files, str(path), tokenizer, rules(job), stats)
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
