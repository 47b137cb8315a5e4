"""The layer contract at run time: commands that need no model never import torch.

(The static contract, which module may import which, is import-linter's in `make lint`; it
counts a function's lazy imports too, so for the controllers it lists those it allows.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "cloud_paths_child.py"


@pytest.mark.parametrize(
    "modules",
    [
        "distill.cli, distill.config",  # every command parses its job file through these
        # teacher-cloud, gc
        "distill.cloud.run, distill.cloud.session, distill.cloud.vm, distill.cloud.gc",
        "distill.cloud.vm_agent, distill.cloud.batch_task",  # the VM agent, a Batch task
        # the fan-out engine, its watch loop's bucket reads, cost-report, Batch tasks
        "distill.cloud.fanout, distill.cloud.progress, distill.cloud.report",
        "distill.cloud.batch, distill.cloud.batch_task, distill.shardset",
        "distill.format.shards, distill.format.manifest, distill.store.cache",
        "distill.data.dataset",
    ],
)
def test_no_torch_without_a_model(modules):
    heavy = "('torch', 'transformers', 'webdataset')"
    code = f"import sys, {modules}; print(sorted(m for m in {heavy} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_gc_cost_report_and_the_watch_loops_load_no_model(gcs_bucket, tmp_path):
    """Run for real in a fresh interpreter (tests/cloud_paths_child.py): ``distill-ctl gc`` and
    ``cost-report``, the fan-out watch loop up to the manifest it writes from the tasks'
    shards, the single-VM watch loop and ``complete()``; none imports torch or transformers."""
    r = subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path), gcs_bucket],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["report_rows"] == 1
    assert seen["fanout_manifest"] == [2, 3.0, True]  # 2 shards, the 2 tasks' 1.5 s each
    assert seen["single_watch"] == "done" and seen["complete"] is True
    assert seen["heavy"] == []
