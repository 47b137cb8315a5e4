"""Child process of tests/test_layers.py: the commands and loops that load no model, run for
real in a fresh interpreter, then the heavy modules they imported.

``python tests/cloud_paths_child.py WORKDIR gs://BUCKET`` (``STORAGE_EMULATOR_HOST`` set):

1. ``distill-ctl gc`` (local backend, nothing left) and ``distill-ctl cost-report`` (one run
   record in the bucket), through the CLI's own commands;
2. the Batch engine's watch loop on a split whose tasks have written every shard: it polls the
   bucket and the Batch job (a stand-in API), then :func:`~distill.shardset.finish_split`
   writes the manifest;
3. the single-VM engine's watch loop and the session's ``complete()`` on that complete split.

Prints JSON: ``heavy`` (which of torch, transformers, webdataset are in ``sys.modules``) and
what each step saw.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from rich.console import Console

from distill import cli
from distill.cloud.batch import JobState, TaskState
from distill.cloud.fanout import BatchEngine, _BatchRun
from distill.cloud.progress import BucketProgress
from distill.cloud.records import Attempt, CloudRun
from distill.cloud.session import CloudOptions, Plan, Session
from distill.cloud.vm import VmEngine, _VmRun
from distill.config import load_job
from distill.format.manifest import MANIFEST, Manifest
from distill.format.shards import ShardStats, shard_name
from distill.shardset import PARTS, Part, put_parts, put_task_seconds, sidecar_name
from distill.store.storage import open_store

HEAVY = ("torch", "transformers", "webdataset")
FP = "f" * 64  # the split's job fingerprint (the preflight's, which needs the tokenizer)
SHARDS = 2
USD = ("vm_spot", "disk_spot", "vm_on_demand", "disk_on_demand")
ESTIMATE = {"hours": {"spot": 0.1, "on_demand": 0.1}, "usd": dict.fromkeys(USD, 0.01)}


class Job:
    """The Batch job, as its API reports it: running, one task done, one still running."""

    def get(self, name: str) -> JobState:
        return JobState(name, "RUNNING", [], {}, "")

    def tasks(self, name: str) -> list[TaskState]:
        return [TaskState(0, "SUCCEEDED", 0, []), TaskState(1, "RUNNING", 0, [])]


class NoVm:
    """A Compute backend with no VM (the single-VM watch sees the complete set first)."""

    name = "none"

    def get(self, name: str, zone: str) -> None:
        return None


def write_job(work: Path, bucket: str) -> Path:
    data = work / "train.jsonl"
    data.write_text('{"prompt": "Hi", "response": "Hello."}\n')
    path = work / "job.toml"
    path.write_text(
        f'[job]\nname = "lean"\noutput = "{bucket}/run"\n\n'
        f'[data]\ntrain = "{data}"\n\n'
        '[cloud]\nproject = "p"\nengine = "batch"\nvms = 2\npoll_seconds = 0.01\n'
    )
    return path


def tasks_wrote_every_shard(output: str) -> None:
    """What two fan-out tasks leave: parts.json, every shard and sidecar, their seconds."""
    store = open_store(f"{output}/train")
    keys = [f"train-{i:07d}" for i in range(1, 2 * SHARDS + 1)]
    stats = [
        ShardStats(shard_name(i), 2, 10, 4, 3, "0" * 64, keys[2 * i], keys[2 * i + 1])
        for i in range(SHARDS)
    ]
    base = Manifest("train", "builtin:x", "c", "t", 100, "topk", 2, {}, 16, FP, [])
    put_parts(store, base, SHARDS)
    for st in stats:
        store.put_bytes(st.name, b"tar")
        store.put_bytes(sidecar_name(st.name), json.dumps(vars(st)).encode())
    for i in range(2):
        put_task_seconds(store, Part(i, 2), 1.5)


def cloud_run() -> CloudRun:
    return CloudRun("lean", "gce", "p", [], "vm", True, "2025-01-01T00:00:00", ESTIMATE, 1.0, 0.0)


def record(output: str) -> None:
    """A run record, as teacher-cloud writes it when it ends."""
    body = {**cloud_run().to_dict(), "outcome": "done"}
    open_store(f"{output}/cloud").put_bytes("run-1.json", json.dumps(body).encode())


def main(work: Path, bucket: str) -> dict[str, object]:
    seen: dict[str, object] = {}
    gc = ["gc", "--backend", "local", "--state-dir", str(work / "cloud"), "--yes"]
    cli.app(gc, standalone_mode=False)
    path = write_job(work, bucket)
    job = load_job(path)
    record(job.output)
    report = ["cost-report", "--job", str(path), "--json", str(work / "report.json")]
    cli.app(report, standalone_mode=False)
    seen["report_rows"] = len(json.loads((work / "report.json").read_text()))

    tasks_wrote_every_shard(job.output)
    log = io.StringIO()
    console = Console(file=log, width=200)
    opts = CloudOptions(project="p", yes=True)
    session = Session(job, opts, console, backend=NoVm())  # type: ignore[arg-type]
    plan = Plan(  # what the preflight leaves (its estimate and fingerprints need a tokenizer)
        job=job,
        project="p",
        zones=tuple(job.cloud.zones),
        output=job.output,
        estimate=type("Estimate", (), {"tasks": 2})(),  # type: ignore[arg-type]
        fingerprints={"train": FP},
        vms=2,
        image="image",
        service_account="sa",
    )
    progress = BucketProgress(job.output, {"train": (SHARDS, 20)})
    engine = BatchEngine(session, api=Job())  # type: ignore[arg-type]
    fan = _BatchRun(engine, plan, cloud_run(), progress)
    fan.batch = engine.job_path(plan)
    fan.watch_job()
    train = open_store(f"{job.output}/train")
    m = Manifest.from_json(train.read_bytes(MANIFEST), MANIFEST)
    seen["fanout_manifest"] = [len(m.shards), m.teacher_seconds, train.exists(PARTS)]

    single = _VmRun(VmEngine(session), plan, cloud_run(), progress)
    seen["single_watch"] = single.watch(Attempt(n=1, zone="us-central1-a"))
    seen["complete"] = session.complete(plan)
    seen["heavy"] = sorted(m for m in HEAVY if m in sys.modules)
    return seen


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
