"""teacher-cloud --vms N end to end without a cloud: the real google-cloud-batch client against
the Batch stub (tests/fakes/batch.py), whose tasks run the real task entrypoint
(distill/cloud/batch_task.py) and the real teacher as local processes against fake-gcs-server;
the preflight's checks go to the Compute stub (tests/fakes/compute.py).

Every test ends with the promises of issue #13: no Batch job and no task VM is left, and the
stored sample set is exactly the dataset, each sample once; where the set completes (after a
rerun), the manifest lists the single-VM run's shards and the stored bytes are theirs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from fakes.batch import FakeBatch
from fakes.compute import FakeCompute
from helpers import (
    PROJECT,
    SLOW,
    assert_exact,
    default_sigint,
    guest_env,
    make_job,
    run_in_thread,
    run_records,
    shards_in,
)
from rich.console import Console

from distill.cloud.batch import DRIVER_VERSION, decode_env
from distill.cloud.errors import CloudError, QuotaExceeded, Stockout, TeacherFailed
from distill.cloud.fanout import BatchEngine
from distill.cloud.run import teacher_cloud
from distill.cloud.session import CloudOptions, Session
from distill.cloud.vm import VmEngine
from distill.config import load_job
from distill.errors import DistillError
from distill.format.manifest import MANIFEST, Manifest
from distill.shardset import Part, finish_split, split_fingerprints
from distill.store.storage import open_store
from distill.teacher import run as teacher_run
from distill.teacher.run import run_teacher

VMS = 3
TRAIN_SHARDS = 12  # 48 samples, 4 a shard: task i gets shards i, i+3, i+6, i+9

pytestmark = pytest.mark.wire


class TaskGuests:
    """What the stub's task VMs run: the teacher image's command, as a local process, with
    its own temp directory (``tmp``: what a task leaves on its VM's disk)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tmp.mkdir()
        self.env: dict[str, str] = {
            "DISTILL_ENTRYPOINT": SLOW,
            "SLOW_TEACHER_S": "0",
            "TMPDIR": str(tmp),
        }

    def left(self) -> list[str]:
        """Our files left in the VMs' temp directory (torch's compile cache is torch's)."""
        return [p.name for p in self.tmp.iterdir() if p.name.startswith("distill-")]

    def __call__(self, runnable: dict, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        c = runnable["container"]
        assert c["entrypoint"] == "python", c
        return [sys.executable, *c["commands"]], {**guest_env(**self.env), **env}


@pytest.fixture
def guests(tmp_path) -> TaskGuests:
    return TaskGuests(tmp_path / "vm-tmp")


@pytest.fixture
def batch(guests, gcs_bucket):
    with FakeBatch(project=PROJECT, guest=guests, step_s=0.05, preempt_grace_s=10.0) as stub:
        yield stub


@pytest.fixture
def compute(gcs_bucket):
    with FakeCompute(project=PROJECT, step_s=0.05) as stub:
        yield stub


@pytest.fixture
def fan_job(cloud_job) -> Path:
    """The single VM's test job (48 train samples, 4 a shard), run as a fan-out."""
    return cloud_job


def options(compute: FakeCompute, batch: FakeBatch, tmp_path: Path) -> CloudOptions:
    return CloudOptions(
        backend="gce",
        endpoint=compute.url,
        batch_endpoint=batch.url,
        project=PROJECT,
        yes=True,
        poll_seconds=0.1,
        state_dir=tmp_path / "cloud",
        teardown_timeout_s=60.0,
    )


def fanout(job: Path, compute, batch, tmp_path: Path, *sets: str) -> BatchEngine:
    j = load_job(job, ['cloud.engine="batch"', f"cloud.vms={VMS}", *sets])
    session = Session(j, options(compute, batch, tmp_path), Console(stderr=True, width=200))
    return BatchEngine(session)


def nothing_left(batch: FakeBatch, timeout: float = 30.0) -> bool:
    """No Batch job, and no task's VM (process group) still running."""
    return batch.wait_for(lambda: not batch.live() and not batch.vms(), timeout)


def task_shards(url: str, task: int) -> int:
    """Shards of task ``task`` (of VMS) in the bucket (their sidecars: upload finished)."""
    names = set(open_store(url).list())
    return sum(1 for i in range(task, TRAIN_SHARDS, VMS) if f"shard-{i:06d}.json" in names)


@pytest.fixture(scope="module")
def single_vm(tiny_teacher_dir, gcs_server, tmp_path_factory) -> dict[str, Manifest]:
    """The same job (same data, teacher and settings) run once, in one process: the single
    VM's shard set, for every test of this module. Its bucket: ``(manifests, url)``."""
    from distill.demo.fake_gcs import emulator_client

    tmp = tmp_path_factory.mktemp("single-vm")
    bucket = f"single-{uuid.uuid4().hex[:12]}"
    emulator_client().create_bucket(bucket)
    job = make_job(
        tmp, tiny_teacher_dir, f"gs://{bucket}/run", n_train=48, teacher__samples_per_shard="4"
    )
    return {k: v for k, v in run_teacher(load_job(job)).items() if v is not None}


def local_fingerprints(j) -> dict[str, str]:
    """Each split's job fingerprint as a run of ``j`` on this machine computes it."""
    from distill import models

    teacher_dir = models.resolve_model(j.teacher.model)
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(teacher_dir))
    return split_fingerprints(j, teacher_dir, tok_fp)


def assert_same_as_single(job: Path, ref: dict[str, Manifest], teacher: str = "model") -> None:
    """Each split: the manifest lists the same shards (names, stats, sha256) as the single run,
    the stored bytes hash to those sha256, and the rest of the manifest matches but its time
    and the teacher's path (the cloud's job names the staged copy, ``model``, and its
    fingerprint hashes that name: as a single-VM teacher-cloud run's manifest does)."""
    out = load_job(job).output
    for split, single in ref.items():
        store = open_store(f"{out}/{split}")
        m = Manifest.from_json(store.read_bytes(MANIFEST), split)
        assert m.shards == single.shards, split
        for s in m.shards:
            assert hashlib.sha256(store.read_bytes(s.name)).hexdigest() == s.sha256, s.name
        a, b = vars(m).copy(), vars(single).copy()
        for k in ("created", "teacher_seconds", "teacher", "job_fingerprint"):
            a.pop(k), b.pop(k)
        assert a == b, split
        assert m.teacher == teacher


# --- the split itself, in one process --------------------------------------------------------


def test_tasks_split_the_shards_and_finish_writes_the_single_run_manifest(
    fan_job, single_vm, tmp_path, monkeypatch
):
    """Two parts, each computing (and keeping) only its shards (s % 2 == i), then
    finish_split: the same shards, bytes and manifest as one run; no part writes the manifest;
    another job's fingerprint is refused; a bad part is refused."""
    j = load_job(fan_job)
    fps = local_fingerprints(j)
    train = open_store(f"{j.output}/train")
    computed: dict[str, list[int]] = {}  # split -> samples held per shard, as computed
    real = teacher_run._compute_shards

    def spy(ctx, *rest):
        computed[ctx.split] = [len(c) for c in ctx.chunks]
        return real(ctx, *rest)

    monkeypatch.setattr(teacher_run, "_compute_shards", spy)
    assert run_teacher(j, Part(1, 2)) == {"train": None, "eval": None}
    # the task keeps only its own shards' samples (the others' are dropped after tokenising)
    assert computed["train"] == [0, 4] * (TRAIN_SHARDS // 2)
    names = set(train.list())
    assert MANIFEST not in names and finish_split(train, fps["train"]) is None  # half
    assert {n for n in names if n.endswith(".tar")} == {
        f"shard-{i:06d}.tar" for i in range(1, TRAIN_SHARDS, 2)
    }
    run_teacher(j, Part(0, 2))
    assert computed["train"] == [4, 0] * (TRAIN_SHARDS // 2)
    # every shard is there, but not this job's: refused, no manifest
    other = "0" * 64
    with pytest.raises(DistillError, match="partial shard set from a different job or dataset"):
        finish_split(train, other)
    assert not train.exists(MANIFEST)
    made = {
        split: finish_split(open_store(f"{j.output}/{split}"), fps[split])
        for split in ("train", "eval")
    }
    for split, m in made.items():
        assert m is not None and m.shards == single_vm[split].shards, split
        store = open_store(f"{j.output}/{split}")
        assert store.exists(MANIFEST)
        # teacher_seconds: the two tasks' compute time, as each recorded it
        times = [json.loads(store.read_bytes(n)) for n in store.list("task-seconds/")]
        assert sorted(t["task"] for t in times) == [0, 1]
        assert m.teacher_seconds == sum(t["seconds"] for t in times) > 0
    with pytest.raises(DistillError, match="complete shard set from a different job or dataset"):
        finish_split(train, other)
    with pytest.raises(DistillError, match="task 2 of 2: the index must be in"):
        Part(2, 2)


def test_tasks_read_only_their_shards_through_the_record_index(
    compute, batch, guests, fan_job, single_vm, tmp_path
):
    """The controller indexes each split once (its checks read every record anyway); the
    tasks stage no data file and read only their shards' byte ranges of the staged copy:
    a third each, and the single VM's shards."""
    run = fanout(fan_job, compute, batch, tmp_path).run()
    assert run.outcome == "done" and nothing_left(batch)
    (body,) = batch.created
    env = body["taskGroups"][0]["taskSpec"]["runnables"][0]["environment"]["variables"]
    vm_job = tomllib.loads(decode_env(env["DISTILL_JOB_TOML_B64"]))
    index_url = vm_job["data"]["record_index"]["train"]
    assert index_url.startswith(f"{load_job(fan_job).output}/inputs/records-")
    index = json.loads(
        open_store(index_url.rpartition("/")[0]).read_bytes(index_url.split("/")[-1])
    )
    assert index["stride"] == 4 and sum(f["records"] for f in index["files"]) == 48
    assert "data/" not in decode_env(env["DISTILL_INPUTS_B64"])  # no task downloads the data
    for task in batch.history[0].tasks:
        log = "".join(task.serial)
        m = re.search(r"train: read ([\d.]+) kB of the split's ([\d.]+) kB through its record", log)
        assert m, log[-3000:]
        assert 0.25 < float(m[1]) / float(m[2]) < 0.42, m[0]  # 4 of 12 shards
    assert_exact(fan_job, tmp_path)
    assert_same_as_single(fan_job, single_vm)


# --- the main path: preemptions at several points, output == the single VM's -----------------


def test_fanout_with_preemptions_gives_the_single_vm_shards(
    compute, batch, guests, fan_job, single_vm, tmp_path
):
    guests.env["SLOW_TEACHER_S"] = "0.4"
    ctl = fanout(fan_job, compute, batch, tmp_path)
    t, result = run_in_thread(ctl)
    train = f"{load_job(fan_job).output}/train"
    # task 0: preempted while it boots (before its first shard)
    assert batch.wait_for(lambda: batch.history and batch.task(0).state == "RUNNING", 120), result
    batch.preempt(0)
    # task 1: preempted mid-run, after its first shard
    assert batch.wait_for(lambda: task_shards(train, 1) >= 1, 180)
    batch.preempt(1)
    # task 2: preempted twice, mid-run each time
    for need in (1, 2):
        assert batch.wait_for(
            lambda need=need: task_shards(train, 2) >= need and batch.task(2).state == "RUNNING",
            180,
        )
        batch.preempt(2)
        assert batch.wait_for(lambda: batch.task(2).state != "RUNNING" or "run" in result, 30)
    t.join(600)
    assert "error" not in result, result.get("error")
    run = result["run"]
    assert run.outcome == "done" and run.preemptions == 4, [a.to_dict() for a in run.attempts]
    assert nothing_left(batch)
    assert_exact(fan_job, tmp_path)
    # the preempted tasks were retried by Batch and resumed: no shard computed twice
    tasks = batch.history[0].tasks
    assert [t.attempts for t in tasks] == [2, 2, 3]
    log2 = "".join(tasks[2].serial)
    assert "stopped on SIGTERM" in log2 and "train: resuming, 2/4 shards" in log2, log2[-3000:]
    assert "task 0 of 3: shards 0, 3, 6 ... 9 (4)" in "".join(tasks[0].serial)
    assert not guests.left()  # preempted or done, no task left its scratch
    # a task preempted mid-run: its teacher heard the SIGTERM that its container's main process
    # got (the task passes it on) and stopped cleanly, exit 75, not killed after the grace
    for i in (1, 2):
        log = "".join(tasks[i].serial)
        assert "SIGTERM: passing it to the teacher" in log, log[-3000:]
        assert "teacher exit code 75 (preempted: retry)" in log, log[-3000:]
    # the job as created: Spot L4 VMs, the driver, the retry policy
    (body,) = batch.created
    policy = body["allocationPolicy"]["instances"][0]
    assert policy["policy"]["provisioningModel"] == "SPOT" and policy["installGpuDrivers"]
    assert policy["policy"]["machineType"] == "g2-standard-8"
    (acc,) = policy["policy"]["accelerators"]
    assert acc["type"] == "nvidia-l4" and acc["driverVersion"] == DRIVER_VERSION
    disk = policy["policy"]["bootDisk"]
    assert (disk["image"], disk["sizeGb"]) == ("batch-debian", "100")  # tiny teacher: the least
    group = body["taskGroups"][0]
    assert group["taskCount"] == group["parallelism"] == str(VMS)
    spec = group["taskSpec"]
    runnable = spec["runnables"][0]
    assert runnable["container"]["options"] == "--gpus all"  # the L4 inside the container
    env = runnable["environment"]["variables"]
    assert env["DISTILL_WATCH_PREEMPTION"] == "1"
    # teacher.mode = "auto" is pinned to the estimated way in the tasks' job, and the device
    # to the GPU (a container that cannot see it fails at once)
    vm_job = tomllib.loads(decode_env(env["DISTILL_JOB_TOML_B64"]))
    assert vm_job["teacher"]["mode"] == "resident" and vm_job["teacher"]["model"] == "model"
    assert vm_job["teacher"]["device"] == "cuda"
    assert all("\n" not in v for v in env.values())  # multi-line texts travel as base64
    assert spec["maxRetryCount"] == 10 and int(spec["maxRunDuration"].rstrip("s")) >= 3600
    # one policy (Batch takes one): retry when the VM went away or the teacher stopped on
    # the notice; every other exit code fails the task
    assert spec["lifecyclePolicies"] == [
        {
            "action": "RETRY_TASK",
            "actionCondition": {"exitCodes": [50001, 50002, 50003, 50006, 75]},
        }
    ]
    assert body["labels"] == {"distill-job": "job", "managed-by": "distill"}
    # byte for byte what one VM writes
    assert_same_as_single(fan_job, single_vm)
    (rec,) = run_records(fan_job)
    assert rec["outcome"] == "done" and rec["preemptions"] == 4 and rec["actual_usd"] > 0
    # a rerun finds the complete set and creates nothing
    assert fanout(fan_job, compute, batch, tmp_path).run() is None
    assert len(batch.created) == 1


# --- failures ------------------------------------------------------------------------------


def test_a_hub_teacher_is_copied_into_the_bucket_once_for_all_the_tasks(
    compute, batch, guests, fake_hub, tiny_teacher_dir, single_vm, gcs_bucket, tmp_path
):
    """Three tasks start at once with an hf: teacher: one claims the copy, downloads the
    commit from the Hub and uploads it; the others wait for it and read the bucket. Each
    weights file leaves the Hub once; the shards are the single run's."""
    repo = "distill-test/tiny-teacher"
    files = {p.name: p.read_bytes() for p in tiny_teacher_dir.iterdir() if p.is_file()}
    sha = fake_hub.add_repo(repo, files=files)
    guests.env.update({**fake_hub.env(tmp_path / "vm-hf"), "DISTILL_COPY_POLL_S": "0.2"})
    job = make_job(
        tmp_path, f"hf:{repo}", f"{gcs_bucket}/run", n_train=48, teacher__samples_per_shard="4"
    )
    run = fanout(job, compute, batch, tmp_path).run()
    assert run is not None and run.outcome == "done"
    assert nothing_left(batch)
    assert_same_as_single(job, single_vm, teacher=f"hf:{repo}@{sha}")
    weights = [n for n in files if n.endswith(".safetensors")]
    assert weights and all(fake_hub.downloads[(repo, n)] == 1 for n in weights)
    logs = ["".join(t.serial) for t in batch.history[0].tasks]
    assert sum("from the Hub into" in log for log in logs) == 1, logs
    assert sum("reading hf:" in log for log in logs) == VMS - 1, logs


def test_a_failed_task_is_named_and_a_rerun_computes_only_its_shards(
    compute, batch, guests, fan_job, single_vm, tmp_path
):
    guests.env["FAIL_TASK_INDEX"] = "1"
    with pytest.raises(TeacherFailed) as e:
        fanout(fan_job, compute, batch, tmp_path).run()
    msg = str(e.value)
    assert "task 1 (projects/distill-test/locations/us-central1/jobs/distill-teacher-job" in msg
    assert "the teacher failed (exit codes 3)" in msg
    assert "train/1, train/4, train/7, train/10" in msg and "rerun" in msg
    assert nothing_left(batch)
    out = load_job(fan_job).output
    assert not open_store(f"{out}/train").exists(MANIFEST)
    assert "CUDA error" in "".join(batch.task(1).serial)
    # a finished task and a failed one leave nothing on their VM's disk (Batch may run the
    # next task there): neither the staged job nor the teacher's scratch shards
    assert not guests.left()
    # the rerun: tasks 0 and 2 find their shards; only task 1's are computed
    del guests.env["FAIL_TASK_INDEX"]
    run = fanout(fan_job, compute, batch, tmp_path).run()
    assert run.outcome == "done" and len(batch.created) == 2 and nothing_left(batch)
    logs = ["".join(t.serial) for t in batch.history[1].tasks]
    assert "train: resuming, 4/4 shards" in logs[0] and "train: resuming, 4/4" in logs[2]
    assert "resuming" not in logs[1]
    assert_exact(fan_job, tmp_path)
    assert_same_as_single(fan_job, single_vm)


def test_retries_exhausted_by_preemptions_names_the_task(
    compute, batch, guests, fan_job, single_vm, tmp_path
):
    guests.env["SLOW_TEACHER_S"] = "0.4"
    ctl = fanout(fan_job, compute, batch, tmp_path, "cloud.max_preemptions=0")
    t, result = run_in_thread(ctl)
    train = f"{load_job(fan_job).output}/train"
    assert batch.wait_for(lambda: task_shards(train, 2) >= 1, 180)
    batch.preempt(2)
    t.join(600)
    err = result.get("error")
    assert isinstance(err, CloudError) and not isinstance(err, TeacherFailed), err
    assert "task 2 (" in str(err) and "preempted 1 time(s)" in str(err)
    assert "cloud.max_preemptions = 0" in str(err)
    assert nothing_left(batch)
    assert run_records(fan_job)[0]["outcome"] == "failed"
    # the rerun computes task 2's missing shards only, and the set is exact
    guests.env["SLOW_TEACHER_S"] = "0"
    assert fanout(fan_job, compute, batch, tmp_path).run().outcome == "done"
    assert nothing_left(batch)
    assert_exact(fan_job, tmp_path)
    assert_same_as_single(fan_job, single_vm)


def test_a_hung_task_is_stopped_by_its_max_run_duration(
    compute, batch, guests, fan_job, single_vm, tmp_path
):
    """A teacher that hangs after its first shard: Batch stops it at maxRunDuration (exit
    50005), which fails the task (no retry); the error says so; a rerun completes the set."""
    guests.env["SLOW_TEACHER_S"] = "600"  # hung after the first shard's targets
    batch.max_run_scale = 12 / 3600  # the 1 h max run duration passes in 12 s
    ctl = fanout(fan_job, compute, batch, tmp_path, "cloud.max_run_hours=1")
    with pytest.raises(TeacherFailed, match="ran past its max run duration") as e:
        ctl.run()
    assert "exit codes 50005" in str(e.value)
    assert batch.created[0]["taskGroups"][0]["taskSpec"]["maxRunDuration"] == "3600s"
    assert [t.attempts for t in batch.history[0].tasks] == [1] * VMS  # not retried
    assert nothing_left(batch)
    batch.max_run_scale = 1.0
    guests.env["SLOW_TEACHER_S"] = "0"
    assert fanout(fan_job, compute, batch, tmp_path).run().outcome == "done"
    assert nothing_left(batch)
    assert_exact(fan_job, tmp_path)
    assert_same_as_single(fan_job, single_vm)


def test_a_batch_api_outage_while_watching_is_ridden_out(
    compute, batch, guests, fan_job, single_vm, tmp_path
):
    guests.env["SLOW_TEACHER_S"] = "0.3"
    t, result = run_in_thread(fanout(fan_job, compute, batch, tmp_path))
    assert batch.wait_for(lambda: bool(batch.history) and batch.task(0).state == "RUNNING", 120)
    batch.failures = 8  # 8 requests answered 503: retried by the client, then by the watcher
    t.join(600)
    assert "error" not in result, result.get("error")
    assert result["run"].outcome == "done" and batch.failures == 0
    assert len(batch.created) == 1 and nothing_left(batch)
    assert_exact(fan_job, tmp_path)
    assert_same_as_single(fan_job, single_vm)


def test_stockout_waits_then_runs_or_gives_up(compute, batch, fan_job, single_vm, tmp_path):
    batch.stockouts = 3  # Batch retries the allocation; then capacity comes
    run = fanout(fan_job, compute, batch, tmp_path).run()
    assert run.outcome == "done" and run.stockouts == ["us-central1"]
    assert nothing_left(batch)
    assert_exact(fan_job, tmp_path)
    assert_same_as_single(fan_job, single_vm)
    # no capacity for longer than cloud.provision_timeout_minutes: deleted, nothing written
    out = load_job(fan_job).output
    batch.stockouts = 10**6
    ctl = fanout(
        fan_job,
        compute,
        batch,
        tmp_path,
        f'job.output="{out}2"',
        "cloud.provision_timeout_minutes=0.02",
    )
    with pytest.raises(Stockout, match="no L4 capacity for the Batch job"):
        ctl.run()
    assert nothing_left(batch) and not open_store(f"{out}2/train").list()


def test_a_job_that_never_runs_is_given_up_after_the_provision_timeout(
    compute, batch, fan_job, tmp_path
):
    """Batch failing the job for a stockout reads as "no capacity", not "no task failed"; and
    a job held QUEUED with no event that says why is deleted at
    cloud.provision_timeout_minutes (Batch itself would wait 2 days)."""
    out = load_job(fan_job).output
    batch.stockouts, batch.stockout_fails = 1, True
    with pytest.raises(Stockout, match="no L4 capacity for the Batch job .* Batch could not"):
        fanout(fan_job, compute, batch, tmp_path).run()
    assert nothing_left(batch)
    batch.stockouts, batch.stockout_fails, batch.hold_queued = 0, False, True
    t0 = time.monotonic()
    ctl = fanout(
        fan_job,
        compute,
        batch,
        tmp_path,
        f'job.output="{out}2"',
        "cloud.provision_timeout_minutes=0.02",
    )
    with pytest.raises(CloudError, match="no task of the Batch job .* started in 0.02 min"):
        ctl.run()
    assert time.monotonic() - t0 < 60
    assert nothing_left(batch) and not open_store(f"{out}2/train").list()


def test_a_job_cancelled_outside_is_reported_and_a_rerun_completes(
    compute, batch, guests, fan_job, single_vm, tmp_path
):
    """Someone cancels the job (the console, gcloud): CANCELLATION_IN_PROGRESS and CANCELLED
    end the watch with that said, instead of a poll that never ends."""
    guests.env["SLOW_TEACHER_S"] = "0.4"
    t, result = run_in_thread(fanout(fan_job, compute, batch, tmp_path))
    train = f"{load_job(fan_job).output}/train"
    assert batch.wait_for(lambda: shards_in(train) >= 1, 180)
    batch.cancel(batch.history[0].name)
    t.join(120)
    assert not t.is_alive(), "the controller still watches a cancelled job"
    err = result.get("error")
    assert isinstance(err, CloudError) and "was cancelled (CANCEL" in str(err), err
    assert nothing_left(batch)
    guests.env["SLOW_TEACHER_S"] = "0"
    assert fanout(fan_job, compute, batch, tmp_path).run().outcome == "done"
    assert nothing_left(batch)
    assert_exact(fan_job, tmp_path)
    assert_same_as_single(fan_job, single_vm)


@pytest.mark.parametrize("fault", ["no-gpus-option", "old-driver"])
def test_a_container_without_the_gpu_fails_in_seconds(
    compute, batch, fan_job, tmp_path, monkeypatch, fault
):
    """The job ships teacher.device = "cuda": a container that does not see the L4 (no
    `--gpus all`) fails at once instead of running the teacher on the CPU until its max run
    duration; a driver older than the image's CUDA stops the container before it starts."""
    from distill.cloud import batch as batch_mod

    if fault == "no-gpus-option":
        monkeypatch.setattr(batch_mod, "CONTAINER_OPTIONS", "")
    else:
        monkeypatch.setattr(batch_mod, "DRIVER_VERSION", "550.54.15")
    t0 = time.monotonic()
    with pytest.raises(DistillError) as e:
        fanout(fan_job, compute, batch, tmp_path).run()
    assert time.monotonic() - t0 < 120
    msg = str(e.value)
    if fault == "no-gpus-option":
        assert isinstance(e.value, TeacherFailed) and "the teacher failed" in msg
        log = "".join(batch.history[0].tasks[0].serial)
        assert "sees no CUDA device" in log, log[-2000:]
    else:
        assert "its container did not start (docker run's exit code 125)" in msg
    assert nothing_left(batch)
    assert not open_store(f"{load_job(fan_job).output}/train").list()


def test_quota_zero_is_refused(compute, batch, fan_job, tmp_path):
    # the preflight: the region's L4 quota cannot hold 3 VMs; nothing is created
    compute.region_quotas["us-central1"] = {
        "NVIDIA_L4_GPUS": 2.0,
        "PREEMPTIBLE_NVIDIA_L4_GPUS": 0.0,
    }
    with pytest.raises(QuotaExceeded, match="NVIDIA_L4_GPUS"):
        fanout(fan_job, compute, batch, tmp_path).run()
    assert not batch.created
    # Batch's own refusal (quota taken between the check and the job): the job is deleted
    compute.region_quotas["us-central1"] = {
        "NVIDIA_L4_GPUS": 8.0,
        "PREEMPTIBLE_NVIDIA_L4_GPUS": 0.0,
    }
    # ... Batch holds the job QUEUED for quota (for 2 days, then fails it): stopped at once
    batch.gpu_quota = 0
    t0 = time.monotonic()
    with pytest.raises(QuotaExceeded) as e:
        fanout(fan_job, compute, batch, tmp_path).run()
    assert time.monotonic() - t0 < 120
    assert "NVIDIA_L4_GPUS is 0" in str(e.value) and "inadequate quotas" in str(e.value)
    assert len(batch.created) == 1 and nothing_left(batch)
    # ... or the VMs' creation fails for quota, which fails the job
    batch.gpu_quota, batch.creation_quota_error = None, True
    with pytest.raises(QuotaExceeded, match="NVIDIA_L4_GPUS is 0.0 in region us-central1"):
        fanout(fan_job, compute, batch, tmp_path).run()
    assert len(batch.created) == 2 and nothing_left(batch)
    assert not open_store(f"{load_job(fan_job).output}/train").exists(MANIFEST)


def test_more_vms_than_shards_needs_quota_for_the_tasks_only(compute, batch, fan_job, tmp_path):
    """--vms 20 on a job of 12 shards at most runs 12 tasks: the quota check asks for 12 L4s,
    96 vCPUs and 12 boot disks (each just enough passes, one less is refused), and the tasks
    and VMs are counted as 12."""
    compute.gpu_quota = 12  # GPUS_ALL_REGIONS
    enough = {
        "NVIDIA_L4_GPUS": 12.0,
        "PREEMPTIBLE_NVIDIA_L4_GPUS": 0.0,
        "CPUS": 96.0,  # 12 x g2-standard-8
        "PREEMPTIBLE_CPUS": 0.0,
        "SSD_TOTAL_GB": 1200.0,  # 12 x 100 GB pd-balanced
    }
    compute.region_quotas["us-central1"] = dict(enough)
    plan = fanout(fan_job, compute, batch, tmp_path, "cloud.vms=20").session.preflight()
    assert plan.vms == plan.estimate.tasks == TRAIN_SHARDS
    for metric, less in (("NVIDIA_L4_GPUS", 11.0), ("CPUS", 95.0), ("SSD_TOTAL_GB", 1199.0)):
        compute.region_quotas["us-central1"] = {**enough, metric: less}
        with pytest.raises(QuotaExceeded, match=f"quota: {metric} is {less}"):
            fanout(fan_job, compute, batch, tmp_path, "cloud.vms=20").session.preflight()
    # Spot VMs take the preemptible CPU quota where the region grants it room
    compute.region_quotas["us-central1"] = {**enough, "CPUS": 8.0, "PREEMPTIBLE_CPUS": 96.0}
    fanout(fan_job, compute, batch, tmp_path, "cloud.vms=20").session.preflight()
    assert not batch.created


def test_a_big_teacher_gets_a_disk_that_holds_it(compute, batch, fan_job, tmp_path, monkeypatch):
    """The boot disk (Batch's and the single VM's) is sized from the teacher directory's bytes
    and the inputs, and the estimate prices that disk."""
    from distill.cloud.spec import BOOT_DISK_GB, boot_disk_gb

    j = load_job(fan_job)
    big = tmp_path / "big-teacher"
    big.mkdir()
    for f in Path(j.teacher.model).iterdir():
        (big / f.name).symlink_to(f)
    with open(big / "model-00002.safetensors", "wb") as f:  # 150 GiB, sparse
        f.truncate(150 * 2**30)
    sets = [f'teacher.model="{big}"']
    ctl = fanout(fan_job, compute, batch, tmp_path, *sets)
    plan = ctl.session.preflight()
    data = sum(Path(p).stat().st_size for p in (j.data.train, j.data.eval))
    teacher = sum(p.stat().st_size for p in big.iterdir())
    want = boot_disk_gb(teacher, data)
    assert want > 150 + 16 > BOOT_DISK_GB and plan.estimate.opts.boot_disk_gb == want
    assert plan.estimate.usd["disk_spot"] > 0
    vm_toml = '[job]\nname = "job"\n'  # the sparse 150 GiB file is not staged
    body = ctl.batch_spec(plan, vm_toml, ()).body()
    assert body["allocationPolicy"]["instances"][0]["policy"]["bootDisk"] == {
        "image": "batch-debian",
        "sizeGb": str(want),
    }
    single = VmEngine(
        Session(load_job(fan_job, sets), options(compute, batch, tmp_path), Console(stderr=True))
    )
    assert single.spec(single.session.preflight(), vm_toml, ()).boot_disk_gb == want


def test_a_rerun_refuses_another_jobs_finished_shards(
    compute, batch, tiny_teacher_dir, gcs_bucket, single_vm, tmp_path, monkeypatch
):
    """The controller died after every task wrote its shards (no manifest yet); the user edits
    the dataset and reruns with the same output: the shards are another job's, so the rerun is
    refused instead of finishing them; with the dataset as it was, it writes the manifests and
    creates no Batch job."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").symlink_to(tiny_teacher_dir)  # named as the VMs name the staged copy
    job = make_job(
        tmp_path, Path("model"), f"{gcs_bucket}/run", n_train=48, teacher__samples_per_shard="4"
    )
    j = load_job(job)
    for i in range(VMS):  # the tasks, as the VMs ran them
        run_teacher(j, Part(i, VMS))
    train = Path(j.data.train)
    original = train.read_text()
    train.write_text(original + original.splitlines()[0] + "\n")
    with pytest.raises(DistillError, match="partial shard set from a different job or dataset"):
        fanout(job, compute, batch, tmp_path).run()
    assert not batch.created and not open_store(f"{j.output}/train").exists(MANIFEST)
    train.write_text(original)
    assert fanout(job, compute, batch, tmp_path).run() is None
    assert not batch.created
    assert_same_as_single(job, single_vm)
    # the edited dataset, now against the complete set: refused too
    train.write_text(original + original.splitlines()[0] + "\n")
    with pytest.raises(DistillError, match="complete shard set from a different job or dataset"):
        fanout(job, compute, batch, tmp_path).run()


def cli_fanout(job: Path, compute, batch, tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    """``distill-ctl teacher-cloud --vms 3`` against the stubs, as a user runs it."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "DISTILL_COMPUTE_ENDPOINT": compute.url,
        "DISTILL_BATCH_ENDPOINT": batch.url,
        "COLUMNS": "200",  # the gc table's rows on one line each
    }
    argv = [sys.executable, "-m", "distill.cli", "teacher-cloud", "--job", str(job)]
    argv += ["--project", PROJECT, "--yes", "--vms", str(VMS), "--poll-seconds", "0.1"]
    argv += ["--state-dir", str(tmp_path / "cloud")]
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,  # one signal() call in the child: safe beside threads
    )
    return proc, env


def wait_task_running(batch: FakeBatch) -> None:
    assert batch.wait_for(
        lambda: bool(batch.history) and any(t.state == "RUNNING" for t in batch.history[0].tasks),
        120,
    ), "no task started"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_delete_the_batch_job(compute, batch, guests, fan_job, tmp_path, sig):
    guests.env["SLOW_TEACHER_S"] = "1.0"
    proc, _ = cli_fanout(fan_job, compute, batch, tmp_path)
    try:
        wait_task_running(batch)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "deleting Batch job projects/distill-test" in err and "rerun the same command" in err
    assert not batch.live()  # deleted and confirmed before the controller exited
    assert nothing_left(batch)
    assert run_records(fan_job)[0]["outcome"] == "interrupted"
    assert not open_store(f"{load_job(fan_job).output}/train").exists(MANIFEST)


@pytest.mark.parametrize("when", ["running", "finished"])
def test_controller_sigkill_then_rerun(compute, batch, guests, fan_job, single_vm, tmp_path, when):
    """The controller dies (SIGKILL: no teardown); Batch goes on, and gc lists the job. A rerun
    adopts the job if it still runs (creates none) or, once Batch finished every shard, just
    writes the manifests; either way it deletes the job; gc then finds nothing."""
    guests.env["SLOW_TEACHER_S"] = "2.0" if when == "running" else "0.2"
    proc, env = cli_fanout(fan_job, compute, batch, tmp_path)
    try:
        wait_task_running(batch)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    gc = [sys.executable, "-m", "distill.cli", "gc", "--project", PROJECT]
    r = subprocess.run(gc, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "batch job distill-teacher-job" in r.stdout, r.stderr
    assert "nothing deleted" in r.stderr and batch.live()  # nobody deleted it
    if when == "finished":
        assert batch.wait_for(lambda: batch.history[0].state == "SUCCEEDED", 180)
    j = load_job(fan_job, ['cloud.engine="batch"', f"cloud.vms={VMS}"])
    log = io.StringIO()
    run = teacher_cloud(j, options(compute, batch, tmp_path), Console(file=log, width=200))
    if when == "running":
        assert "is already RUNNING" in log.getvalue() and run.outcome == "done"
    else:
        assert run is None and "deleting the leftover Batch job" in log.getvalue()
    assert len(batch.created) == 1  # adopted or finished, never duplicated
    assert nothing_left(batch)
    assert_exact(fan_job, tmp_path)
    assert_same_as_single(fan_job, single_vm)
    r = subprocess.run([*gc, "--yes"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "no distill VMs or Batch jobs left" in r.stdout, r.stderr


def test_gc_deletes_a_leftover_batch_job(compute, tmp_path):
    """A Batch job left with distill's labels (its tasks still running): gc lists it, asks
    (nothing deleted without consent), then deletes it and waits until it is gone."""
    from distill.cloud.batch import BatchApi, BatchSpec
    from distill.cloud.gc import collect_garbage

    def sleeper(runnable: dict, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-c", "import time; time.sleep(600)"], guest_env()

    with FakeBatch(project=PROJECT, guest=sleeper) as stub:
        spec = BatchSpec(
            project=PROJECT,
            job_name="old-job",
            job_toml="",
            inputs=(),
            image="img",
            service_account_email="sa@x",
            zones=("us-central1-a",),
            tasks=2,
            max_retries=0,
            max_run_duration_s=3600,
        )
        BatchApi(PROJECT, endpoint=stub.url).create(spec)
        assert stub.wait_for(lambda: len(stub.vms()) == 2, 30)
        opts = options(compute, stub, tmp_path)
        out, err = io.StringIO(), io.StringIO()
        consoles = (Console(file=out, width=200), Console(file=err, width=200))
        opts.yes = False
        collect_garbage(None, opts, *consoles, confirm=lambda q: False)
        assert "batch job distill-teacher-old-job" in out.getvalue()
        assert "nothing deleted" in err.getvalue() and stub.live()
        opts.yes = True
        collect_garbage(None, opts, *consoles, confirm=lambda q: False)
        assert "deleted 0 VM(s) and 1 Batch job(s)" in out.getvalue()
        assert nothing_left(stub)
