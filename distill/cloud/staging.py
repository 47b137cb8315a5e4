"""What a teacher VM needs before it starts: its inputs in the bucket, its job file.

A local dataset (and a local teacher directory) are uploaded once under ``<output>/inputs/``,
content-addressed and create-only; a ``gs://`` dataset is not copied: the VM reads it from its
bucket. The VM's job file points at the staged copies (or the ``gs://`` URL), carries each
split's dataset digest (``data.dataset_sha256``: the VM fingerprints its job without reading
the dataset), names the staged teacher as the VM computes its fingerprint, and asks for the
GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

from rich.console import Console

from distill.cloud.spec import boot_disk_gb
from distill.config import Job
from distill.shardset import split_fingerprints
from distill.sources import digest, file_sha256, is_remote, list_files, staged_bytes
from distill.store.storage import ObjectExists, open_store


def stage_inputs(
    job: Job, console: Console, gpu: bool = True
) -> tuple[dict[str, Any], tuple[tuple[str, str], ...]]:
    """Upload the dataset (and a local teacher directory) under ``<output>/inputs/``.

    Returns the VM's job table (paths pointing at the staged copies) and the
    ``(gs://src, dest)`` pairs for the VM spec. Names are content-addressed and writes are
    create-only, so a rerun uploads nothing twice. ``gpu``: the job runs on an L4, so it says
    ``teacher.device = "cuda"``: a VM whose GPU the teacher cannot see fails in seconds instead
    of running on the CPU, billed, until its max run duration."""
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
    for split, spec in splits(job).items():
        files = list_files(spec)
        # the VM fingerprints its job with the controller's digest, reading no dataset byte
        raw["data"]["dataset_sha256"][split] = digest(spec, files)
        if is_remote(spec):  # read by the VM from its bucket, as it is
            raw["data"][split] = spec
            continue
        for f in files:
            path = Path(f.url)
            name = f"inputs/{file_sha256(path)[:16]}-{path.name}"
            upload(name, path)
            # the same file name (sample keys use its stem); several files keep their layout
            inputs.append((store.join(name), f"data/{split}/{f.name}"))
        raw["data"][split] = f"data/{split}/{files[0].name}" if len(files) == 1 else f"data/{split}"
    model = job.teacher.model
    if vm_teacher(model) != model:
        src = Path(model).expanduser()
        model_files = sorted(p for p in src.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for p in model_files:
            h.update(f"{p.relative_to(src)}\0{p.stat().st_size}\0".encode())
        h.update((src / "config.json").read_bytes())
        prefix = f"inputs/model-{h.hexdigest()[:16]}"
        for p in model_files:
            upload(f"{prefix}/{p.relative_to(src).as_posix()}", p)
        raw["teacher"]["model"] = vm_teacher(model)
        inputs.append((store.join(prefix) + "/", "model"))
    if gpu:
        raw["teacher"]["device"] = "cuda"
    raw.pop("cloud", None)  # the VM needs none of it
    return raw, tuple(inputs)


def vm_teacher(model: str) -> str:
    """``teacher.model`` as the VM's job names it: a local directory is staged as ``model``."""
    return model if model.startswith(("builtin:", "gs://")) else "model"


def expected_fingerprints(job: Job) -> dict[str, str]:
    """Each split's job fingerprint as the teacher VM computes it (from its job: the staged
    teacher's name, the same dataset bytes, tokenizer and settings)."""
    from distill import models  # the tokenizer's fingerprint needs the tokenizer

    teacher_dir = models.resolve_model(job.teacher.model)
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(teacher_dir))
    teacher = job.teacher.model_copy(update={"model": vm_teacher(job.teacher.model)})
    return split_fingerprints(job.model_copy(update={"teacher": teacher}), teacher_dir, tok_fp)


def staged_disk_gb(job: Job) -> int:
    """The boot disk for ``job``'s teacher VM: sized from the teacher directory's bytes (the
    checkpoint each VM stages) and the datasets' (:func:`~distill.cloud.spec.boot_disk_gb`)."""
    from distill import models
    from distill.config import splits

    teacher_dir = models.resolve_model(job.teacher.model)
    checkpoint = sum(p.stat().st_size for p in teacher_dir.rglob("*") if p.is_file())
    inputs = sum(staged_bytes(list_files(spec)) for spec in splits(job).values())
    return boot_disk_gb(checkpoint, inputs)


def vm_job_toml(raw: dict[str, Any]) -> str:
    import tomli_w

    header = "# Written by distill-ctl teacher-cloud: the job as the teacher VM runs it.\n"
    return header + tomli_w.dumps(raw)
