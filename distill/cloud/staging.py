"""What a teacher VM needs before it starts: its inputs in the bucket, its job file.

A local dataset (and a local teacher directory) are uploaded once under ``<output>/inputs/``,
content-addressed and create-only (the teacher's files in parallel, with a progress bar); a
``gs://`` dataset is not copied: the VM reads it from its bucket. A Hub (``hf:``) or bucket
(``gs://``) teacher is not copied through this machine at all: the job names it pinned
(:func:`pin_teacher`) and the VMs fetch it (:mod:`distill.cloud.checkpoint_copy`). The VM's job
file points at the staged copies (or the ``gs://`` URL), carries each split's dataset digest
(``data.dataset_sha256``: the VM fingerprints its job without reading the dataset), names the
staged teacher as the VM computes its fingerprint, and asks for the GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.checkpoints import COPY_STREAMS, checkpoint_bytes, parse_source
from distill.cloud.pricing import ASSUMED_UPLINK_BYTES_PER_S
from distill.cloud.spec import boot_disk_gb
from distill.config import Job
from distill.errors import DistillError
from distill.shardset import split_fingerprints
from distill.sources import digest, file_sha256, is_remote, list_files, staged_bytes
from distill.store.storage import ObjectExists, open_store


def stage_inputs(
    job: Job,
    console: Console,
    gpu: bool = True,
    project: str = "",
    indexes: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], tuple[tuple[str, str], ...]]:
    """Upload the dataset (and a local teacher directory) under ``<output>/inputs/``.

    Returns the VM's job table (paths pointing at the staged copies) and the
    ``(src, dest)`` pairs for the VM spec (src: ``gs://...``, or a pinned ``hf:`` / ``gs://``
    checkpoint); ``project``: a short ``cloud.hf_token_secret``'s. Names are content-addressed
    and writes are create-only, so a rerun uploads nothing twice. ``gpu``: the job runs on an
    L4, so it says ``teacher.device = "cuda"``: a VM whose GPU the teacher cannot see fails in
    seconds instead of running on the CPU, billed, until its max run duration. ``indexes``
    (a fan-out's, by split: :mod:`distill.data.record_index`): each is stored as
    ``inputs/records-<hash>.json``, the job names it in ``data.record_index``, and the tasks
    read the split's files where they are (staged or ``gs://``) instead of downloading them."""
    from distill.config import splits

    store = open_store(job.output.rstrip("/"))
    present = set(store.list("inputs/"))  # one listing, not one lookup per file

    def upload(name: str, path: Path) -> None:
        if name not in present:
            console.print(f"staging {path} -> {store.join(name)}")
            with contextlib.suppress(ObjectExists):  # a concurrent run staged it first
                store.put_file(name, path)

    raw = job.to_dict()
    inputs: list[tuple[str, str]] = []
    raw["data"]["dataset_sha256"] = {}
    indexes = indexes or {}
    if indexes:
        raw["data"]["record_index"] = {}
    for split, spec in splits(job).items():
        files = list_files(spec)
        # the VM fingerprints its job with the controller's digest, reading no dataset byte
        raw["data"]["dataset_sha256"][split] = digest(spec, files)
        if split in indexes and indexes[split].digest != raw["data"]["dataset_sha256"][split]:
            raise DistillError(
                f"{spec} changed while teacher-cloud was checking it (its files or their "
                "bytes differ from what the checks read): rerun teacher-cloud"
            )
        urls = {}
        if is_remote(spec):  # read by the VM from its bucket, as it is
            raw["data"][split] = spec
            urls = {f.name: f.url for f in files}
        else:
            for f in files:
                path = Path(f.url)
                name = f"inputs/{file_sha256(path)[:16]}-{path.name}"
                upload(name, path)
                urls[f.name] = store.join(name)
                if split not in indexes:  # else a task reads the staged copy where it is
                    # the same file name (sample keys use its stem); several files keep
                    # their layout
                    inputs.append((store.join(name), f"data/{split}/{f.name}"))
            one = len(files) == 1
            raw["data"][split] = f"data/{split}/{files[0].name}" if one else f"data/{split}"
        if split in indexes:
            raw["data"]["record_index"][split] = put_index(store, indexes[split].with_urls(urls))
    model = job.teacher.model
    source = parse_source(model)
    if source is not None:  # the VMs fetch it (a Hub model: into the bucket, once)
        if not source.pinned:
            raise DistillError(f"teacher.model {model!r} must be pinned before staging")
        inputs.append((source.ref, "model"))
        raw["teacher"]["model"] = "model"
        secret = job.cloud.hf_token_secret
        if secret:
            if not secret.startswith("projects/"):
                secret = f"projects/{project}/secrets/{secret}"
            raw["cloud"] = {"hf_token_secret": secret}
    elif not model.startswith("builtin:"):
        prefix = upload_model_dir(Path(model).expanduser(), store, present, console)
        raw["teacher"]["model"] = "model"
        inputs.append((store.join(prefix) + "/", "model"))
    if gpu:
        raw["teacher"]["device"] = "cuda"
    if "hf_token_secret" not in raw.get("cloud", {}):
        raw.pop("cloud", None)  # the VM needs none of it
    return raw, tuple(inputs)


def put_index(store: Any, index: Any) -> str:
    """Store a split's record index as ``inputs/records-<hash>.json`` (create-only,
    content-named: a rerun stores nothing new); its URL."""
    data = index.to_json()
    name = f"inputs/records-{hashlib.sha256(data).hexdigest()[:16]}.json"
    with contextlib.suppress(ObjectExists):
        store.put_bytes(name, data)
    return store.join(name)


def upload_model_dir(src: Path, store: Any, present: set[str], console: Console) -> str:
    """A local teacher directory under ``inputs/model-<hash>/`` (create-only, content-named by
    its files' names and sizes and its config), :data:`~distill.checkpoints.COPY_STREAMS`
    files at once, the time it should take said first; returns the prefix."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    files = sorted(p for p in src.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(src)}\0{p.stat().st_size}\0".encode())
    h.update((src / "config.json").read_bytes())
    prefix = f"inputs/model-{h.hexdigest()[:16]}"
    todo = [(f"{prefix}/{p.relative_to(src).as_posix()}", p) for p in files]
    todo = [(n, p) for n, p in todo if n not in present]
    if not todo:
        return prefix
    total = sum(p.stat().st_size for _, p in todo)
    console.print(
        f"uploading the teacher {src} to {store.join(prefix)}: {len(todo)} files, "
        f"{total / 1e9:,.2f} GB, {COPY_STREAMS} at once (about {_eta(total)} at "
        f"{ASSUMED_UPLINK_BYTES_PER_S * 8 / 1e6:,.0f} Mbit/s); a Hub model (hf:ORG/NAME) or a "
        "gs:// folder is never copied through this machine"
    )
    cols = (
        TextColumn("upload teacher"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*cols, console=console, transient=False) as bar:
        task = bar.add_task("upload", total=total)
        store.put_files(todo, COPY_STREAMS, lambda name, n: bar.advance(task, n))
    return prefix


def _eta(n: int) -> str:
    s = n / ASSUMED_UPLINK_BYTES_PER_S
    return f"{s / 3600:,.1f} h" if s >= 3600 else f"{s / 60:,.0f} min" if s >= 60 else f"{s:.0f} s"


def vm_teacher(model: str) -> str:
    """``teacher.model`` as the VM's job names it: a local directory, a Hub or bucket
    checkpoint are staged as ``model``."""
    return model if model.startswith("builtin:") else "model"


def pin_teacher(job: Job) -> Job:
    """``job`` with an ``hf:`` / ``gs://`` teacher pinned (a commit sha, a listing digest),
    so planning, every VM and every relaunch read the same weights; a gated or private Hub
    model without ``cloud.hf_token_secret`` is refused here, before anything is spent."""
    from distill.checkpoints import planning_dir, source_record

    if parse_source(job.teacher.model) is None:
        return job
    rec = source_record(planning_dir(job.teacher.model))
    assert rec is not None
    if rec.restricted and not job.cloud.hf_token_secret:
        raise DistillError(
            f"{rec.ref} is gated or private: the VMs need a Hub token. Put one in Secret "
            "Manager (`gcloud secrets create hf-token --data-file=-`), grant the teacher's "
            "service account access (infra/terraform/base: -var hf_token_secret=hf-token) and "
            'set cloud.hf_token_secret = "hf-token" in the job file'
        )
    teacher = job.teacher.model_copy(update={"model": rec.ref})
    return job.model_copy(update={"teacher": teacher})


def expected_fingerprints(job: Job) -> dict[str, str]:
    """Each split's job fingerprint as the teacher VM computes it (from its job: the staged
    teacher's name, the same dataset bytes, tokenizer and settings)."""
    from distill import models  # the tokenizer's fingerprint needs the tokenizer

    teacher_dir = models.resolve_model(job.teacher.model, weights=False)
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(teacher_dir))
    teacher = job.teacher.model_copy(update={"model": vm_teacher(job.teacher.model)})
    return split_fingerprints(job.model_copy(update={"teacher": teacher}), teacher_dir, tok_fp)


def staged_disk_gb(job: Job) -> int:
    """The boot disk for ``job``'s teacher VM: sized from the checkpoint's bytes (what each VM
    stages; a Hub or bucket checkpoint's from its listing) and the datasets'
    (:func:`~distill.cloud.spec.boot_disk_gb`)."""
    from distill import models
    from distill.config import splits

    checkpoint = checkpoint_bytes(models.resolve_model(job.teacher.model, weights=False))
    inputs = sum(staged_bytes(list_files(spec)) for spec in splits(job).values())
    return boot_disk_gb(checkpoint, inputs)


def vm_job_toml(raw: dict[str, Any]) -> str:
    import tomli_w

    header = "# Written by distill-ctl teacher-cloud: the job as the teacher VM runs it.\n"
    return header + tomli_w.dumps(raw)
