"""The embedded default: SmolLM2-135M-Instruct teacher -> shards in a local fake-gcs-server
bucket (through the real google-cloud-storage client) -> student -> held-out evaluation."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from distill.config import load_job
from distill.demo.fake_gcs import local_gcs
from distill.errors import DistillError

DEMO_QUESTION = "What is a list comprehension in Python?"


def run_demo(job_path: Path, workdir: Path, overrides: list[str], console: Console) -> dict:
    """Run teacher, train and eval end to end; the emulator is started and stopped here."""
    from distill.student.report import compare_students
    from distill.student.train import train
    from distill.teacher.run import run_teacher

    t0 = time.perf_counter()
    workdir = workdir.resolve()
    with local_gcs("distill-demo") as bucket:
        job = load_job(
            job_path,
            [
                f'job.output="{bucket}/demo"',
                f'train.run_dir="{workdir}/run"',
                f'train.cache_dir="{workdir}/cache"',
                *overrides,
            ],
        )
        console.rule("1/3 teacher pass -> sparse targets in " + bucket)
        run_teacher(job)
        console.rule("2/3 student training, streaming shards from the bucket")
        summary = train(job)
        console.rule("3/3 held-out evaluation")
        result = compare_students(job, DEMO_QUESTION, console)
    before, after = result["initialised"]["kd"], result["trained"]["kd"]
    console.print(
        f"held-out KD loss {before:.4f} -> {after:.4f} "
        f"({'lower' if after < before else 'NOT lower'}); data wait "
        f"{summary['data_wait_share']:.1%} of training time; total {time.perf_counter() - t0:.0f}s"
    )
    if after >= before:
        raise DistillError("the trained student is not better than the initialised one")
    return result
