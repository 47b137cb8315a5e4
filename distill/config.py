"""Job files: one TOML file per job, validated on load with errors that name the field.

A job describes the teacher, the dataset, the sparse-target settings, where the shards go,
the student and its training. CLI flags override fields with ``--set section.field=value``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.format.codec import KNOWN, Codec, check_writable
from distill.format.spec import KINDS, SAMPLING, TargetSpec

_ZONE = re.compile(r"^([a-z]+-[a-z]+\d+)-[a-z]$")


def region_of(zone: str) -> str:
    """us-central1-a -> us-central1 (as distill/cloud/spec.py reads zones)."""
    m = _ZONE.match(zone)
    if not m:
        raise DistillError(f"invalid zone {zone!r}: expected e.g. us-central1-a")
    return m.group(1)


KD_TERMS = ("forward_kl", "reverse_kl", "jsd", "tvd", "bild")
TERMS = (*KD_TERMS, "ce")  # the loss terms, defined in distill/student/terms.py


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (see the module docstring) and their hyper-parameters.

    Terms with weight 0 are not computed. ``jsd_beta`` is the JSD's teacher mixture weight,
    ``bild_top`` the number of teacher tokens BiLD uses (<= the stored k), ``temperature`` the
    KD temperature (KD terms are scaled by its square; CE is not tempered).
    """

    forward_kl: float = 0.9
    reverse_kl: float = 0.0
    jsd: float = 0.0
    jsd_beta: float = 0.5
    tvd: float = 0.0
    bild: float = 0.0
    bild_top: int = 8
    ce: float = 0.1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "bild_top":
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise DistillError(f"LossWeights.bild_top must be an integer >= 1, got {v!r}")
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise DistillError(f"LossWeights.{f.name} must be a finite number, got {v!r}")
        for name in TERMS:
            if getattr(self, name) < 0:
                raise DistillError(f"LossWeights.{name} must be >= 0, got {getattr(self, name)!r}")
        if not any(getattr(self, name) > 0 for name in TERMS):
            raise DistillError(f"LossWeights: at least one of {', '.join(TERMS)} must be > 0")
        if not 0.0 < self.jsd_beta < 1.0:
            raise DistillError(f"LossWeights.jsd_beta must be in (0, 1), got {self.jsd_beta!r}")
        if self.temperature <= 0:
            raise DistillError(f"LossWeights.temperature must be > 0, got {self.temperature!r}")

    def active(self) -> dict[str, float]:
        """The terms with weight > 0, in ``TERMS`` order, and their weights."""
        return {name: float(getattr(self, name)) for name in TERMS if getattr(self, name) > 0}

    def coefficients(self) -> dict[str, float]:
        """Per-term factors of the total: ``tau**2 * w`` for KD terms, ``w`` for CE."""
        t2 = float(self.temperature) ** 2
        return {n: (w if n == "ce" else t2 * w) for n, w in self.active().items()}


@dataclass
class JobSection:
    name: str = "job"
    output: str = "runs/job/targets"  # local path or gs://bucket/prefix; one shard set per split
    seed: int = 0


@dataclass
class TeacherSection:
    model: str = "builtin:smollm2-135m-instruct"  # builtin:NAME, or a Hugging Face directory
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    batch_tokens: int = 4096  # padded tokens per forward batch
    head_chunk: int = 256  # target positions per LM-head chunk
    samples_per_shard: int = 256


@dataclass
class DataSection:
    train: str = ""
    eval: str = ""
    max_length: int = 512
    truncation: str = "error"  # error | right (keep the first max_length tokens)
    max_samples: int = 0  # 0 = all
    on_invalid: str = "error"  # error (list every bad line, stop) | skip (leave them out)


@dataclass
class TargetsSection:
    """Sparse teacher targets (distill/format/spec.py) and their codec (distill/format/codec.py)."""

    # The default is what bench/quality.py and bench/codec.py support (README "Benchmarks"):
    # 50 systematic draws in packed v2 blocks with zstd, ~28 bytes per target position.
    kind: str = "sample"  # topk | topp | sample | topk+sample
    k: int = 16  # topk: entries; topp: the cap; topk+sample: the exact head
    top_p: float = 0.95  # topp: keep the smallest prefix with at least this mass
    draws: int = 50  # sample, topk+sample: N draws with replacement
    sampling: str = "systematic"  # sample, topk+sample: systematic | iid (see extract.py)
    codec: str = "packed"  # packed v2, blocks (codec.py); npz v0 and packed v1 are read only
    codec_version: int = 0  # 0: the newest (2)
    values: str = "log8"  # packed: log8 | pow8 | f16 (exact entries' log-probs)
    log_range: float = 20.0  # packed log8: codes span log-probs [-log_range, 0]
    zstd: bool = True  # packed: one zstd frame per block
    zstd_level: int = 3
    block_tokens: int = 16384  # packed v2: tokens per block (a tar member of samples)

    def spec(self) -> TargetSpec:
        return TargetSpec(
            kind=self.kind, k=self.k, top_p=self.top_p, draws=self.draws, sampling=self.sampling
        )

    def codec_spec(self) -> Codec:
        return Codec(
            name=self.codec,
            version=self.codec_version or max(KNOWN[self.codec]),
            values=self.values,
            log_range=self.log_range,
            zstd=self.zstd,
            zstd_level=self.zstd_level,
            block_tokens=self.block_tokens,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What decides the shards' bytes (for topk/npz, the same keys as before kinds)."""
        d = {k: v for k, v in self.spec().info().items() if k not in ("tail", "width")}
        return d if self.codec == "npz" else {**d, "codec": self.codec_spec().info()}

    def check(self, src: str, loss: LossWeights) -> None:
        """Field ranges, and loss terms that this target kind cannot support."""
        self.spec().check(where=f"{src}: targets")
        check_writable(self.codec, self.codec_version, src)
        self.codec_spec().check(f"{src}: targets")
        kind = self.kind
        if loss.bild > 0 and kind != "topk":
            raise DistillError(
                f'{src}: loss.bild needs targets.kind = "topk" (BiLD ranks a fixed, exact '
                f"top-k), got {kind!r}"
            )
        if loss.reverse_kl > 0 and kind in ("sample", "topk+sample"):
            raise DistillError(
                f"{src}: loss.reverse_kl cannot use targets.kind = {kind!r}: sampled targets "
                "have no tail bucket, so KL(q || p_hat) is infinite off the sampled ids"
            )


@dataclass
class StudentSection:
    init: str = "teacher-layers"  # teacher-layers | pretrained
    layers: int = 8  # teacher-layers: number of teacher layers kept
    layer_selection: str = "ends"  # ends: first and last layers, drop the middle | spaced
    model: str = ""  # pretrained: a Hugging Face directory


@dataclass
class TrainSection:
    run_dir: str = "runs/job"
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs decide
    batch_size: int = 8  # samples per micro-batch (per rank under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # adamw | adamw8bit (CUDA + bitsandbytes)
    optimizer_offload: bool = False  # optimizer state and fp32 master weights in CPU memory
    packing: bool = False  # several samples per row, no attention across them
    pack_tokens: int = 0  # row length when packing (0 = the shard set's max_length)
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_chunk: int = 1024  # target positions per LM-head/loss chunk
    checkpoint_every: int = 50
    eval_every: int = 0  # 0 = only at the end
    device: str = "auto"
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    cache_dir: str = "~/.cache/distill/shards"
    cache_max_bytes: int = 2 * 1024**3
    shuffle_buffer: int = 256


@dataclass
class CloudSection:
    """Where and how ``distill-ctl teacher-cloud`` runs the teacher (see docs/CLOUD.md)."""

    project: str = ""  # "" = GOOGLE_CLOUD_PROJECT, CLOUDSDK_CORE_PROJECT or gcloud's config
    zones: list[str] = field(
        default_factory=lambda: ["us-central1-a", "us-central1-b", "us-central1-c"]
    )  # one region, in failover order
    image: str = ""  # "" = REGION-docker.pkg.dev/PROJECT/distill/teacher:VERSION
    service_account: str = ""  # "" = distill-teacher@PROJECT.iam.gserviceaccount.com
    network: str = "distill"  # the VPC (infra/terraform/base makes "distill"; or "default")
    subnetwork: str = ""  # "" = <network>-<region> ("default" in the default VPC)
    spot: bool = True  # false: on-demand (STANDARD provisioning, no preemptions)
    max_run_hours: float = 0.0  # dead-man switch per VM; 0 = 2 x the estimate + 1 h
    max_preemptions: int = 10  # relaunches before giving up
    provision_timeout_minutes: float = 30.0  # keep trying stocked-out zones this long
    poll_seconds: float = 20.0
    budget_usd: float = 0.0  # refuse to start when the estimate is above it (0 = no limit)

    def check(self, src: str) -> None:
        if not self.zones or not all(isinstance(z, str) for z in self.zones):
            raise DistillError(f"{src}: cloud.zones must be a non-empty list of zone names")
        regions = {region_of(z) for z in self.zones}
        if len(regions) != 1:
            raise DistillError(
                f"{src}: cloud.zones span regions {', '.join(sorted(regions))}: give zones of "
                "one region (the bucket, the subnet and the registry are regional)"
            )
        for name in ("network", "subnetwork"):
            v = getattr(self, name)
            if (v or name == "network") and not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", v):
                raise DistillError(
                    f"{src}: cloud.{name} = {v!r}: a VPC resource name is 1-63 of [a-z0-9-], "
                    "starting with a letter"
                )
        for name in ("max_run_hours", "poll_seconds", "provision_timeout_minutes", "budget_usd"):
            v = getattr(self, name)
            if v < 0 or (name == "poll_seconds" and v == 0):
                raise DistillError(f"{src}: cloud.{name} must be >= 0, got {v!r}")
        if self.max_run_hours and not 30 / 3600 <= self.max_run_hours <= 120 * 24:
            raise DistillError(f"{src}: cloud.max_run_hours must be in [30 s, 120 days]")
        if self.max_preemptions < 0:
            raise DistillError(f"{src}: cloud.max_preemptions must be >= 0")


@dataclass
class Job:
    job: JobSection = field(default_factory=JobSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataSection = field(default_factory=DataSection)
    targets: TargetsSection = field(default_factory=TargetsSection)
    student: StudentSection = field(default_factory=StudentSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossWeights = field(default_factory=LossWeights)  # validated on construction
    cloud: CloudSection = field(default_factory=CloudSection)
    path: Path | None = None  # the file it came from; relative paths resolve against its dir

    def resolve(self, p: str) -> Path:
        """A data/model path from the job file, relative to the job file's directory."""
        path = Path(p).expanduser()
        if path.is_absolute() or self.path is None or path.exists():
            return path
        return (self.path.parent / path).resolve() if (self.path.parent / path).exists() else path

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


_CHOICES = {
    ("teacher", "dtype"): ("float32", "bfloat16", "float16"),
    ("teacher", "device"): ("auto", "cpu", "cuda"),
    ("data", "truncation"): ("error", "right"),
    ("data", "on_invalid"): ("error", "skip"),
    ("targets", "kind"): KINDS,
    ("targets", "sampling"): SAMPLING,
    ("targets", "codec"): ("npz", "packed"),
    ("targets", "values"): ("log8", "pow8", "f16"),
    ("student", "init"): ("teacher-layers", "pretrained"),
    ("student", "layer_selection"): ("ends", "spaced"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "dtype"): ("float32", "bfloat16"),
    ("train", "optimizer"): ("adamw", "adamw8bit"),
}
_POSITIVE = {
    ("teacher", "batch_tokens"),
    ("teacher", "head_chunk"),
    ("teacher", "samples_per_shard"),
    ("data", "max_length"),
    ("targets", "k"),
    ("targets", "block_tokens"),
    ("student", "layers"),
    ("train", "epochs"),
    ("train", "batch_size"),
    ("train", "grad_accum"),
    ("train", "lr"),
    ("train", "loss_chunk"),
    ("train", "checkpoint_every"),
    ("train", "cache_max_bytes"),
    ("train", "shuffle_buffer"),
}


def _check_type(where: str, value: Any, typ: Any) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool) and (
        not isinstance(value, typ) or (typ is int and isinstance(value, bool))
    ):
        raise DistillError(
            f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _build_section(cls: type, raw: Any, section: str, src: str) -> Any:
    if not isinstance(raw, dict):
        raise DistillError(f"{src}: [{section}] must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DistillError(
            f"{src}: unknown field {section}.{unknown[0]} (known: {', '.join(sorted(known))})"
        )
    values = {k: _check_type(f"{src}: {section}.{k}", v, hints[k]) for k, v in raw.items()}
    obj = cls(**values)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        choices = _CHOICES.get((section, f.name))
        if choices and v not in choices:
            raise DistillError(
                f"{src}: {section}.{f.name} = {v!r} is not one of: {', '.join(choices)}"
            )
        if (section, f.name) in _POSITIVE and v <= 0:
            raise DistillError(f"{src}: {section}.{f.name} must be > 0, got {v!r}")
    return obj


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise DistillError(f"--set {item!r}: expected section.field=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    return section, name, value


def job_from_dict(raw: dict[str, Any], src: str = "<job>", path: Path | None = None) -> Job:
    """Validate a parsed job table; every error names ``src`` and the field."""
    sections = {f.name: f for f in dataclasses.fields(Job) if f.name != "path"}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise DistillError(f"{src}: unknown section [{unknown[0]}] (known: {', '.join(sections)})")
    built = {}
    for name in sections:
        cls = typing.get_type_hints(Job)[name]
        try:
            built[name] = _build_section(cls, raw.get(name, {}), name, src)
        except DistillError as e:  # LossWeights validates itself and names its fields
            raise DistillError(str(e).replace("LossWeights.", f"{src}: loss.")) from None
    job = Job(**built, path=path)
    job.targets.check(src, job.loss)
    job.cloud.check(src)
    if job.loss.bild > 0 and job.loss.bild_top > job.targets.k:
        raise DistillError(
            f"{src}: loss.bild_top = {job.loss.bild_top} > targets.k = {job.targets.k}"
        )
    return job


def load_job(path: str | Path, overrides: list[str] | None = None) -> Job:
    """Load and validate a job file, applying ``section.field=value`` overrides."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"job file {p} not found")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise DistillError(f"{p}: not valid TOML: {e}") from None
    for item in overrides or []:
        section, name, value = _parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise DistillError(f"--set {item!r}: [{section}] is not a table")
        raw[section][name] = value
    return job_from_dict(raw, str(p), p.resolve())


def parse_bytes(text: str | int) -> int:
    """'12GiB', '512MB', '2e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "b": 1,
    }
    s = text.strip().lower()
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise DistillError(f"cannot parse a size from {text!r} (use e.g. 12GiB)") from None


def splits(job: Job) -> dict[str, Path]:
    out = {}
    for name in ("train", "eval"):
        p = getattr(job.data, name)
        if p:
            out[name] = job.resolve(p)
    if "train" not in out:
        raise DistillError(f"{job.path}: data.train is not set")
    return out
