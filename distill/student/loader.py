"""Loader: samples from cached shards -> shuffled, padded student batches.

The order is a pure function of (seed, epoch): shards are permuted, then samples pass through
a seeded shuffle buffer. A resumed run skips the batches it already trained on and so sees
exactly what an uninterrupted run would have seen.

Under ``torchrun`` every rank walks the same global order, cut into global batches of
``world x batch_size`` samples; rank r takes the r-th slice of each. So ranks never overlap,
no sample is dropped, and all ranks take the same number of steps (a rank whose slice of the
last global batch is empty gets ``None`` and must still join the step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distill.format.manifest import Manifest
from distill.format.shards import TargetSample, read_shard
from distill.store.cache import ShardCache, ShardRef


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    target_mask: torch.Tensor  # [B, T] bool: position t has a teacher target for token t+1
    t_ids: torch.Tensor  # [N, k] long, N = target_mask.sum()
    t_logprobs: torch.Tensor  # [N, k] float32
    labels: torch.Tensor  # [N] long: the ground-truth token t+1
    keys: list[str]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: str) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.target_mask,
                    self.t_ids,
                    self.t_logprobs,
                    self.labels,
                )
            ),
            keys=self.keys,
        )


def collate(samples: Sequence[TargetSample], pad_id: int = 0) -> Batch:
    t = max(len(s.input_ids) for s in samples)
    b = len(samples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, t), dtype=torch.long)
    tmask = torch.zeros((b, t), dtype=torch.bool)
    labels = []
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        x = torch.from_numpy(s.input_ids.astype(np.int64))
        ids[i, :n] = x
        attn[i, :n] = 1
        m = torch.from_numpy(s.loss_mask[1:].astype(bool))
        tmask[i, : n - 1] = m
        labels.append(x[1:][m])
    return Batch(
        input_ids=ids,
        attention_mask=attn,
        target_mask=tmask,
        t_ids=torch.from_numpy(np.concatenate([s.target_ids.astype(np.int64) for s in samples])),
        t_logprobs=torch.from_numpy(
            np.concatenate([s.target_logprobs for s in samples]).astype(np.float32)
        ),
        labels=torch.cat(labels),
        keys=[s.key for s in samples],
    )


def shard_refs(manifest: Manifest) -> list[ShardRef]:
    return [ShardRef(name=s.name, sha256=s.sha256, nbytes=s.nbytes) for s in manifest.shards]


class ShardLoader:
    """Batches over one shard set, streamed through a ShardCache."""

    def __init__(
        self,
        manifest: Manifest,
        cache: ShardCache,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        collate_fn: Callable[[Sequence[TargetSample]], Batch] = collate,
    ) -> None:
        self.manifest = manifest
        self.cache = cache
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shuffle = shuffle
        self.rank, self.world = rank, world
        self.collate_fn = collate_fn
        self.wait_seconds = 0.0  # time spent producing batches (download, decode, collate)

    def __len__(self) -> int:
        return math.ceil(self.manifest.samples / (self.batch_size * self.world))

    def _samples(self, epoch: int) -> Iterator[TargetSample]:
        refs = shard_refs(self.manifest)
        if not self.shuffle:
            for path in self.cache.iter_local(refs):
                yield from read_shard(path, self.manifest.vocab_size)
            return
        rng = np.random.default_rng([self.seed, epoch])
        refs = [refs[i] for i in rng.permutation(len(refs))]
        buf: list[TargetSample] = []
        for path in self.cache.iter_local(refs):
            for s in read_shard(path, self.manifest.vocab_size):
                buf.append(s)
                if len(buf) >= self.shuffle_buffer:
                    yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[Batch | None]:
        """This rank's batches of an epoch, after skipping the first ``skip`` (exact resume)."""
        it = self._samples(epoch)
        index = 0
        b = self.batch_size
        while True:
            t0 = time.perf_counter()
            group = [s for _, s in zip(range(b * self.world), it, strict=False)]
            if not group:
                return
            if index >= skip:
                mine = group[self.rank * b : (self.rank + 1) * b]
                batch = self.collate_fn(mine) if mine else None
                self.wait_seconds += time.perf_counter() - t0
                yield batch
            index += 1
