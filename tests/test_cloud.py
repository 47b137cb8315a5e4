"""teacher-cloud end to end without a cloud: the real google-cloud-compute client against the
Compute stub (tests/fakes/compute.py), whose "VMs" run the real startup logic
(distill/cloud/vm_agent.py) and the real teacher entrypoint against fake-gcs-server.

Every fault test ends with the two promises of issue #5: no VM is left, and the stored
sample set is exactly the dataset, each sample once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakes.compute import FakeCompute, InsertError
from helpers import (
    NAME,
    PROJECT,
    REPO,
    SLOW,
    assert_exact,
    controller,
    default_sigint,
    no_vm_left,
    run_in_thread,
    run_records,
    shards_in,
    wait_guest_running,
)
from rich.console import Console

from distill.cloud.backend import Needs, quota_refusal
from distill.cloud.errors import (
    CloudError,
    NoAccelerator,
    PreflightFailed,
    QuotaExceeded,
    Stockout,
    TeacherFailed,
)
from distill.cloud.session import CloudOptions, Session
from distill.cloud.vm import VmEngine
from distill.config import load_job
from distill.errors import DistillError
from distill.format.manifest import MANIFEST
from distill.store.storage import open_store

pytestmark = pytest.mark.wire

# --- the happy path and preemptions -----------------------------------------------------------


def test_teacher_cloud_runs_and_tears_down(compute, cloud_job, tmp_path):
    run = controller(cloud_job, compute, tmp_path).run()
    assert run is not None and run.outcome == "done" and len(run.attempts) == 1
    assert no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)
    body = compute.inserted[0]
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert int(body["scheduling"]["maxRunDuration"]["seconds"]) >= 3600
    md = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    assert "data/train/train.jsonl" in md["distill-job"] and "gs://" in md["distill-inputs"]
    assert 'mode = "resident"' in md["distill-job"]  # "auto" pinned to the estimated way
    assert 'device = "cuda"' in md["distill-job"]  # no GPU in the container: fail, not crawl
    rec = run_records(cloud_job)
    assert len(rec) == 1 and rec[0]["outcome"] == "done" and rec[0]["vm_seconds"] > 0
    assert rec[0]["actual_usd"] > 0 and rec[0]["estimate"]["usd"]["total_spot"] > 0
    # the VM deleted itself (the guest's DELETE) or was deleted by the controller: gone
    events = [e for _, n, e in compute.events if n == NAME]
    assert "deleted" in events
    # A rerun finds the complete shard set and creates nothing.
    assert controller(cloud_job, compute, tmp_path).run() is None
    assert len(compute.inserted) == 1


@pytest.mark.parametrize("when", ["booting", "mid-run", "twice"])
def test_preemption_relaunches_and_loses_nothing(compute, guests, cloud_job, tmp_path, when):
    guests.env["SLOW_TEACHER_S"] = "0.4"
    ctl = controller(cloud_job, compute, tmp_path)
    t, result = run_in_thread(ctl)
    train = f"{load_job(cloud_job).output}/train"
    for n in range(2 if when == "twice" else 1):
        if when == "booting":
            assert compute.wait_for(
                lambda: any(i.status in ("PROVISIONING", "STAGING") for i in compute.live()),
                60,
            )
        else:
            need = 2 + 3 * n
            assert compute.wait_for(lambda need=need: shards_in(train) >= need, 120)
        done_before = shards_in(train)
        compute.preempt(NAME)
        # the next VM comes up (or the run finishes)
        assert compute.wait_for(
            lambda k=n: (
                sum(1 for i in compute.history if i.name == NAME) >= k + 2 or "run" in result
            ),
            120,
        )
    t.join(300)
    assert "error" not in result, result.get("error")
    run = result["run"]
    assert run.outcome == "done" and run.preemptions == (2 if when == "twice" else 1)
    assert [a.outcome for a in run.attempts][-1] == "done"
    assert no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)
    # the preempted teacher stopped cleanly (exit 75), the new one resumed from the bucket
    first = compute.history[0]
    if when != "booting":
        assert any("preempted" in line or "stopped on" in line for line in first.serial), "".join(
            first.serial[-20:]
        )
        # everything in the bucket at the preemption was kept: only the shard in flight redone
        last = "".join(compute.history[-1].serial)
        m = re.search(r"train: resuming, (\d+)/(\d+) shards", last)
        assert m and int(m.group(1)) >= done_before, last[-3000:]
    assert compute.history[-1].zone == first.zone  # same zone first


def test_an_api_outage_while_watching_is_ridden_out(compute, guests, cloud_job, tmp_path):
    guests.env["SLOW_TEACHER_S"] = "0.3"
    ctl = controller(cloud_job, compute, tmp_path)
    t, result = run_in_thread(ctl)
    wait_guest_running(compute)
    compute.failures = 6  # 6 requests answered 503: retried by the client, then by the watcher
    t.join(300)
    assert "error" not in result, result.get("error")
    assert result["run"].outcome == "done" and len(compute.inserted) == 1
    assert compute.failures == 0 and no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)
    # an outage longer than the grace: torn down with an error that says so
    ctl = controller(
        cloud_job, compute, tmp_path, 'job.output="' + load_job(cloud_job).output + '2"'
    )
    ctl.session.opts.watch_grace_s = 0.5
    ctl.session.backend._read["retry"] = ctl.session.backend._read["retry"].with_timeout(2.0)
    t, result = run_in_thread(ctl)
    wait_guest_running(compute)
    compute.failures = 10**6
    assert compute.wait_for(
        lambda: ctl.record is not None and ctl.record.outcome == "failed", 60
    )  # the watcher gave up
    time.sleep(1.0)  # the teardown meets the outage too, and keeps trying
    compute.failures = 0  # the outage ends
    t.join(120)
    assert "lost contact with the Compute API" in str(result.get("error"))
    assert no_vm_left(compute)  # deleted once the API answered again


def test_stockout_fails_over_to_the_next_zone(compute, cloud_job, tmp_path):
    compute.stockout("us-central1-a")
    run = controller(cloud_job, compute, tmp_path).run()
    zones = [re.search(r"zones/([^/]+)/", b["machineType"]).group(1) for b in compute.inserted]
    assert zones == ["us-central1-a", "us-central1-b"]
    assert run.stockouts == ["us-central1-a"] and run.attempts[0].zone == "us-central1-b"
    assert no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)


def test_every_zone_stocked_out_gives_up_with_nothing_left(compute, cloud_job, tmp_path):
    for z in ("us-central1-a", "us-central1-b", "us-central1-c"):
        compute.stockout(z)
    ctl = controller(cloud_job, compute, tmp_path, "cloud.provision_timeout_minutes=0.01")
    with pytest.raises(Stockout, match="no L4 capacity in us-central1-a, us-central1-b"):
        ctl.run()
    assert len(compute.inserted) == 3 and not compute.live()
    assert run_records(cloud_job)[0]["outcome"] == "failed"


@pytest.mark.parametrize(
    "error",
    [
        InsertError("UNSUPPORTED_OPERATION", "Spot G2 cannot be placed in this zone now"),
        InsertError("RESOURCE_NOT_READY", "The resource 'x' is not ready"),
        InsertError("insufficientCapacity", "not enough capacity for g2-standard-8", 503, True),
        InsertError("resourceNotReady", "The resource 'x' is not ready", 400, True),
        InsertError(
            "resourceOperationRateExceeded", "Operation rate exceeded for resource", 403, True
        ),
    ],
    ids=lambda e: ("http-" if e.sync else "op-") + e.reason,
)
def test_other_stockout_shapes_fail_over_too(compute, cloud_job, tmp_path, error):
    """Operation errors by code and synchronous HTTP errors by their reason, not message."""
    compute.fail_inserts("us-central1-a", error)
    run = controller(cloud_job, compute, tmp_path).run()
    assert run.stockouts == ["us-central1-a"] and run.attempts[0].zone == "us-central1-b"
    assert no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)


def test_already_exists_then_a_stockout_fails_over(compute, cloud_job, tmp_path):
    """The AlreadyExists path (an old VM of this name, not running) deletes and creates again;
    a stockout on that create must fail over like any other, not end the run."""
    compute.fail_inserts(
        "us-central1-a",
        InsertError("alreadyExists", f"The resource '{NAME}' already exists", 409, True),
    )
    compute.stockout("us-central1-a", times=1)  # the re-create finds no capacity
    run = controller(cloud_job, compute, tmp_path).run()
    assert run.stockouts == ["us-central1-a"] and run.attempts[0].zone == "us-central1-b"
    assert no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)


def test_billing_disabled_is_a_billing_error(compute, cloud_job, tmp_path):
    compute.fail_inserts(
        "us-central1-a",
        InsertError(
            "accessNotConfigured",
            "This API method requires billing to be enabled. Please enable billing on project "
            f"#{PROJECT} ... The billing account for the owning project is disabled in state "
            "closed",
            403,
            True,
        ),
    )
    with pytest.raises(CloudError) as e:
        controller(cloud_job, compute, tmp_path).run()
    msg = str(e.value)
    assert msg.startswith(f"billing is not enabled for project {PROJECT}")
    assert "billing/linkedaccount" in msg and "API is not enabled" not in msg
    assert not compute.live()


# --- errors that spend nothing ---------------------------------------------------------------


def nothing_uploaded(job: Path) -> bool:
    return not open_store(load_job(job).output).list()


@pytest.mark.parametrize(
    ("quotas", "spot", "needle"),
    [
        ({}, True, "GPUS_ALL_REGIONS is 0.0 globally"),
        (
            {"NVIDIA_L4_GPUS": 0.0, "PREEMPTIBLE_NVIDIA_L4_GPUS": 0.0},
            True,
            "NVIDIA_L4_GPUS is 0.0 in us-central1 (PREEMPTIBLE_NVIDIA_L4_GPUS there: 0, 0 in use)",
        ),
        (
            {"NVIDIA_L4_GPUS": 0.0, "PREEMPTIBLE_NVIDIA_L4_GPUS": 4.0},
            False,
            "NVIDIA_L4_GPUS is 0.0",
        ),
    ],
    ids=["global", "regional-spot", "regional-standard"],
)
def test_gpu_quota_is_checked_before_any_upload(compute, cloud_job, tmp_path, quotas, spot, needle):
    if quotas:
        compute.region_quotas["us-central1"] = quotas
    else:
        compute.gpu_quota = 0
    sets = [] if spot else ["cloud.spot=false"]
    with pytest.raises(QuotaExceeded) as e:
        controller(cloud_job, compute, tmp_path, *sets).run()
    msg = str(e.value)
    assert needle in msg, msg
    assert f"iam-admin/quotas?project={PROJECT}" in msg and "nothing was spent" in msg
    assert not compute.inserted and nothing_uploaded(cloud_job)


def test_quota_refused_at_insert_says_how_to_fix_it(compute, cloud_job, tmp_path):
    # another job took the last GPU between the preflight and the insert
    compute.fail_inserts(
        "us-central1-a",
        InsertError(
            "QUOTA_EXCEEDED", "Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: 1.0 globally.", 403
        ),
    )
    with pytest.raises(QuotaExceeded) as e:
        controller(cloud_job, compute, tmp_path).run()
    msg = str(e.value)
    assert "GPUS_ALL_REGIONS" in msg and "1.0 globally" in msg
    assert f"iam-admin/quotas?project={PROJECT}" in msg
    assert len(compute.inserted) == 1 and not compute.live()


@pytest.mark.parametrize(
    ("regional", "all_regions", "spot", "refused"),
    [
        ({"NVIDIA_L4_GPUS": (0, 0), "PREEMPTIBLE_NVIDIA_L4_GPUS": (2, 0)}, (4, 0), True, None),
        ({"NVIDIA_L4_GPUS": (2, 0), "PREEMPTIBLE_NVIDIA_L4_GPUS": (0, 0)}, (4, 0), True, None),
        ({"NVIDIA_L4_GPUS": (2, 2), "PREEMPTIBLE_NVIDIA_L4_GPUS": (0, 0)}, (4, 2), True, "NVIDIA"),
        (
            {"NVIDIA_L4_GPUS": (2, 0), "PREEMPTIBLE_NVIDIA_L4_GPUS": (2, 0)},
            (1, 1),
            True,
            "GPUS_ALL",
        ),
        ({"NVIDIA_L4_GPUS": (0, 0), "PREEMPTIBLE_NVIDIA_L4_GPUS": (2, 0)}, (4, 0), False, "NVIDIA"),
    ],
)
def test_quota_arithmetic(regional, all_regions, spot, refused):
    needs = Needs("us-central1", 1, spot, "cos-cloud", "cos-stable", "distill", "distill-x")
    why = quota_refusal("p", needs, regional, all_regions)
    assert (why is None) == (refused is None), why
    if refused:
        assert why.startswith(f"GPU quota: {refused}"), why


@pytest.mark.parametrize(
    ("setup", "sets", "needle"),
    [
        (
            lambda c: c.deprecated_families.update(
                {"cos-stable": ("DEPRECATED", "cos-stable-200")}
            ),
            [],
            "boot image family cos-cloud/cos-stable resolves to cos-stable-v20261101, which is "
            "DEPRECATED (replacement: cos-stable-200)",
        ),
        (
            lambda c: c.subnets.clear(),
            [],
            "subnetwork distill-us-central1 of network distill in us-central1 not found: apply "
            'infra/terraform/base with region = "us-central1"',
        ),
        (
            lambda c: None,
            ["cloud.network=default"],
            "subnetwork default of network default in us-central1 has Private Google Access off",
        ),
        (
            lambda c: None,
            ["cloud.subnetwork=default"],
            "the subnet belongs to default",
        ),
    ],
    ids=["deprecated-image", "no-subnet", "no-private-google-access", "wrong-network"],
)
def test_preflight_refuses_what_the_vm_could_not_boot_with(
    compute, cloud_job, tmp_path, setup, sets, needle
):
    setup(compute)
    with pytest.raises(PreflightFailed) as e:
        controller(cloud_job, compute, tmp_path, *sets).run()
    msg = str(e.value)
    assert needle in msg and msg.endswith("nothing was spent"), msg
    if "Private Google Access" in msg:
        assert "gcloud compute networks subnets update default --region=us-central1 " in msg
        assert "--enable-private-ip-google-access" in msg
    assert not compute.inserted and nothing_uploaded(cloud_job)


def test_refused_before_anything_is_created(compute, cloud_job, tmp_path, monkeypatch):
    # a zone without an L4
    with pytest.raises(NoAccelerator, match="us-central1-f does not offer nvidia-l4"):
        controller(
            cloud_job, compute, tmp_path, 'cloud.zones=["us-central1-a","us-central1-f"]'
        ).run()
    # a project that is not there
    j = load_job(cloud_job)
    opts = CloudOptions(backend="gce", endpoint=compute.url, project="nope", yes=True)
    with pytest.raises(CloudError, match="project nope not found"):
        VmEngine(Session(j, opts, Console(stderr=True))).run()
    # no project at all
    for var in ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DISTILL_NO_GCLOUD_CONFIG", "1")
    with pytest.raises(CloudError, match="no Google Cloud project"):
        VmEngine(Session(j, CloudOptions(backend="gce", endpoint=compute.url), Console())).run()
    # no credentials (the real client, no endpoint override)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    with pytest.raises(CloudError, match="no Google Cloud credentials"):
        VmEngine(Session(j, CloudOptions(backend="gce", project=PROJECT), Console())).run()
    # the teacher cannot fit the L4: refused with the estimate, before any VM
    with pytest.raises(DistillError, match="does not fit"):
        controller(cloud_job, compute, tmp_path, "teacher.batch_tokens=400000000").run()
    # job.output must be in a bucket
    with pytest.raises(DistillError, match="must be a gs:// URL"):
        controller(cloud_job, compute, tmp_path, f'job.output="{tmp_path / "out"}"')
    assert compute.inserted == []


def test_bucket_without_access_is_refused(compute, cloud_job, tmp_path, monkeypatch):
    """A bucket of another project: GCS answers 403; the controller stops before any VM."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Deny(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps(
                {
                    "error": {
                        "code": 403,
                        "message": "robot@x.iam.gserviceaccount.com does not have "
                        "storage.objects.list access to the Google Cloud Storage bucket.",
                        "errors": [{"reason": "forbidden"}],
                    }
                }
            ).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(DistillError, match="permission denied .* storage.objects.list"):
            controller(cloud_job, compute, tmp_path).run()
    finally:
        server.shutdown()
    assert compute.inserted == []


def test_budget_and_confirmation(compute, cloud_job, tmp_path):
    with pytest.raises(CloudError, match="above cloud.budget_usd"):
        controller(cloud_job, compute, tmp_path, "cloud.budget_usd=0.0001").run()
    ctl = controller(cloud_job, compute, tmp_path)
    ctl.session.opts.yes = False
    with pytest.raises(DistillError, match="confirm with --yes"):
        ctl.run()  # no terminal in tests: never starts without --yes
    assert compute.inserted == []


# --- the teacher fails on the VM ---------------------------------------------------------


def test_teacher_failure_is_reported_and_the_vm_deleted(compute, guests, cloud_job, tmp_path):
    guests.env["DISTILL_ENTRYPOINT"] = (
        f"{sys.executable} -c \"import sys; print('CUDA error: out of memory'); sys.exit(3)\""
    )
    with pytest.raises(TeacherFailed, match="exit code 3(.|\n)*CUDA error: out of memory"):
        controller(cloud_job, compute, tmp_path).run()
    assert no_vm_left(compute)
    assert run_records(cloud_job)[0]["outcome"] == "failed"


# --- the controller itself: signals, SIGKILL, adoption, the dead-man switch, gc --------------


def cli_controller(job: Path, compute: FakeCompute, tmp_path: Path, *extra: str):
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "DISTILL_COMPUTE_ENDPOINT": compute.url,
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "teacher-cloud",
            "--job",
            str(job),
            "--project",
            PROJECT,
            "--yes",
            "--poll-seconds",
            "0.1",
            "--state-dir",
            str(tmp_path / "cloud"),
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,  # one signal() call in the child: safe beside threads
    )


def sigkill_when_running(proc: subprocess.Popen, compute: FakeCompute) -> None:
    """SIGKILL the controller once its VM runs the teacher: no teardown of its own."""
    try:
        wait_guest_running(compute)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_tear_down(compute, guests, cloud_job, tmp_path, sig):
    guests.env["SLOW_TEACHER_S"] = "1.0"
    proc = cli_controller(cloud_job, compute, tmp_path)
    try:
        wait_guest_running(compute)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "deleting distill-teacher-job" in err and "rerun the same command" in err
    assert not compute.live()  # deleted and confirmed before the controller exited
    assert run_records(cloud_job)[0]["outcome"] == "interrupted"
    assert not open_store(f"{load_job(cloud_job).output}/train").exists(MANIFEST)


def test_controller_sigkill_vm_finishes_and_deletes_itself(compute, guests, cloud_job, tmp_path):
    guests.env["SLOW_TEACHER_S"] = "0.2"
    sigkill_when_running(cli_controller(cloud_job, compute, tmp_path), compute)
    # Nobody deletes it but itself: the guest's own DELETE once the teacher is done.
    assert no_vm_left(compute, timeout=180)
    assert any(e == "delete-requested by guest" for _, n, e in compute.events if n == NAME)
    assert_exact(cloud_job, tmp_path)


def test_rerun_adopts_a_running_vm(compute, guests, cloud_job, tmp_path):
    guests.env["SLOW_TEACHER_S"] = "0.5"
    sigkill_when_running(cli_controller(cloud_job, compute, tmp_path), compute)
    run = controller(cloud_job, compute, tmp_path).run()
    assert len(compute.inserted) == 1  # watched the orphan, created nothing
    assert run.outcome == "done"
    assert no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)


def test_dead_man_switch_then_resume(compute, guests, cloud_job, tmp_path):
    """Controller SIGKILLed and the teacher hung: maxRunDuration deletes the VM; the shard set
    stays consistent (no manifest), and a rerun completes it exactly."""
    guests.env["SLOW_TEACHER_S"] = "30"  # effectively hung after its first shard
    compute.max_run_scale = 8 / 3600  # the 1 h max run duration passes in 8 s
    proc = cli_controller(cloud_job, compute, tmp_path, "--set", "cloud.max_run_hours=1")
    sigkill_when_running(proc, compute)
    assert no_vm_left(compute, timeout=60)
    assert any(e == "max-run-duration" for _, n, e in compute.events if n == NAME)
    out = load_job(cloud_job).output
    assert not open_store(f"{out}/train").exists(MANIFEST)
    compute.max_run_scale = 1.0
    guests.env["SLOW_TEACHER_S"] = "0"
    run = controller(cloud_job, compute, tmp_path).run()
    assert run.outcome == "done" and no_vm_left(compute)
    assert_exact(cloud_job, tmp_path)


def test_gc_deletes_a_stopped_leftover(compute, guests, cloud_job, tmp_path):
    """Where the VM may not delete itself it powers off (TERMINATED); gc removes it."""
    compute.allow_self_delete = False
    sigkill_when_running(cli_controller(cloud_job, compute, tmp_path), compute)
    assert compute.wait_for(
        lambda: [i.status for i in compute.live()] == ["TERMINATED"], timeout=180
    )
    base = [sys.executable, "-m", "distill.cli", "gc", "--project", PROJECT]
    env = {**os.environ, "DISTILL_COMPUTE_ENDPOINT": compute.url}
    r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and NAME in r.stdout and "nothing deleted" in r.stderr
    assert len(compute.live()) == 1  # listing alone deletes nothing
    r = subprocess.run([*base, "--yes"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "deleted 1 VM" in r.stdout, r.stderr
    assert not compute.live()
    assert_exact(cloud_job, tmp_path)  # the teacher had finished before powering off


def test_cost_report_shows_actual_beside_estimate(compute, cloud_job, tmp_path):
    controller(cloud_job, compute, tmp_path).run()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "cost-report",
            "--job",
            str(cloud_job),
            "--json",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "report.json").read_text())
    assert len(rows) == 1 and rows[0]["outcome"] == "done" and rows[0]["vms"] == 1
    assert 0 < rows[0]["vm_hours"] < 1 and rows[0]["actual_usd"] > 0
    assert rows[0]["estimated_usd"] > 0 and rows[0]["ratio"] == pytest.approx(
        rows[0]["actual_usd"] / rows[0]["estimated_usd"]
    )
    assert "$ actual" in r.stdout and "$ estimate" in r.stdout


# --- gcloud against the stub: the third rendering, over the wire ------------------------------


def _wire(body: dict) -> dict:
    """An insert body as the API sees it, with URLs relative and the API's defaults explicit."""

    def rel(x):
        if isinstance(x, dict):
            return {k: rel(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rel(v) for v in x]
        if isinstance(x, str):
            x = re.sub(r"^https?://[^/]+/compute/v1/", "", x)
            # zonal types: the client sends zones/Z/..., gcloud projects/P/zones/Z/...
            zonal = "/machineTypes/" in x or "/diskTypes/" in x
            # a public image family: gcloud names its zonal view (the image rolled out in the
            # VM's zone), the spec the global family; both resolve to the family's image
            x = re.sub(r"/zones/-/imageFamilyViews/", "/global/images/family/", x)
            return re.sub(r"^projects/[^/]+/(zones/)", r"\1", x) if zonal else x
        return x

    b = rel(body)
    b.pop("canIpForward", None) in (None, False) or pytest.fail("canIpForward set")
    b.pop("deletionProtection", None) in (None, False) or pytest.fail("deletionProtection set")
    for d in b["disks"]:
        assert d.pop("mode", "READ_WRITE") == "READ_WRITE" and d.pop("type", "PERSISTENT")
    b["shieldedInstanceConfig"].setdefault("enableSecureBoot", False)
    b["metadata"] = {i["key"]: i["value"] for i in b["metadata"]["items"]}
    b.pop("name")
    return b


@pytest.mark.skipif(not shutil.which("gcloud"), reason="the gcloud CLI is not installed")
def test_gcloud_creates_the_same_vm_as_the_api_client(tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import compute_v1

    from distill.cloud.spec import VmSpec

    job = tmp_path / "job.toml"
    job.write_text('[job]\nname = "j"\noutput = "gs://b/runs/j"\n')
    kw = dict(
        inputs=(("gs://b/runs/j/inputs/x-train.jsonl", "data/train/train.jsonl"),),
        status_url="gs://b/runs/j/cloud/status",
    )
    sa = f"distill-teacher@{PROJECT}.iam.gserviceaccount.com"
    with FakeCompute(project=PROJECT, step_s=0.05) as stub:
        spec = VmSpec.for_job(job, PROJECT, "img:1", sa, **kw)
        cmd = spec.gcloud(tmp_path / "md", "us-central1-b")
        cmd.write_files()
        env = {
            **os.environ,
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": f"{stub.url}/compute/v1/",
            "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
            "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        }
        r = subprocess.run(cmd.argv, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        client = compute_v1.InstancesClient(
            credentials=AnonymousCredentials(), client_options={"api_endpoint": stub.url}
        )
        other = VmSpec.for_job(job, PROJECT, "img:1", sa, name="via-api", **kw)
        client.insert(other.insert_request("us-central1-b"))
        via_gcloud, via_api = stub.inserted
        assert _wire(via_gcloud) == _wire(via_api)
        # the CLI sees and deletes what the client made, through the same lifecycle
        assert stub.wait_for(lambda: len(stub.running()) == 2, 30)
        listed = subprocess.run(
            ["gcloud", "compute", "instances", "list", f"--project={PROJECT}", "--format=json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert {i["name"] for i in json.loads(listed.stdout)} == {spec.name, "via-api"}
        for name in (spec.name, "via-api"):
            r = subprocess.run(
                [
                    "gcloud",
                    "compute",
                    "instances",
                    "delete",
                    name,
                    "--zone=us-central1-b",
                    f"--project={PROJECT}",
                    "--quiet",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert r.returncode == 0, r.stderr
        assert not stub.live()


# --- the local backend: the "VM" is a process group on this machine ---------------------------


def test_local_backend_cli_end_to_end(cloud_job, tmp_path):
    """`distill-ctl teacher-cloud --backend local`: the whole controller, no Compute API."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.cli",
            "teacher-cloud",
            "--job",
            str(cloud_job),
            "--backend",
            "local",
            "--yes",
            "--poll-seconds",
            "0.2",
            "--state-dir",
            str(tmp_path / "cloud"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher pass cost" in r.stderr and "shard sets complete" in r.stderr
    assert_exact(cloud_job, tmp_path)
    assert not any((tmp_path / "cloud" / "vms").iterdir())  # torn down
    (rec,) = run_records(cloud_job)
    assert rec["backend"] == "local" and rec["outcome"] == "done"


def test_local_backend_preemption(cloud_job, tmp_path, monkeypatch):
    from distill.cloud.local import LocalBackend

    monkeypatch.setenv("DISTILL_ENTRYPOINT", SLOW)
    monkeypatch.setenv("SLOW_TEACHER_S", "0.4")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    backend = LocalBackend(tmp_path / "vms", preempt_grace_s=10)
    # The preemption's clean-up is slow (here: on the test's thread only), so the controller
    # sees the VM stopped and relaunches while it runs: the relaunch must wait for it, not
    # have its new VM's directory removed under it (a CI failure once).
    rmtree = shutil.rmtree
    main = threading.current_thread()

    def slow_rmtree(path, *a, **k):
        if threading.current_thread() is main:
            time.sleep(1.0)
        rmtree(path, *a, **k)

    monkeypatch.setattr("distill.cloud.local.shutil.rmtree", slow_rmtree)
    j = load_job(cloud_job)
    opts = CloudOptions(backend="local", yes=True, poll_seconds=0.1, state_dir=tmp_path)
    ctl = VmEngine(Session(j, opts, Console(stderr=True, width=200), backend=backend))
    t, result = run_in_thread(ctl)
    train = f"{j.output}/train"
    deadline = time.monotonic() + 120
    while shards_in(train) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    backend.preempt(NAME)
    t.join(300)
    assert "error" not in result, result.get("error")
    assert result["run"].preemptions == 1 and result["run"].outcome == "done"
    assert [a.outcome for a in result["run"].attempts] == ["preempted", "done"]
    assert backend.list({}) == []
    assert_exact(cloud_job, tmp_path)
