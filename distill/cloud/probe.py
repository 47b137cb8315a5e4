"""Shard bytes of a job's targets and codec, measured by writing probe samples for real.

The packed codecs' size depends on the teacher's distributions (how many distinct ids the
draws hit, how spread the ids are), so :func:`probe_sample_bytes` encodes synthetic samples of
the job's average shape with :func:`distill.format.shards.write_shard` itself. Their teacher
rows are Zipf-like, ``p ∝ rank^-ZIPF_S`` over a random permutation of the vocab per row; with
``ZIPF_S = 1.8``, N=50 draws hit ~12.0 (iid) / ~13.6 (systematic) distinct ids per row, as on
SmolLM2-135M-Instruct's demo targets (12.1 / 13.6, measured). Input ids are uniform random: a
real chat template that repeats in every sample compresses better under zstd than this.
"""

from __future__ import annotations

import functools
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.format.codec import Codec, ShardFormat, id_dtype
from distill.format.spec import TargetSpec
from distill.teacher.extract import draw_uniforms, extract_chunk

ZIPF_S = 1.8
MAX_PROBE_ROWS = 1024  # bounds the probe's time (~1 s at vocab 49k)


def probe_samples(
    spec: TargetSpec, vocab: int, tokens: int, targets: int, n: int, seed: int = 0
) -> list[Any]:
    """``n`` synthetic :class:`~distill.format.shards.TargetSample` of ``tokens`` tokens, the last
    ``targets`` of them assistant tokens, with Zipf-like teacher rows (module docstring)."""
    from distill.format.shards import TargetSample

    rng = np.random.default_rng(seed)
    profile = torch.from_numpy(-ZIPF_S * np.log(np.arange(1, vocab + 1, dtype=np.float64)))
    vdt = id_dtype(vocab)
    out = []
    for i in range(n):
        key = f"probe-{i:07d}"
        logits = torch.empty(targets, vocab, dtype=torch.float64)
        if targets:
            perm = torch.from_numpy(np.stack([rng.permutation(vocab) for _ in range(targets)]))
            logits.scatter_(1, perm, profile.expand(targets, -1))
        u = (
            torch.from_numpy(draw_uniforms(seed, key, targets, spec.draws))
            if spec.sampled
            else None
        )
        t = extract_chunk(logits.float(), spec, u)
        mask = np.zeros(tokens, np.uint8)
        mask[tokens - targets :] = 1
        out.append(
            TargetSample(
                key,
                rng.integers(0, vocab, tokens).astype(vdt),
                mask,
                t.ids.numpy().astype(vdt),
                t.values.numpy(),
                t.counts.numpy().astype(np.uint16) if spec.sampled else None,
            )
        )
    return out


def member_bytes(path: Path) -> int:
    """Bytes of a tar file's members, headers and block padding included (the archive's end
    and record padding excluded)."""
    with tarfile.open(path) as tf:
        return sum(m.offset_data - m.offset + m.size + -m.size % tarfile.BLOCKSIZE for m in tf)


@functools.cache
def probe_sample_bytes(
    spec: TargetSpec, codec: Codec, vocab: int, tokens: int, targets: int, samples: int
) -> float:
    """Bytes per sample (tar framing included, the archive's end excluded) of probe samples
    with ``tokens`` tokens and ``targets`` target positions each, ``samples`` to a shard."""
    from distill.format.shards import write_shard

    targets = max(int(targets), 0)
    tokens = max(int(tokens), targets + 1)
    n = max(1, min(int(samples), MAX_PROBE_ROWS // max(targets, 1)))
    fmt = ShardFormat(codec, spec, vocab)
    with tempfile.TemporaryDirectory(prefix="distill-probe-") as d:
        path = Path(d) / "probe.tar"
        write_shard(path, probe_samples(spec, vocab, tokens, targets, n), fmt)
        return member_bytes(path) / n
