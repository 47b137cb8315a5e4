"""The hours and dollars of one teacher pass on N L4 VMs: a pure model of counted inputs.

Its inputs are numbers: the data's counts (:class:`~distill.cloud.counting.DataCounts`, which
may be built by hand), the teacher's profile, the way it runs (:mod:`distill.teacher.fit`),
the sustained FLOP/s and a price table. Nothing here tokenises, loads a model or reads a file.

- hours: compute = FLOPs / sustained; every VM pays setup (boot minutes + the checkpoint read
  + its data preparation: every record of the splits read, its share of the tokens checked and
  tokenised, :func:`data_prep_hours`);
  a layered pass adds each VM's exposed weight streaming and activation I/O; spot hours carry
  a preemption overhead (layered: scaled by the chunk's time, the work a preemption loses);
  N VMs split each split's shards round-robin, the wall time is the busiest VM's;
- dollars: VM-hours x the VM price, the boot disk per GB-month, storage, egress, Cloud NAT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from distill.cloud.counting import DEFAULT_SAMPLE_LINES, DataCounts, total_flops
from distill.cloud.prices import HOURS_PER_MONTH, NAT_CAP_VMS, Prices
from distill.cloud.spec import BOOT_DISK_GB
from distill.config import Job
from distill.errors import DistillError
from distill.hardware import l4
from distill.teacher.fit import (
    DTYPE_BYTES,
    WEIGHTS_STREAM_BYTES_PER_S,
    TeacherProfile,
    Throughput,
    Way,
    throughput,
)

DEFAULT_PREEMPTION_OVERHEAD = 0.15
DEFAULT_SETUP_MINUTES = 10.0  # boot, driver check, image pull, container start
# a task's data preparation on the L4 VM (distill/hardware/l4.toml: bench/data_scale.py's rates
# on 2 vCPUs, the tokens' scaled to the VM's 8): its splits' records read and counted (one
# process), then its own records checked and tokenised (every vCPU)
DATA_READ_RECORDS_PER_S = l4().machine.data_read_records_per_s
DEFAULT_PREP_TOKENS_PER_S = l4().machine.data_prep_tokens_per_s
# The NVIDIA driver a Batch VM (batch-debian) downloads at boot through Cloud NAT: the R570
# data-center .run installer (~0.4 GiB) and its build dependencies from apt
DRIVER_DOWNLOAD_GIB = 0.5


@dataclass
class CostOptions:
    mfu: float | None = None  # None: DEFAULT_MFU unless calibrated
    calibration: Path | None = None
    prices: Path | None = None
    preemption_overhead: float = DEFAULT_PREEMPTION_OVERHEAD
    setup_minutes: float = DEFAULT_SETUP_MINUTES
    storage_months: float = 1.0
    downloads: int = 1
    boot_disk_gb: int = BOOT_DISK_GB  # the VM spec's
    reference_run: str | None = None  # a shard set (path or gs://) to take bytes/target from
    vms: int = 1  # teacher-cloud --vms N: N tasks of one Batch job split the shards
    engine: str = "vm"  # "batch": each VM boot downloads the NVIDIA driver through Cloud NAT
    sample_lines: int = DEFAULT_SAMPLE_LINES  # lines tokenised per split; 0: all (--exact)
    prep_tokens_per_s: float = DEFAULT_PREP_TOKENS_PER_S  # a VM's data preparation (setup)

    def validate(self) -> None:
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise DistillError(f"--mfu must be in (0, 1], got {self.mfu}")
        if self.mfu is not None and self.calibration is not None:
            raise DistillError("give --mfu or --calibration, not both")
        if not 0 <= self.preemption_overhead <= 10:
            raise DistillError(
                f"--preemption-overhead is a fraction (0.15 = 15%), got {self.preemption_overhead}"
            )
        for name in ("setup_minutes", "storage_months"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise DistillError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if not (math.isfinite(self.prep_tokens_per_s) and self.prep_tokens_per_s > 0):
            raise DistillError(f"--prep-tokens-per-s must be > 0, got {self.prep_tokens_per_s}")
        if self.sample_lines < 0:
            raise DistillError(f"--sample-lines must be >= 1 (0: --exact), got {self.sample_lines}")
        if self.vms < 1:
            raise DistillError(f"--vms must be >= 1, got {self.vms}")
        if self.engine not in ("vm", "batch"):
            raise DistillError(f"engine {self.engine!r}: one of vm, batch")
        if self.downloads < 0 or self.boot_disk_gb <= 0:
            raise DistillError("--downloads must be >= 0 and the boot disk > 0 GB")


# --- Hours ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassHours:
    """The hours of one teacher pass on ``tasks`` L4 VMs (:func:`pass_hours`)."""

    flops: float
    compute: float  # the FLOPs at the sustained rate, all VMs together
    setup: float  # per VM: boot, driver, image, the checkpoint's read and the data preparation
    prep: float  # of setup: the data preparation (the busiest VM's share of the tokens)
    layered: Throughput | None  # the largest chunk's time model (None: resident)
    overhead: float  # layered: exposed weight streaming + activation I/O, all VMs
    overhead_busiest: float  # the same, of the VM with the most
    preemption: float  # spot overhead fraction
    tasks: int
    on_demand: float
    spot: float
    wall: float


def pass_hours(
    job: Job,
    p: TeacherProfile,
    way: Way,
    data: DataCounts,
    sustained: float,
    opts: CostOptions,
    copy_h: float = 0.0,
) -> PassHours:
    """Compute, setup, layered overhead, preemption, VM-hours and wall time of ``job``'s
    teacher pass run ``way`` on ``opts.vms`` VMs at ``sustained`` FLOP/s each; ``copy_h``:
    an hf: checkpoint's copy into the bucket, which every VM waits for (part of its setup)."""
    flops = total_flops(p, data)
    compute_h = flops / sustained / 3600
    tasks, busiest = fanout_split(job, data, opts.vms)
    # every VM reads the whole checkpoint in the job's dtype (also when it quantises it)
    weights = p.params * DTYPE_BYTES[job.teacher.dtype]
    prep_h = data_prep_hours(data, busiest, opts.prep_tokens_per_s)
    setup_h = (
        opts.setup_minutes / 60 + weights / WEIGHTS_STREAM_BYTES_PER_S / 3600 + prep_h + copy_h
    )
    tp, per_task = layered_overhead(job, p, way, data, tasks, flops, sustained)
    preemption = opts.preemption_overhead
    shard_h = compute_h / max(data.shards, 1)
    if tp is not None and setup_h + shard_h > 0:  # a preemption loses the chunk in flight
        preemption *= (setup_h + tp.seconds / 3600 / 2) / (setup_h + shard_h / 2)
    overhead_h, overhead_busiest_h = sum(per_task) / 3600, max(per_task) / 3600
    on_demand, spot, wall = vm_hours(
        compute_h, setup_h, tasks, busiest, preemption, overhead_h, overhead_busiest_h
    )
    return PassHours(
        flops=flops,
        compute=compute_h,
        setup=setup_h,
        prep=prep_h,
        layered=tp,
        overhead=overhead_h,
        overhead_busiest=overhead_busiest_h,
        preemption=preemption,
        tasks=tasks,
        on_demand=on_demand,
        spot=spot,
        wall=wall,
    )


HUB_DOWNLOAD_BYTES_PER_S = l4().machine.hub_download_bytes_per_s
ASSUMED_UPLINK_BYTES_PER_S = 50e6 / 8  # a local teacher's upload: a home uplink, 50 Mbit/s


@dataclass(frozen=True)
class CheckpointMove:
    """How the teacher's weights reach the VMs, for the estimate (:mod:`distill.checkpoints`):

    - ``local``: uploaded from the user's machine into the bucket (``upload_hours`` at an
      assumed 50 Mbit/s uplink; before any VM starts, so no VM-hours), kept there;
    - ``hf``: copied from the Hub into the bucket once by the first VM, through Cloud NAT
      (``copy_hours`` at :data:`HUB_DOWNLOAD_BYTES_PER_S`: every VM waits for it, so it is part
      of each VM's setup), kept there;
    - ``gs``: read from the user's bucket: nothing moved or stored by the run;
    - ``builtin``: in the teacher image."""

    kind: str
    bytes: int
    upload_hours: float = 0.0
    copy_hours: float = 0.0
    nat_gib: float = 0.0  # through Cloud NAT (hf: once)
    stored_gb: float = 0.0  # kept in the run's bucket


def checkpoint_move(model: str, nbytes: int) -> CheckpointMove:
    """:class:`CheckpointMove` of ``teacher.model`` whose checkpoint is ``nbytes``."""
    if model.startswith("hf:"):
        return CheckpointMove(
            "hf",
            nbytes,
            copy_hours=nbytes / HUB_DOWNLOAD_BYTES_PER_S / 3600,
            nat_gib=nbytes / 2**30,
            stored_gb=nbytes / 2**30,
        )
    if model.startswith("gs://"):
        return CheckpointMove("gs", nbytes)
    if model.startswith("builtin:"):
        return CheckpointMove("builtin", nbytes)
    return CheckpointMove(
        "local",
        nbytes,
        upload_hours=nbytes / ASSUMED_UPLINK_BYTES_PER_S / 3600,
        stored_gb=nbytes / 2**30,
    )


def data_prep_hours(data: DataCounts, share: float, tokens_per_s: float) -> float:
    """One VM's data preparation before its first forward pass (as
    :func:`distill.teacher.batching.prepare_split` runs it): every record of the splits read
    and counted (:data:`DATA_READ_RECORDS_PER_S`; an upper bound: through its split's record
    index a fan-out task reads only its own shards' records of a plain JSONL file, but every
    record of a compressed or Parquet file that holds one), and its ``share`` of the tokens
    checked and tokenised at ``tokens_per_s``. Every
    VM is given the busiest's share (round-robin shards: within a shard per split of each)."""
    records = data.samples / DATA_READ_RECORDS_PER_S
    return (records + data.tokens * share / tokens_per_s) / 3600


def fanout_split(job: Job, data: DataCounts, vms: int) -> tuple[int, float]:
    """(VMs that get shards, the busiest VM's fraction of the padded tokens) when ``vms``
    VMs split each split's shards round-robin (shard s to VM s % n)."""
    per = job.teacher.samples_per_shard
    shards = {s: -(-c["samples"] // per) for s, c in data.per_split.items()}
    tasks = max(1, min(vms, max(shards.values(), default=1)))
    total = max(sum(c["padded_tokens"] for c in data.per_split.values()), 1)
    busiest = sum(
        c["padded_tokens"] * -(-shards[s] // tasks) / max(shards[s], 1)
        for s, c in data.per_split.items()
    )
    return tasks, min(busiest / total, 1.0) if data.per_split else 1.0


def layered_overhead(
    job: Job,
    p: TeacherProfile,
    way: Way,
    data: DataCounts,
    tasks: int,
    flops: float,
    sustained: float,
) -> tuple[Throughput | None, list[float]]:
    """The layered pass's seconds beyond the compute, per task: task i runs the shards
    s % tasks == i of each split in chunks of at most ``teacher.chunk_tokens`` (as
    :func:`distill.teacher.run._targets_by_shard` groups them), and each chunk streams every
    layer's weights (exposed where prefetch cannot hide it) and moves its activations over the
    host link twice per layer. Also the time model of the largest chunk (None: resident)."""
    from distill.teacher.layered import chunk_groups

    per_task = [0.0] * tasks
    if way.mode != "layered" or data.tokens == 0:
        return None, per_task
    t = job.teacher
    fpt = flops / data.tokens

    def model(tokens: int) -> Throughput:
        return throughput(p, t.dtype, way, tokens, fpt, sustained)

    largest = 0
    for sizes in data.shard_tokens.values():
        for i in range(tasks):
            mine = sizes[i::tasks]
            for group in chunk_groups(mine, t.chunk_tokens):
                chunk = sum(mine[g] for g in group)
                tp = model(chunk)
                per_task[i] += tp.exposed_stream_s + tp.activation_io_s
                largest = max(largest, chunk)
    return model(largest), per_task


def vm_hours(
    compute_h: float,
    setup_h: float,
    tasks: int,
    busiest: float,
    preemption: float,
    overhead_h: float = 0.0,
    overhead_busiest_h: float = 0.0,
) -> tuple[float, float, float]:
    """(on-demand VM-hours, spot VM-hours, spot wall hours) of ``tasks`` VMs that each pay the
    setup and split ``compute_h``, the busiest doing the fraction ``busiest`` of it; a layered
    run adds ``overhead_h`` (all VMs) and, to the wall time, ``overhead_busiest_h`` (the VM
    with the most). Spot hours carry the ``preemption`` fraction."""
    on_demand_h = compute_h + overhead_h + tasks * setup_h
    spot = 1 + preemption
    wall = setup_h + compute_h * busiest + overhead_busiest_h
    return on_demand_h, on_demand_h * spot, wall * spot


# --- Dollars ----------------------------------------------------------------------------------


def nat_gib(opts: CostOptions, tasks: int, preemption: float) -> float:
    """GiB through Cloud NAT: the driver, once per Batch VM boot (a preempted task boots a new
    VM: the spot overhead fraction more); the single VM's COS driver comes from Google."""
    if opts.engine != "batch":
        return 0.0
    return DRIVER_DOWNLOAD_GIB * tasks * (1 + preemption)


def nat_usd(prices: Prices, vm_h: float, wall_h: float, tasks: int, gib: float) -> float:
    """Cloud NAT: the VMs' hours (the flat gateway rate above NAT_CAP_VMS) and the GiB processed."""
    hourly = (
        wall_h * prices.nat_max_per_hour if tasks > NAT_CAP_VMS else vm_h * prices.nat_per_vm_hour
    )
    return hourly + gib * prices.nat_per_gb


def priced(
    prices: Prices,
    opts: CostOptions,
    spot_h: float,
    on_demand_h: float,
    storage_gb_months: float,
    egress_gb: float,
    nat: tuple[float, float] = (0.0, 0.0),
    weights: float = 0.0,
) -> dict[str, float]:
    """USD per item (VM and boot disk, spot and on demand; storage; egress; Cloud NAT, spot
    and on demand; ``weights``: the teacher checkpoint's storage and Hub download, see
    :func:`weights_usd`) and the totals."""
    disk_per_h = opts.boot_disk_gb * prices.boot_disk_per_gb_month / HOURS_PER_MONTH
    usd = {
        "vm_spot": spot_h * prices.vm_spot_per_hour,
        "vm_on_demand": on_demand_h * prices.vm_on_demand_per_hour,
        "disk_spot": spot_h * disk_per_h,
        "disk_on_demand": on_demand_h * disk_per_h,
        "storage": storage_gb_months * prices.storage_per_gb_month,
        "egress": egress_gb * prices.egress_per_gb,
        "nat_spot": nat[0],
        "nat_on_demand": nat[1],
        "weights": weights,
    }
    shared = usd["storage"] + usd["egress"] + weights
    usd["total_spot"] = usd["vm_spot"] + usd["disk_spot"] + usd["nat_spot"] + shared
    usd["total_on_demand"] = (
        usd["vm_on_demand"] + usd["disk_on_demand"] + usd["nat_on_demand"] + shared
    )
    return usd


def weights_usd(prices: Prices, move: CheckpointMove, storage_months: float) -> float:
    """The teacher checkpoint's own dollars: its copy kept in the run's bucket for
    ``storage_months`` (local, hf) and an hf: copy's GiB through Cloud NAT (once)."""
    return (
        move.stored_gb * storage_months * prices.storage_per_gb_month
        + move.nat_gib * prices.nat_per_gb
    )
