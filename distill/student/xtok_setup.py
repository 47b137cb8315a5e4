"""Cross-tokenizer training's setup: the checks, the student's data path on the loader, and
the vocab map (built once from the teacher tokenizer stored with the shard set)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill import models
from distill.config import Job, splits
from distill.errors import DistillError
from distill.student.loader import ShardLoader
from distill.student.xtok_data import RecordIndex, StudentCollate
from distill.student.xtok_terms import vocab_map


def stored_teacher_tokenizer(loader: ShardLoader, dest: Path) -> Any:
    """The teacher tokenizer saved under ``tokenizer/`` in the shard set (targets.alignment)."""
    m, store = loader.manifest, loader.cache.store
    names = m.targets.get("tokenizer") or []
    if not m.targets.get("alignment") or not names:
        raise DistillError(
            f"{store.url} was written without targets.alignment (no token offsets, no teacher "
            "tokenizer): a student with its own tokenizer needs it; re-run the teacher with "
            "targets.alignment = true"
        )
    for name in names:
        store.download(name, dest / name)
    return models.load_tokenizer(dest / "tokenizer")


def cross_tokenizer_data(
    job: Job, loader: ShardLoader, tokenizer: Any, out: Path, world: int
) -> torch.Tensor:
    """Point ``loader`` at the student's data path (re-read, render, align: :mod:`xtok_data`);
    the vocab map [teacher vocab] int64."""
    if world > 1:
        raise DistillError("cross-tokenizer training runs in one process for now (no torchrun)")
    if job.train.packing:
        raise DistillError(
            "train.packing is not supported with student.tokenizer (cross-tokenizer) yet"
        )
    teacher_tok = stored_teacher_tokenizer(loader, out / "teacher-tokenizer")
    records = RecordIndex(splits(job)["train"], out / "records")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader.collate_fn = StudentCollate(records, tokenizer, pad)
    return vocab_map(teacher_tok, tokenizer, loader.manifest.vocab_size)
