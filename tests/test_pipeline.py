"""End to end on a tiny random model with the real SmolLM2 tokenizer, every shard passing
through the real google-cloud-storage client and a local fake-gcs-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import dataset, dataset_keys, make_job, stored_keys

from distill.config import load_job
from distill.errors import DistillError
from distill.format.manifest import MANIFEST
from distill.store.storage import BucketNotFound, open_store
from distill.student import train as train_mod
from distill.student.train import train
from distill.teacher import run as teacher_mod
from distill.teacher.run import run_teacher


def test_teacher_train_eval_through_gcs(tiny_teacher_dir, tiny_student_dir, gcs_bucket, tmp_path):
    from google.cloud import storage
    from transformers import AutoModelForCausalLM

    from distill.student.report import compare_students, shard_set_stats

    job = load_job(make_job(tmp_path, tiny_teacher_dir, f"{gcs_bucket}/run"))
    manifests = run_teacher(job)
    assert stored_keys(f"{gcs_bucket}/run/train", tmp_path) == dataset_keys(
        tmp_path / "train.jsonl"
    )
    m = manifests["train"]
    assert (m.samples, m.width, m.vocab_size, len(m.shards)) == (96, 50, 49152, 6)  # 50 draws
    assert m.dtypes["target_ids"] == "uint16" and m.schema_version == 2
    # the default targets: 50 systematic draws in packed v2 blocks with zstd
    assert m.targets == {
        "kind": "sample",
        "draws": 50,
        "sampling": "systematic",
        "tail": False,
        "width": 50,
    }
    assert (m.codec["name"], m.codec["version"], m.codec["zstd"]) == ("packed", 2, True)
    # The objects really are in the emulated bucket, seen through the plain GCS client.
    client = storage.Client(
        project="t",
        credentials=__import__("google.auth.credentials").auth.credentials.AnonymousCredentials(),
    )
    names = {b.name for b in client.list_blobs(gcs_bucket[5:], prefix="run/train/")}
    assert {f"run/train/{s.name}" for s in m.shards} | {"run/train/manifest.json"} <= names

    _, stats = shard_set_stats(f"{gcs_bucket}/run/train", tmp_path / "c2")
    assert 0 < stats["mean_topk_mass"] <= 1 and stats["bytes_per_token"] > 0

    job = load_job(
        tmp_path / "job.toml",
        [
            'student.init="pretrained"',
            f'student.model="{tiny_student_dir}"',
            "loss.ce=0.0",
        ],
    )
    summary = train(job)
    assert summary["steps"] == 2 * 12
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert model.config.num_hidden_layers == 2
    result = compare_students(job, "Hello?", __import__("rich.console").console.Console(quiet=True))
    assert result["trained"]["kd"] < result["initialised"]["kd"]
    assert result["trained"]["target_tokens"] == manifests["eval"].target_tokens
    assert isinstance(result["answer"], str)


class Boom(KeyboardInterrupt):
    pass


def test_teacher_interrupted_then_rerun_has_every_sample_once(
    tiny_teacher_dir, gcs_bucket, tmp_path, monkeypatch
):
    job = load_job(make_job(tmp_path, tiny_teacher_dir, f"{gcs_bucket}/run"))
    real = teacher_mod.compute_targets
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Boom()
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_mod, "compute_targets", flaky)
    with pytest.raises(Boom):
        run_teacher(job)
    store = open_store(f"{gcs_bucket}/run/train")
    assert not store.exists(MANIFEST)
    done = [n for n in store.list() if n.endswith(".tar")]
    assert 1 <= len(done) <= 3
    monkeypatch.setattr(teacher_mod, "compute_targets", real)
    calls["n"] = 0
    run_teacher(job)
    assert stored_keys(f"{gcs_bucket}/run/train", tmp_path) == dataset_keys(
        tmp_path / "train.jsonl"
    )
    # A complete set is left alone; the same output for another dataset is refused.
    run_teacher(job)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DistillError, match="different job or dataset"):
        run_teacher(load_job(tmp_path / "job.toml"))


def test_shard_without_sidecar_is_recovered_from_its_bytes(tiny_teacher_dir, tmp_path):
    out = tmp_path / "out"
    job = load_job(make_job(tmp_path, tiny_teacher_dir, str(out)))
    run_teacher(job)
    want = (out / "train" / MANIFEST).read_text()
    # Simulate a crash between a shard's upload and its sidecar (and before the manifest).
    (out / "train" / MANIFEST).unlink()
    (out / "train" / "shard-000002.json").unlink()
    run_teacher(job)
    a, b = json.loads(want), json.loads((out / "train" / MANIFEST).read_text())
    assert a["shards"] == b["shards"]


def test_teacher_killed_with_sigkill_then_rerun(tiny_teacher_dir, gcs_bucket, tmp_path):
    path = make_job(
        tmp_path,
        tiny_teacher_dir,
        f"{gcs_bucket}/run",
        n_train=400,
        teacher__samples_per_shard="4",
    )
    dataset(tmp_path, "train.jsonl", "train.jsonl", 400)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", "teacher", "--job", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = open_store(f"{gcs_bucket}/run/train")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(n.endswith(".tar") for n in store.list()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"teacher ended before the kill: {proc.communicate()[1]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not store.exists(MANIFEST)
    run_teacher(load_job(path))
    keys = stored_keys(f"{gcs_bucket}/run/train", tmp_path)
    assert keys == dataset_keys(tmp_path / "train.jsonl") and len(set(keys)) == 400


def test_missing_bucket_fails_before_any_work(tiny_teacher_dir, gcs_server, tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    job = load_job(make_job(tmp_path, tiny_teacher_dir, "gs://no-such-bucket-xyz/run"))
    with pytest.raises(BucketNotFound, match="no-such-bucket-xyz"):
        run_teacher(job)


def test_unknown_model_and_k_too_large(tiny_teacher_dir, tmp_path):
    job = load_job(make_job(tmp_path, tmp_path / "nowhere", str(tmp_path / "o")))
    with pytest.raises(DistillError, match="not found: expected a Hugging Face directory"):
        run_teacher(job)
    job = load_job(
        make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "o")),
        ['targets.kind="topk"', "targets.k=49152"],
    )
    with pytest.raises(DistillError, match="must be smaller than the teacher vocab"):
        run_teacher(job)
    assert not (tmp_path / "o" / "train" / MANIFEST).exists()


def test_student_with_other_vocab_is_refused(tiny_teacher_dir, tmp_path, smol_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    job = load_job(make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "o")))
    run_teacher(job)
    other = tmp_path / "other"
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(other)
    smol_tokenizer.save_pretrained(other)
    bad = load_job(tmp_path / "job.toml", ['student.init="pretrained"', f'student.model="{other}"'])
    with pytest.raises(DistillError, match="student vocab size 32000 != teacher's 49152"):
        train(bad)


def test_training_resumes_exactly_after_a_kill(tiny_teacher_dir, tmp_path, monkeypatch):
    path = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "o"))
    run_teacher(load_job(path))
    straight = load_job(path, [f'train.run_dir="{tmp_path / "a"}"'])
    train(straight)
    resumed = load_job(path, [f'train.run_dir="{tmp_path / "b"}"'])
    step, done = train_mod.train_step, []

    def killed_after_9_steps(*args: object) -> object:
        if len(done) == 9:
            raise KeyboardInterrupt("killed after 9 steps (simulated)")
        done.append(step)
        return step(*args)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(train_mod, "train_step", killed_after_9_steps)
        train(resumed)  # killed mid-epoch 0 (12 steps/epoch), ckpt at 8
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 8
    train(resumed)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # A checkpoint from another job is refused, and so is a corrupt one.
    other = load_job(path, [f'train.run_dir="{tmp_path / "b"}"', "train.lr=0.5"])
    with pytest.raises(DistillError, match="belongs to a different job"):
        train(other)
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(DistillError, match="corrupt checkpoint"):
        train(resumed)


def test_train_takes_its_body_and_loss_as_components(tiny_teacher_dir, tmp_path):
    """The loop's body and loss are injected (bench/quality.py's online arm passes its own):
    spies that delegate to the defaults see every micro-batch, and the run trains exactly the
    weights the defaults train."""
    from distill.student.losses import chunked_distill_loss

    path = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "o"), n_train=32)
    run_teacher(load_job(path))
    plain = train(load_job(path, [f'train.run_dir="{tmp_path / "a"}"', "train.epochs=1"]))
    calls = {"body": 0, "loss": 0}

    class CountingBody(train_mod.StudentBody):
        def forward(self, batch):
            calls["body"] += 1
            return super().forward(batch)

    def counting_loss(*args, **kwargs):
        calls["loss"] += 1
        return chunked_distill_loss(*args, **kwargs)

    job = load_job(path, [f'train.run_dir="{tmp_path / "b"}"', "train.epochs=1"])
    injected = train(job, train_mod.Components(body=CountingBody, loss=counting_loss))
    assert injected["steps"] == plain["steps"] == 4  # 32 samples, batches of 8
    assert calls == {"body": 4, "loss": 4}
    assert injected["final_loss"] == plain["final_loss"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nlr = "fast"\n')
    r = subprocess.run(
        [sys.executable, "-m", "distill.cli", "teacher", "--job", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "train.lr: expected float" in r.stderr and "Traceback" not in r.stderr


def test_memory_levers_and_observability(tiny_teacher_dir, tmp_path):
    # reverse KL and BiLD need top-k targets (a tail bucket, an exact top-k)
    path = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "o"), targets__kind='"topk"')
    run_teacher(load_job(path))
    job = load_job(
        path,
        [
            "train.packing=true",
            "train.grad_accum=2",
            "train.gradient_checkpointing=true",
            "train.optimizer_offload=true",
            "train.eval_every=3",
            "train.epochs=1",
            "loss.reverse_kl=0.2",
            "loss.bild=0.1",
        ],
    )
    s = train(job)
    assert s["steps"] == 6  # 12 micro-batches / 2
    out = tmp_path / "run"
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"forward_kl", "reverse_kl", "bild", "ce", "memory_bytes"} <= set(train_rows[-1])
    assert [r["step"] for r in rows if r.get("split") == "eval"] == [3, 6]
    assert 0 <= s["data_wait_share"] < 1


def test_ranks_split_the_data_without_overlap_or_gaps(tiny_teacher_dir, tmp_path):
    from distill.student.train import make_loader

    path = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "o"), n_train=90)
    job = load_job(path)
    run_teacher(job)
    for world in (1, 2, 3, 4):
        seen, counts = [], []
        for rank in range(world):
            loader = make_loader(job, "train", shuffle=True, rank=rank, world=world)
            batches = list(loader.batches(epoch=1))
            counts.append(len(batches))
            seen += [k for b in batches if b is not None for k in b.keys]
        assert len(set(counts)) == 1 and counts[0] == len(loader)  # ranks step together
        assert sorted(seen) == dataset_keys(tmp_path / "train.jsonl")  # each sample once


def test_torchrun_ddp_training(tiny_teacher_dir, tmp_path):
    path = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "o"), n_train=40)
    run_teacher(load_job(path))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "distill.cli",
            "train",
            "--job",
            str(path),
            "--set",
            "train.epochs=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3  # 40 samples / (2 x 8)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")


def test_cli_plan_then_train_auto(tiny_teacher_dir, tmp_path):
    path = make_job(tmp_path, tiny_teacher_dir, str(tmp_path / "o"), n_train=32)
    run_teacher(load_job(path))
    cli = [sys.executable, "-m", "distill.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [*cli, "plan", "--job", str(path), "--gpu-mem", "4GiB"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "estimated peak" in r.stdout and "train.batch_size=" in r.stdout
    r = subprocess.run(
        [*cli, "plan", "--job", str(path), "--gpu-mem", "1MiB"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2 and "cannot fit" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [
            *cli,
            "train",
            "--job",
            str(path),
            "--auto",
            "--gpu-mem",
            "2GiB",
            "--set",
            "train.epochs=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--auto: micro-batch" in r.stderr
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] >= 4
