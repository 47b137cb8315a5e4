"""distill-ctl: the one command-line tool."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from distill.errors import DistillError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Offline LLM distillation: one teacher pass to sparse targets, then a local student.",
)
out = Console()
err = Console(stderr=True)

JobOpt = Annotated[Path, typer.Option("--job", "-j", help="Job file (TOML) in jobs/.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a job field: section.field=value (repeatable)."),
]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Override job.output (path or gs://...).")
]


def _load(job: Path, sets: list[str] | None, output: str | None = None):  # noqa: ANN202
    from distill.config import load_job

    overrides = list(sets or [])
    if output:
        overrides.append(f'job.output="{output}"')
    return load_job(job, overrides)


@app.command()
def teacher(job: JobOpt, set_: SetOpt = None, output: OutputOpt = None) -> None:
    """Run the teacher once over the dataset and write sparse-target shards (resumable)."""
    from distill.teacher import run_teacher

    run_teacher(_load(job, set_, output))


@app.command()
def train(
    job: JobOpt,
    set_: SetOpt = None,
    output: OutputOpt = None,
    auto: Annotated[bool, typer.Option(help="Apply `distill-ctl plan`'s settings.")] = False,
    gpu_mem: Annotated[
        str | None, typer.Option("--gpu-mem", help="Budget for --auto (default: the GPU's).")
    ] = None,
) -> None:
    """Train the student from stored shards (resumes from <run_dir>/checkpoint.pt)."""
    from distill.train import train as run_train

    j = _load(job, set_, output)
    if auto:
        from distill import planner
        from distill.config import parse_bytes

        budget = parse_bytes(gpu_mem) if gpu_mem else planner.device_budget()
        p = planner.plan(j, budget)
        planner.apply(j, p)
        err.print(
            f"--auto: micro-batch {j.train.batch_size}, grad_accum {j.train.grad_accum}, "
            f"checkpointing {j.train.gradient_checkpointing} "
            f"(estimated peak {p.estimate.total / 2**30:.2f} GiB of {budget / 2**30:.2f} GiB)"
        )
    summary = run_train(j)
    out.print_json(json.dumps(summary))


@app.command("eval")
def eval_(
    job: JobOpt,
    set_: SetOpt = None,
    output: OutputOpt = None,
    question: Annotated[str, typer.Option(help="A question for one generated answer.")] = "",
) -> None:
    """Held-out KD loss and teacher top-1 agreement: initialised vs trained student."""
    from distill.report import compare_students

    compare_students(_load(job, set_, output), question, out)


@app.command()
def plan(
    job: JobOpt,
    gpu_mem: Annotated[str, typer.Option("--gpu-mem", help="Memory budget, e.g. 12GiB.")],
    set_: SetOpt = None,
) -> None:
    """Estimate the student's peak memory and recommend settings that fit the budget."""
    from rich.table import Table

    from distill.config import parse_bytes
    from distill.planner import describe
    from distill.planner import plan as make_plan

    j = _load(job, set_)
    p = make_plan(j, parse_bytes(gpu_mem))
    t = Table(title=f"memory plan for {job} ({j.train.optimizer}, {j.train.dtype})")
    t.add_column("item")
    t.add_column("value")
    for k, v in describe(p):
        t.add_row(k, v)
    out.print(t)
    out.print(
        f"use: --set train.batch_size={p.estimate.micro_batch} "
        f"--set train.grad_accum={p.grad_accum} "
        f"--set train.gradient_checkpointing={str(p.estimate.checkpointing).lower()}"
        "  (or: distill-ctl train --auto --gpu-mem ...)"
    )


@app.command()
def inspect(url: Annotated[str, typer.Argument(help="A shard set: path or gs://... URL.")]) -> None:
    """Print a shard set's manifest and stats."""
    from distill.report import inspect_shards

    inspect_shards(url, out)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where runs and caches go.")] = Path("runs/demo"),
    job: Annotated[Path, typer.Option(help="The demo job file.")] = Path("jobs/demo.toml"),
    set_: SetOpt = None,
) -> None:
    """The embedded default: teacher -> fake-gcs-server bucket -> student -> evaluation."""
    from distill.demo import run_demo

    run_demo(job, workdir, list(set_ or []), out)


def main() -> None:
    try:
        app(standalone_mode=False)
    except DistillError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: rerun the same command to resume")
        sys.exit(130)
    except Exception as e:  # click's usage errors arrive here with standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
