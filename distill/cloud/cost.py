"""Cost estimate for one teacher pass on Google Cloud L4 spot VMs (g2-standard-8): the
orchestration, :func:`estimate_cost`, and its result, :class:`CostEstimate`.

Every number is either counted (the job's tokens after tokenisation with the teacher's own
tokenizer, the teacher's parameters from its config on the meta device, the teacher's real
batches), estimated from a uniform sample of the dataset's lines with a stated 95% bound, or
a stated assumption that a flag or a file overrides. Following a job through
:func:`estimate_cost`, one module per step:

1. the teacher's profile, and the way it runs on one L4 (resident, quantised or layered;
   refused when none the job allows fits): :mod:`distill.teacher.fit`, :mod:`.l4`;
2. the data, as the teacher will batch it: sampled and extrapolated (:mod:`.sampling`), or
   counted line by line (``--exact``, or a split smaller than the sample: :mod:`.counting`);
3. the MFU, assumed or calibrated from a measured run (on an L4, or on another GPU scaled by
   the FLOP ratio): :mod:`.calibration`;
4. the hours (compute, setup, layered overhead, preemption, N VMs), a pure model of those
   numbers: :mod:`.pricing`;
5. the shard bytes, measured on a reference run or probed: :mod:`.shard_bytes`;
6. the dollars (VM, boot disk, storage, egress, Cloud NAT): :mod:`.pricing`, at the dated
   prices of distill/hardware/l4.toml or ``--prices FILE`` (:mod:`.prices`);
7. the table and the JSON: :mod:`.cost_table`.

The names callers import from here (options, the price table, the model) stay importable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.checkpoints import checkpoint_bytes
from distill.cloud.calibration import Calibration, load_calibration
from distill.cloud.cost_table import assumption_rows, render_table, write_estimate
from distill.cloud.counting import BOUNDED, DataCounts, count_data, total_flops
from distill.cloud.l4 import (
    DEFAULT_MFU,
    L4_MEMORY_BYTES,
    L4_NAME,
    L4_PEAK_FLOPS,
    L4_VM_RAM_BYTES,
    l4_usable_bytes,
    plan_l4,
)
from distill.cloud.prices import HOURS_PER_MONTH, NAT_CAP_VMS, Prices, load_prices
from distill.cloud.pricing import (
    DEFAULT_PREEMPTION_OVERHEAD,
    DEFAULT_SETUP_MINUTES,
    DRIVER_DOWNLOAD_GIB,
    CheckpointMove,
    CostOptions,
    PassHours,
    checkpoint_move,
    fanout_split,
    layered_overhead,
    nat_gib,
    nat_usd,
    pass_hours,
    priced,
    vm_hours,
    weights_usd,
)
from distill.cloud.sampling import estimate_data
from distill.cloud.shard_bytes import (
    probed_shard_bytes,
    reference_bytes_per_target,
    shard_bytes_estimate,
)
from distill.config import Job
from distill.errors import DistillError
from distill.teacher.fit import GIB, TeacherProfile, Throughput, Way, teacher_profile

__all__ = [
    "DEFAULT_MFU",
    "DEFAULT_PREEMPTION_OVERHEAD",
    "DEFAULT_SETUP_MINUTES",
    "DRIVER_DOWNLOAD_GIB",
    "HOURS_PER_MONTH",
    "L4_MEMORY_BYTES",
    "L4_NAME",
    "L4_PEAK_FLOPS",
    "L4_VM_RAM_BYTES",
    "NAT_CAP_VMS",
    "Calibration",
    "CostEstimate",
    "CostOptions",
    "DataCounts",
    "PassHours",
    "Prices",
    "count_data",
    "estimate_data",
    "estimate_cost",
    "fanout_split",
    "l4_usable_bytes",
    "layered_overhead",
    "load_calibration",
    "load_prices",
    "nat_gib",
    "nat_usd",
    "pass_hours",
    "plan_l4",
    "priced",
    "probed_shard_bytes",
    "reference_bytes_per_target",
    "render_table",
    "shard_bytes_estimate",
    "teacher_profile",
    "total_flops",
    "vm_hours",
    "write_estimate",
]


def estimate_cost(
    job: Job, opts: CostOptions | None = None, data_scratch: Path | None = None
) -> CostEstimate:
    """Count, size and price one teacher pass of ``job`` on an L4 spot VM (or ``opts.vms``);
    ``data_scratch``: where a ``gs://`` split's copy already is (teacher-cloud's checks')."""
    from transformers import AutoConfig

    from distill import models

    opts = opts or CostOptions()
    opts.validate()
    prices = load_prices(opts.prices)
    teacher_dir = models.resolve_model(job.teacher.model, weights=False)
    try:
        config = AutoConfig.from_pretrained(teacher_dir)
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot read the teacher config in {teacher_dir}: {e}") from None
    profile = teacher_profile(config, teacher_dir)
    way = plan_l4(job, profile)  # refuse before the (slow) tokenisation
    data = estimate_data(
        job, models.load_tokenizer(teacher_dir), opts.sample_lines, scratch=data_scratch
    )
    calibration = (
        load_calibration(opts.calibration, job, profile, data) if opts.calibration else None
    )
    mfu = calibration.mfu if calibration else (opts.mfu or DEFAULT_MFU)
    sustained = L4_PEAK_FLOPS[job.teacher.dtype] * mfu
    move = checkpoint_move(job.teacher.model, checkpoint_bytes(teacher_dir))
    h = pass_hours(job, profile, way, data, sustained, opts, move.copy_hours)
    busy_h = h.compute + h.overhead

    shard_bytes, basis = shard_bytes_estimate(job, data, profile.vocab, opts.reference_run)
    gb = shard_bytes / GIB
    usd, gib_nat = _dollars(prices, opts, h, shard_bytes, move)
    usd_range: dict[str, tuple[float, float]] = {}
    if not data.exact:  # every sampled count at its low, then its high end, priced
        ends = []
        for sign in (-1, 1):
            d = data.at_bound(sign)
            hd = pass_hours(job, profile, way, d, sustained, opts, move.copy_hours)
            nbytes = round(shard_bytes * d.target_tokens / max(data.target_tokens, 1))
            ends.append(_dollars(prices, opts, hd, nbytes, move)[0])
        usd_range = {k: (ends[0][k], ends[1][k]) for k in ("total_spot", "total_on_demand")}
    return CostEstimate(
        job=job.name,
        teacher=job.teacher.model,
        dtype=job.teacher.dtype,
        data=data,
        profile=profile,
        memory=way.device,
        way=way,
        layered=h.layered,
        layered_overhead_hours=h.overhead,
        layered_overhead_wall_hours=h.overhead_busiest,
        preemption=h.preemption,
        flops=h.flops,
        mfu=mfu,
        calibration=calibration,
        tokens_per_s=data.tokens / (busy_h * 3600) if busy_h > 0 else 0.0,
        compute_hours=h.compute,
        setup_hours=h.setup,
        prep_hours=h.prep,
        on_demand_hours=h.on_demand,
        spot_hours=h.spot,
        tasks=h.tasks,
        wall_hours=h.wall,
        shard_bytes=shard_bytes,
        bytes_basis=basis,
        storage_gb_months=gb * opts.storage_months,
        egress_gb=gb * opts.downloads,
        nat_gb=gib_nat,
        weights=move,
        prices=prices,
        opts=opts,
        usd=usd,
        mode_setting=job.teacher.mode,
        usd_range=usd_range,
    )


def _dollars(
    prices: Prices, opts: CostOptions, h: PassHours, shard_bytes: int, move: CheckpointMove
) -> tuple[dict[str, float], float]:
    """USD per item of a pass of hours ``h`` writing ``shard_bytes``; the GiB through NAT."""
    gb = shard_bytes / GIB
    gib_nat = nat_gib(opts, h.tasks, h.preemption)
    on_demand_wall = h.wall / (1 + h.preemption)
    nat = (
        nat_usd(prices, h.spot, h.wall, h.tasks, gib_nat),
        nat_usd(prices, h.on_demand, on_demand_wall, h.tasks, nat_gib(opts, h.tasks, 0.0)),
    )
    usd = priced(
        prices,
        opts,
        h.spot,
        h.on_demand,
        gb * opts.storage_months,
        gb * opts.downloads,
        nat,
        weights_usd(prices, move, opts.storage_months),
    )
    return usd, gib_nat


@dataclass
class CostEstimate:
    job: str
    teacher: str
    dtype: str
    data: DataCounts
    profile: TeacherProfile
    memory: dict[str, int]
    way: Way  # resident / quantised / layered (distill/teacher/fit.py)
    layered: Throughput | None  # the layered pass's time model, largest chunk (None: resident)
    layered_overhead_hours: float  # exposed weight streaming + activation I/O, all VMs
    layered_overhead_wall_hours: float  # the same, of the VM with the most
    preemption: float  # the spot overhead as a fraction (layered: scaled by the chunk's time)
    flops: float
    mfu: float
    calibration: Calibration | None
    tokens_per_s: float
    compute_hours: float  # the FLOPs at the sustained rate (layered overhead not included)
    setup_hours: float  # per VM
    prep_hours: float  # of setup_hours: the data preparation (the busiest VM's)
    on_demand_hours: float  # VM-hours, all VMs together
    spot_hours: float
    tasks: int  # VMs that get shards: min(--vms, the most shards of a split)
    wall_hours: float  # start to end (spot, the busiest VM's setup + shards + preemptions)
    shard_bytes: int
    bytes_basis: str
    storage_gb_months: float
    egress_gb: float
    nat_gb: float  # through Cloud NAT (the Batch VMs' driver downloads)
    weights: CheckpointMove  # how the teacher checkpoint reaches the VMs
    prices: Prices
    opts: CostOptions
    usd: dict[str, float]

    mode_setting: str = "auto"  # the job's teacher.mode
    # sampled counts: the totals priced with every count at the low and at the high end of
    # its 95% bound, {"total_spot": (low, high), "total_on_demand": ...}; empty when exact
    usd_range: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def flops_per_token(self) -> float:
        return self.flops / max(self.data.tokens, 1)

    def assumptions(self) -> list[tuple[str, str]]:
        """(assumption, value and source) rows, every one stated (:mod:`.cost_table`)."""
        return assumption_rows(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "teacher": self.teacher,
            "dtype": self.dtype,
            "data": {
                "samples": self.data.samples,
                "shards": self.data.shards,
                "tokens": self.data.tokens,
                "target_tokens": self.data.target_tokens,
                "padded_tokens": self.data.padded_tokens,
                "attention_token_ctx": self.data.attention_token_ctx,
                "per_split": self.data.per_split,
                "exact": self.data.exact,
                # 95% half-widths of the sampled counts (0: counted), and how each split was
                "bounds": {name: self.data.bound(name) for name in BOUNDED},
                "sampled": {k: dataclasses.asdict(v) for k, v in self.data.sampled.items()},
            },
            "teacher_params": self.profile.params,
            "teacher_non_embedding_params": self.profile.non_embedding_params,
            "mode": self.way.mode,
            "quantize": self.way.quantize,
            "memory_bytes": self.memory,
            "host_memory_bytes": self.way.host,
            "layered": None
            if self.layered is None
            else {
                **dataclasses.asdict(self.layered),
                "stream_share": self.layered.stream_share,
                "overhead_hours": self.layered_overhead_hours,
                "overhead_wall_hours": self.layered_overhead_wall_hours,
            },
            "memory_usable_bytes": l4_usable_bytes(),
            "flops": self.flops,
            "flops_per_token": self.flops_per_token,
            "mfu": self.mfu,
            "calibrated": self.calibration is not None,
            "calibration_gpu": None if self.calibration is None else self.calibration.gpu,
            "calibration_scaled": self.calibration is not None and not self.calibration.on_l4,
            "tokens_per_s": self.tokens_per_s,
            "hours": {
                "compute": self.compute_hours,
                "layered_overhead": self.layered_overhead_hours,
                "setup": self.setup_hours,
                "data_prep": self.prep_hours,
                "on_demand": self.on_demand_hours,
                "spot": self.spot_hours,
                "wall": self.wall_hours,
            },
            "vms": self.tasks,
            "teacher_weights": dataclasses.asdict(self.weights),
            "preemption_overhead": self.preemption,
            "shard_bytes": self.shard_bytes,
            "storage_gb_months": self.storage_gb_months,
            "egress_gb": self.egress_gb,
            "nat_gb": self.nat_gb,
            "usd": self.usd,
            "usd_range": {k: list(v) for k, v in self.usd_range.items()},
            "prices": dataclasses.asdict(self.prices),
            "options": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(self.opts).items()
            },
            "assumptions": dict(self.assumptions()),
        }
