"""``distill-ctl cost-report``: what each teacher-cloud run cost, beside its estimate.

Reads the run records that :mod:`distill.cloud.session` writes (create-only) to
``<job.output>/cloud/run-*.json``: the attempts (zone, VM seconds, outcome), preemptions,
stockouts, the actual VM cost at the run's price table, and the estimate made before it.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from distill.config import Job
from distill.errors import DistillError
from distill.store.storage import open_store


def estimated_vm_usd(estimate: dict[str, Any], spot: bool) -> float:
    """The estimate's VM and boot-disk dollars: what a run's actual cost compares with."""
    kind = "spot" if spot else "on_demand"
    return float(estimate["usd"][f"vm_{kind}"] + estimate["usd"][f"disk_{kind}"])


def load_runs(output: str) -> list[dict[str, Any]]:
    store = open_store(f"{output.rstrip('/')}/cloud")
    runs = []
    for name in store.list():
        if name.startswith("run-") and name.endswith(".json"):
            try:
                runs.append({"record": store.join(name), **json.loads(store.read_bytes(name))})
            except ValueError as e:
                raise DistillError(f"{store.join(name)}: not a run record ({e})") from None
    return sorted(runs, key=lambda r: r.get("started", ""))


def cost_report(job: Job, console: Console) -> list[dict[str, Any]]:
    """Print one row per run; returns the rows."""
    runs = load_runs(job.output)
    if not runs:
        raise DistillError(
            f"no teacher-cloud run records under {job.output.rstrip('/')}/cloud/ "
            "(they are written when `distill-ctl teacher-cloud` ends)"
        )
    t = Table(title=f"teacher-cloud runs of job {job.name}")
    for col in (
        "started",
        "outcome",
        "VMs",
        "preempted",
        "VM hours",
        "est. hours",
        "$ actual",
        "$ estimate",
        "actual / est.",
    ):
        t.add_column(col, justify="right" if col not in ("started", "outcome") else "left")
    rows = []
    for r in runs:
        est = r["estimate"]
        spot = r.get("spot", True)
        est_hours = est["hours"]["spot" if spot else "on_demand"]
        est_usd = estimated_vm_usd(est, spot)
        hours = r["vm_seconds"] / 3600
        row = {
            "record": r["record"],
            "started": r["started"],
            "outcome": r["outcome"],
            "vms": len(r["attempts"]),
            "preemptions": r.get("preemptions", 0),
            "vm_hours": hours,
            "estimated_hours": est_hours,
            "actual_usd": r["actual_usd"],
            "estimated_usd": est_usd,
            "ratio": r["actual_usd"] / est_usd if est_usd else None,
        }
        rows.append(row)
        t.add_row(
            row["started"],
            row["outcome"],
            str(row["vms"]),
            str(row["preemptions"]),
            f"{hours:.3f}",
            f"{est_hours:.3f}",
            f"{row['actual_usd']:.4f}",
            f"{est_usd:.4f}",
            f"{row['ratio']:.2f}" if row["ratio"] is not None else "-",
        )
    console.print(t)
    console.print(
        "VM cost only (the VM and its boot disk, at the run's price table); storage and egress "
        "are in `distill-ctl cost-estimate`"
    )
    return rows
