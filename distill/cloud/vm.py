"""``teacher-cloud`` on one VM: provision it, watch it, relaunch it, always tear it down.

The flow, SkyPilot-style (show the cost before spending, clean up after); the session
(:mod:`distill.cloud.session`) does steps 1, 2, 3 and 7:

1. **Check, spending nothing** (:meth:`~distill.cloud.session.Session.preflight`), and
   whether the shard set is already complete.
2. **Price**: the ``cost-estimate`` table; ``cloud.budget_usd`` refuses a job over budget;
   the user confirms (``--yes`` skips the question).
3. **Stage**: the dataset (and a local teacher directory) go to ``<output>/inputs/``.
4. **Provision** the :class:`~distill.cloud.spec.VmSpec` where the recovery strategy
   (:class:`~distill.cloud.recovery.SameZoneFirst`) says: a stockout moves to the next zone,
   round after round with backoff, until ``cloud.provision_timeout_minutes``; a quota error
   stops with how to fix it.
5. **Watch** the bucket (shards done of total, tokens/s, ETA) and the VM (status, spend so
   far). A preempted or vanished VM is relaunched, same zone first, up to
   ``cloud.max_preemptions`` times; the new VM resumes from the bucket.
6. **Tear down** in a ``finally``: on success, failure, Ctrl-C and SIGTERM the VM is deleted
   and the deletion confirmed (signals are held off meanwhile). If this process is killed
   outright, the VM deletes itself when the teacher ends, and its ``maxRunDuration``
   (``cloud.max_run_hours``) deletes it if the teacher hangs.
7. **Record** the attempts, VM seconds and actual cost beside the estimate.

A VM of this job that is already running (a controller that died) is adopted, not duplicated:
the VM name is a function of ``job.name``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from distill.cloud.backend import Backend, VmState
from distill.cloud.errors import AlreadyExists, CloudError, Stockout, TeacherFailed
from distill.cloud.progress import BucketProgress, Rate, Snapshot
from distill.cloud.records import RECORD_PREFIX, Attempt, CloudRun, utc_now
from distill.cloud.recovery import SameZoneFirst
from distill.cloud.retry import Backoff, retry_until
from distill.cloud.session import Contact, Plan, Session, signals_held, watch_bar
from distill.cloud.spec import DEFAULT_MAX_RUN_S, VmSpec, instance_name, job_labels
from distill.errors import DistillError
from distill.store.storage import open_store

PROVISION_BACKOFF = Backoff(first=5.0, factor=2.0, cap=120.0)  # rounds of stocked-out zones
TEARDOWN_BACKOFF = Backoff(first=1.0, factor=2.0, cap=30.0)


class VmEngine:
    """One ``teacher-cloud`` run on one VM (see the module docstring)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.name = instance_name(session.job.name)
        self.record: CloudRun | None = None  # the run's record, once priced (for watchers)

    def spec(self, plan: Plan, job_toml: str, inputs: tuple[tuple[str, str], ...]) -> VmSpec:
        """The VM that runs ``plan``'s job file, its inputs staged."""
        cloud = plan.cloud
        return VmSpec(
            project=plan.project,
            name=self.name,
            job_name=plan.job.name,
            job_toml=job_toml,
            image=plan.image,
            service_account_email=plan.service_account,
            zones=plan.zones,
            provisioning_model="SPOT" if cloud.spot else "STANDARD",
            max_run_duration_s=plan.max_run_s(plan.estimate.spot_hours),
            inputs=inputs,
            status_url=f"{plan.output}/{RECORD_PREFIX}/status",
            network=cloud.network,
            subnetwork=cloud.subnetwork,
            boot_disk_gb=plan.estimate.opts.boot_disk_gb,
        )

    def run(self, plan: Plan | None = None) -> CloudRun | None:
        """The whole run; its record (None when there was nothing to do). ``plan``: one
        :meth:`~distill.cloud.session.Session.preflight` already made (else it is made)."""
        s = self.session
        s.console.print(
            f"teacher-cloud: job {s.job.name}, project {s.project}, "
            f"zones {', '.join(s.job.cloud.zones)}, backend {s.backend.name}"
        )
        plan = plan or s.preflight()
        if s.complete(plan):
            s.console.print(f"[green]{plan.output}: every split is complete; nothing to do")
            return None
        adopted = self._adopt(plan)
        if adopted is None:
            s.price_and_confirm(plan)
        self.record = s.new_record(plan, self.name)
        live = _VmRun(self, plan, self.record, s.bucket_progress(plan))
        return s.supervise(
            live.record, plan, lambda: live.loop(adopted), live.teardown, lambda: live.current
        )

    def _adopt(self, plan: Plan) -> Attempt | None:
        """A live VM of this job from an earlier controller: watch it instead of a new one."""
        s = self.session
        for st in s.backend.list(job_labels(plan.job.name)):
            if st.name != self.name:
                continue
            if st.live:
                s.console.print(
                    f"{st.name} is already running in {st.zone} (an earlier teacher-cloud ended "
                    "without tearing down): watching it"
                )
                return Attempt(n=1, zone=st.zone, requested=st.created, vm_id=st.id)
            s.console.print(f"deleting stopped leftover {st.name} in {st.zone}")
            s.backend.delete(st.name, st.zone)
        return None


class _VmRun:
    """A run's state from the price on: its plan, record, progress, VM spec and attempt."""

    def __init__(
        self, engine: VmEngine, plan: Plan, record: CloudRun, progress: BucketProgress
    ) -> None:
        self.engine, self.plan, self.record, self.progress = engine, plan, record, progress
        self.session = engine.session
        self.backend: Backend = engine.session.backend
        self.console = engine.session.console
        self.name = engine.name
        self.poll = engine.session.poll
        self.recovery = SameZoneFirst(plan.zones, plan.cloud.max_preemptions)
        self.spec: VmSpec | None = None  # once the inputs are staged
        self.zone: str | None = None  # where the current VM is
        self.current: Attempt | None = None

    # --- 4. provision -------------------------------------------------------------------------

    def loop(self, adopted: Attempt | None) -> None:
        """Provision (or adopt), watch, relaunch after a preemption, until the set is done."""
        self.spec = self.engine.spec(self.plan, *self.session.stage(self.plan))
        attempt, start = adopted, None
        if adopted is not None:
            self.zone = adopted.zone
        while True:
            if attempt is None:
                attempt = Attempt(n=len(self.record.attempts) + 1, zone="", requested=utc_now())
            self.current = attempt
            self.record.attempts.append(attempt)
            if not attempt.zone:
                self.zone = attempt.zone = self.provision(self.spec, start)
            outcome = self.watch(attempt)
            attempt.outcome = outcome
            if outcome == "done":
                self._let_it_finish(attempt)
                return
            self.record.preemptions += 1
            n, most = self.record.preemptions, self.plan.cloud.max_preemptions
            self.console.print(
                f"[yellow]{self.name} was {outcome} in {attempt.zone} "
                f"(after {attempt.live_seconds() / 60:.1f} min); relaunching ({n}/{most})"
            )
            if self.recovery.give_up(n):
                raise CloudError(
                    f"{self.name} was preempted {n} times: giving up (raise "
                    "cloud.max_preemptions, or set cloud.spot = false for an on-demand VM); "
                    "rerun to resume from the shards in the bucket"
                )
            # the VM is gone (DELETE on preemption) or stopped: make sure before relaunching
            if self.backend.get(self.name, attempt.zone) is not None:
                self.backend.delete(self.name, attempt.zone)
            start, attempt = attempt.zone, None

    def provision(self, spec: VmSpec, start: str | None) -> str:
        """Create the VM in the strategy's zone order (from ``start``, the zone a preempted VM
        ran in), round after round until the provision timeout; returns the zone."""
        order = self.recovery.order(start)
        cloud = self.plan.cloud

        def one_round() -> str | None:
            for z in order:
                self.console.print(f"creating {self.name} in {z} ({spec.provisioning_model})")
                try:
                    self._create_or_adopt(spec, z)
                    return z
                except Stockout as e:
                    self.record.stockouts.append(z)
                    self.console.print(f"[yellow]{z}: no L4 capacity now[/yellow] ({e})")
            return None

        zone = retry_until(
            one_round,
            cloud.provision_timeout_minutes * 60,
            PROVISION_BACKOFF,
            retry_on=(),
            on_pause=lambda s: self.console.print(f"all zones stocked out; retrying in {s:.0f} s"),
        )
        if zone is None:
            raise Stockout(
                f"no L4 capacity in {', '.join(self.plan.zones)} for "
                f"{cloud.provision_timeout_minutes:g} min: try later, other zones of "
                "the region or another region (cloud.zones), or raise "
                "cloud.provision_timeout_minutes; no VM was created"
            )
        return zone

    def _create_or_adopt(self, spec: VmSpec, zone: str) -> None:
        """Create the VM in ``zone``; one of this name there already is adopted if it runs, else
        deleted and created anew (a stockout then fails over like any other)."""
        try:
            self.backend.create(spec, zone)
        except AlreadyExists:
            st = self.backend.get(self.name, zone)
            if st is not None and st.live:
                self.console.print(f"{self.name} already runs in {zone}: adopting it")
                return
            self.backend.delete(self.name, zone)
            self.backend.create(spec, zone)

    # --- 5. watch -----------------------------------------------------------------------------

    def watch(self, attempt: Attempt) -> str:
        """Poll until the shard set is complete or this VM ends; returns the outcome."""
        progress = self.progress
        rate = Rate()
        last_guest = ""
        last_status = ""
        with watch_bar(self.console) as bar:
            snap = progress.poll()
            task = bar.add_task("", total=snap.shards_total, completed=snap.shards_done, info="")
            grace = self.session.opts.watch_grace_s
            contact = Contact("Compute API", "the VM", grace, self.poll, bar)
            while True:
                got = contact.read(
                    lambda: (self.backend.get(self.name, attempt.zone), progress.poll())
                )
                if got is None:
                    continue
                st, snap = got
                if st is not None:
                    attempt.vm_id = attempt.vm_id or st.id
                    if st.status in ("STAGING", "RUNNING"):
                        attempt.mark_running()
                    last_guest = st.guest.get("distill/status", last_guest)
                    shown = f"{st.status}" + (f"/{last_guest}" if last_guest else "")
                    if shown != last_status:
                        bar.console.print(f"{self.name} in {attempt.zone}: {shown}")
                        last_status = shown
                if attempt._t_running is not None:
                    tps, eta = rate.update(snap)
                else:
                    tps, eta = 0.0, None
                bar.update(task, completed=snap.shards_done, info=self._info(snap, tps, eta, st))
                if snap.complete:
                    return "done"
                if st is None or st.status == "TERMINATED":
                    attempt.mark_ended()
                    return self._ended(attempt, last_guest)
                time.sleep(self.poll)

    def _status_object(self, attempt: Attempt) -> dict[str, Any] | None:
        if not attempt.vm_id:
            return None
        store = open_store(f"{self.plan.output}/{RECORD_PREFIX}/status")
        name = f"{self.name}-{attempt.vm_id}.json"
        try:
            return json.loads(store.read_bytes(name))
        except DistillError:
            return None

    def _vm_log(self, attempt: Attempt, status: dict[str, Any]) -> str:
        """The VM's whole startup log (the record's ``log`` object), else its serial console."""
        store = open_store(f"{self.plan.output}/{RECORD_PREFIX}/status")
        name = status.get("log") or f"{self.name}-{attempt.vm_id}.log"
        try:
            return store.read_bytes(name).decode(errors="replace")
        except DistillError:
            return self.backend.console(self.name, attempt.zone)

    def _ended(self, attempt: Attempt, last_guest: str) -> str:
        """Why the VM is gone or stopped: done | preempted | vanished (or raise on failure)."""
        # (the watch listed the bucket after it saw the VM gone: a complete set was seen there)
        status = self._status_object(attempt) or {}
        outcome = status.get("status") or last_guest
        # A preemption can kill the teacher before it handles SIGTERM (an error exit): the
        # preemption, not the exit code, is why the VM ended.
        if outcome == "preempted" or self.backend.was_preempted(
            self.name, attempt.zone, attempt.vm_id
        ):
            return "preempted"
        output = self.plan.output
        if outcome == "failed":
            tail = self._vm_log(attempt, status)
            full = (
                f" (the whole log: {output}/{RECORD_PREFIX}/status/{status['log']})"
                if status.get("log")
                else ""
            )
            raise TeacherFailed(
                f"the teacher VM {self.name} failed (exit code "
                f"{status.get('exit_code', '?')}); its last output{full}:\n"
                + "\n".join(tail.strip().splitlines()[-25:])
            )
        if outcome == "done":
            raise CloudError(
                f"{self.name} reported done but {output} has no manifest for every split"
            )
        max_run = self.spec.max_run_duration_s if self.spec else DEFAULT_MAX_RUN_S
        if attempt.live_seconds() >= max_run - 2 * self.poll:
            raise CloudError(
                f"{self.name} reached its max run duration ({max_run / 3600:.2f} h) and was "
                "deleted before the teacher finished: raise cloud.max_run_hours and rerun "
                "(the teacher resumes from the shards already in the bucket)"
            )
        return "vanished"

    def _let_it_finish(self, attempt: Attempt) -> None:
        """The shard sets are complete: give the teacher a moment to exit, record its outcome
        and delete its own VM, so the record says done rather than killed by our teardown
        (which follows, whatever happens here)."""
        deadline = time.monotonic() + self.session.opts.finish_grace_s
        while time.monotonic() < deadline:
            try:
                st = self.backend.get(self.name, attempt.zone)
            except (DistillError, OSError):
                return
            if st is None or st.status in ("STOPPING", "TERMINATED"):
                return
            if st.guest.get("distill/status") in ("done", "failed", "preempted"):
                return
            time.sleep(min(self.poll, 5.0))

    def _info(self, snap: Snapshot, tps: float, eta: float | None, st: VmState | None) -> str:
        parts = [
            f"shards {snap.shards_done}/{snap.shards_total}",
            f"{tps:,.0f} tok/s" if tps else "- tok/s",
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}" if eta is not None else "ETA -",
            f"${self.record.usd:,.4f} spent",
        ]
        if st is not None:
            parts.append(f"{st.status} in {st.zone}")
        return " · ".join(parts)

    # --- 6. teardown --------------------------------------------------------------------------

    def teardown(self) -> None:
        """Delete every VM of this job that still exists, and confirm that it is gone.

        Errors (an API outage) are retried with backoff for ``opts.teardown_timeout_s``: a VM
        left running costs more than a controller that waits."""

        def one_pass() -> bool | None:
            where = {(s.name, s.zone) for s in self.backend.list(job_labels(self.plan.job.name))}
            where = {w for w in where if w[0] == self.name}
            if self.zone:
                where.add((self.name, self.zone))
            for name, zone in sorted(where):
                if self.backend.get(name, zone) is not None:
                    self.console.print(f"deleting {name} in {zone}")
                    self.backend.delete(name, zone)
            if all(self.backend.get(n, z) is None for n, z in where):
                if self.current is not None:
                    self.current.mark_ended()
                return True
            return None

        with signals_held(self.console):
            gone = retry_until(
                one_pass,
                self.session.opts.teardown_timeout_s,
                TEARDOWN_BACKOFF,
                on_error=lambda e: self.console.print(f"[red]teardown: {e}; retrying[/red]"),
            )
        if not gone:
            self.console.print(
                f"[red bold]could not confirm that {self.name} is deleted: run "
                f"`distill-ctl gc --yes` or `gcloud compute instances delete {self.name} "
                f"--zone {self.zone} --project {self.plan.project}` now"
            )
