"""teacher-cloud's inputs for datasets of several files and gs:// datasets: local files staged
with their layout, gs:// passed through as is, and the dataset digest in the VM's job, so the
VM fingerprints its job as the controller expects without reading a byte of the dataset."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
from helpers import make_job
from rich.console import Console

from distill import models
from distill.cloud.session import check_datasets
from distill.cloud.staging import expected_fingerprints, stage_inputs, staged_disk_gb
from distill.config import Job, load_job
from distill.errors import DistillError
from distill.shardset import split_fingerprints
from distill.sources import digest
from distill.store.storage import open_store

QUIET = Console(quiet=True)


def vm_job(raw: dict, at: Path) -> Job:
    """The VM's job file as the VM loads it (its paths relative to its own directory)."""
    from distill.cloud.staging import vm_job_toml

    at.mkdir(parents=True, exist_ok=True)
    (at / "job.toml").write_text(vm_job_toml(raw))
    return load_job(at / "job.toml")


def test_a_directory_is_staged_with_its_layout_and_its_digest(tiny_teacher_dir, tmp_path):
    path = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "out"), n_train=20)
    d = tmp_path / "parts"
    (d / "b").mkdir(parents=True)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    (d / "a.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (d / "b" / "c.jsonl").write_text("\n".join(lines[10:]) + "\n")
    job = load_job(path, [f'data.train="{d}"'])
    raw, inputs = stage_inputs(job, QUIET, gpu=False)
    assert raw["data"]["train"] == "data/train"
    assert raw["data"]["eval"] == "data/eval/eval.jsonl"  # one file: as before
    assert [dest for _, dest in inputs][:3] == [
        "data/train/a.jsonl",
        "data/train/b/c.jsonl",
        "data/eval/eval.jsonl",
    ]
    assert raw["data"]["dataset_sha256"] == {
        "train": digest(str(d)),
        "eval": digest(str(tmp_path / "eval.jsonl")),
    }
    # the VM's staged copies, and the fingerprint it computes equals the controller's
    vm = tmp_path / "vm"
    for src, dest in inputs[:3]:
        (vm / dest).parent.mkdir(parents=True, exist_ok=True)
        name = src.rsplit("/", 1)[1]
        shutil.copy(tmp_path / "out" / "inputs" / name, vm / dest)
    shutil.copytree(tiny_teacher_dir, vm / "model")
    on_vm = vm_job(raw, vm)
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(tiny_teacher_dir))
    assert split_fingerprints(on_vm, tiny_teacher_dir, tok_fp) == expected_fingerprints(job)
    assert digest(str(vm / "data" / "train")) == digest(str(d))  # same names, same bytes


def test_a_gs_dataset_is_passed_through_and_fingerprinted_from_its_listing(
    tiny_teacher_dir, gcs_bucket, tmp_path, monkeypatch
):
    path = make_job(tmp_path, tiny_teacher_dir, f"{gcs_bucket}/run", n_train=20)
    store = open_store(f"{gcs_bucket}/data")
    store.put_file("train/part-0.jsonl", tmp_path / "train.jsonl")
    job = load_job(path, [f'data.train="{gcs_bucket}/data/train"'])
    raw, inputs = stage_inputs(job, QUIET, gpu=False)
    assert raw["data"]["train"] == f"{gcs_bucket}/data/train"
    assert not any("part-0" in dest for _, dest in inputs)  # not copied through this machine
    assert not any(n.endswith("part-0.jsonl") for n in open_store(f"{gcs_bucket}/run").list())
    want = expected_fingerprints(job)

    def no_download(*a, **k):
        raise AssertionError("the dataset was read to fingerprint it")

    monkeypatch.setattr(type(store), "download", no_download)
    monkeypatch.setattr(type(store), "read_bytes", no_download)
    assert expected_fingerprints(job) == want  # from the bucket's listing alone
    shutil.copytree(tiny_teacher_dir, tmp_path / "vm" / "model")
    (tmp_path / "vm" / "data" / "eval").mkdir(parents=True)
    shutil.copy(tmp_path / "eval.jsonl", tmp_path / "vm" / "data" / "eval" / "eval.jsonl")
    on_vm = vm_job(raw, tmp_path / "vm")
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(tiny_teacher_dir))
    assert split_fingerprints(on_vm, tiny_teacher_dir, tok_fp) == want
    assert staged_disk_gb(job) > 0


def test_the_controller_checks_every_line_of_every_split_first(tiny_teacher_dir, tmp_path):
    path = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "out"), n_train=30)
    check_datasets(load_job(path))  # the demo lines are fine
    lines = (tmp_path / "eval.jsonl").read_text().splitlines()
    lines[4] = "{oops"
    lines[9] = json.dumps({"prompt": "p", "response": ""})
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DistillError) as e:
        check_datasets(load_job(path))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'eval.jsonl'}: 2 invalid lines:")
    assert "eval.jsonl:5: malformed JSON" in msg and "eval.jsonl:10: no assistant turn" in msg
    check_datasets(load_job(path, ['data.on_invalid="skip"']))


def test_the_vm_job_round_trips_the_digest(tmp_path):
    raw = {"data": {"train": "x.jsonl", "dataset_sha256": {"train": "0" * 64}}}
    (tmp_path / "j.toml").write_text(
        "[data]\ntrain = 'x.jsonl'\n[data.dataset_sha256]\ntrain = '" + "0" * 64 + "'\n"
    )
    assert load_job(tmp_path / "j.toml").data.dataset_sha256 == {"train": "0" * 64}
    assert tomllib.loads((tmp_path / "j.toml").read_text())["data"] == raw["data"]
    (tmp_path / "j.toml").write_text("[data]\ntrain = 'x'\ndataset_sha256 = {train = 'abc'}\n")
    with pytest.raises(DistillError, match=r"dataset_sha256.train = .abc.: .*64 lowercase"):
        load_job(tmp_path / "j.toml")


def test_a_fanout_task_reads_a_gs_split_through_the_record_index(
    tiny_teacher_dir, gcs_bucket, tmp_path
):
    """teacher-cloud --vms N: the controller's checks index each split; the job names the
    index (its fingerprint does not change); a task (1 of 2) stages no data file and gets
    exactly its shards' samples, as a run over the whole split gives them."""
    import gzip

    from distill.shardset import Part
    from distill.teacher.batching import prepare_split

    path = make_job(tmp_path, tiny_teacher_dir, f"{gcs_bucket}/run", n_train=40)
    lines = (tmp_path / "train.jsonl").read_text().splitlines(keepends=True)
    store = open_store(f"{gcs_bucket}/data")
    (tmp_path / "a.jsonl").write_text("".join(lines[:25]))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress("".join(lines[25:]).encode()))
    store.put_file("train/a.jsonl", tmp_path / "a.jsonl")
    store.put_file("train/b.jsonl.gz", tmp_path / "b.jsonl.gz")
    sets = [f'data.train="{gcs_bucket}/data/train"', "teacher.samples_per_shard=5"]
    job = load_job(path, sets)
    indexes = check_datasets(job, index=True)
    assert [f.records for f in indexes["train"].files] == [25, 15]
    raw, inputs = stage_inputs(job, QUIET, gpu=False, indexes=indexes)
    assert not any(dest.startswith("data/") for _, dest in inputs)  # eval is read in place too
    url = raw["data"]["record_index"]["train"]
    assert url.startswith(f"{gcs_bucket}/run/inputs/records-")
    again, _ = stage_inputs(job, QUIET, gpu=False, indexes=indexes)  # create-only, same name
    assert again["data"]["record_index"] == raw["data"]["record_index"]
    shutil.copytree(tiny_teacher_dir, tmp_path / "vm" / "model")
    on_vm = vm_job(raw, tmp_path / "vm")
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(tiny_teacher_dir))
    assert split_fingerprints(on_vm, tiny_teacher_dir, tok_fp) == expected_fingerprints(job)
    tok = models.load_tokenizer(tiny_teacher_dir)
    part = prepare_split(
        on_vm,
        "unused",
        tok,
        tmp_path / "t",
        Part(1, 2),
        url,
        raw["data"]["dataset_sha256"]["train"],
    )
    whole = prepare_split(job, job.data.train, tok, tmp_path / "w")
    mine = [s for i, s in enumerate(whole.chunks()) if i % 2 == 1]
    assert [[x.key for x in c] for c in part.chunks()][1::2] == [[x.key for x in c] for c in mine]
    assert all(not c for c in list(part.chunks())[0::2])
    assert part.read.startswith("read ") and "1 of 1 compressed or Parquet files" in part.read
    with pytest.raises(DistillError, match="indexes another dataset"):
        prepare_split(on_vm, "unused", tok, tmp_path / "x", Part(0, 2), url, "0" * 64)


def test_a_dataset_changed_between_the_checks_and_the_staging_is_refused(
    tiny_teacher_dir, tmp_path
):
    path = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "out"), n_train=20)
    job = load_job(path)
    indexes = check_datasets(job, index=True)
    with (tmp_path / "train.jsonl").open("a") as f:  # edited after the checks read it
        f.write(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(DistillError, match="changed while teacher-cloud was checking it"):
        stage_inputs(job, QUIET, gpu=False, indexes=indexes)
    assert not open_store(str(tmp_path / "out")).list("inputs/")  # nothing staged
