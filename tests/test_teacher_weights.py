"""Teacher weights where they live (#25): an ``hf:`` Hub model and a ``gs://`` bucket folder run
through ``teacher-cloud`` to the same shard bytes as a local directory of the same weights,
with no weight byte read by the controller's process, the Hub copied into the bucket once,
and a gated model's token read by the VM from Secret Manager and written nowhere.

The Hub is tests/fakes/hub.py (the real huggingface_hub client against it), Secret Manager
tests/fakes/secrets.py, the bucket fake-gcs-server; the VMs are local processes running the
real vm_agent (the ``local`` backend) or the Compute stub's guests.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.compute import FakeCompute
from helpers import PROJECT, controller, make_job
from rich.console import Console

from distill.checkpoints import SOURCE_FILE, planning_dir, source_id
from distill.cloud import checkpoint_copy
from distill.cloud.session import CloudOptions, Session
from distill.cloud.vm import VmEngine
from distill.config import load_job
from distill.errors import DistillError
from distill.format.manifest import MANIFEST, Manifest
from distill.store.storage import LocalStore, open_store
from distill.teacher.run import run_teacher

REPO_ID = "distill-test/tiny-teacher"
TOKEN = "hf_secretTOKENvalue0123456789"  # noqa: S105 - a test token
_WATCHERS: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHERS and args and ".safetensors" in str(args[0]):
        for w in _WATCHERS:
            w.append(str(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def weights_opened() -> Iterator[list[str]]:
    """Every weights file (``*.safetensors``) this process opens meanwhile."""
    seen: list[str] = []
    _WATCHERS.append(seen)
    try:
        yield seen
    finally:
        _WATCHERS.remove(seen)


def repo_files(teacher_dir: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in teacher_dir.iterdir() if p.is_file()}
    files["original/consolidated.00.pth"] = b"\0" * 4096  # not loaded: never fetched
    return files


def small_job(where: Path, model: str | Path, output: str, **extra: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    return make_job(
        where, model, output, n_train=24, n_eval=8, teacher__samples_per_shard="4", **extra
    )


def shard_bytes(output: str) -> dict[str, dict[str, bytes]]:
    """Each split's shards (names and bytes) as its manifest lists them."""
    out = {}
    for split in ("train", "eval"):
        store = open_store(f"{output}/{split}")
        m = Manifest.from_json(store.read_bytes(MANIFEST), split)
        out[split] = {s.name: store.read_bytes(s.name) for s in m.shards}
    return out


@pytest.fixture
def reference(tiny_teacher_dir, tmp_path) -> dict[str, dict[str, bytes]]:
    """The shards of the same job with the teacher as a local directory, run here."""
    job = small_job(tmp_path / "ref", tiny_teacher_dir, str(tmp_path / "ref-out"))
    run_teacher(load_job(job))
    return shard_bytes(str(tmp_path / "ref-out"))


def local_run(job: Path, tmp_path: Path):
    opts = CloudOptions(backend="local", yes=True, poll_seconds=0.1, state_dir=tmp_path / "cloud")
    return VmEngine(Session(load_job(job), opts, Console(stderr=True, width=200))).run()


# --- planning: kilobytes, one pin ------------------------------------------------------------


def test_a_hub_teacher_is_planned_from_its_small_files_at_one_commit(
    fake_hub, tiny_teacher_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    first = fake_hub.add_repo(REPO_ID, files=repo_files(tiny_teacher_dir))
    with weights_opened() as opened:
        plan = planning_dir(f"hf:{REPO_ID}")
    assert opened == []
    assert source_id(plan) == f"hf:{REPO_ID}@{first}"  # main, resolved to its commit
    fetched = fake_hub.requested_paths(REPO_ID)
    assert "config.json" in fetched and "tokenizer.json" in fetched
    assert not [p for p in fetched if p.endswith((".safetensors", ".pth"))], fetched
    rec = json.loads((plan / SOURCE_FILE).read_text())
    assert "original/consolidated.00.pth" not in rec["files"]  # not what the teacher loads

    # main moves on: the pinned commit still plans (and later loads) the first weights
    second = fake_hub.commit(REPO_ID, files={"config.json": b"{}"})
    assert second != first
    assert source_id(planning_dir(f"hf:{REPO_ID}@{first}")) == f"hf:{REPO_ID}@{first}"
    with pytest.raises(DistillError, match="no revision"):
        planning_dir(f"hf:{REPO_ID}@no-such-branch")
    with pytest.raises(DistillError, match="no such model on the Hub"):
        planning_dir("hf:distill-test/missing")


def test_a_gated_hub_teacher_without_a_token_secret_is_refused_before_anything_is_spent(
    fake_hub, tiny_teacher_dir, gcs_bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    fake_hub.add_repo(REPO_ID, files=repo_files(tiny_teacher_dir), gated=True)
    job = small_job(tmp_path, f"hf:{REPO_ID}", f"{gcs_bucket}/run")
    with pytest.raises(DistillError, match="is gated: accept its license.*log in"):
        local_run(job, tmp_path)  # planning needs this machine's Hub login
    fake_hub.grant(REPO_ID, "planning-token")
    monkeypatch.setenv("HF_TOKEN", "planning-token")
    with pytest.raises(DistillError, match="gated or private.*cloud.hf_token_secret"):
        local_run(job, tmp_path)  # and the VMs need a token of their own
    assert open_store(gcs_bucket).list() == []  # nothing staged, no VM


def test_the_estimate_prices_a_hub_teacher_from_its_listing(
    fake_hub, tiny_teacher_dir, gcs_bucket, tmp_path, monkeypatch
):
    """cost-estimate on an hf: teacher: the weights' bytes from the Hub's listing (none
    downloaded), their copy in the setup of every VM, and its NAT and storage dollars."""
    from distill.cloud.cost import estimate_cost
    from distill.cloud.cost_table import render_table
    from distill.cloud.pricing import HUB_DOWNLOAD_BYTES_PER_S

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    files = repo_files(tiny_teacher_dir)
    fake_hub.add_repo(REPO_ID, files=files)
    local = estimate_cost(load_job(small_job(tmp_path / "a", tiny_teacher_dir, "out")))
    hub = estimate_cost(load_job(small_job(tmp_path / "b", f"hf:{REPO_ID}", "out")))
    loaded = sum(len(b) for n, b in files.items() if "/" not in n and n != "README.md")
    assert hub.weights.kind == "hf" and hub.weights.bytes == loaded
    assert local.weights.kind == "local" and local.weights.bytes == loaded
    copy_s = loaded / HUB_DOWNLOAD_BYTES_PER_S
    assert (hub.setup_hours - local.setup_hours) * 3600 == pytest.approx(copy_s)
    assert hub.usd["weights"] > local.usd["weights"] > 0  # + its GiB through Cloud NAT
    assert hub.usd["total_spot"] > local.usd["total_spot"]
    assert not [p for p in fake_hub.requested_paths(REPO_ID) if p.endswith(".safetensors")]
    text = Console(width=400, record=True)
    text.print(render_table(hub))
    out = text.export_text()
    assert "copied from the Hub into the run's bucket once" in out and "$ teacher weights" in out


# --- the runs: same shards as a local directory ----------------------------------------------


def test_a_bucket_teacher_runs_to_the_same_shards_reading_no_weights_here(
    reference, tiny_teacher_dir, gcs_bucket, tmp_path
):
    ckpt = open_store(f"{gcs_bucket}/checkpoints/tiny")
    for name, data in repo_files(tiny_teacher_dir).items():
        ckpt.put_bytes(name, data)
    job = small_job(tmp_path, f"{gcs_bucket}/checkpoints/tiny", f"{gcs_bucket}/run")
    with weights_opened() as opened:
        run = local_run(job, tmp_path)
    assert run.outcome == "done" and opened == []
    assert shard_bytes(f"{gcs_bucket}/run") == reference
    m = Manifest.from_json(open_store(f"{gcs_bucket}/run/train").read_bytes(MANIFEST), "train")
    assert re.fullmatch(rf"{gcs_bucket}/checkpoints/tiny@[0-9a-f]{{16}}", m.teacher)
    assert not [n for n in open_store(f"{gcs_bucket}/run").list() if "safetensors" in n]


def test_a_hub_teacher_runs_to_the_same_shards_copied_into_the_bucket_once(
    reference, fake_hub, tiny_teacher_dir, gcs_bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("DISTILL_COPY_POLL_S", "0.2")
    sha = fake_hub.add_repo(REPO_ID, files=repo_files(tiny_teacher_dir))
    job = small_job(tmp_path, f"hf:{REPO_ID}", f"{gcs_bucket}/run")
    with weights_opened() as opened:
        run = local_run(job, tmp_path)
    assert run.outcome == "done" and opened == []
    assert shard_bytes(f"{gcs_bucket}/run") == reference
    weights = [n for n in repo_files(tiny_teacher_dir) if n.endswith(".safetensors")]
    assert all(fake_hub.downloads[(REPO_ID, n)] == 1 for n in weights), fake_hub.downloads
    assert not any(p.endswith(".pth") for p in fake_hub.requested_paths(REPO_ID))
    copy = open_store(checkpoint_copy.copy_folder(f"{gcs_bucket}/run", f"hf:{REPO_ID}@{sha}"))
    assert set(weights) <= set(copy.list()) and SOURCE_FILE in copy.list()
    m = Manifest.from_json(open_store(f"{gcs_bucket}/run/train").read_bytes(MANIFEST), "train")
    assert m.teacher == f"hf:{REPO_ID}@{sha}"


def test_a_gated_hub_teacher_reads_its_token_from_secret_manager_and_writes_it_nowhere(
    reference, fake_hub, fake_secrets, guests, tiny_teacher_dir, gcs_bucket, tmp_path, monkeypatch
):
    """Through the Compute stub (a guest has a metadata server and its service account's
    token): the VM reads the secret, downloads the gated commit with it, and the token is in
    no metadata value, job file, log line or bucket object."""
    sha = fake_hub.add_repo(REPO_ID, files=repo_files(tiny_teacher_dir), gated=True)
    fake_hub.grant(REPO_ID, TOKEN)
    fake_secrets.add_secret(PROJECT, "hf-token", TOKEN)
    home = tmp_path / "vm-hf-home"
    guests.env.update(
        {
            **fake_hub.env(home),
            checkpoint_copy.SECRETS_ENV: fake_secrets.url,
            "DISTILL_COPY_POLL_S": "0.2",
        }
    )
    job = small_job(tmp_path, f"hf:{REPO_ID}", f"{gcs_bucket}/runs/x")
    job.write_text(job.read_text() + '[cloud]\nhf_token_secret = "hf-token"\n')
    fake_hub.grant(REPO_ID, "planning-token")  # this machine's own Hub login, for planning
    monkeypatch.setenv("HF_TOKEN", "planning-token")
    with FakeCompute(project=PROJECT, guest=guests, step_s=0.05) as compute:
        run = controller(job, compute, tmp_path).run()
        inserts = [json.dumps(body) for body in compute.inserted]
    assert run.outcome == "done"
    assert shard_bytes(f"{gcs_bucket}/runs/x") == reference
    used = {r.token for r in fake_hub.requests if "safetensors" in r.path}
    assert TOKEN in used  # the VM's downloads carried the secret's token
    assert [(c.name, c.status) for c in fake_secrets.calls] == [
        (f"projects/{PROJECT}/secrets/hf-token/versions/latest", 200)
    ]
    everywhere = [*inserts]
    store = open_store(gcs_bucket)
    everywhere += [store.read_bytes(n).decode("latin-1") for n in store.list()]
    everywhere += [p.read_text("latin-1") for p in (tmp_path / "cloud").rglob("*") if p.is_file()]
    assert everywhere and not [t for t in everywhere if TOKEN in t]
    assert any(f"hf:{REPO_ID}@{sha}" in t for t in inserts)  # the pinned commit in the inputs


# --- the copy's claim ------------------------------------------------------------------------


def test_a_stale_claim_is_taken_over_and_a_failed_copy_is_reported_to_the_waiters(
    fake_hub, tiny_teacher_dir, tmp_path, monkeypatch
):
    sha = fake_hub.add_repo(REPO_ID, files=repo_files(tiny_teacher_dir))
    ref = f"hf:{REPO_ID}@{sha}"
    store = LocalStore(tmp_path / "bucket" / "copy")
    store.put_bytes(".claim-0", b"{}")  # a copier that was preempted before any upload
    monkeypatch.setattr(checkpoint_copy, "STALE_S", 0.3)
    monkeypatch.setattr(checkpoint_copy, "POLL_S", 0.05)
    lines: list[str] = []
    pinned = checkpoint_copy.copy_once(ref, store, tmp_path / "model", "", lines.append)
    assert pinned.ref == ref and ".claim-1" in store.list() and SOURCE_FILE in store.list()
    assert any("made no progress" in line for line in lines)
    for name, size in pinned.files.items():
        assert (tmp_path / "model" / name).stat().st_size == size
    # every other VM, and a relaunch, reads the bucket's copy: no second Hub download
    served = dict(fake_hub.downloads)
    again = checkpoint_copy.copy_once(ref, store, tmp_path / "model2", "", lines.append)
    assert again == pinned and fake_hub.downloads == served
    for name in pinned.files:
        assert (tmp_path / "model2" / name).read_bytes() == (tmp_path / "model" / name).read_bytes()

    # a gated commit without a token: the copier says why, and the VMs waiting for it too
    gated = "distill-test/gated"
    gsha = fake_hub.add_repo(gated, files=repo_files(tiny_teacher_dir), gated=True)
    other = LocalStore(tmp_path / "bucket" / "gated")
    other.put_bytes(".claim-0", b"{}")  # the copier, already at work when the waiter looks
    monkeypatch.setattr(checkpoint_copy, "STALE_S", 60.0)
    waiter: dict = {}

    def wait() -> None:
        try:
            checkpoint_copy.copy_once(f"hf:{gated}@{gsha}", other, tmp_path / "g1", "", print)
        except DistillError as e:
            waiter["error"] = str(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    other.put_bytes(".claim-0.failed", b"hf:distill-test/gated is gated: ...")
    t.join(10)
    assert "another VM's copy of" in waiter["error"] and "is gated" in waiter["error"]
    # a later run (the access granted meanwhile) claims again instead of failing at once
    with pytest.raises(DistillError, match="is gated: accept its license"):
        checkpoint_copy.copy_once(f"hf:{gated}@{gsha}", other, tmp_path / "g2", "", print)
    assert ".claim-1" in other.list() and ".claim-1.failed" in other.list()
    fake_hub.grant(gated, TOKEN)
    monkeypatch.setattr(checkpoint_copy, "read_secret", lambda name: TOKEN)
    got = checkpoint_copy.copy_once(f"hf:{gated}@{gsha}", other, tmp_path / "g3", "s", print)
    assert got.ref == f"hf:{gated}@{gsha}" and ".claim-2" in other.list()


def test_the_secret_is_read_with_the_vms_token_and_refusals_say_what_to_do(
    fake_secrets, monkeypatch
):
    fake_secrets.add_secret(PROJECT, "hf-token", "first")
    fake_secrets.add_secret(PROJECT, "hf-token", "second\n", accessors={"vm-token"})
    monkeypatch.setenv(checkpoint_copy.SECRETS_ENV, fake_secrets.url)
    monkeypatch.setattr(checkpoint_copy, "_vm_token", lambda: "vm-token")
    name = f"projects/{PROJECT}/secrets/hf-token"
    assert checkpoint_copy.read_secret(name) == "second"
    monkeypatch.setattr(checkpoint_copy, "_vm_token", lambda: "someone-else")
    with pytest.raises(DistillError, match="secretAccessor"):
        checkpoint_copy.read_secret(name)
    monkeypatch.setattr(checkpoint_copy, "_vm_token", lambda: None)
    with pytest.raises(DistillError, match="no valid credentials"):
        checkpoint_copy.read_secret(name)
