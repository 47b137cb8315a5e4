"""The shard bytes a job will write: measured on a reference run with the same targets and
codec, else probe samples of the job's average shape through the real writer
(:mod:`distill.cloud.probe`)."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from distill.cloud.counting import DataCounts
from distill.config import Job
from distill.errors import DistillError


def shard_bytes_estimate(
    job: Job, data: DataCounts, vocab: int, reference_run: str | None = None
) -> tuple[int, str]:
    """(shard bytes, how they were found): measured on a reference run with the job's targets
    and codec (``reference_run``, else ``job.output`` when local), else probe samples."""
    ref = None
    if reference_run:
        ref = reference_bytes_per_target(reference_run, job)
        if ref is None:
            raise DistillError(
                f"--reference-run {reference_run}: no manifest with the job's targets "
                f"({job.targets.kind}, k={job.targets.k}) and codec there (or under train/, eval/)"
            )
    elif "://" not in job.output and Path(job.output).is_dir():
        ref = reference_bytes_per_target(job.output, job)
    if ref is None:
        nbytes, basis = probed_shard_bytes(job, data, vocab)
        if job.targets.alignment:  # the probe's samples carry no offsets: add them
            extra = (
                ALIGN_BYTES_PER_TARGET * data.target_tokens + ALIGN_BYTES_PER_TOKEN * data.tokens
            )
            nbytes += int(extra)
            basis += (
                f"; + targets.alignment: {ALIGN_BYTES_PER_TARGET:g} bytes/target token (the "
                f"actual token's float16 log-prob) + {ALIGN_BYTES_PER_TOKEN:g} bytes/token "
                "(offsets, spans; measured on the demo data)"
            )
        return nbytes, basis
    per_target, basis = ref
    return int(per_target * data.target_tokens), f"{per_target:,.1f} bytes/target token, {basis}"


# targets.alignment (#24) adds to a shard, per target position, the float16 log-prob of the
# actual next token and, per token, its Rice-coded character offsets and the content spans:
# 0.37 bytes a token measured on the demo data (tests/test_alignment_teacher.py)
ALIGN_BYTES_PER_TARGET = 2.0
ALIGN_BYTES_PER_TOKEN = 0.37


def _targets_info(job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """(target description, codec description) as a manifest records them."""
    t = job.targets
    spec = t.spec().info() if hasattr(t, "spec") else {"kind": t.kind, "k": t.k}
    codec = t.codec_spec().info() if hasattr(t, "codec_spec") else {"name": "npz", "version": 0}
    return spec, codec


def _same_targets(m: Any, job: Job) -> bool:
    spec, codec = _targets_info(job)
    recorded = getattr(m, "targets", None) or {"kind": m.target_kind, "k": m.width}
    keys = ("kind", "k", "top_p", "draws")
    same_kind = all(recorded.get(key) == spec.get(key) for key in keys)
    # iid and systematic draws hit different numbers of distinct ids: other bytes per row
    same_kind &= recorded.get("sampling", "iid") == spec.get("sampling", "iid")
    recorded_codec = getattr(m, "codec", None) or {"name": "npz", "version": 0}
    same_alignment = bool(recorded.get("alignment", False)) == job.targets.alignment
    return same_kind and recorded_codec == codec and same_alignment


def reference_bytes_per_target(url: str, job: Job) -> tuple[float, str] | None:
    """Bytes per target token of an existing run with the job's targets and codec: a shard set
    (``url/manifest.json``) or a job output holding ``train/`` and ``eval/`` shard sets."""
    from distill.format.manifest import MANIFEST, Manifest
    from distill.store.storage import open_store

    found = []
    for sub in ("", "train", "eval"):
        store = open_store(f"{url.rstrip('/')}/{sub}" if sub else url)
        if store.exists(MANIFEST):
            found.append(Manifest.from_json(store.read_bytes(MANIFEST), store.join(MANIFEST)))
            if not sub:
                break
    found = [m for m in found if _same_targets(m, job)]
    targets = sum(m.target_tokens for m in found)
    if not targets:
        return None
    where = ", ".join(sorted({m.split for m in found}))
    return sum(m.nbytes for m in found) / targets, f"measured: {url} ({where})"


def probed_shard_bytes(job: Job, c: DataCounts, vocab: int) -> tuple[int, str]:
    """Samples x the bytes of probe samples of the job's average shape, written with the
    job's targets and codec by the real shard writer (:mod:`distill.cloud.probe`)."""
    from distill.cloud.probe import ZIPF_S, probe_sample_bytes

    spec, codec = job.targets.spec(), job.targets.codec_spec()
    n = max(c.samples, 1)
    tokens, targets = round(c.tokens / n), round(c.target_tokens / n)
    per_sample = probe_sample_bytes(
        spec, codec, vocab, tokens, targets, job.teacher.samples_per_shard
    )
    end = 2 * tarfile.BLOCKSIZE
    total = int(c.samples * per_sample + c.shards * end)
    return total, (
        f"estimated: samples x {per_sample:,.0f} (probe samples of {tokens} tokens / {targets} "
        f"targets written as packed v{codec.version} by write_shard: random input ids, "
        f"Zipf-like teacher rows p ~ rank^-{ZIPF_S}) + shards x {end} (tar end) = "
        f"{total / max(c.target_tokens, 1):,.1f} bytes/target token; a chat template shared "
        "by all samples compresses further under zstd (measure with --reference-run)"
    )
