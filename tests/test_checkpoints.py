"""Teacher checkpoint references (distill/checkpoints.py): parsing, which files a checkpoint
loads, pinning a bucket folder, planning without the weights, and the estimate's rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill import checkpoints
from distill.checkpoints import (
    SOURCE_FILE,
    Source,
    checkpoint_bytes,
    checkpoint_files,
    parse_source,
    planning_dir,
    source_id,
)
from distill.config import load_job
from distill.errors import DistillError
from distill.store.storage import open_store

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("hf:Qwen/Qwen2.5-7B-Instruct", Source("hf", "Qwen/Qwen2.5-7B-Instruct", "")),
        (f"hf:org/name@{SHA}", Source("hf", "org/name", SHA)),
        ("hf:org/name@v1.0", Source("hf", "org/name", "v1.0")),
        ("gs://b/ckpt/7b/", Source("gs", "gs://b/ckpt/7b", "")),
        ("gs://b/ckpt@0123456789abcdef", Source("gs", "gs://b/ckpt", "0123456789abcdef")),
        ("gs://b/a@b/ckpt", Source("gs", "gs://b/a@b/ckpt", "")),  # '@' in a path: no pin
        ("builtin:smollm2-135m-instruct", None),
        ("/models/llama", None),
    ],
)
def test_references_parse(ref, want):
    assert parse_source(ref) == want


def test_pinned_means_a_commit_or_a_digest():
    assert Source("hf", "o/n", SHA).pinned and not Source("hf", "o/n", "main").pinned
    assert not Source("hf", "o/n", SHA[:7]).pinned  # a short sha is not a pin
    assert Source("gs", "gs://b/p", "0123456789abcdef").pinned
    assert Source("hf", "o/n", SHA).ref == f"hf:o/n@{SHA}"


@pytest.mark.parametrize("ref", ["hf:justaname", "hf:o/n@", "hf:o/n@a@b", "gs://bucket", "gs://b/"])
def test_malformed_references_are_refused_when_the_job_is_read(tmp_path, ref):
    with pytest.raises(DistillError, match="teacher.model"):
        parse_source(ref)
    job = tmp_path / "job.toml"
    job.write_text(f'[teacher]\nmodel = "{ref}"\n')
    with pytest.raises(DistillError, match="teacher.model"):
        load_job(job)


def test_a_secret_name_is_checked_when_the_job_is_read(tmp_path):
    job = tmp_path / "job.toml"
    for ok in ("hf-token", "projects/p-1/secrets/hf-token", "projects/p/secrets/t/versions/3"):
        job.write_text(f'[cloud]\nhf_token_secret = "{ok}"\n')
        assert load_job(job).cloud.hf_token_secret == ok
    for bad in ("hf token", "projects/p/hf", "hf-token/versions/2"):
        job.write_text(f'[cloud]\nhf_token_secret = "{bad}"\n')
        with pytest.raises(DistillError, match="cloud.hf_token_secret"):
            load_job(job)


def test_a_checkpoint_loads_its_top_level_weights_config_and_tokenizer():
    files = {
        "config.json": 700,
        "tokenizer.json": 2_000_000,
        "tokenizer_config.json": 4_000,
        "model-00001-of-00002.safetensors": 4_900_000_000,
        "model-00002-of-00002.safetensors": 1_100_000_000,
        "model.safetensors.index.json": 30_000,
        "pytorch_model.bin": 6_000_000_000,  # a second copy, not loaded beside safetensors
        "original/consolidated.00.pth": 6_000_000_000,
        "README.md": 9_000,
        "model.gguf": 4_000_000_000,
    }
    got = checkpoint_files(files, "hf:o/n")
    assert sorted(got) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert checkpoint_files({"config.json": 1, "pytorch_model.bin": 9}, "x") == {
        "config.json": 1,
        "pytorch_model.bin": 9,
    }
    with pytest.raises(DistillError, match="no config.json"):
        checkpoint_files({"sub/config.json": 1, "model.safetensors": 9}, "gs://b/p")
    with pytest.raises(DistillError, match="no \\*.safetensors"):
        checkpoint_files({"config.json": 1, "original/model.safetensors": 9}, "gs://b/p")


def upload_dir(src: Path, url: str) -> None:
    store = open_store(url)
    for p in sorted(src.rglob("*")):
        if p.is_file():
            store.put_file(p.relative_to(src).as_posix(), p)


def test_a_bucket_checkpoint_is_planned_from_its_small_files_and_pinned_by_its_listing(
    tiny_teacher_dir, gcs_bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    url = f"{gcs_bucket}/ckpt/tiny"
    upload_dir(tiny_teacher_dir, url)
    plan = planning_dir(url)
    weights = sorted(p.name for p in tiny_teacher_dir.glob("*.safetensors"))
    assert weights and not any(plan.glob("*.safetensors"))  # the weights stayed in the bucket
    assert (plan / "config.json").is_file() and (plan / "tokenizer.json").is_file()
    rec = json.loads((plan / SOURCE_FILE).read_text())
    assert set(weights) <= set(rec["files"])
    total = sum(p.stat().st_size for p in tiny_teacher_dir.iterdir() if p.is_file())
    assert checkpoint_bytes(plan) == total  # the disk and the estimate size the whole checkpoint
    pinned = source_id(plan)
    assert pinned is not None and pinned.startswith(f"{url}@")
    assert planning_dir(pinned) == plan  # the pin names the same cached folder

    # the folder rewritten (another checkpoint, same path): the pin no longer matches
    store = open_store(f"{gcs_bucket}/ckpt")
    store.put_bytes("tiny/extra.safetensors", b"\0" * 64)
    with pytest.raises(DistillError, match="changed since this run was planned"):
        checkpoints.pin(parse_source(pinned))


def test_a_bucket_folder_that_is_not_a_checkpoint_is_refused(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    open_store(f"{gcs_bucket}/notckpt").put_bytes("data.jsonl", b"{}\n")
    with pytest.raises(DistillError, match="no config.json at its top level"):
        planning_dir(f"{gcs_bucket}/notckpt")


def test_a_run_on_this_machine_fetches_the_whole_checkpoint_once(
    tiny_teacher_dir, gcs_bucket, tmp_path, monkeypatch
):
    """`distill-ctl teacher` here with a gs:// teacher: the weights come into the cache once,
    the same bytes, and the folder names its pin (what the fingerprint and manifest use)."""
    from distill.models import resolve_model

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    url = f"{gcs_bucket}/ckpt/tiny"
    upload_dir(tiny_teacher_dir, url)
    full = resolve_model(url)
    for p in tiny_teacher_dir.iterdir():
        if p.is_file():
            assert (full / p.name).read_bytes() == p.read_bytes(), p.name
    assert source_id(full) == source_id(resolve_model(url, weights=False))
    assert resolve_model(source_id(full)) == full  # cached by its pin: nothing fetched again
