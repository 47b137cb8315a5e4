"""A shard set in a bucket, as the teacher writes it and the controllers read it: no torch.

One split's shard set is a directory (``<job.output>/<split>/``) of create-only objects:

- ``run.json``: the job fingerprint of the run that claimed the directory
  (:func:`claim_output`); a rerun of another job is refused (:func:`check_same_job`);
- ``shard-NNNNNN.tar`` and its stats sidecar ``shard-NNNNNN.json`` (:func:`sidecar_name`),
  written in that order, so a sidecar means its shard is complete; before them, where some of
  the shard's lines were left out as invalid, ``skipped-NNNNNN.json`` (:func:`put_skipped`);
- a fan-out (Google Cloud Batch, task ``i`` of ``N``: :class:`Part`) adds ``parts.json`` (the
  manifest without its shards, :func:`put_parts`) and one ``task-seconds/`` object per task
  attempt (:func:`put_task_seconds`); :func:`finish_split` turns them and the sidecars into
  the manifest once every shard is there;
- ``manifest.json``, written last: the set is complete iff it exists (:func:`stored_manifest`).

:func:`job_fingerprint` is what decides a shard set's bytes. The teacher
(:mod:`distill.teacher.run`) writes this protocol; the cloud controllers and their watch loops
(:mod:`distill.cloud.controller`, :mod:`distill.cloud.fanout`, :mod:`distill.cloud.progress`)
read it without loading torch or transformers (import-linter's contract in pyproject.toml).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distill.checkpoints import source_id
from distill.config import Job, splits
from distill.data.dataset import MAX_REPORTED
from distill.errors import DistillError
from distill.format.manifest import MANIFEST, Manifest
from distill.format.shards import shard_name
from distill.sources import digest
from distill.store.cache import sha256_file
from distill.store.storage import ObjectExists, Store

RUN_INFO = "run.json"  # the job fingerprint of the run that claimed the directory
PARTS = "parts.json"  # a fan-out task's manifest without its shards: finish_split completes it
TASK_SECONDS = "task-seconds/"  # a fan-out task attempt's compute time (put_task_seconds)
SKIPPED = "skipped-"  # skipped-NNNNNN.json: a shard's lines left out as invalid (put_skipped)
_SIDECAR = re.compile(r"^shard-\d{6}\.json$")


@dataclasses.dataclass(frozen=True)
class Part:
    """Task ``index`` of ``count``: it computes the shards ``s`` with ``s % count == index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise DistillError(
                f"task {self.index} of {self.count}: the index must be in [0, count) "
                "(BATCH_TASK_INDEX / BATCH_TASK_COUNT)"
            )

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    @classmethod
    def from_env(cls) -> Part | None:
        """The Batch task's part (``BATCH_TASK_INDEX``/``BATCH_TASK_COUNT``), else None."""
        index, count = os.environ.get("BATCH_TASK_INDEX"), os.environ.get("BATCH_TASK_COUNT")
        if index is None and count is None:
            return None
        try:
            return cls(int(index or ""), int(count or ""))
        except ValueError:
            raise DistillError(
                f"BATCH_TASK_INDEX={index!r}, BATCH_TASK_COUNT={count!r}: both must be integers"
            ) from None


SHARDING = "record-ranges"  # shard s: records [s * per, (s + 1) * per) (distill.data.prepare)


def job_fingerprint(job: Job, split: str, dataset: str, teacher_dir: Path, tok_fp: str) -> str:
    """Everything that decides a shard set's bytes; a rerun must match it to resume.

    ``dataset``: the split's data (:func:`distill.config.splits`); its digest is the job's
    ``data.dataset_sha256`` (the controller's, in a VM's job) or :func:`distill.sources.digest`.
    ``tok_fp``: the tokenizer's fingerprint (:func:`distill.models.tokenizer_fingerprint`,
    which needs the tokenizer loaded); the rest is hashed from the job and files.

    With ``data.on_invalid = "skip"`` the shard rule is named too: a skipped line leaves a
    hole in its shard (records by range), where earlier versions moved the later samples up,
    so a partial set of the other rule is refused instead of mixed. Without skipping, both
    rules give the same shards and the fingerprint is unchanged."""
    data_digest = dict(job.data.dataset_sha256).get(split) or digest(dataset)
    keys = {
        "split": split,
        "dataset_sha256": data_digest,
        # a Hub or bucket checkpoint: its pin (commit sha, listing digest), wherever it sits
        "teacher": source_id(teacher_dir) or job.teacher.model,
        "teacher_config_sha256": sha256_file(teacher_dir / "config.json"),
        "tokenizer": tok_fp,
        "dtype": job.teacher.dtype,
        "targets": job.targets.fingerprint(),
        "data": {
            # on_invalid is left out: it decides whether a run may go on, not what a valid
            # line's bytes are (the dataset's digest already covers its lines)
            k: v
            for k, v in job.data.model_dump().items()
            if k not in ("train", "eval", "on_invalid", "dataset_sha256", "record_index")
        },
        "samples_per_shard": job.teacher.samples_per_shard,
        # quantised weights give other targets; teacher.mode does not (same batches, same ops)
        **({"quantize": job.teacher.quantize} if job.teacher.quantize != "none" else {}),
        **({"sharding": SHARDING} if job.data.on_invalid == "skip" else {}),
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def split_fingerprints(job: Job, teacher_dir: Path, tok_fp: str) -> dict[str, str]:
    """Each split's :func:`job_fingerprint`."""
    return {
        split: job_fingerprint(job, split, spec, teacher_dir, tok_fp)
        for split, spec in splits(job).items()
    }


def sidecar_name(name: str) -> str:
    """``shard-NNNNNN.json``: the stats sidecar of shard ``name`` (``shard-NNNNNN.tar``)."""
    return name.replace(".tar", ".json")


def skipped_name(idx: int) -> str:
    """``skipped-NNNNNN.json``: the lines of shard ``idx`` left out as invalid (only where some
    were), written before the shard, so a complete shard's skipped lines are in the bucket."""
    return f"{SKIPPED}{idx:06d}.json"


def put_skipped(store: Store, idx: int, lines: list[int | str]) -> None:
    """Record shard ``idx``'s skipped lines (create-only; every run writes the same)."""
    body = json.dumps({"count": len(lines), "first_lines": lines[:MAX_REPORTED]}).encode()
    with contextlib.suppress(ObjectExists):
        store.put_bytes(skipped_name(idx), body)


def skipped_lines(per_shard: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``skipped_lines`` from each shard's record, in shard order: their count
    and the first :data:`MAX_REPORTED` lines (empty when none were skipped)."""
    count = sum(int(r["count"]) for r in per_shard)
    first = [x for r in per_shard for x in r["first_lines"]][:MAX_REPORTED]
    return {"count": count, "first_lines": first} if count else {}


def is_sidecar(name: str) -> bool:
    """Whether ``name`` is a shard's stats sidecar (its shard is then complete)."""
    return _SIDECAR.match(name) is not None


def check_same_job(store: Store, what: str, found: str | None, fingerprint: str) -> None:
    """Refuse ``what`` in ``store`` whose job fingerprint is not ``fingerprint``."""
    if found != fingerprint:
        raise DistillError(
            f"{store.url} holds {what} from a different job or dataset (job fingerprint "
            f"{str(found)[:12]}, this job's {fingerprint[:12]}): choose another job.output "
            "(writes are create-only)"
        )


def claim_output(store: Store, fingerprint: str) -> None:
    """Write ``run.json`` (create-only), or check that a partial set there is this job's."""
    run_info = json.dumps({"job_fingerprint": fingerprint}).encode()
    try:
        store.put_bytes(RUN_INFO, run_info)
    except ObjectExists:
        found = json.loads(store.read_bytes(RUN_INFO)).get("job_fingerprint")
        check_same_job(store, "a partial shard set", found, fingerprint)


def stored_manifest(store: Store, fingerprint: str) -> Manifest | None:
    """The split's manifest if its shard set is complete; refused if it is another job's."""
    if not store.exists(MANIFEST):
        return None
    m = Manifest.from_json(store.read_bytes(MANIFEST), store.join(MANIFEST))
    check_same_job(store, "a complete shard set", m.job_fingerprint, fingerprint)
    return m


def put_parts(store: Store, base: Manifest, n: int) -> None:
    """``parts.json`` (create-only): the manifest but its shards, and how many there are."""
    body = {"shards_total": n, "manifest": json.loads(base.to_json())}
    with contextlib.suppress(ObjectExists):  # every task writes the same content
        store.put_bytes(PARTS, json.dumps(body, indent=1).encode())


def put_task_seconds(store: Store, part: Part, seconds: float) -> None:
    """This task attempt's compute seconds on the split, one object an attempt (create-only):
    :func:`finish_split` sums them into the manifest's ``teacher_seconds``."""
    name = f"{TASK_SECONDS}task-{part.index:04d}-{uuid.uuid4().hex[:12]}.json"
    body = {"task": part.index, "tasks": part.count, "seconds": seconds}
    store.put_bytes(name, json.dumps(body).encode())


def finish_split(store: Store, fingerprint: str) -> Manifest | None:
    """A fan-out's manifest from ``parts.json`` and the shard sidecars, written (create-only)
    once every shard is in the bucket; None while some are missing (or no task has started).
    A manifest or ``parts.json`` whose job fingerprint is not ``fingerprint`` (the job as the
    tasks run it) is refused: another job's shards never become this job's manifest.

    The shard stats are the sidecars the tasks wrote, so the manifest lists the same shards
    with the same bytes as a single run's; ``teacher_seconds`` is the tasks' compute time
    (every attempt's, preempted ones included: the sum of ``task-seconds/``)."""
    names = set(store.list())
    if MANIFEST in names:
        return stored_manifest(store, fingerprint)
    if PARTS not in names:
        return None
    parts = json.loads(store.read_bytes(PARTS))
    check_same_job(
        store, "a partial shard set", parts["manifest"].get("job_fingerprint"), fingerprint
    )
    wanted = [shard_name(i) for i in range(int(parts["shards_total"]))]
    if any(n not in names or sidecar_name(n) not in names for n in wanted):
        return None
    shards = [json.loads(store.read_bytes(sidecar_name(n))) for n in wanted]
    skipped = [json.loads(store.read_bytes(n)) for n in sorted(names) if n.startswith(SKIPPED)]
    raw = {
        **parts["manifest"],
        "shards": shards,
        "skipped_lines": skipped_lines(skipped),
        "teacher_seconds": sum(
            json.loads(store.read_bytes(n))["seconds"]
            for n in sorted(names)
            if n.startswith(TASK_SECONDS)
        ),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest = Manifest.from_json(json.dumps(raw).encode(), store.join(PARTS))
    with contextlib.suppress(ObjectExists):  # another controller finished it first
        store.put_bytes(MANIFEST, manifest.to_json())
    return manifest
