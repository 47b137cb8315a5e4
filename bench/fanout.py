"""Fan-out on the Batch stub: the wall time of one job over N tasks against 1 task, side by side.

Both runs are the whole ``teacher-cloud --vms N`` path: the real controller and
google-cloud-batch client, the Batch stub (tests/fakes/batch.py) whose tasks run the real task
entrypoint and teacher as local processes, fake-gcs-server, the same job (a tiny random
teacher with SmolLM2's tokenizer; the demo data). A VM's GPU time is simulated: each shard's
forward pass is held ``--shard-seconds`` (tests/slow_teacher.py), so N local processes can
overlap it as N VMs would, while their start-up (imports, model load) still shares this
machine's cores. Prints N tasks' wall time, 1 task's, their ratio, the shards each task
wrote, and checks that both runs stored the same shard bytes.

Also prints the model estimate of issue #13 (docs/CLOUD.md): 1B tokens through a 7B teacher
on 1 and on 100 Spot L4 VMs, from the cost estimate's own model (distill/cloud/pricing.py)
and prices (distill/hardware/l4.toml).

    python bench/fanout.py [--vms 4] [--shard-seconds 1.0] [--json bench/results/fanout.json]
    python bench/fanout.py --estimate-only   # the model estimate alone, into the same JSON
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def machine() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return platform.processor() or platform.machine()


def run_fanout(vms: int, work: Path, teacher: Path, bucket: str, shard_s: float) -> dict[str, Any]:
    """One ``teacher-cloud --vms vms`` run on the stubs; its wall time and shards per task."""
    from fakes.batch import FakeBatch
    from fakes.compute import FakeCompute
    from helpers import PROJECT, SLOW, guest_env, make_job
    from rich.console import Console

    from distill.cloud.fanout import BatchEngine
    from distill.cloud.session import CloudOptions, Session
    from distill.config import load_job
    from distill.store.storage import open_store

    work.mkdir(parents=True)
    path = make_job(
        work, teacher, f"{bucket}/fanout-{vms}", n_train=96, teacher__samples_per_shard="4"
    )

    def guest(runnable: dict, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        extra = {"DISTILL_ENTRYPOINT": SLOW, "SLOW_TEACHER_S": str(shard_s)}
        return [sys.executable, *runnable["container"]["commands"]], {
            **guest_env(**extra),
            **env,
        }

    with (
        FakeCompute(project=PROJECT, step_s=0.05) as compute,
        FakeBatch(project=PROJECT, guest=guest, step_s=0.05) as batch,
    ):
        opts = CloudOptions(
            backend="gce",
            endpoint=compute.url,
            batch_endpoint=batch.url,
            project=PROJECT,
            yes=True,
            poll_seconds=0.2,
            state_dir=work / "cloud",
        )
        job = load_job(path, ['cloud.engine="batch"', f"cloud.vms={vms}"])
        log = io.StringIO()
        ctl = BatchEngine(Session(job, opts, Console(file=log, width=200)))
        plan = ctl.session.preflight()  # it tokenises the data: not part of the job's wall time
        t0 = time.perf_counter()
        run = ctl.run(plan)
        wall = time.perf_counter() - t0
        assert run is not None and run.outcome == "done", log.getvalue()[-2000:]
        per_task = []
        for t in batch.history[0].tasks:
            text = "".join(t.serial)
            written = re.findall(r"(\w+): task \d+: (\d+) shards in", text)
            per_task.append(sum(int(n) for _, n in written))
    shards = {}
    for split in ("train", "eval"):
        store = open_store(f"{job.output}/{split}")
        m = json.loads(store.read_bytes("manifest.json"))
        shards[split] = [s["sha256"] for s in m["shards"]]
    return {"vms": vms, "wall_s": wall, "shards_per_task": per_task, "sha256": shards}


def scenario_estimate(vms: int) -> dict[str, Any]:
    """Issue #13's estimate: 1e9 tokens through a 7B teacher (Qwen2.5-7B's architecture, bf16)
    on ``vms`` Spot L4 VMs, through the cost estimate's own hours and price model
    (:func:`~distill.cloud.pricing.pass_hours`, distill/hardware/l4.toml's prices)."""
    from transformers import Qwen2Config

    from distill.cloud.counting import DataCounts
    from distill.cloud.l4 import DEFAULT_MFU, L4_PEAK_FLOPS, plan_l4
    from distill.cloud.prices import load_prices
    from distill.cloud.pricing import CostOptions, nat_gib, nat_usd, pass_hours, priced
    from distill.config import Job
    from distill.teacher.fit import teacher_profile

    tokens, length = 1_000_000_000, 512  # average sample: 512 tokens, half of them targets
    samples = tokens // length
    padded = int(tokens * 1.03)  # length-sorted token-budget batches: ~3% padding
    config = Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    p = teacher_profile(config)
    data = DataCounts(
        samples=samples,
        shards=-(-samples // 256),
        tokens=tokens,
        target_tokens=tokens // 2,
        padded_tokens=padded,
        attention_token_ctx=padded * length,
        per_split={
            "train": {
                "samples": samples,
                "tokens": tokens,
                "target_tokens": tokens // 2,
                "padded_tokens": padded,
            }
        },
    )
    opts = CostOptions(vms=vms, engine="batch" if vms > 1 else "vm")
    job = Job()  # bf16, samples_per_shard = 256, teacher.mode = "auto"
    sustained = L4_PEAK_FLOPS[job.teacher.dtype] * DEFAULT_MFU
    h = pass_hours(job, p, plan_l4(job, p), data, sustained, opts)
    prices = load_prices(None)
    gib = nat_gib(opts, h.tasks, h.preemption)
    nat = nat_usd(prices, h.spot, h.wall, h.tasks, gib)
    usd = priced(prices, opts, h.spot, h.on_demand, 0, 0, (nat, 0.0))
    return {
        "vms": h.tasks,
        "teacher_params": p.params,
        "tokens_per_s_per_vm": tokens / ((h.compute + h.overhead) * 3600),
        "shards": data.shards,
        "setup_hours_per_vm": h.setup,
        "data_prep_hours_per_vm": h.prep,
        "wall_hours": h.wall,
        "vm_hours_spot": h.spot,
        "usd_vm_and_disk_spot": usd["vm_spot"] + usd["disk_spot"],
        "nat_gib": gib,
        "usd_nat_spot": usd["nat_spot"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--shard-seconds", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/fanout.json")
    ap.add_argument(
        "--estimate-only",
        action="store_true",
        help="print the model estimate and update only its part of --json (no run)",
    )
    args = ap.parse_args()
    os.environ.setdefault("DISTILL_CACHE", str(ROOT / ".cache" / "distill"))

    from conftest import _tiny_llama

    from distill import models
    from distill.demo.fake_gcs import emulator_client, start_server

    estimate = {n: scenario_estimate(n) for n in (1, 100)}
    for n, e in estimate.items():
        print(
            f"estimate, 1e9 tokens, 7B teacher, {n} VM(s): {e['wall_hours']:,.1f} h wall, "
            f"{e['vm_hours_spot']:,.1f} spot VM-hours, ${e['usd_vm_and_disk_spot']:,.2f} "
            f"(VM + disk; {e['tokens_per_s_per_vm']:,.0f} tokens/s per L4), Cloud NAT "
            f"${e['usd_nat_spot']:,.2f} ({e['nat_gib']:,.1f} GiB); setup per VM "
            f"{e['setup_hours_per_vm'] * 60:,.1f} min, of it data preparation "
            f"{e['data_prep_hours_per_vm'] * 60:,.1f} min"
        )
    if args.estimate_only:
        old = json.loads(args.json.read_text()) if args.json.exists() else {}
        old["estimate_1e9_tokens_7b"] = {str(n): e for n, e in estimate.items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(old, indent=2) + "\n")
        print(f"wrote the estimate into {args.json}")
        return
    server = start_server()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
            work = Path(tmp)
            tok = models.load_tokenizer(models.resolve_model("builtin:smollm2-135m-instruct"))
            teacher = _tiny_llama(tok, work / "teacher", 4, 1.0, 0)
            emulator_client().create_bucket("bench-fanout")
            runs = [
                run_fanout(n, work / f"run-{n}", teacher, "gs://bench-fanout", args.shard_seconds)
                for n in (args.vms, 1)
            ]
    finally:
        server.stop()
    ours, base = runs
    assert ours["sha256"] == base["sha256"], "the N-task run stored other shard bytes"
    ratio = base["wall_s"] / ours["wall_s"]
    print(f"machine: {machine()}")
    print(
        f"{args.vms} tasks: {ours['wall_s']:.1f} s wall, shards per task {ours['shards_per_task']}"
    )
    print(f"1 task:  {base['wall_s']:.1f} s wall, shards per task {base['shards_per_task']}")
    print(f"speed-up: {ratio:.2f}x (same shard bytes: yes)")
    out = {
        "machine": machine(),
        "shard_seconds": args.shard_seconds,
        "ours": {k: v for k, v in ours.items() if k != "sha256"},
        "baseline": {k: v for k, v in base.items() if k != "sha256"},
        "speedup": ratio,
        "same_shard_bytes": True,
        "estimate_1e9_tokens_7b": {str(n): e for n, e in estimate.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
