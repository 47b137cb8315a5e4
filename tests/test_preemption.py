"""The teacher notices a preemption by itself: metadata ``instance/preempted`` (long-polled)
or SIGTERM; it stops after the batch in flight with exit code 75, leaves a consistent shard
set (no manifest, whole shards), and a rerun completes it exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import dataset_keys, make_job, stored_keys

from distill.config import load_job
from distill.format.manifest import MANIFEST
from distill.store.storage import open_store
from distill.teacher.run import run_teacher
from distill.teacher.stop import EXIT_PREEMPTED, Preempted, StopWatch

REPO = Path(__file__).resolve().parents[1]


class Metadata:
    """A metadata server with one switch, ``instance/preempted`` (wait_for_change works)."""

    def __init__(self) -> None:
        self.preempted = False
        self.cond = threading.Condition()
        self.waits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.headers.get("Metadata-Flavor") != "Google":
                    self.send_error(403)
                    return
                if not self.path.startswith("/computeMetadata/v1/instance/preempted"):
                    self.send_error(404)
                    return
                with outer.cond:
                    if "wait_for_change=true" in self.path and not outer.preempted:
                        outer.waits += 1
                        outer.cond.wait(timeout=30)
                    body = b"TRUE" if outer.preempted else b"FALSE"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.server.server_port}"

    def preempt(self) -> None:
        with self.cond:
            self.preempted = True
            self.cond.notify_all()

    def close(self) -> None:
        self.preempt()
        self.server.shutdown()


@pytest.fixture
def metadata(monkeypatch):
    md = Metadata()
    monkeypatch.setenv("GCE_METADATA_HOST", md.host)
    yield md
    md.close()


def test_stopwatch_sees_the_metadata_notice(metadata):
    with StopWatch(watch_metadata=True) as stop:
        deadline = time.monotonic() + 10
        while metadata.waits == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metadata.waits >= 1 and not stop.stopped  # long-polling, not preempted yet
        stop.check("x")  # no-op
        metadata.preempt()
        deadline = time.monotonic() + 10
        while not stop.stopped and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.stopped and "instance/preempted" in stop.reason
        with pytest.raises(Preempted, match="x: stopped on preempted"):
            stop.check("x")


def test_stopwatch_sigterm_and_restore():
    before = signal.getsignal(signal.SIGTERM)
    with StopWatch(watch_metadata=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop.stopped and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.reason == "SIGTERM"
        with pytest.raises(SystemExit):  # a second SIGTERM does not wait
            stop._on_sigterm(signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGTERM) is before


def test_teacher_stops_on_the_notice_then_resumes(tiny_teacher_dir, gcs_bucket, tmp_path, metadata):
    path = make_job(
        tmp_path, tiny_teacher_dir, f"{gcs_bucket}/run", n_train=48, teacher__samples_per_shard="4"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DISTILL_WATCH_PREEMPTION": "1",
        "SLOW_TEACHER_S": "0.3",
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path / "vm-tmp"),
    }
    (tmp_path / "vm-tmp").mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "slow_teacher.py"), "teacher", "--job", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = open_store(f"{gcs_bucket}/run/train")
    try:
        deadline = time.monotonic() + 120
        while sum(n.endswith(".tar") for n in store.list()) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        done_at_notice = sum(n.endswith(".tar") for n in store.list())
        metadata.preempt()  # no signal at all: only the metadata server knows
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "preempted" in err and "instance/preempted" in err
    names = store.list()
    assert MANIFEST not in names
    shards = sum(n.endswith(".tar") for n in names)
    # it stopped promptly: at most the shard in flight (and the one uploading) were added
    assert done_at_notice <= shards <= done_at_notice + 2 < 12
    left = [p.name for p in (tmp_path / "vm-tmp").iterdir() if p.name.startswith("distill-")]
    assert not left  # the stopped split's scratch is gone
    run_teacher(load_job(path))
    keys = stored_keys(f"{gcs_bucket}/run/train", tmp_path)
    assert keys == dataset_keys(tmp_path / "train.jsonl")
