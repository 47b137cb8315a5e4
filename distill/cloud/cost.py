"""Cost estimate for one teacher pass on a Google Cloud L4 spot VM (g2-standard-8).

Every number is either counted (the job's tokens after tokenisation with the teacher's own
tokenizer, the teacher's parameters from its config on the meta device, the teacher's real
batches) or a stated assumption that a flag or a file overrides. The table prints them all:

- compute: FLOPs = padded tokens x (2 x non-embedding params + 2 x layers x ctx x d_attn)
  + target tokens x 2 x hidden x vocab (the LM head runs only at target positions);
- time: FLOPs / (L4 peak x MFU); the MFU is assumed (0.35) or calibrated from a benchmark
  measured on an L4 (or on another GPU whose peak the file states: the same MFU is assumed on
  the L4, i.e. its throughput scaled by the FLOP ratio); plus VM boot/setup minutes and the
  weights' load; spot hours carry a preemption overhead (lost work since the last shard +
  re-setup; layered: since the start of the chunk in flight, so the overhead is scaled by the
  chunk's time);
- money: VM hours x a dated price table (spot and on-demand), the boot disk, shard storage
  in GB-months at the GCS Standard price, and internet egress for the student's download.

The way the teacher runs on the L4 comes from distill/teacher/fit.py: resident when it fits,
else (``teacher.mode = "auto"`` or ``"layered"``) layered, one decoder layer at a time. Every
chunk of every split of every task streams all the layers' weights, so a layered run's VM-hours
add each task's exposed weight streaming and activations' host I/O to the compute, and its
wall time the busiest task's. A job that fits no way it allows is refused with the estimate in
the message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tarfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.cloud.spec import BOOT_DISK_GB
from distill.config import Job
from distill.errors import DistillError
from distill.teacher.fit import (
    DTYPE_BYTES,
    GIB,  # Google bills storage and egress per GiB ("GB" on the pricing pages)
    HOST_LINK_BYTES_PER_S,
    HOST_MARGIN_BYTES,
    WEIGHTS_STREAM_BYTES_PER_S,
    TeacherProfile,
    Throughput,
    Way,
    choose,
    teacher_profile,
    throughput,
    usable_bytes,
)

# --- The GPU (NVIDIA L4 datasheet) -------------------------------------------------------------
L4_NAME = "NVIDIA L4"
# Dense peak (the datasheet's 242 TFLOP/s bf16/fp16 is with structured sparsity; fp32 30.3).
L4_PEAK_FLOPS = {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12}
L4_MEMORY_BYTES = 23_034 * 2**20  # "24 GB" card: what nvidia-smi reports as total
DEFAULT_MFU = 0.35
DEFAULT_PREEMPTION_OVERHEAD = 0.15
DEFAULT_SETUP_MINUTES = 10.0  # boot, driver check, image pull, container start
HOURS_PER_MONTH = 730.0  # Google's billing month


@dataclass(frozen=True)
class Prices:
    """A dated price table (USD). Override with ``--prices FILE`` (TOML or JSON, any subset)."""

    as_of: str = "2026-11"
    source: str = (
        "Google Cloud's GPU and Spot VM pricing pages, g2-standard-8 in us-central1, the high end "
        "of the 2026 figures; verify before relying"
    )
    region: str = "us-central1"
    machine: str = "g2-standard-8 (8 vCPU, 32 GB, 1 x NVIDIA L4)"
    vm_on_demand_per_hour: float = 0.85
    vm_spot_per_hour: float = 0.34
    boot_disk_per_gb_month: float = 0.10  # pd-balanced
    storage_per_gb_month: float = 0.020  # Cloud Storage Standard, regional
    egress_per_gb: float = 0.12  # internet egress (premium tier, first TB), no free tier counted
    # Cloud NAT (infra/terraform/base: the Batch VMs' driver download), cloud.google.com/nat/pricing
    nat_per_vm_hour: float = 0.0014  # per VM using the gateway, up to 32 VMs
    nat_max_per_hour: float = 0.044  # the gateway's hourly charge with more than 32 VMs
    nat_per_gb: float = 0.045  # data processed, in or out


_PRICE_NUMBERS = tuple(f.name for f in dataclasses.fields(Prices) if f.type in ("float", float))


def load_prices(path: Path | None) -> Prices:
    """Defaults, with the fields a TOML/JSON file names replaced (unknown keys refused)."""
    if path is None:
        return Prices()
    raw = _read_table(path, "price file")
    if isinstance(raw.get("prices"), dict):  # allow a [prices] table
        raw = raw["prices"]
    known = {f.name for f in dataclasses.fields(Prices)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DistillError(
            f"{path}: unknown price {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    values: dict[str, Any] = {}
    for key, v in raw.items():
        if key in _PRICE_NUMBERS:
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or v < 0
                or not math.isfinite(v)
            ):
                raise DistillError(f"{path}: {key} must be a number >= 0, got {v!r}")
            values[key] = float(v)
        elif not isinstance(v, str):
            raise DistillError(f"{path}: {key} must be a string, got {v!r}")
        else:
            values[key] = v
    values.setdefault("source", f"{path} (defaults for the fields it does not set)")
    values.setdefault("as_of", "unknown (set as_of in the price file)")
    return dataclasses.replace(Prices(), **values)


def _read_table(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DistillError(f"{what} {path} not found")
    text = path.read_text()
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise DistillError(f"{path}: not valid {kind}: {e}") from None
    if not isinstance(raw, dict):
        raise DistillError(f"{path}: expected a table/object, got {type(raw).__name__}")
    return raw


# --- The teacher's shape ----------------------------------------------------------------------


L4_VM_RAM_BYTES = 32 * GIB  # g2-standard-8's host memory (layered: the chunk's activations)


def l4_usable_bytes() -> int:
    return usable_bytes(L4_MEMORY_BYTES)


def plan_l4(job: Job, p: TeacherProfile) -> Way:
    """How the job's teacher runs on one L4 (:func:`distill.teacher.fit.choose`): resident,
    quantised or layered; DistillError when no way the job allows fits."""
    return choose(job, p, L4_MEMORY_BYTES, L4_VM_RAM_BYTES - HOST_MARGIN_BYTES, where="one L4")


# --- The dataset, as the teacher will batch it -------------------------------------------------


@dataclass
class DataCounts:
    samples: int = 0
    shards: int = 0
    tokens: int = 0
    target_tokens: int = 0
    padded_tokens: int = 0  # what the forward passes process (token-budget batches)
    attention_token_ctx: int = 0  # sum over padded tokens of their batch's length
    per_split: dict[str, dict[str, int]] = field(default_factory=dict)
    shard_tokens: dict[str, list[int]] = field(default_factory=dict)  # real tokens per shard


def count_data(job: Job, tokenizer: Any) -> DataCounts:
    """Tokenise every split and replay the teacher's shard chunks and batches."""
    from distill.config import splits
    from distill.teacher.batching import token_budget_batches, tokenize_split

    c = DataCounts()
    for split, path in splits(job).items():
        samples, st = tokenize_split(job, path, tokenizer)
        per = job.teacher.samples_per_shard
        padded = ctx = 0
        c.shard_tokens[split] = []
        for lo in range(0, len(samples), per):
            lengths = [len(s.input_ids) for s in samples[lo : lo + per]]
            c.shard_tokens[split].append(sum(lengths))
            for batch in token_budget_batches(lengths, job.teacher.batch_tokens):
                longest = lengths[batch[0]]
                padded += len(batch) * longest
                ctx += len(batch) * longest * longest
        c.samples += st.samples
        c.shards += -(-len(samples) // per)
        c.tokens += st.tokens
        c.target_tokens += st.target_tokens
        c.padded_tokens += padded
        c.attention_token_ctx += ctx
        c.per_split[split] = {
            "samples": st.samples,
            "tokens": st.tokens,
            "target_tokens": st.target_tokens,
            "padded_tokens": padded,
        }
    return c


def total_flops(p: TeacherProfile, c: DataCounts) -> float:
    """Forward FLOPs of the whole pass (body on padded tokens, head on target rows only)."""
    body = 2 * p.non_embedding_params * c.padded_tokens
    attention = 2 * p.layers * p.q_dim * c.attention_token_ctx  # Kaplan et al. 2020, ctx = T_b
    head = 2 * p.hidden * p.vocab * c.target_tokens
    return float(body + attention + head)


# --- Calibration ------------------------------------------------------------------------------


@dataclass
class Calibration:
    path: Path
    model: str
    gpu: str
    tokens_per_s: float
    mfu: float  # achieved: tokens/s x FLOPs per token / the measuring GPU's peak
    peak_flops: float = L4_PEAK_FLOPS["bfloat16"]  # that GPU's dense peak at the run's dtype
    on_l4: bool = True  # False: measured on another GPU, scaled to the L4 by the FLOP ratio


def _positive(raw: dict[str, Any], key: str) -> float | None:
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise DistillError(f"{key} must be > 0, got {v!r}")
    return float(v)


def load_calibration(path: Path, job: Job, p: TeacherProfile, c: DataCounts) -> Calibration:
    """MFU achieved by a run measured on an L4 (``tokens_per_s`` of real tokens, ``model``).

    Also reads bench/teacher_pass.py's summary (``ours_tokens_per_s``, ``machine.cuda_device``).
    Its FLOPs per token are ``flops_per_token`` if given, else computed from the named model's
    config with the job's padding and attention context and the run's target share (its
    ``tokens``/``target_tokens`` if given, else the job's).

    A run on another GPU (``gpu`` not an L4) needs ``gpu_peak_flops``, that GPU's dense peak
    FLOP/s at the run's ``dtype``: its MFU is measured against that peak and assumed on the L4,
    i.e. its throughput is scaled by the FLOP ratio (bench/gpu/check.py writes such a file).
    """
    raw = _read_table(path, "calibration file")
    tps = raw.get("tokens_per_s", raw.get("ours_tokens_per_s"))
    if isinstance(tps, bool) or not isinstance(tps, int | float) or not tps > 0:
        raise DistillError(f"{path}: needs tokens_per_s > 0 (real tokens per second on an L4)")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise DistillError(f"{path}: needs 'model', the teacher the throughput was measured with")
    machine = raw.get("machine") if isinstance(raw.get("machine"), dict) else {}
    gpu = raw.get("gpu") or raw.get("cuda_device") or machine.get("cuda_device") or ""
    on_l4 = isinstance(gpu, str) and "L4" in re.split(r"[^A-Z0-9]+", gpu.upper())
    try:
        other_peak = _positive(raw, "gpu_peak_flops")
    except DistillError as e:
        raise DistillError(f"{path}: {e}") from None
    if not isinstance(gpu, str) or not gpu or (not on_l4 and other_peak is None):
        raise DistillError(
            f"{path}: measured on {gpu or 'an unnamed device'!r}, not an {L4_NAME} "
            "(set 'gpu' to the device name, e.g. \"NVIDIA L4\"; a run on another GPU also needs "
            "'gpu_peak_flops', its dense peak FLOP/s at the run's dtype, to be scaled to the L4)"
        )
    dtype = raw.get("dtype", job.teacher.dtype)
    if dtype not in L4_PEAK_FLOPS:
        raise DistillError(f"{path}: dtype {dtype!r} is not one of {', '.join(L4_PEAK_FLOPS)}")
    peak = L4_PEAK_FLOPS[dtype] if on_l4 or other_peak is None else other_peak
    if "flops_per_token" in raw:
        fpt = raw["flops_per_token"]
        if isinstance(fpt, bool) or not isinstance(fpt, int | float) or not fpt > 0:
            raise DistillError(f"{path}: flops_per_token must be > 0, got {fpt!r}")
    else:
        cp = p if model == job.teacher.model else _profile_of(model, path)
        share = c.target_tokens / c.tokens
        if isinstance(raw.get("tokens"), int) and isinstance(raw.get("target_tokens"), int):
            share = raw["target_tokens"] / max(raw["tokens"], 1)
        pad = c.padded_tokens / c.tokens
        ctx = c.attention_token_ctx / max(c.padded_tokens, 1)
        fpt = pad * (2 * cp.non_embedding_params + 2 * cp.layers * cp.q_dim * ctx)
        fpt += share * 2 * cp.hidden * cp.vocab
    mfu = float(tps) * float(fpt) / peak
    if not 0 < mfu <= 1:
        raise DistillError(
            f"{path}: {tps:,.0f} tokens/s of {model} means MFU {mfu:.2f} on "
            f"{'an L4' if on_l4 else gpu}, which is impossible; check tokens_per_s, model and "
            "flops_per_token" + ("" if on_l4 else " and gpu_peak_flops")
        )
    return Calibration(path, model, gpu, float(tps), mfu, peak, on_l4)


def _profile_of(model: str, where: Path) -> TeacherProfile:
    from transformers import AutoConfig

    from distill import models

    try:
        return teacher_profile(AutoConfig.from_pretrained(models.resolve_model(model)))
    except DistillError as e:
        raise DistillError(
            f"{where}: cannot size model {model!r} ({e}); add flops_per_token"
        ) from None


# --- Shard bytes ------------------------------------------------------------------------------


def _targets_info(job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """(target description, codec description) as a manifest records them."""
    t = job.targets
    spec = t.spec().info() if hasattr(t, "spec") else {"kind": t.kind, "k": t.k}
    codec = t.codec_spec().info() if hasattr(t, "codec_spec") else {"name": "npz", "version": 0}
    return spec, codec


def _same_targets(m: Any, job: Job) -> bool:
    spec, codec = _targets_info(job)
    recorded = getattr(m, "targets", None) or {"kind": m.target_kind, "k": m.width}
    keys = ("kind", "k", "top_p", "draws")
    same_kind = all(recorded.get(key) == spec.get(key) for key in keys)
    # iid and systematic draws hit different numbers of distinct ids: other bytes per row
    same_kind &= recorded.get("sampling", "iid") == spec.get("sampling", "iid")
    recorded_codec = getattr(m, "codec", None) or {"name": "npz", "version": 0}
    return same_kind and recorded_codec == codec


def reference_bytes_per_target(url: str, job: Job) -> tuple[float, str] | None:
    """Bytes per target token of an existing run with the job's targets and codec: a shard set
    (``url/manifest.json``) or a job output holding ``train/`` and ``eval/`` shard sets."""
    from distill.format.manifest import MANIFEST, Manifest
    from distill.store.storage import open_store

    found = []
    for sub in ("", "train", "eval"):
        store = open_store(f"{url.rstrip('/')}/{sub}" if sub else url)
        if store.exists(MANIFEST):
            found.append(Manifest.from_json(store.read_bytes(MANIFEST), store.join(MANIFEST)))
            if not sub:
                break
    found = [m for m in found if _same_targets(m, job)]
    targets = sum(m.target_tokens for m in found)
    if not targets:
        return None
    where = ", ".join(sorted({m.split for m in found}))
    return sum(m.nbytes for m in found) / targets, f"measured: {url} ({where})"


def probed_shard_bytes(job: Job, c: DataCounts, vocab: int) -> tuple[int, str]:
    """Samples x the bytes of probe samples of the job's average shape, written with the
    job's targets and codec by the real shard writer (:mod:`distill.cloud.probe`)."""
    from distill.cloud.probe import ZIPF_S, probe_sample_bytes

    spec, codec = job.targets.spec(), job.targets.codec_spec()
    n = max(c.samples, 1)
    tokens, targets = round(c.tokens / n), round(c.target_tokens / n)
    per_sample = probe_sample_bytes(
        spec, codec, vocab, tokens, targets, job.teacher.samples_per_shard
    )
    end = 2 * tarfile.BLOCKSIZE
    total = int(c.samples * per_sample + c.shards * end)
    return total, (
        f"estimated: samples x {per_sample:,.0f} (probe samples of {tokens} tokens / {targets} "
        f"targets written as packed v{codec.version} by write_shard: random input ids, "
        f"Zipf-like teacher rows p ~ rank^-{ZIPF_S}) + shards x {end} (tar end) = "
        f"{total / max(c.target_tokens, 1):,.1f} bytes/target token; a chat template shared "
        "by all samples compresses further under zstd (measure with --reference-run)"
    )


# --- The estimate -----------------------------------------------------------------------------


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
        if self.vms < 1:
            raise DistillError(f"--vms must be >= 1, got {self.vms}")
        if self.engine not in ("vm", "batch"):
            raise DistillError(f"engine {self.engine!r}: one of vm, batch")
        if self.downloads < 0 or self.boot_disk_gb <= 0:
            raise DistillError("--downloads must be >= 0 and the boot disk > 0 GB")


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
    setup_hours: float
    on_demand_hours: float  # VM-hours, all VMs together
    spot_hours: float
    tasks: int  # VMs that get shards: min(--vms, the most shards of a split)
    wall_hours: float  # start to end (spot, the busiest VM's setup + shards + preemptions)
    shard_bytes: int
    bytes_basis: str
    storage_gb_months: float
    egress_gb: float
    nat_gb: float  # through Cloud NAT (the Batch VMs' driver downloads)
    prices: Prices
    opts: CostOptions
    usd: dict[str, float]

    mode_setting: str = "auto"  # the job's teacher.mode

    @property
    def flops_per_token(self) -> float:
        return self.flops / max(self.data.tokens, 1)

    def _preemption_basis(self) -> str:
        base = (
            f"{self.opts.preemption_overhead:.0%} of hours (work since the last shard + re-setup)"
        )
        if self.layered is None:
            return base
        return (
            f"{self.preemption:.0%}: layered, a preemption loses the chunk in flight "
            f"(up to {_hours(self.layered.seconds / 3600)} h), not a shard, so {base} is scaled "
            "by (setup + chunk / 2) / (setup + shard / 2); on Spot a smaller "
            "teacher.chunk_tokens loses less (and streams the weights more often)"
        )

    def assumptions(self) -> list[tuple[str, str]]:
        """(assumption, value and source) rows, every one stated."""
        p, o = self.prices, self.opts
        peak = L4_PEAK_FLOPS[self.dtype]
        if self.calibration:
            cal = self.calibration
            mfu = (
                f"{self.mfu:.3f}, calibrated: {cal.model} at {cal.tokens_per_s:,.0f} tokens/s "
                f"on {cal.gpu} ({cal.path})"
            )
            if not cal.on_l4:
                mfu += (
                    f"; measured on {cal.gpu}, not an L4: scaled to the L4 by the FLOP ratio "
                    f"({peak / 1e12:.1f} / {cal.peak_flops / 1e12:.1f} TFLOP/s dense peak), "
                    "i.e. the same MFU is assumed"
                )
        else:
            mfu = f"{self.mfu:.2f} ({'--mfu' if o.mfu is not None else 'assumed'}; uncalibrated)"
        return [
            (
                "GPU",
                f"1 x {L4_NAME}, {peak / 1e12:.1f} TFLOP/s dense {self.dtype} peak (datasheet)",
            ),
            ("MFU (model FLOPs utilisation)", mfu),
            (
                "FLOPs formula",
                "padded tokens x (2 x non-embedding params + 2 x layers x ctx x d_attn) "
                "+ target tokens x 2 x hidden x vocab (LM head only at target positions)",
            ),
            (
                "setup",
                f"{o.setup_minutes:g} min boot/driver/image pull + the {self.dtype} checkpoint "
                f"read at {WEIGHTS_STREAM_BYTES_PER_S / 1e6:.0f} MB/s",
            ),
            (
                "VMs",
                f"{self.tasks} (--vms {o.vms}): VM i computes the shards s % {self.tasks} == i, "
                "each VM pays its own setup; wall time is the busiest VM's",
            ),
            ("preemption overhead (spot)", self._preemption_basis()),
            *(
                [
                    (
                        "layered pass",
                        f"weights read at {WEIGHTS_STREAM_BYTES_PER_S / 1e6:.0f} MB/s once per "
                        "chunk, prefetched under the previous layer's compute; activations cross "
                        f"the host link at {HOST_LINK_BYTES_PER_S / 1e9:.0f} GB/s twice per layer; "
                        "each VM's chunks are its own shards of each split, chunk_tokens at most",
                    )
                ]
                if self.layered
                else []
            ),
            ("prices", f"as of {p.as_of}; {p.source}"),
            ("machine", f"{p.machine}, {p.region}"),
            (
                "VM price",
                f"spot ${p.vm_spot_per_hour:.3f}/h, on-demand ${p.vm_on_demand_per_hour:.3f}/h",
            ),
            (
                "boot disk",
                f"{o.boot_disk_gb} GB pd-balanced at ${p.boot_disk_per_gb_month}/GB-month",
            ),
            ("shard bytes", self.bytes_basis),
            (
                "storage",
                f"GCS Standard ${p.storage_per_gb_month}/GB-month, kept {o.storage_months:g} "
                "month(s); operations not counted",
            ),
            (
                "egress",
                f"internet ${p.egress_per_gb}/GB, {o.downloads} full download(s) by the "
                "student; free tier not counted",
            ),
            (
                "network",
                f"Cloud NAT ${p.nat_per_vm_hour}/VM-hour (${p.nat_max_per_hour}/h above "
                f"{NAT_CAP_VMS} VMs) + ${p.nat_per_gb}/GB processed: "
                + (
                    f"each Batch VM boot downloads the NVIDIA driver (~{DRIVER_DOWNLOAD_GIB} GB)"
                    if o.engine == "batch"
                    else "the single VM's driver comes from Google (no NAT traffic)"
                ),
            ),
            ("GB", "2^30 bytes, as Google bills"),
        ]

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
                "per_split": self.data.per_split,
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
                "on_demand": self.on_demand_hours,
                "spot": self.spot_hours,
                "wall": self.wall_hours,
            },
            "vms": self.tasks,
            "preemption_overhead": self.preemption,
            "shard_bytes": self.shard_bytes,
            "storage_gb_months": self.storage_gb_months,
            "egress_gb": self.egress_gb,
            "nat_gb": self.nat_gb,
            "usd": self.usd,
            "prices": dataclasses.asdict(self.prices),
            "options": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(self.opts).items()
            },
            "assumptions": dict(self.assumptions()),
        }


def shard_bytes_estimate(
    job: Job, data: DataCounts, vocab: int, opts: CostOptions
) -> tuple[int, str]:
    """(shard bytes, how they were found): measured on a reference run with the job's targets
    and codec (``--reference-run``, else ``job.output`` when local), else probe samples."""
    ref = None
    if opts.reference_run:
        ref = reference_bytes_per_target(opts.reference_run, job)
        if ref is None:
            raise DistillError(
                f"--reference-run {opts.reference_run}: no manifest with the job's targets "
                f"({job.targets.kind}, k={job.targets.k}) and codec there (or under train/, eval/)"
            )
    elif "://" not in job.output and Path(job.output).is_dir():
        ref = reference_bytes_per_target(job.output, job)
    if ref is None:
        return probed_shard_bytes(job, data, vocab)
    per_target, basis = ref
    return int(per_target * data.target_tokens), f"{per_target:,.1f} bytes/target token, {basis}"


# The NVIDIA driver a Batch VM (batch-debian) downloads at boot through Cloud NAT: the R570
# data-center .run installer (~0.4 GiB) and its build dependencies from apt
DRIVER_DOWNLOAD_GIB = 0.5
NAT_CAP_VMS = 32  # above this many VMs, Cloud NAT charges the gateway's flat hourly rate


def nat_gib(opts: CostOptions, tasks: int, preemption: float) -> float:
    """GiB through Cloud NAT: the driver, once per Batch VM boot (a preempted task boots a new
    VM: the spot overhead fraction more); the single VM's COS driver comes from Google."""
    if opts.engine != "batch":
        return 0.0
    return DRIVER_DOWNLOAD_GIB * tasks * (1 + preemption)


def nat_usd(prices: Prices, vm_h: float, wall_h: float, tasks: int, gib: float) -> float:
    """Cloud NAT: the VMs' hours (the flat gateway rate above 32 VMs) and the GiB processed."""
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
) -> dict[str, float]:
    """USD per item (VM and boot disk, spot and on demand; storage; egress; Cloud NAT, spot
    and on demand) and the totals."""
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
    }
    shared = usd["storage"] + usd["egress"]
    usd["total_spot"] = usd["vm_spot"] + usd["disk_spot"] + usd["nat_spot"] + shared
    usd["total_on_demand"] = (
        usd["vm_on_demand"] + usd["disk_on_demand"] + usd["nat_on_demand"] + shared
    )
    return usd


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


@dataclass(frozen=True)
class PassHours:
    """The hours of one teacher pass on ``tasks`` L4 VMs (:func:`pass_hours`)."""

    flops: float
    compute: float  # the FLOPs at the sustained rate, all VMs together
    setup: float  # per VM: boot, driver, image and the checkpoint's read
    layered: Throughput | None  # the largest chunk's time model (None: resident)
    overhead: float  # layered: exposed weight streaming + activation I/O, all VMs
    overhead_busiest: float  # the same, of the VM with the most
    preemption: float  # spot overhead fraction
    tasks: int
    on_demand: float
    spot: float
    wall: float


def pass_hours(
    job: Job, p: TeacherProfile, way: Way, data: DataCounts, sustained: float, opts: CostOptions
) -> PassHours:
    """Compute, setup, layered overhead, preemption, VM-hours and wall time of ``job``'s
    teacher pass run ``way`` on ``opts.vms`` VMs at ``sustained`` FLOP/s each."""
    flops = total_flops(p, data)
    compute_h = flops / sustained / 3600
    # every VM reads the whole checkpoint in the job's dtype (also when it quantises it)
    weights = p.params * DTYPE_BYTES[job.teacher.dtype]
    setup_h = opts.setup_minutes / 60 + weights / WEIGHTS_STREAM_BYTES_PER_S / 3600
    tasks, busiest = fanout_split(job, data, opts.vms)
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
        layered=tp,
        overhead=overhead_h,
        overhead_busiest=overhead_busiest_h,
        preemption=preemption,
        tasks=tasks,
        on_demand=on_demand,
        spot=spot,
        wall=wall,
    )


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


def estimate_cost(job: Job, opts: CostOptions | None = None) -> CostEstimate:
    """Count, size and price one teacher pass of ``job`` on an L4 spot VM (or ``opts.vms``)."""
    from transformers import AutoConfig

    from distill import models

    opts = opts or CostOptions()
    opts.validate()
    prices = load_prices(opts.prices)
    teacher_dir = models.resolve_model(job.teacher.model)
    try:
        config = AutoConfig.from_pretrained(teacher_dir)
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot read the teacher config in {teacher_dir}: {e}") from None
    profile = teacher_profile(config, teacher_dir)
    way = plan_l4(job, profile)  # refuse before the (slow) tokenisation
    data = count_data(job, models.load_tokenizer(teacher_dir))
    calibration = (
        load_calibration(opts.calibration, job, profile, data) if opts.calibration else None
    )
    mfu = calibration.mfu if calibration else (opts.mfu or DEFAULT_MFU)
    h = pass_hours(job, profile, way, data, L4_PEAK_FLOPS[job.teacher.dtype] * mfu, opts)
    busy_h = h.compute + h.overhead

    shard_bytes, basis = shard_bytes_estimate(job, data, profile.vocab, opts)
    gb = shard_bytes / GIB
    storage_gb_months = gb * opts.storage_months
    egress_gb = gb * opts.downloads
    gib_nat = nat_gib(opts, h.tasks, h.preemption)
    on_demand_wall = h.wall / (1 + h.preemption)
    nat = (
        nat_usd(prices, h.spot, h.wall, h.tasks, gib_nat),
        nat_usd(prices, h.on_demand, on_demand_wall, h.tasks, nat_gib(opts, h.tasks, 0.0)),
    )
    usd = priced(prices, opts, h.spot, h.on_demand, storage_gb_months, egress_gb, nat)
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
        on_demand_hours=h.on_demand,
        spot_hours=h.spot,
        tasks=h.tasks,
        wall_hours=h.wall,
        shard_bytes=shard_bytes,
        bytes_basis=basis,
        storage_gb_months=storage_gb_months,
        egress_gb=egress_gb,
        nat_gb=gib_nat,
        prices=prices,
        opts=opts,
        usd=usd,
        mode_setting=job.teacher.mode,
    )


def _usd(x: float) -> str:
    return f"{x:,.2f}" if x >= 0.995 else f"{x:.4f}"


def _hours(h: float) -> str:
    return f"{h:,.2f}" if h >= 10 else f"{h:.3f} ({h * 60:,.1f} min)"


def _layered_rows(e: CostEstimate) -> list[tuple[str, str, str]]:
    tp = e.layered
    if tp is None:
        return []
    return [
        ("host memory", f"{e.way.host / GIB:.2f} GiB", "layered: the chunk's activations"),
        (
            "weight streaming",
            f"{tp.stream_share:.1%} of time",
            f"{tp.stream_s:,.0f} s per chunk of {tp.chunk_tokens:,} tokens, "
            f"{tp.exposed_stream_s:,.0f} s not hidden by prefetch "
            f"(compute {tp.compute_s:,.0f} s, activation I/O {tp.activation_io_s:,.0f} s)",
        ),
        (
            "layered overhead hours",
            _hours(e.layered_overhead_hours),
            f"every chunk of each VM's shards; in VM-hours (all {e.tasks} VMs), the busiest "
            f"VM's {_hours(e.layered_overhead_wall_hours)} h in the wall time",
        ),
    ]


def _mfu_note(cal: Calibration | None) -> str:
    if cal is None:
        return ", uncalibrated"
    return "" if cal.on_l4 else f", measured on {cal.gpu}, scaled by the FLOP ratio"


def render_table(e: CostEstimate) -> Any:
    """A rich table: the numbers, then every assumption as a row."""
    from rich.table import Table

    t = Table(title=f"teacher pass cost: job {e.job} on {e.tasks} x L4 ({e.prices.region})")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_column("how")
    d, pr = e.data, e.profile
    mem = sum(e.memory.values())
    rows = [
        (
            "samples",
            f"{d.samples:,}",
            ", ".join(f"{k} {v['samples']:,}" for k, v in d.per_split.items()),
        ),
        ("tokens", f"{d.tokens:,}", "teacher tokenizer, all splits"),
        ("target tokens", f"{d.target_tokens:,}", "positions whose next token is assistant's"),
        ("padded tokens", f"{d.padded_tokens:,}", "the teacher's token-budget batches"),
        (
            "teacher params",
            f"{pr.params / 1e6:,.1f} M",
            f"{pr.non_embedding_params / 1e6:,.1f} M non-embedding (meta device)",
        ),
        ("FLOPs per token", f"{e.flops_per_token:.3g}", f"total {e.flops:.3g}"),
        ("teacher mode", e.way.label(), f"teacher.mode = {e.mode_setting!r}"),
        ("GPU memory", f"{mem / GIB:.2f} GiB", f"of {l4_usable_bytes() / GIB:.1f} GiB usable"),
        *_layered_rows(e),
        (
            "throughput",
            f"{e.tokens_per_s:,.0f} tok/s",
            f"MFU {e.mfu:.2f}" + _mfu_note(e.calibration),
        ),
        ("compute hours", _hours(e.compute_hours), ""),
        ("setup hours", _hours(e.setup_hours), ""),
        (
            "hours on-demand",
            _hours(e.on_demand_hours),
            f"VM-hours of all {e.tasks} VMs" if e.tasks > 1 else "",
        ),
        ("hours spot", _hours(e.spot_hours), f"+{e.preemption:.0%} preemption"),
        (
            "wall time (spot)",
            _hours(e.wall_hours),
            f"{e.tasks} VM(s) at once: the busiest VM's setup + shards (+ layered overhead) "
            "+ preemption",
        ),
        (
            "$ VM spot",
            _usd(e.usd["vm_spot"]),
            f"${e.prices.vm_spot_per_hour:.3f}/h as of {e.prices.as_of}: spot prices change "
            "(up to once a day); --prices FILE to use today's",
        ),
        ("$ VM on-demand", _usd(e.usd["vm_on_demand"]), ""),
        ("$ boot disk", _usd(e.usd["disk_spot"]), "spot hours"),
        ("shard bytes", f"{e.shard_bytes / GIB:.3f} GB", ""),
        ("$ storage", _usd(e.usd["storage"]), f"{e.storage_gb_months:.3f} GB-months"),
        ("$ egress", _usd(e.usd["egress"]), f"{e.egress_gb:.3f} GB"),
        ("$ network (Cloud NAT)", _usd(e.usd["nat_spot"]), f"spot hours, {e.nat_gb:.2f} GB"),
        ("$ total (spot)", _usd(e.usd["total_spot"]), "VM + disk + NAT + storage + egress"),
        ("$ total (on-demand)", _usd(e.usd["total_on_demand"]), ""),
    ]
    for r in rows:
        t.add_row(*r)
    t.add_section()
    for name, value in e.assumptions():
        t.add_row(f"assumption: {name}", "", value)
    return t


def write_estimate(e: CostEstimate, path: Path) -> None:
    """``cost-estimate --json PATH``: the numbers as JSON (:meth:`CostEstimate.to_dict`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(e.to_dict(), indent=2) + "\n")
    except OSError as err:
        raise DistillError(f"--json {path}: cannot write ({err.strerror})") from None
