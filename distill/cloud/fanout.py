"""``teacher-cloud --vms N``: one teacher job over N Spot L4 VMs, as one Google Cloud Batch job.

Batch does what the single-VM engine does by hand: it creates the VMs (Spot, the GPU driver
installed), runs the teacher image, retries a preempted task on a new VM (the one RETRY_TASK
lifecycle policy, ``maxRetryCount`` = ``cloud.max_preemptions``, at most 10) and deletes its
VMs. Task i computes the shards ``s % N == i`` (:class:`distill.shardset.Part`),
create-only, skipping those already in the bucket. This engine shares the single VM's
session (:mod:`distill.cloud.session`: checks, price, staging, record, signal handling):

1. checks and prices the tasks, N capped at the most shards of a split (quotas for that many
   VMs; ``cost-estimate --vms N``), then asks;
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

import time

from rich.console import Console

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
from distill.cloud.errors import CloudError, QuotaExceeded, Stockout, TeacherFailed
from distill.cloud.progress import BucketProgress, Rate, Snapshot
from distill.cloud.records import Attempt, CloudRun
from distill.cloud.retry import Backoff, retry_until
from distill.cloud.session import Contact, Plan, Session, signals_held, watch_bar
from distill.config import region_of
from distill.errors import DistillError
from distill.format.shards import shard_name
from distill.shardset import finish_split, sidecar_name
from distill.store.storage import open_store

# docker run's own exit codes: the container never ran the task (docker/runtime error, the
# entrypoint not executable or not found)
CONTAINER_NOT_STARTED = (125, 126, 127)
DELETE_BACKOFF = Backoff(first=0.2, factor=2.0, cap=10.0)


class BatchEngine:
    """One ``teacher-cloud`` run on Google Cloud Batch (see the module docstring)."""

    def __init__(self, session: Session, api: BatchApi | None = None) -> None:
        self.session = session
        self.job_id = batch_job_id(session.job.name)
        self.api = api or BatchApi(session.project, endpoint=session.opts.batch_endpoint)
        self.record: CloudRun | None = None  # the run's record, once priced (for watchers)

    def job_path(self, plan: Plan) -> str:
        return f"projects/{plan.project}/locations/{plan.region}/jobs/{self.job_id}"

    def batch_spec(
        self, plan: Plan, job_toml: str, inputs: tuple[tuple[str, str], ...]
    ) -> BatchSpec:
        """The Batch job that runs ``plan``'s job file over ``plan.vms`` tasks."""
        cloud = plan.cloud
        return BatchSpec(
            project=plan.project,
            job_name=plan.job.name,
            job_toml=job_toml,
            inputs=inputs,
            image=plan.image,
            service_account_email=plan.service_account,
            zones=plan.zones,
            tasks=plan.vms,
            max_retries=cloud.max_preemptions,
            max_run_duration_s=plan.max_run_s(plan.estimate.wall_hours),
            spot=cloud.spot,
            network=cloud.network,
            subnetwork=cloud.subnetwork,
            boot_disk_gb=plan.estimate.opts.boot_disk_gb,
        )

    def run(self, plan: Plan | None = None) -> CloudRun | None:
        """The whole run; its record (None when there was nothing to do). ``plan``: one
        :meth:`~distill.cloud.session.Session.preflight` already made (else it is made)."""
        s = self.session
        vms = s.job.cloud.vms
        s.console.print(
            f"teacher-cloud: job {s.job.name}, project {s.project}, region "
            f"{region_of(s.job.cloud.zones[0])}, Batch job {self.job_id} (--vms {vms})"
        )
        plan = plan or s.preflight()
        if plan.vms < vms:
            s.console.print(f"{plan.vms} task(s), not {vms}: no split has more shards than that")
        if finish(plan):
            s.console.print(f"[green]{plan.output}: every split is complete; nothing to do")
            self._remove_leftover(plan)
            return None
        adopted = self._adopt_job(plan)
        if adopted is None:
            s.price_and_confirm(plan)
        self.record = s.new_record(plan, self.job_id)
        live = _BatchRun(self, plan, self.record, s.bucket_progress(plan))
        live.batch = adopted

        def body() -> None:
            if adopted is None:
                live.batch = self.api.create(self.batch_spec(plan, *s.stage(plan)))
                s.console.print(f"created Batch job {live.batch}")
            live.watch_job()

        return s.supervise(live.record, plan, body, live.teardown, lambda: live.current)

    def _adopt_job(self, plan: Plan) -> str | None:
        """A live Batch job of this job (a controller that died): its name, to watch it and
        create nothing. A finished one is deleted (its ID is this job's) and waited for."""
        st = self.api.get(self.job_path(plan))
        if st is None:
            return None
        if st.state in LIVE:
            self.session.console.print(
                f"Batch job {st.name} is already {st.state} (an earlier teacher-cloud ended "
                "without deleting it): watching it"
            )
            return st.name
        self.session.console.print(f"deleting the finished Batch job {st.name} ({st.state})")
        self.delete_job(st.name)
        return None

    def _remove_leftover(self, plan: Plan) -> None:
        """The shard sets are complete: a job of this job still there (its controller died)
        has nothing left to do: delete it."""
        st = self.api.get(self.job_path(plan))
        if st is not None:
            self.session.console.print(f"deleting the leftover Batch job {st.name} ({st.state})")
            if not self.delete_job(st.name):
                raise CloudError(f"could not confirm that the Batch job {st.name} is deleted")

    def delete_job(self, name: str) -> bool:
        """Delete the job ``name``, retrying errors with backoff; True once it is gone."""
        console = self.session.console
        asked = False

        def one_try() -> bool | None:
            nonlocal asked
            st = self.api.get(name)
            if st is None:
                return True
            if not asked or st.state != "DELETION_IN_PROGRESS":
                console.print(f"deleting Batch job {name}")
                self.api.delete(name)
                asked = True
            return None

        gone = retry_until(
            one_try,
            self.session.opts.teardown_timeout_s,
            DELETE_BACKOFF,
            on_error=lambda e: console.print(f"[red]teardown: {e}; retrying[/red]"),
        )
        return bool(gone)


def finish(plan: Plan) -> bool:
    """Write each split's manifest whose shards are all there; True once all have one.
    Another job's shard set in the output is refused (:func:`finish_split`)."""
    return all(
        finish_split(open_store(f"{plan.output}/{split}"), fp) is not None
        for split, fp in plan.fingerprints.items()
    )


class _BatchRun:
    """A run's state from the price on: its plan, record, progress, Batch job and tasks."""

    def __init__(
        self, engine: BatchEngine, plan: Plan, record: CloudRun, progress: BucketProgress
    ) -> None:
        self.engine, self.plan, self.record, self.progress = engine, plan, record, progress
        self.session = engine.session
        self.api = engine.api
        self.console = engine.session.console
        self.job_id = engine.job_id
        self.poll = engine.session.poll
        self.project = plan.project
        self.zones = plan.zones
        self.region = plan.region
        self.cloud = plan.cloud
        self.batch: str | None = None  # the job's name once created or adopted
        self.attempts: dict[int, Attempt] = {}  # task index -> its current VM
        self.codes_seen: dict[int, int] = {}  # task index -> exit codes already accounted
        self.current: Attempt | None = None

    @property
    def tasks(self) -> int:
        return self.plan.vms

    # --- watch -------------------------------------------------------------------------------

    def watch_job(self) -> None:
        """Poll the job, its tasks and the bucket until every manifest is written."""
        progress, batch = self.progress, self.batch
        assert batch is not None
        rate = Rate()
        seen_events = 0
        first_run: float | None = None
        provision_deadline = time.monotonic() + self.cloud.provision_timeout_minutes * 60

        def read() -> tuple[JobState | None, list[TaskState], Snapshot]:
            st = self.api.get(batch)
            return st, (self.api.tasks(batch) if st is not None else []), progress.poll()

        with watch_bar(self.console) as bar:
            snap = progress.poll()
            bar_task = bar.add_task(
                "", total=snap.shards_total, completed=snap.shards_done, info=""
            )
            grace = self.session.opts.watch_grace_s
            contact = Contact("Batch API", "the job", grace, self.poll, bar)
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
                if snap.shards_done >= snap.shards_total and finish(self.plan):
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
        if isinstance(err, Stockout) and not self.record.stockouts:
            self.record.stockouts.append(self.region)
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
        kind: type[DistillError] = (
            TeacherFailed
            if any(set(t.exit_codes[-1:]) & {EXIT_TASK_FAILED, EXIT_MAX_RUN} for t in failed)
            else CloudError
        )
        raise kind(
            f"the Batch job {self.batch} ended {st.state} with "
            f"{missing_n} of {snap.shards_total} shards missing:\n"
            f"{detail}\nthe task logs: `gcloud logging read 'labels.job_uid=\"{st.uid}\"' "
            f"--project {self.project}`; rerun to compute only the missing shards"
        )

    def _missing(self) -> list[tuple[str, int]]:
        """(split, shard index) of each shard not yet in the bucket."""
        out = []
        for split, (total, _) in self.progress.totals.items():
            names = set(self.progress.stores[split].list())
            out += [(split, i) for i in range(total) if sidecar_name(shard_name(i)) not in names]
        return out

    def _track(self, tasks: list[TaskState], console: Console) -> None:
        """Each task's VM attempts (billed while RUNNING), preemptions and failures: an
        attempt ends with an exit code in the task's status events (a retry can start before
        the next poll, so the codes, not the states seen, count the attempts)."""
        for t in tasks:
            cur = self.attempts.get(t.index)
            for code in t.exit_codes[self.codes_seen.get(t.index, 0) :]:
                if cur is None or not cur.in_progress:  # began and ended between polls
                    cur = self._new_attempt(t.index)
                cur.mark_ended()
                if code in RETRY_CODES:
                    cur.outcome = "preempted"
                    self.record.preemptions += 1
                    lost = code in VM_GONE_CODES and code != EXIT_VM_PREEMPTED
                    what = "lost its VM" if lost else "was preempted"
                    console.print(f"[yellow]task {t.index} {what} (exit code {code})")
                else:
                    cur.outcome = "failed"
                    console.print(f"[red]task {t.index} failed (exit code {code})[/red]")
            self.codes_seen[t.index] = len(t.exit_codes)
            live = cur is not None and cur.in_progress
            if t.state == "RUNNING" and not live:
                self._new_attempt(t.index)
            elif t.state == "SUCCEEDED" and live:
                assert cur is not None
                cur.mark_ended()
                cur.outcome = "done"

    def _new_attempt(self, index: int) -> Attempt:
        a = Attempt(n=len(self.record.attempts) + 1, zone=f"task {index}")
        a.mark_running()
        self.attempts[index] = a
        self.record.attempts.append(a)
        self.current = a
        return a

    def _end_attempts(self, outcome: str) -> None:
        for a in self.attempts.values():
            if a.in_progress:
                a.mark_ended()
                a.outcome = a.outcome or outcome

    def _info(self, snap: Snapshot, tps: float, eta: float | None) -> str:
        running = sum(1 for a in self.attempts.values() if a.in_progress)
        return " · ".join(
            [
                f"shards {snap.shards_done}/{snap.shards_total}",
                f"{tps:,.0f} tok/s" if tps else "- tok/s",
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
                if eta is not None
                else "ETA -",
                f"${self.record.usd:,.4f} spent",
                f"{running}/{self.tasks} VMs running",
            ]
        )

    # --- teardown ------------------------------------------------------------------------

    def teardown(self) -> None:
        """Delete the Batch job (Batch deletes its VMs) and confirm that it is gone."""
        if self.batch is None:
            return
        with signals_held(self.console):
            if not self.engine.delete_job(self.batch):
                self.console.print(
                    f"[red bold]could not confirm that the Batch job {self.batch} is deleted: "
                    f"run `distill-ctl gc --yes` or `gcloud batch jobs delete {self.job_id} "
                    f"--location {self.region} --project {self.project}` now"
                )
        self._end_attempts("interrupted")


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
