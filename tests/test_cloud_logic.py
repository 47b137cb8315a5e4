"""The engines' logic on in-memory doubles (tests/fakes/memory.py): fast, no guest processes.

Failover, relaunch, give-up, adoption, teardown and the record of the single-VM engine, and the
Batch engine's retries, failures, cancellation, quota and stockouts, each in about a second:
the VMs, jobs and tasks live in dicts, and the "teachers" copy a real shard set into the
bucket (fake-gcs-server, the suite's one emulator) shard by shard. The same behaviour end to
end, through the real clients, the HTTP stubs and real guests, is tests/test_cloud.py's and
tests/test_fanout.py's; the recovery strategy and the retry helper are pure functions, tested
here directly.
"""

from __future__ import annotations

import dataclasses
import io
import uuid
from pathlib import Path

import pytest
from fakes.memory import MemoryBackend, MemoryBatchApi, ShardWorld
from helpers import make_job
from rich.console import Console

from distill.cloud.cost import CostOptions
from distill.cloud.errors import CloudError, QuotaExceeded, Stockout, TeacherFailed
from distill.cloud.fanout import BatchEngine
from distill.cloud.recovery import SameZoneFirst
from distill.cloud.retry import Backoff, retry_until
from distill.cloud.session import CloudOptions, Plan, Session
from distill.cloud.vm import VmEngine
from distill.config import load_job
from distill.errors import DistillError
from distill.format.manifest import MANIFEST
from distill.store.storage import open_store
from distill.teacher.run import run_teacher

ZONES = ("us-central1-a", "us-central1-b", "us-central1-c")
NAME = "distill-teacher-job"


# --- the pure parts -------------------------------------------------------------------------


def test_same_zone_first_orders_the_zones_and_gives_up_after_n():
    s = SameZoneFirst(ZONES, max_preemptions=2)
    assert s.order() == list(ZONES)
    assert s.order("us-central1-b") == ["us-central1-b", "us-central1-c", "us-central1-a"]
    assert s.order("europe-west4-a") == list(ZONES)  # not one of ours: from the first
    assert [s.give_up(n) for n in (0, 1, 2, 3)] == [False, False, False, True]


class Clock:
    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_retry_until_backs_off_to_the_deadline_and_retries_errors():
    clock = Clock()
    tries = iter([None, OSError("blip"), None, "there"])

    def attempt():
        x = next(tries)
        if isinstance(x, Exception):
            raise x
        return x

    errors = []
    got = retry_until(
        attempt, 60, Backoff(1, 2, 3), on_error=errors.append, sleep=clock.sleep,
        clock=lambda: clock.now,
    )  # fmt: skip
    assert got == "there" and clock.slept == [1, 2, 3] and len(errors) == 1
    # never there: the pauses stop before the deadline (no pause that would end past it)
    clock = Clock()
    none = retry_until(
        lambda: None, 10, Backoff(1, 2, 4), sleep=clock.sleep, clock=lambda: clock.now
    )
    assert none is None and clock.slept == [1, 2, 4] and clock.now <= 10
    # an error not retried is raised at once
    with pytest.raises(ValueError):
        retry_until(lambda: int("x"), 10, Backoff(), sleep=clock.sleep)
    with pytest.raises(OSError):  # retried only where the caller hears about it
        retry_until(lambda: (_ for _ in ()).throw(OSError("x")), 10, Backoff(), sleep=clock.sleep)


# --- the single-VM engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(tiny_teacher_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny job (24 train and 8 eval samples, 2 a shard: 12 + 4 shards) and its real
    shard set, written once by the real teacher into a local directory."""
    tmp = tmp_path_factory.mktemp("logic")
    out = str(tmp / "ref")
    job = make_job(tmp, tiny_teacher_dir, out, 24, 8, teacher__samples_per_shard="2")
    run_teacher(load_job(job))
    return job, tmp / "ref"


def bucket(gcs_server) -> str:
    """A fresh bucket on the suite's emulator (a module fixture's: gcs_bucket is a test's)."""
    from distill.demo.fake_gcs import emulator_client

    name = f"logic-{uuid.uuid4().hex[:12]}"
    emulator_client().create_bucket(name)
    return f"gs://{name}"


def options(tmp: Path) -> CloudOptions:
    return CloudOptions(
        backend="local",
        yes=True,
        poll_seconds=0.001,
        state_dir=tmp / "state",
        teardown_timeout_s=5.0,
        finish_grace_s=0.0,
    )


@pytest.fixture(scope="module")
def base_plan(ref, gcs_server, tmp_path_factory) -> Plan:
    """One preflight (the estimate tokenises the data): every test runs a copy of it."""
    job, _ = ref
    tmp = tmp_path_factory.mktemp("plan")
    j = load_job(job, [f'job.output="{bucket(gcs_server)}/run"', f"cloud.zones={list(ZONES)}"])
    session = Session(j, options(tmp), Console(file=io.StringIO()), backend=MemoryBackend(ZONES))
    return session.preflight()


def test_the_preflight_estimate_is_sampled_and_its_shard_totals_exact(ref, gcs_server, tmp_path):
    """teacher-cloud prices a sampled estimate (here 8 of the 24 train lines tokenised) but
    counts the lines, so the progress display's shard totals are exact: 12 + 4 shards of 2."""
    job, _ = ref
    j = load_job(job, [f'job.output="{bucket(gcs_server)}/run"', f"cloud.zones={list(ZONES)}"])
    opts = dataclasses.replace(options(tmp_path), cost=CostOptions(sample_lines=8))
    session = Session(j, opts, Console(file=io.StringIO()), backend=MemoryBackend(ZONES))
    plan = session.preflight()
    data = plan.estimate.data
    assert set(data.sampled) == {"train"} and data.sampled["train"].sampled == 8
    totals = session.bucket_progress(plan).totals
    assert {split: shards for split, (shards, _) in totals.items()} == {"train": 12, "eval": 4}
    assert totals["train"][1] == data.per_split["train"]["tokens"] and data.bound("tokens") > 0


def test_the_preflight_copies_a_gs_split_once(ref, gcs_server, tmp_path, monkeypatch):
    """teacher-cloud's checks and its sampled estimate read one copy of a gs:// split (over
    the user's link), not one each."""
    from distill.store.storage import GCSStore

    job, _ = ref
    out = bucket(gcs_server)
    open_store(f"{out}/data").put_file("train.jsonl", Path(load_job(job).data.train))
    sets = [
        f'job.output="{out}/run"',
        f"cloud.zones={list(ZONES)}",
        f'data.train="{out}/data/train.jsonl"',
    ]
    downloads: list[str] = []
    real = GCSStore.download

    def counted(self, name: str, dest: Path) -> None:
        downloads.append(name)
        real(self, name, dest)

    monkeypatch.setattr(GCSStore, "download", counted)
    opts = dataclasses.replace(options(tmp_path), cost=CostOptions(sample_lines=8))
    session = Session(
        load_job(job, sets), opts, Console(file=io.StringIO()), backend=MemoryBackend(ZONES)
    )
    plan = session.preflight()
    assert plan.estimate.data.sampled["train"].sampled == 8  # the sampled path, on the copy
    assert downloads == ["data/train.jsonl"]


def plan_for(base: Plan, out: str, **cloud: object) -> Plan:
    """``base`` with its own output and cloud settings."""
    job = base.job.model_copy(
        update={"output": str(out), "cloud": base.job.cloud.model_copy(update=cloud)}
    )
    return dataclasses.replace(base, job=job, output=str(out))


def vm_engine(plan: Plan, ref, tmp: Path, backend: MemoryBackend) -> tuple[VmEngine, io.StringIO]:
    backend.world = ShardWorld(ref[1], plan.output, plan.fingerprints)
    log = io.StringIO()
    session = Session(plan.job, options(tmp), Console(file=log, width=200), backend=backend)
    return VmEngine(session), log


def complete(plan: Plan) -> bool:
    return all(open_store(f"{plan.output}/{s}").exists(MANIFEST) for s in plan.fingerprints)


def test_vm_runs_to_the_end_and_is_deleted(ref, base_plan, gcs_bucket, tmp_path):
    plan = plan_for(base_plan, gcs_bucket + "/run")
    backend = MemoryBackend(ZONES)
    engine, _ = vm_engine(plan, ref, tmp_path, backend)
    run = engine.run(plan)
    assert run is not None and run.outcome == "done" and complete(plan)
    assert backend.created == [(NAME, ZONES[0])] and not backend.vms  # deleted
    assert [a.outcome for a in run.attempts] == ["done"] and run.preemptions == 0
    assert plan.vms == 1 and plan.job.teacher.mode == "resident"  # auto pinned
    records = [n for n in open_store(f"{plan.output}/cloud").list() if n.startswith("run-")]
    assert len(records) == 1  # the record, written create-only to the bucket
    assert engine.run(plan) is None  # complete: a rerun creates nothing
    assert len(backend.created) == 1


def test_a_stockout_fails_over_to_the_next_zone(ref, base_plan, gcs_bucket, tmp_path):
    plan = plan_for(base_plan, gcs_bucket + "/run")
    backend = MemoryBackend(ZONES)
    backend.stockouts = {ZONES[0]: 1}
    run = vm_engine(plan, ref, tmp_path, backend)[0].run(plan)
    assert run.outcome == "done" and backend.created == [(NAME, ZONES[1])]
    assert run.stockouts == [ZONES[0]]


def test_every_zone_stocked_out_gives_up_at_the_provision_timeout(
    ref, base_plan, gcs_bucket, tmp_path
):
    plan = plan_for(base_plan, gcs_bucket + "/run", provision_timeout_minutes=0.001)
    backend = MemoryBackend(ZONES)
    backend.stockouts = dict.fromkeys(ZONES, 10**6)
    with pytest.raises(Stockout, match="no L4 capacity in .* no VM was created"):
        vm_engine(plan, ref, tmp_path, backend)[0].run(plan)
    assert not backend.created and not backend.vms


def test_a_preempted_vm_is_relaunched_same_zone_first(ref, base_plan, gcs_bucket, tmp_path):
    """Preempted in b: the relaunch tries b again; b stocked out then: c. No shard is lost
    or written twice (the copies are create-only: a second write would raise)."""
    plan = plan_for(base_plan, gcs_bucket + "/run")
    backend = MemoryBackend(ZONES)
    backend.stockouts = {ZONES[0]: 1}
    preempted = []

    def preempt(vm, done):
        if done in (3, 9) and vm.id not in preempted:
            preempted.append(vm.id)
            backend.preempt(vm.name)
            if len(preempted) == 2:
                backend.stockouts[vm.zone] = 1  # the zone it ran in has no capacity now

    backend.on_shard = preempt
    run = vm_engine(plan, ref, tmp_path, backend)[0].run(plan)
    assert run.outcome == "done" and run.preemptions == 2 and complete(plan)
    assert [z for _, z in backend.created] == [ZONES[1], ZONES[1], ZONES[2]]
    assert [a.outcome for a in run.attempts] == ["preempted", "preempted", "done"]


def test_too_many_preemptions_give_up_and_delete_the_vm(ref, base_plan, gcs_bucket, tmp_path):
    plan = plan_for(base_plan, gcs_bucket + "/run", max_preemptions=1)
    backend = MemoryBackend(ZONES)
    backend.on_shard = lambda vm, done: backend.preempt(vm.name)
    with pytest.raises(CloudError, match="preempted 2 times: giving up"):
        vm_engine(plan, ref, tmp_path, backend)[0].run(plan)
    assert len(backend.created) == 2 and not backend.vms and not complete(plan)


def test_a_running_vm_of_the_job_is_adopted_not_duplicated(ref, base_plan, gcs_bucket, tmp_path):
    """An earlier controller died: its VM still runs. A rerun watches it (and asks nothing:
    without --yes and without a terminal, pricing would refuse)."""
    plan = plan_for(base_plan, gcs_bucket + "/run")
    backend = MemoryBackend(ZONES)
    engine, log = vm_engine(plan, ref, tmp_path, backend)
    backend.paused = True
    spec = engine.spec(plan, '[job]\nname = "job"\n', ())
    backend.create(spec, ZONES[1])
    backend.paused = False
    engine.session.opts.yes = False
    run = engine.run(plan)
    assert run.outcome == "done" and backend.created == [(NAME, ZONES[1])]
    assert "already running in us-central1-b" in log.getvalue()


def test_a_failing_teacher_is_reported_with_its_output(ref, base_plan, gcs_bucket, tmp_path):
    plan = plan_for(base_plan, gcs_bucket + "/run")
    backend = MemoryBackend(ZONES)
    backend.fail_with = "RuntimeError: CUDA error: out of memory"
    with pytest.raises(TeacherFailed, match="failed .*\n.*CUDA error: out of memory"):
        vm_engine(plan, ref, tmp_path, backend)[0].run(plan)
    assert not backend.vms  # deleted all the same


# --- the Batch engine -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_plan(ref, gcs_server, tmp_path_factory) -> Plan:
    job, _ = ref
    tmp = tmp_path_factory.mktemp("batch-plan")
    sets = [f'job.output="{bucket(gcs_server)}/run"', 'cloud.engine="batch"', "cloud.vms=3"]
    session = Session(
        load_job(job, sets), options(tmp), Console(file=io.StringIO()), backend=MemoryBackend()
    )
    return session.preflight()


def batch_engine(plan: Plan, ref, tmp: Path) -> tuple[BatchEngine, MemoryBatchApi, io.StringIO]:
    api = MemoryBatchApi()
    api.world = ShardWorld(ref[1], plan.output, plan.fingerprints)
    log = io.StringIO()
    session = Session(plan.job, options(tmp), Console(file=log, width=200), backend=MemoryBackend())
    return BatchEngine(session, api=api), api, log


def test_batch_tasks_split_the_shards_and_the_manifests_are_written(
    ref, batch_plan, gcs_bucket, tmp_path
):
    plan = plan_for(batch_plan, gcs_bucket + "/run")
    engine, api, _ = batch_engine(plan, ref, tmp_path)
    run = engine.run(plan)
    assert run.outcome == "done" and complete(plan) and plan.vms == 3
    (spec,) = api.created
    assert spec.tasks == 3 and spec.max_retries == 10
    assert not api.jobs and len(api.deleted) == 1  # deleted in the finally
    assert sorted(a.zone for a in run.attempts) == ["task 0", "task 1", "task 2"]
    assert engine.run(plan) is None and len(api.created) == 1  # complete: nothing to do


def test_a_preempted_task_is_retried_and_counted(ref, batch_plan, gcs_bucket, tmp_path):
    plan = plan_for(batch_plan, gcs_bucket + "/run")
    engine, api, log = batch_engine(plan, ref, tmp_path)
    calls = {"n": 0}
    get = api.get

    def get_then_preempt(name):
        st = get(name)
        calls["n"] += 1
        if calls["n"] == 3:
            api.end_attempt(1, 50001)  # the Spot VM went away
        if calls["n"] == 5:
            api.end_attempt(2, 50006)  # the VM was recreated: retried too
        return st

    api.get = get_then_preempt
    run = engine.run(plan)
    assert run.outcome == "done" and run.preemptions == 2 and complete(plan)
    assert "task 1 was preempted (exit code 50001)" in log.getvalue()
    assert "task 2 lost its VM (exit code 50006)" in log.getvalue()


@pytest.mark.parametrize(
    ("code", "error", "needle"),
    [
        (3, TeacherFailed, "the teacher failed (exit codes 3)"),
        (50005, TeacherFailed, "ran past its max run duration"),
        (125, CloudError, "its container did not start (docker run's exit code 125)"),
        (50001, CloudError, "preempted 1 time(s) (or its VM lost), its retries"),
    ],
)
def test_a_failed_task_is_named_with_why_and_its_shards(
    ref, batch_plan, gcs_bucket, tmp_path, code, error, needle
):
    plan = plan_for(batch_plan, gcs_bucket + "/run", max_preemptions=0)
    engine, api, _ = batch_engine(plan, ref, tmp_path)
    get = api.get

    def get_then_fail(name):
        st = get(name)
        if api.jobs and api.job().tasks[0].state == "RUNNING" and not api.job().tasks[0].exit_codes:
            api.end_attempt(0, code)
        return st

    api.get = get_then_fail
    with pytest.raises(error) as e:
        engine.run(plan)
    msg = str(e.value)
    # task 0 wrote its first shard (0), then failed: its others are named
    assert needle in msg and "task 0 (" in msg and "missing shards: train/3, train/6" in msg, msg
    assert not api.jobs and not complete(plan)


def test_a_cancelled_job_ends_the_watch(ref, batch_plan, gcs_bucket, tmp_path):
    plan = plan_for(batch_plan, gcs_bucket + "/run")
    engine, api, _ = batch_engine(plan, ref, tmp_path)
    api.paused = True
    get = api.get

    def get_then_cancel(name):
        st = get(name)
        if st is not None and st.state == "RUNNING":
            api.cancel(name)
        return st

    api.get = get_then_cancel
    with pytest.raises(CloudError, match="was cancelled .CANCELLED. outside this command"):
        engine.run(plan)
    assert not api.jobs


def test_quota_held_in_the_queue_stops_at_once(ref, batch_plan, gcs_bucket, tmp_path):
    plan = plan_for(batch_plan, gcs_bucket + "/run")
    engine, api, _ = batch_engine(plan, ref, tmp_path)
    api.quota_short = "NVIDIA_L4_GPUS"
    with pytest.raises(QuotaExceeded, match="quota: NVIDIA_L4_GPUS is 0"):
        engine.run(plan)
    assert not api.jobs


def test_a_stockout_is_waited_out_then_a_held_job_given_up(ref, batch_plan, gcs_bucket, tmp_path):
    plan = plan_for(batch_plan, gcs_bucket + "/run")
    engine, api, _ = batch_engine(plan, ref, tmp_path)
    api.stockouts = 3
    run = engine.run(plan)
    assert run.outcome == "done" and run.stockouts == ["us-central1"]
    plan = plan_for(batch_plan, gcs_bucket + "/run2", provision_timeout_minutes=0.001)
    engine, api, _ = batch_engine(plan, ref, tmp_path)
    api.hold = True
    with pytest.raises(CloudError, match="no task of the Batch job .* started in 0.001 min"):
        engine.run(plan)
    api.hold, api.stockouts, api.stockout_fails = False, 1, True
    with pytest.raises(Stockout, match="Batch could not create its VMs"):
        engine.run(plan)
    assert not api.jobs


def test_a_live_batch_job_is_adopted_and_a_finished_set_completed(
    ref, batch_plan, gcs_bucket, tmp_path
):
    """An earlier controller died. Its job still runs: watched, not created again. It died
    after every task was done: the rerun writes the manifests and deletes the job."""
    plan = plan_for(batch_plan, gcs_bucket + "/run")
    engine, api, log = batch_engine(plan, ref, tmp_path)
    api.paused = True
    name = api.create(engine.batch_spec(plan, '[job]\nname = "job"\n', ()))
    api.get(name)  # QUEUED -> RUNNING
    api.paused = False
    engine.session.opts.yes = False  # pricing would refuse: adoption asks nothing
    run = engine.run(plan)
    assert run.outcome == "done" and len(api.created) == 1 and "already RUNNING" in log.getvalue()
    # every shard there, no manifest, the job left behind
    plan = plan_for(batch_plan, gcs_bucket + "/run2")
    engine, api, log = batch_engine(plan, ref, tmp_path)
    name = api.create(engine.batch_spec(plan, '[job]\nname = "job"\n', ()))
    while api.get(name).state != "SUCCEEDED":
        pass
    assert not complete(plan)
    assert engine.run(plan) is None and complete(plan) and not api.jobs
    assert "deleting the leftover Batch job" in log.getvalue()


def test_a_batch_job_needs_the_gce_backend(ref, batch_plan, gcs_bucket, tmp_path):
    from distill.cloud.run import teacher_cloud

    with pytest.raises(DistillError, match="runs on Google Cloud only"):
        teacher_cloud(batch_plan.job, options(tmp_path))
