"""Child process of the layered memory test: one teacher pass, then its peak RSS.

``python tests/peak_memory_child.py resident|layered CHECKPOINT`` prints JSON: ``base`` (peak
RSS in bytes after imports and the inputs, before the teacher) and ``peak`` (after the pass).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (imported before the baseline is read)
import transformers.models.llama.modeling_llama  # noqa: F401

from distill import models
from distill.data.dataset import Sample
from distill.format.spec import TargetSpec
from distill.teacher.extract import compute_targets
from distill.teacher.layered import LayeredTeacher


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(mode: str, path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        mask = np.zeros(64, dtype=np.uint8)
        mask[16:] = 1
        ids = rng.integers(3, 8000, size=64).astype(np.int32)
        samples.append(Sample(key=f"m-{i}", input_ids=ids, loss_mask=mask))
    spec = TargetSpec(kind="topk", k=8)
    base = rss()
    if mode == "layered":
        teacher = LayeredTeacher(path, "float32")
        out = teacher.compute_groups([samples], spec, 256, 64)[0]
        read = teacher.stats.weight_bytes
    else:
        model = models.load_model(path, "float32")
        out = compute_targets(model, samples, spec, 256, 64)
        read = 0
    assert len(out) == 4 and all(t.target_ids.shape == (48, 8) for t in out)
    print(json.dumps({"base": base, "peak": rss(), "weight_bytes_read": read}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
