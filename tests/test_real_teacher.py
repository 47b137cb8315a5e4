"""The teacher pass on the real SmolLM2-135M-Instruct: its stored targets must be its own
distribution (scored by the same evaluation code the student uses)."""

from pathlib import Path

import numpy as np
import pytest

from distill import models
from distill.config import load_job
from distill.student.evaluate import evaluate
from distill.student.report import shard_set_stats
from distill.student.train import make_loader
from distill.teacher.run import run_teacher

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_real_teacher_targets_reproduce_the_teacher(smol_dir, tmp_path):
    src = (REPO / "data" / "demo" / "eval.jsonl").read_text().splitlines()[:12]
    (tmp_path / "d.jsonl").write_text("\n".join(src) + "\n")
    job_file = tmp_path / "job.toml"
    job_file.write_text(
        f'[job]\noutput = "{tmp_path / "out"}"\n'
        f'[teacher]\nmodel = "{smol_dir}"\ndtype = "float32"\nsamples_per_shard = 5\n'
        f'head_chunk = 100\n[data]\ntrain = "{tmp_path / "d.jsonl"}"\nmax_length = 384\n'
        '[targets]\nkind = "topk"\nk = 16\nvalues = "f16"\n'
        f'[train]\ncache_dir = "{tmp_path / "cache"}"\n'
    )
    job = load_job(job_file)
    m = run_teacher(job)["train"]
    assert m.samples == 12 and len(m.shards) == 3 and m.vocab_size == 49152

    teacher = models.load_model(smol_dir)
    r = evaluate(teacher, make_loader(job, "train", shuffle=False))
    assert r["target_tokens"] == m.target_tokens
    assert r["kd"] < 2e-3  # only float16 rounding of the stored log-probs remains
    assert r["top1_agreement"] > 0.99
    _, stats = shard_set_stats(str(tmp_path / "out" / "train"), tmp_path / "c2")
    # An instruct model is confident on its chat data: top-16 holds most of the mass.
    assert 0.5 < stats["mean_topk_mass"] < 1.0
    assert np.isfinite(stats["bytes_per_target_token"])
