"""A shard set in a bucket, as the teacher writes it and the controllers read it: no torch.

One split's shard set is a directory (``<job.output>/<split>/``) of create-only objects:

- ``run.json``: the job fingerprint of the run that claimed the directory
  (:func:`claim_output`); a rerun of another job is refused (:func:`check_same_job`);
- ``shard-NNNNNN.tar`` and its stats sidecar ``shard-NNNNNN.json`` (:func:`sidecar_name`),
  written in that order, so a sidecar means its shard is complete;
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

from distill.config import Job, splits
from distill.errors import DistillError
from distill.format.manifest import MANIFEST, Manifest
from distill.format.shards import shard_name
from distill.store.cache import sha256_file
from distill.store.storage import ObjectExists, Store

RUN_INFO = "run.json"  # the job fingerprint of the run that claimed the directory
PARTS = "parts.json"  # a fan-out task's manifest without its shards: finish_split completes it
TASK_SECONDS = "task-seconds/"  # a fan-out task attempt's compute time (put_task_seconds)
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


def job_fingerprint(job: Job, split: str, dataset: Path, teacher_dir: Path, tok_fp: str) -> str:
    """Everything that decides a shard set's bytes; a rerun must match it to resume.

    ``tok_fp``: the tokenizer's fingerprint (:func:`distill.models.tokenizer_fingerprint`,
    which needs the tokenizer loaded); the rest is hashed from the job and files."""
    keys = {
        "split": split,
        "dataset_sha256": sha256_file(dataset),
        "teacher": job.teacher.model,
        "teacher_config_sha256": sha256_file(teacher_dir / "config.json"),
        "tokenizer": tok_fp,
        "dtype": job.teacher.dtype,
        "targets": job.targets.fingerprint(),
        "data": {
            # on_invalid is left out: it decides whether a run may go on, not what a valid
            # line's bytes are (the dataset's sha256 already covers its lines)
            k: v
            for k, v in job.data.model_dump().items()
            if k not in ("train", "eval", "on_invalid")
        },
        "samples_per_shard": job.teacher.samples_per_shard,
        # quantised weights give other targets; teacher.mode does not (same batches, same ops)
        **({"quantize": job.teacher.quantize} if job.teacher.quantize != "none" else {}),
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def split_fingerprints(job: Job, teacher_dir: Path, tok_fp: str) -> dict[str, str]:
    """Each split's :func:`job_fingerprint`."""
    return {
        split: job_fingerprint(job, split, path, teacher_dir, tok_fp)
        for split, path in splits(job).items()
    }


def sidecar_name(name: str) -> str:
    """``shard-NNNNNN.json``: the stats sidecar of shard ``name`` (``shard-NNNNNN.tar``)."""
    return name.replace(".tar", ".json")


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
    raw = {
        **parts["manifest"],
        "shards": shards,
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
