"""The layer contract at run time: commands that need no model never import torch.

(The static contract, which module may import which, is import-linter's in `make lint`.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "modules",
    [
        "distill.cli, distill.config",  # every command parses its job file through these
        # teacher-cloud, gc
        "distill.cloud.run, distill.cloud.session, distill.cloud.vm, distill.cloud.gc",
        "distill.cloud.vm_agent, distill.cloud.batch_task",  # the VM agent, a Batch task
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
