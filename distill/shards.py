"""Shards: WebDataset tar files of per-sample sparse teacher targets.

Each sample ``KEY`` is one member ``KEY.targets.npz`` (uncompressed NumPy archive; one tar
header per sample instead of four) holding:

- ``input_ids``     [T]    token ids (uint16 when the vocab fits, else int32)
- ``loss_mask``     [T]    uint8, 1 = assistant token (a label)
- ``topk_ids``      [N, k] the teacher's top-k token ids at the N target positions
- ``topk_logprobs`` [N, k] float16 log-probabilities normalised over the full vocab

Target positions are the t with ``loss_mask[t + 1] == 1`` (position t predicts token t+1), in
order, so positions need not be stored. The tail mass is ``1 - sum(exp(topk_logprobs))``.
Tar members carry a fixed mtime, so the same samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from distill.errors import DistillError

FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs")
MEMBER = "targets.npz"


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


@dataclass
class TargetSample:
    key: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray

    def target_positions(self) -> np.ndarray:
        return np.flatnonzero(self.loss_mask[1:])

    def validate(self, where: str) -> None:
        n = int(self.loss_mask[1:].sum())
        ok = (
            self.input_ids.ndim == 1
            and self.loss_mask.shape == self.input_ids.shape
            and self.topk_ids.shape == self.topk_logprobs.shape
            and self.topk_ids.ndim == 2
            and self.topk_ids.shape[0] == n
        )
        if not ok:
            raise DistillError(
                f"{where}: sample {self.key} has inconsistent shapes "
                f"(input_ids {self.input_ids.shape}, loss_mask {self.loss_mask.shape}, "
                f"topk_ids {self.topk_ids.shape}, topk_logprobs {self.topk_logprobs.shape}); "
                "the shard is corrupt"
            )


@dataclass
class ShardStats:
    name: str
    samples: int
    tokens: int
    target_tokens: int
    nbytes: int
    sha256: str
    first_key: str
    last_key: str


def write_shard(path: Path, samples: Iterable[TargetSample]) -> ShardStats:
    """Write samples to a tar file at ``path`` and return its stats (including sha256)."""
    samples = list(samples)
    if not samples:
        raise ValueError("a shard needs at least one sample")
    with path.open("wb") as f:
        writer = wds.TarWriter(f, mtime=0.0)
        for s in samples:
            buf = io.BytesIO()
            np.savez(buf, **{k: getattr(s, k) for k in FIELDS})
            writer.write({"__key__": s.key, MEMBER: buf.getvalue()})
        writer.close()
    data = path.read_bytes()
    return ShardStats(
        name=path.name,
        samples=len(samples),
        tokens=sum(len(s.input_ids) for s in samples),
        target_tokens=sum(s.topk_ids.shape[0] for s in samples),
        nbytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        first_key=samples[0].key,
        last_key=samples[-1].key,
    )


def read_shard(path: Path) -> Iterator[TargetSample]:
    """Yield the samples of a local tar shard, validating each one."""
    try:
        with tarfile.open(path, "r|") as tf:  # streaming: members in write order
            for info in tf:
                key, _, suffix = info.name.partition(".")
                if suffix != MEMBER or not info.isfile():
                    raise DistillError(f"{path}: unexpected member {info.name!r}")
                data = tf.extractfile(info).read()  # type: ignore[union-attr]
                with np.load(io.BytesIO(data)) as z:
                    missing = [k for k in FIELDS if k not in z.files]
                    if missing:
                        raise DistillError(f"{path}: sample {key} lacks {', '.join(missing)}")
                    arrays = {k: z[k] for k in FIELDS}
                s = TargetSample(key=key, **arrays)
                s.validate(str(path))
                yield s
    except (tarfile.TarError, zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise DistillError(f"{path}: corrupt shard ({e})") from None


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"
