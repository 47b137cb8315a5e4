"""``teacher-cloud --vms N``: one teacher job over N Spot L4 VMs, as one Google Cloud Batch job.

Batch does what the single-VM controller does by hand: it creates the VMs (Spot, the GPU
driver installed), runs the teacher image, retries a preempted task on a new VM (the one
RETRY_TASK lifecycle policy, ``maxRetryCount`` = ``cloud.max_preemptions``, at most 10) and
deletes its VMs.
Task i computes the shards ``s % N == i`` (:class:`distill.shardset.Part`), create-only,
skipping those already in the bucket. This controller (a :class:`Controller`, so the checks,
price, staging, record and signal handling are the single VM's):

1. checks and prices the tasks, N capped at the most shards of a split (GPU quota for that
   many L4s; ``cost-estimate --vms N``), then asks;
2. if every shard is already in the bucket (an earlier run whose controller died), writes the
   manifest and stops; a live Batch job of this job is adopted, a finished one deleted;
3. creates the job and watches the bucket (shards done/total, tokens/s, ETA, $ so far from
   the tasks' VM time) and the tasks (each attempt, preemptions, retries);
4. writes each split's manifest (create-only) once all its shards are there;
5. deletes the Batch job in a ``finally`` (done, failed, Ctrl-C, SIGTERM) and confirms it is
   gone. A task that failed (its retries exhausted, or the teacher failed) is named with its
   missing shards; a rerun computes only those.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from rich.console import Console

from distill.cloud.backend import Backend, CloudError, QuotaExceeded, Stockout
from distill.cloud.batch import (
    ENDED,
    EXIT_MAX_RUN,
    EXIT_TASK_FAILED,
    EXIT_UNRESPONSIVE,
    EXIT_VM_PREEMPTED,
    LIVE,
    RETRY_CODES,
    VM_GONE_CODES,
    BatchApi,
    BatchSpec,
    JobState,
    TaskState,
    allocation_error,
    batch_job_id,
)
from distill.cloud.controller import (
    Attempt,
    CloudOptions,
    CloudRun,
    Contact,
    Controller,
    TeacherFailed,
    signals_held,
    stage_inputs,
    vm_job_toml,
)
from distill.cloud.progress import Rate, Snapshot
from distill.cloud.spec import region_of
from distill.config import Job
from distill.errors import DistillError
from distill.format.shards import shard_name
from distill.shardset import finish_split, sidecar_name
from distill.store.storage import open_store

# docker run's own exit codes: the container never ran the task (docker/runtime error, the
# entrypoint not executable or not found)
CONTAINER_NOT_STARTED = (125, 126, 127)


class FanoutController(Controller):
    """One ``teacher-cloud`` run on Google Cloud Batch (see the module docstring)."""

    def __init__(
        self,
        job: Job,
        opts: CloudOptions,
        console: Console | None = None,
        confirm: Callable[[str], bool] | None = None,
        backend: Backend | None = None,
        api: BatchApi | None = None,
    ) -> None:
        cost = dataclasses.replace(opts.cost, vms=job.cloud.vms, engine="batch")
        opts = dataclasses.replace(opts, cost=cost)
        super().__init__(job, opts, console, confirm, backend)
        self.vms = job.cloud.vms
        self.region = region_of(self.zones[0])
        self.job_id = batch_job_id(job.name)
        self.job_path = f"projects/{self.project}/locations/{self.region}/jobs/{self.job_id}"
        self.api = api or BatchApi(self.project, endpoint=opts.batch_endpoint)
        self.batch: str | None = None  # the job's name once created or adopted
        self.attempts: dict[int, Attempt] = {}  # task index -> its current VM
        self.codes_seen: dict[int, int] = {}  # task index -> exit codes already accounted

    # --- the run -------------------------------------------------------------------------

    def execute(self) -> CloudRun | None:
        self.console.print(
            f"teacher-cloud: job {self.job.name}, project {self.project}, region "
            f"{self.region}, Batch job {self.job_id} (--vms {self.vms})"
        )
        self.preflight()
        if self.tasks < self.vms:
            self.console.print(
                f"{self.tasks} task(s), not {self.vms}: no split has more shards than that"
            )
        if self.finish():
            self.console.print(f"[green]{self.output}: every split is complete; nothing to do")
            self._remove_leftover()
            return None
        adopted = self._adopt_job()
        if not adopted:
            self.price_and_confirm()
        assert self.estimate is not None
        self.run = self.new_record(self.job_id)
        self.progress = self.bucket_progress()

        def body() -> None:
            if not adopted:
                self.batch = self.api.create(self.make_batch_spec())
                self.console.print(f"created Batch job {self.batch}")
            self.watch_job()

        return self.supervised(body)

    def make_batch_spec(self) -> BatchSpec:
        assert self.estimate is not None
        raw, inputs = stage_inputs(self.job, self.console)
        return BatchSpec(
            project=self.project,
            job_name=self.job.name,
            job_toml=vm_job_toml(raw),
            inputs=inputs,
            image=self.image(),
            service_account_email=self.service_account(),
            zones=tuple(self.zones),
            tasks=self.tasks,
            max_retries=self.cloud.max_preemptions,
            max_run_duration_s=self.max_run_s(self.estimate.wall_hours),
            spot=self.cloud.spot,
            network=self.cloud.network,
            subnetwork=self.cloud.subnetwork,
            boot_disk_gb=self.estimate.opts.boot_disk_gb,
        )

    def _adopt_job(self) -> bool:
        """A live Batch job of this job (a controller that died): watch it, create nothing.
        A finished one is deleted (its ID is this job's) and waited for."""
        st = self.api.get(self.job_path)
        if st is None:
            return False
        if st.state in LIVE:
            self.console.print(
                f"Batch job {st.name} is already {st.state} (an earlier teacher-cloud ended "
                "without deleting it): watching it"
            )
            self.batch = st.name
            return True
        self.console.print(f"deleting the finished Batch job {st.name} ({st.state})")
        self.batch = st.name
        self._delete_job()
        self.batch = None
        return False

    def _remove_leftover(self) -> None:
        """The shard sets are complete: a job of this job still there (its controller died)
        has nothing left to do: delete it."""
        st = self.api.get(self.job_path)
        if st is not None:
            self.console.print(f"deleting the leftover Batch job {st.name} ({st.state})")
            self.batch = st.name
            if not self._delete_job():
                raise CloudError(f"could not confirm that the Batch job {st.name} is deleted")

    @property
    def tasks(self) -> int:
        """The Batch job's tasks: the estimate's, --vms capped at the most shards of a split."""
        assert self.estimate is not None
        return self.estimate.tasks

    def vms_at_once(self) -> int:
        return self.tasks  # parallelism = taskCount

    def finish(self) -> bool:
        """Write each split's manifest whose shards are all there; True once all have one.
        Another job's shard set in the output is refused (:func:`finish_split`)."""
        return all(
            finish_split(open_store(f"{self.output}/{split}"), fp) is not None
            for split, fp in self.fingerprints.items()
        )

    # --- watch -----------------------------------------------------------------------------

    def watch_job(self) -> None:
        """Poll the job, its tasks and the bucket until every manifest is written."""
        progress, batch = self.progress, self.batch
        assert progress is not None and batch is not None
        rate = Rate()
        seen_events = 0
        first_run: float | None = None
        provision_deadline = time.monotonic() + self.cloud.provision_timeout_minutes * 60

        def read() -> tuple[JobState | None, list[TaskState], Snapshot]:
            st = self.api.get(batch)
            return st, (self.api.tasks(batch) if st is not None else []), progress.poll()

        with self.watch_bar() as bar:
            snap = progress.poll()
            bar_task = bar.add_task(
                "", total=snap.shards_total, completed=snap.shards_done, info=""
            )
            contact = Contact("Batch API", "the job", self.opts.watch_grace_s, self.poll, bar)
            while True:
                got = contact.read(read)
                if got is None:
                    continue
                st, tasks, snap = got
                for ev in (st.events if st else [])[seen_events:]:
                    bar.console.print(f"{self.job_id}: {ev}")
                seen_events = len(st.events) if st else 0
                self._track(tasks, bar.console)
                if first_run is None and any(t.state == "RUNNING" for t in tasks):
                    first_run = time.monotonic()
                tps, eta = rate.update(snap) if first_run is not None else (0.0, None)
                bar.update(bar_task, completed=snap.shards_done, info=self._info(snap, tps, eta))
                if snap.shards_done >= snap.shards_total and self.finish():
                    self._end_attempts("done")
                    return
                if st is None:
                    raise CloudError(
                        f"the Batch job {self.batch} vanished before every shard was written; "
                        "rerun to compute the missing shards"
                    )
                self._check_allocation(st, first_run, provision_deadline)
                if st.state in ENDED:
                    self._ended(st, tasks, snap, first_run)
                time.sleep(self.poll)

    def _check_allocation(self, st: JobState, first_run: float | None, deadline: float) -> None:
        """Quota refused (a VM creation, or the job held in QUEUED for it): stop now. Until a
        task runs, whatever holds the job (no capacity, a queue) is waited out only until
        ``cloud.provision_timeout_minutes``: Batch itself would keep a job QUEUED for 2 days."""
        err = allocation_error(self.project, st.events)
        if isinstance(err, QuotaExceeded):
            raise err
        if first_run is not None:
            return
        assert self.run is not None
        if isinstance(err, Stockout) and not self.run.stockouts:
            self.run.stockouts.append(self.region)
        if time.monotonic() <= deadline:
            return
        wait = f"{self.cloud.provision_timeout_minutes:g} min"
        if isinstance(err, Stockout):
            raise Stockout(
                f"no L4 capacity for the Batch job in {', '.join(self.zones)} for {wait}: try "
                "later or another region (cloud.zones), or raise "
                "cloud.provision_timeout_minutes; the job is deleted"
            )
        last = st.events[-1] if st.events else "no event"
        raise CloudError(
            f"no task of the Batch job {self.job_id} started in {wait} (job {st.state}; its "
            f"last event: {last}): raise cloud.provision_timeout_minutes to wait longer; the "
            "job is deleted, and a rerun computes only the missing shards"
        )

    def _ended(
        self, st: JobState, tasks: list[TaskState], snap: Snapshot, first_run: float | None
    ) -> None:
        """The job ended without every shard: why no VM came (the allocation events, first),
        a cancellation, or the failed tasks and their missing shards."""
        err = allocation_error(self.project, st.events)
        if err is not None and first_run is None and not any(t.exit_codes for t in tasks):
            if isinstance(err, Stockout):
                raise Stockout(
                    f"no L4 capacity for the Batch job in {', '.join(self.zones)}: Batch could "
                    f"not create its VMs and ended the job {st.state} ({err}); try later or "
                    "another region (cloud.zones); nothing ran"
                )
            raise err
        missing_n = snap.shards_total - snap.shards_done
        if st.state.startswith("CANCEL"):
            raise CloudError(
                f"the Batch job {self.batch} was cancelled ({st.state}) outside this command "
                f"(the console, or `gcloud batch jobs cancel`) with {missing_n} of "
                f"{snap.shards_total} shards missing; rerun to compute only the missing shards"
            )
        failed = [t for t in tasks if t.state == "FAILED"]
        missing = self._missing()
        lines = []
        for t in failed:
            codes = ", ".join(map(str, t.exit_codes)) or "-"
            why = _why(t.exit_codes[-1:], len(t.exit_codes), self.cloud.max_preemptions)
            mine = [s for s in missing if s[1] % len(tasks) == t.index]
            lines.append(
                f"  task {t.index} ({self.batch}/taskGroups/group0/tasks/{t.index}): {why} "
                f"(exit codes {codes}); missing shards: "
                + (", ".join(f"{sp}/{s}" for sp, s in mine[:8]) + (" ..." if len(mine) > 8 else ""))
            )
        detail = "\n".join(lines) or f"  (job {st.state}, no task failed)"
        err = (
            TeacherFailed
            if any(set(t.exit_codes[-1:]) & {EXIT_TASK_FAILED, EXIT_MAX_RUN} for t in failed)
            else CloudError
        )
        raise err(
            f"the Batch job {self.batch} ended {st.state} with "
            f"{missing_n} of {snap.shards_total} shards missing:\n"
            f"{detail}\nthe task logs: `gcloud logging read 'labels.job_uid=\"{st.uid}\"' "
            f"--project {self.project}`; rerun to compute only the missing shards"
        )

    def _missing(self) -> list[tuple[str, int]]:
        """(split, shard index) of each shard not yet in the bucket."""
        assert self.progress is not None
        out = []
        for split, (total, _) in self.progress.totals.items():
            names = set(self.progress.stores[split].list())
            out += [(split, i) for i in range(total) if sidecar_name(shard_name(i)) not in names]
        return out

    def _track(self, tasks: list[TaskState], console: Console) -> None:
        """Each task's VM attempts (billed while RUNNING), preemptions and failures: an
        attempt ends with an exit code in the task's status events (a retry can start before
        the next poll, so the codes, not the states seen, count the attempts)."""
        assert self.run is not None
        for t in tasks:
            cur = self.attempts.get(t.index)
            for code in t.exit_codes[self.codes_seen.get(t.index, 0) :]:
                if cur is None or cur._t_ended is not None:  # began and ended between polls
                    cur = self._new_attempt(t.index)
                cur.mark_ended()
                if code in RETRY_CODES:
                    cur.outcome = "preempted"
                    self.run.preemptions += 1
                    lost = code in VM_GONE_CODES and code != EXIT_VM_PREEMPTED
                    what = "lost its VM" if lost else "was preempted"
                    console.print(f"[yellow]task {t.index} {what} (exit code {code})")
                else:
                    cur.outcome = "failed"
                    console.print(f"[red]task {t.index} failed (exit code {code})[/red]")
            self.codes_seen[t.index] = len(t.exit_codes)
            live = cur is not None and cur._t_ended is None
            if t.state == "RUNNING" and not live:
                self._new_attempt(t.index)
            elif t.state == "SUCCEEDED" and live:
                assert cur is not None
                cur.mark_ended()
                cur.outcome = "done"

    def _new_attempt(self, index: int) -> Attempt:
        assert self.run is not None
        a = Attempt(n=len(self.run.attempts) + 1, zone=f"task {index}")
        a.mark_running()
        self.attempts[index] = a
        self.run.attempts.append(a)
        self.current = a
        return a

    def _end_attempts(self, outcome: str) -> None:
        for a in self.attempts.values():
            if a._t_ended is None:
                a.mark_ended()
                a.outcome = a.outcome or outcome

    def _info(self, snap: Snapshot, tps: float, eta: float | None) -> str:
        assert self.run is not None
        running = sum(1 for a in self.attempts.values() if a._t_ended is None)
        return " · ".join(
            [
                f"shards {snap.shards_done}/{snap.shards_total}",
                f"{tps:,.0f} tok/s" if tps else "- tok/s",
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
                if eta is not None
                else "ETA -",
                f"${self.run.usd:,.4f} spent",
                f"{running}/{self.tasks} VMs running",
            ]
        )

    # --- teardown ------------------------------------------------------------------------

    def teardown(self) -> None:
        """Delete the Batch job (Batch deletes its VMs) and confirm that it is gone."""
        if self.batch is None:
            return
        with signals_held(self.console):
            if not self._delete_job():
                self.console.print(
                    f"[red bold]could not confirm that the Batch job {self.batch} is deleted: "
                    f"run `distill-ctl gc --yes` or `gcloud batch jobs delete {self.job_id} "
                    f"--location {self.region} --project {self.project}` now"
                )
        self._end_attempts("interrupted")

    def _delete_job(self) -> bool:
        """Delete ``self.batch``, retrying errors with backoff; True once it is gone."""
        assert self.batch is not None
        deadline = time.monotonic() + self.opts.teardown_timeout_s
        pause, asked = 0.2, False
        while time.monotonic() < deadline:
            try:
                st = self.api.get(self.batch)
                if st is None:
                    return True
                if not asked or st.state != "DELETION_IN_PROGRESS":
                    self.console.print(f"deleting Batch job {self.batch}")
                    self.api.delete(self.batch)
                    asked = True
            except (DistillError, OSError) as e:
                self.console.print(f"[red]teardown: {e}; retrying[/red]")
            time.sleep(pause)
            pause = min(pause * 2, 10.0)
        return False


def _why(last: list[int], attempts: int, max_preemptions: int) -> str:
    """Why a task failed, from its last exit code."""
    code = last[0] if last else None
    if code == EXIT_TASK_FAILED:
        return "the teacher failed"
    if code == EXIT_MAX_RUN:
        return (
            "it ran past its max run duration (a hung teacher? raise cloud.max_run_hours if "
            "it was only slow)"
        )
    if code == EXIT_UNRESPONSIVE:
        return "its VM and task stopped responding (Batch's exit code 50004)"
    if code in CONTAINER_NOT_STARTED:
        return (
            f"its container did not start (docker run's exit code {code}): see the task log; "
            "an NVIDIA driver older than the image's CUDA stops it this way"
        )
    if code in RETRY_CODES:
        return (
            f"preempted {attempts} time(s) (or its VM lost), its retries "
            f"(cloud.max_preemptions = {max_preemptions}) exhausted"
        )
    if code is None:
        return "it never ran"
    return f"exit code {code}, not the teacher's own: see the task log"
