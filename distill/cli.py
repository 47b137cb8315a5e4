"""distill-ctl: the one command-line tool."""

from __future__ import annotations

import dataclasses
import json
import os
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
# the cost estimate's inputs (cost-estimate, and teacher-cloud's price before it starts)
MfuOpt = Annotated[
    float | None, typer.Option(help="Model FLOPs utilisation on the L4 (default 0.35).")
]
CalibrationOpt = Annotated[
    Path | None,
    typer.Option(
        help="JSON with tokens_per_s, model and gpu measured on an L4 (another GPU: add "
        "gpu_peak_flops, and the MFU is scaled to the L4 by the FLOP ratio)."
    ),
]
PricesOpt = Annotated[
    Path | None,
    typer.Option(help="TOML/JSON overriding prices of distill/hardware/l4.toml (any subset)."),
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
    from distill.teacher.run import run_teacher

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
    from distill.student.train import train as run_train

    j = _load(job, set_, output)
    if auto:
        from distill.student.planner import apply_auto

        j, chosen = apply_auto(j, gpu_mem)
        err.print(chosen)
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
    from distill.student.report import compare_students

    compare_students(_load(job, set_, output), question, out)


@app.command()
def plan(
    job: JobOpt,
    gpu_mem: Annotated[str, typer.Option("--gpu-mem", help="Memory budget, e.g. 12GiB.")],
    set_: SetOpt = None,
    teacher: Annotated[
        bool, typer.Option("--teacher", help="Plan the teacher pass (mode, quantisation).")
    ] = False,
) -> None:
    """Estimate the student's (or with --teacher the teacher's) peak memory and what fits."""
    if teacher:
        from distill.cloud.teacher_plan import show_teacher_plan

        show_teacher_plan(_load(job, set_), gpu_mem, str(job), out)
        return
    from distill.student.planner import show_plan

    show_plan(_load(job, set_), gpu_mem, str(job), out)


@app.command()
def inspect(url: Annotated[str, typer.Argument(help="A shard set: path or gs://... URL.")]) -> None:
    """Print a shard set's manifest and stats."""
    from distill.student.report import inspect_shards

    inspect_shards(url, out)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where runs and caches go.")] = Path("runs/demo"),
    job: Annotated[Path, typer.Option(help="The demo job file.")] = Path("jobs/demo.toml"),
    set_: SetOpt = None,
) -> None:
    """The embedded default: teacher -> fake-gcs-server bucket -> student -> evaluation."""
    from distill.demo.run import run_demo

    run_demo(job, workdir, list(set_ or []), out)


@app.command("cost-estimate")
def cost_estimate(
    job: JobOpt,
    set_: SetOpt = None,
    mfu: MfuOpt = None,
    calibration: CalibrationOpt = None,
    prices: PricesOpt = None,
    preemption_overhead: Annotated[
        float, typer.Option(help="Extra spot hours as a fraction (0.15 = 15%).")
    ] = 0.15,
    setup_minutes: Annotated[float, typer.Option(help="VM boot, driver, image pull.")] = 10.0,
    prep_tokens_per_s: Annotated[
        float | None,
        typer.Option(
            help="A VM's data preparation: tokens checked and tokenised per second (default: "
            "bench/data_scale.py's, scaled to the L4 VM's 8 vCPUs)."
        ),
    ] = None,
    storage_months: Annotated[float, typer.Option(help="How long the shards are kept.")] = 1.0,
    downloads: Annotated[int, typer.Option(help="Full downloads of the shards.")] = 1,
    reference_run: Annotated[
        str | None,
        typer.Option(help="An existing shard set (path or gs://) to take bytes/token from."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the numbers to this file.")
    ] = None,
    vms: Annotated[
        int | None,
        typer.Option(
            "--vms",
            min=1,
            help="L4 VMs splitting the shards (teacher-cloud --vms; default: the job's "
            'cloud.vms when cloud.engine = "batch", else 1).',
        ),
    ] = None,
    sample_lines: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Lines of each split to tokenise, a uniform sample (default 20,000; a split "
            "of fewer lines is counted exactly); the counts are extrapolated with a 95% bound.",
        ),
    ] = None,
    exact: Annotated[
        bool, typer.Option("--exact", help="Tokenise every line (slow on a large dataset).")
    ] = False,
) -> None:
    """Estimate hours and dollars of the job's teacher pass on one L4 spot VM (or N)."""
    from distill.cloud.cost import CostOptions, estimate_cost
    from distill.cloud.cost_table import render_table, write_estimate
    from distill.cloud.counting import DEFAULT_SAMPLE_LINES
    from distill.cloud.pricing import DEFAULT_PREP_TOKENS_PER_S
    from distill.cloud.staging import staged_disk_gb

    if exact and sample_lines is not None:
        raise DistillError("give --exact or --sample-lines, not both")
    the_job = _load(job, set_)
    engine = "batch" if vms is not None else the_job.cloud.engine
    if vms is None:
        vms = the_job.cloud.vms if the_job.cloud.engine == "batch" else 1
    opts = CostOptions(
        mfu=mfu,
        calibration=calibration,
        prices=prices,
        preemption_overhead=preemption_overhead,
        setup_minutes=setup_minutes,
        prep_tokens_per_s=DEFAULT_PREP_TOKENS_PER_S
        if prep_tokens_per_s is None
        else prep_tokens_per_s,
        storage_months=storage_months,
        downloads=downloads,
        reference_run=reference_run,
        vms=vms,
        engine=engine,
        sample_lines=0 if exact else (sample_lines or DEFAULT_SAMPLE_LINES),
    )
    opts.validate()  # before the job is tokenised
    # the boot disk teacher-cloud will create: sized to the checkpoint and the datasets
    opts = dataclasses.replace(opts, boot_disk_gb=staged_disk_gb(the_job))
    est = estimate_cost(the_job, opts)
    out.print(render_table(est))
    if json_path:
        write_estimate(est, json_path)
        err.print(f"wrote {json_path}")


@app.command("vm-render")
def vm_render(
    job: JobOpt,
    project: Annotated[str, typer.Option(help="Google Cloud project.")],
    image: Annotated[
        str, typer.Option(help="Teacher image: REGION-docker.pkg.dev/PROJECT/REPO/teacher:TAG.")
    ],
    service_account: Annotated[str, typer.Option(help="The job's service account email.")],
    zones: Annotated[
        str, typer.Option(help="Comma-separated zones of one region, in failover order.")
    ] = "us-central1-a,us-central1-b,us-central1-c",
    zone: Annotated[
        str | None, typer.Option(help="The zone to render (default: the first of --zones).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="gcloud | tfvars | api")] = "gcloud",
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where the tfvars or metadata files go.")
    ] = Path("runs/vm"),
    max_run_hours: Annotated[
        float, typer.Option(help="Dead-man switch: the VM is deleted after this long.")
    ] = 12.0,
    input_: Annotated[
        list[str] | None,
        typer.Option("--input", help="Stage gs://SRC=DEST (DEST relative to the job file)."),
    ] = None,
) -> None:
    """Render the teacher VM spec: gcloud command, Terraform variables or API request."""
    from distill.cloud.spec import render_vm

    render_vm(
        job,
        project,
        image,
        service_account,
        zones=zones,
        zone=zone,
        fmt=fmt,
        out_dir=out_dir,
        max_run_hours=max_run_hours,
        inputs=input_ or [],
        console=out,
    )


BackendOpt = Annotated[
    str, typer.Option(help="gce (Compute Engine) or local (the VM is a process on this machine).")
]
ProjectOpt = Annotated[
    str | None, typer.Option(help="Google Cloud project (default: cloud.project, gcloud's).")
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--compute-endpoint",
        envvar="DISTILL_COMPUTE_ENDPOINT",
        help="Compute API base URL, e.g. a local stub (anonymous credentials).",
        hidden=True,
    ),
]
StateOpt = Annotated[Path, typer.Option(help="Local VMs' state and copies of the run records.")]
BatchEndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--batch-endpoint",
        envvar="DISTILL_BATCH_ENDPOINT",
        help="Batch API base URL, e.g. a local stub (anonymous credentials).",
        hidden=True,
    ),
]
VmsOpt = Annotated[
    int | None,
    typer.Option(
        "--vms",
        min=1,
        help="Split the job over N Spot L4 VMs: one Google Cloud Batch job of N tasks "
        '(sets cloud.engine = "batch", cloud.vms = N).',
    ),
]


def _with_vms(sets: list[str] | None, vms: int | None) -> list[str]:
    """``--vms N`` as the job fields it stands for."""
    return [*(sets or []), *(['cloud.engine="batch"', f"cloud.vms={vms}"] if vms else [])]


@app.command("teacher-cloud")
def teacher_cloud(
    job: JobOpt,
    set_: SetOpt = None,
    output: OutputOpt = None,
    backend: BackendOpt = "gce",
    project: ProjectOpt = None,
    image: Annotated[
        str | None, typer.Option(help="Teacher image (default: cloud.image, then the registry's).")
    ] = None,
    service_account: Annotated[
        str | None, typer.Option(help="The VM's service account (default: distill-teacher@...).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Start without asking.")] = False,
    mfu: MfuOpt = None,
    calibration: CalibrationOpt = None,
    prices: PricesOpt = None,
    state_dir: StateOpt = Path("runs/cloud"),
    endpoint: EndpointOpt = None,
    poll_seconds: Annotated[
        float | None, typer.Option(help="Seconds between polls (default: cloud.poll_seconds).")
    ] = None,
    vms: VmsOpt = None,
    batch_endpoint: BatchEndpointOpt = None,
) -> None:
    """Run the teacher on an L4 spot VM (or N, --vms): estimate, confirm, provision, watch,
    tear down."""
    from distill.cloud.cost import CostOptions
    from distill.cloud.run import teacher_cloud as run_cloud
    from distill.cloud.session import CloudOptions

    opts = CloudOptions(
        backend=backend,
        endpoint=endpoint,
        project=project,
        image=image,
        service_account=service_account,
        yes=yes,
        state_dir=state_dir,
        cost=CostOptions(mfu=mfu, calibration=calibration, prices=prices),
        poll_seconds=poll_seconds,
        batch_endpoint=batch_endpoint,
    )
    opts.cost.validate()
    j = _load(job, _with_vms(set_, vms), output)
    run_cloud(j, opts, err, lambda q: typer.confirm(q, err=True))


@app.command()
def gc(
    backend: BackendOpt = "gce",
    project: ProjectOpt = None,
    job: Annotated[Path | None, typer.Option("--job", "-j", help="Only this job's VMs.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    state_dir: StateOpt = Path("runs/cloud"),
    endpoint: EndpointOpt = None,
    batch_endpoint: BatchEndpointOpt = None,
) -> None:
    """List teacher VMs and Batch jobs left behind (label managed-by=distill); delete them."""
    from distill.cloud.gc import collect_garbage
    from distill.cloud.session import CloudOptions

    opts = CloudOptions(
        backend=backend,
        endpoint=endpoint,
        project=project,
        yes=yes,
        state_dir=state_dir,
        batch_endpoint=batch_endpoint,
    )
    collect_garbage(
        _load(job, None) if job else None,
        opts,
        out,
        err,
        lambda q: sys.stdin.isatty() and typer.confirm(q),
    )


@app.command("cost-report")
def cost_report(
    job: JobOpt,
    set_: SetOpt = None,
    output: OutputOpt = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the rows to this file.")
    ] = None,
) -> None:
    """Each teacher-cloud run of the job: VM time and cost, beside the estimate."""
    from distill.cloud.report import cost_report as report

    rows = report(_load(job, set_, output), out)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    # One progress display: ours. transformers' and the hub's tqdm bars ("Loading weights",
    # "Writing model shards") read this before transformers is imported (a user's value wins).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from distill.teacher.stop import EXIT_PREEMPTED, Preempted

    try:
        rc = app(standalone_mode=False)  # typer returns 130 for a KeyboardInterrupt
    except Preempted as e:
        err.print(f"[yellow]preempted:[/yellow] {e}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_PREEMPTED)
    except DistillError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
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
    if rc == 130:
        err.print("[yellow]interrupted[/yellow]: rerun the same command to resume")
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
