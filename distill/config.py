"""Job files: one TOML file per job, validated on load with errors that name the field.

A job describes the teacher, the dataset, the sparse-target settings, where the shards go,
the student and its training. CLI flags override fields with ``--set section.field=value``.

Each table is a frozen pydantic model: TOML's types strictly (an int is accepted where a
float goes), unknown keys refused, choices as ``Literal`` types built from the tuples that
define them, bounds on the fields, and rules between fields as model validators. Sizes in
bytes are :class:`pydantic.ByteSize` (``2147483648``, ``"512MiB"`` or ``"20GB"``). Every
problem becomes one line of a :class:`DistillError` naming the file and the field.
"""

from __future__ import annotations

import glob
import itertools
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

from distill.data.dataset import ON_INVALID
from distill.errors import DistillError
from distill.format.codec import KNOWN, VALUE_MAPS, Codec, check_writable
from distill.format.spec import KINDS, MAX_WIDTH, SAMPLING, TargetSpec

_ZONE = re.compile(r"^([a-z]+-[a-z]+\d+)-[a-z]$")
_VPC_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def region_of(zone: str) -> str:
    """us-central1-a -> us-central1: the one reading of a zone (the cloud code imports it)."""
    m = _ZONE.match(zone)
    if not m:
        raise DistillError(f"invalid zone {zone!r}: expected e.g. us-central1-a")
    return m.group(1)


KD_TERMS = ("forward_kl", "reverse_kl", "jsd", "tvd", "bild")
TERMS = (*KD_TERMS, "ce")  # the loss terms, defined in distill/student/terms.py
XTOK_TERMS = ("alm", "xkl")  # cross-tokenizer terms, distill/student/xtok_terms.py
DEVICES = ("auto", "cpu", "cuda")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
# resident: the whole teacher on the device; layered: one decoder layer at a time over a chunk
# of the dataset (distill/teacher/layered.py); auto: resident when it fits (teacher/fit.py)
TEACHER_MODES = ("auto", "resident", "layered")
QUANTIZE = ("none", "int8", "nf4")  # int8/nf4: bitsandbytes on CUDA, resident mode
TRAIN_DTYPES = ("float32", "bfloat16")  # bfloat16: autocast
TRUNCATION = ("error", "right")  # right: keep the first max_length tokens
STUDENT_INITS = ("teacher-layers", "pretrained")
LAYER_SELECTIONS = ("ends", "spaced")  # ends: first and last layers, drop the middle
OPTIMIZERS = ("adamw", "adamw8bit")  # adamw8bit: CUDA + bitsandbytes (distill/student/optim.py)

CODECS = tuple(KNOWN)
Weight = NonNegativeFloat  # a loss term's weight; 0 = the term is off
Size = Annotated[ByteSize, Field(gt=0)]  # bytes, or a string such as "20GB" or "512MiB"


def _zone(zone: str) -> str:
    if not _ZONE.match(zone):
        raise ValueError("expected a zone such as us-central1-a")
    return zone


def _vpc_name(name: str) -> str:
    if not _VPC_NAME.fullmatch(name):
        raise ValueError("a VPC resource name is 1-63 of [a-z0-9-], starting with a letter")
    return name


def _subnet_name(name: str) -> str:
    return _vpc_name(name) if name else name  # "" = the default subnet name


def _sha256(digest: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError("expected a sha256 digest: 64 lowercase hex digits")
    return digest


def _run_hours(hours: float) -> float:
    if hours and not 30 / 3600 <= hours <= 120 * 24:
        raise ValueError("must be 0 (the default limit) or in [30 s, 120 days]")
    return hours


class _Table(BaseModel):
    """One table of the job file: typed strictly, unknown keys refused, immutable.

    Building one directly (``LossWeights(ce=-1)``) raises :class:`DistillError` too; change
    one with ``model_copy(update=...)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise DistillError(describe(e, within=type(self))) from None

    # Marked like BaseModel.__init__ (and RootModel's): pydantic then validates a table nested
    # in a job without calling this, so the job's problems are collected and named together.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


class JobSection(_Table):
    """The file's ``[job]`` table (read in code as ``job.name``, ``job.output``, ``job.seed``)."""

    name: str = "job"
    output: str = "runs/job/targets"  # local path or gs://bucket/prefix; one shard set per split
    seed: int = 0


def _model_ref(v: str) -> str:
    from distill.checkpoints import parse_source

    try:
        parse_source(v)
    except DistillError as e:
        raise ValueError(str(e)) from None
    return v


_SECRET = re.compile(
    r"^(?:projects/[a-z0-9-]+/secrets/)?[A-Za-z0-9_-]{1,255}(?:/versions/(?:latest|[0-9]+))?$"
)


def _secret_name(v: str) -> str:
    if v and not _SECRET.match(v):
        raise ValueError(
            f"{v!r} is not a Secret Manager secret: NAME (this project's), "
            "projects/PROJECT/secrets/NAME or projects/PROJECT/secrets/NAME/versions/VERSION"
        )
    if v and not v.startswith("projects/") and "/versions/" in v:
        raise ValueError(f"{v!r}: name a version as projects/PROJECT/secrets/NAME/versions/V")
    return v


class TeacherSection(_Table):
    # builtin:NAME, a Hugging Face directory, hf:ORG/NAME[@REVISION] or gs://BUCKET/PATH
    model: Annotated[str, AfterValidator(_model_ref)] = "builtin:smollm2-135m-instruct"
    dtype: Literal[TEACHER_DTYPES] = "bfloat16"
    device: Literal[DEVICES] = "auto"
    batch_tokens: PositiveInt = 4096  # padded tokens per forward batch
    head_chunk: PositiveInt = 256  # target positions per LM-head chunk
    samples_per_shard: PositiveInt = 256
    mode: Literal[TEACHER_MODES] = "auto"
    quantize: Literal[QUANTIZE] = "none"
    # layered: real tokens per chunk, each layer's weights are read once per chunk (the chunk's
    # activations wait in host memory: chunk_tokens x hidden x dtype bytes)
    chunk_tokens: Annotated[int, Field(ge=1, le=2**26)] = 2**20

    @model_validator(mode="after")
    def _quantize_rules(self) -> TeacherSection:
        if self.quantize == "none":
            return self
        if self.device == "cpu":
            raise ValueError(
                f"teacher.quantize = {self.quantize!r} needs a CUDA device (bitsandbytes); "
                'teacher.device is "cpu": use teacher.quantize = "none"'
            )
        if self.mode == "layered":
            raise ValueError(
                f"teacher.quantize = {self.quantize!r} is for the resident pass; "
                'teacher.mode = "layered" streams unquantised weights (use one or the other)'
            )
        if self.dtype == "float32":
            raise ValueError(
                f"teacher.quantize = {self.quantize!r} computes in bfloat16 or float16: "
                'set teacher.dtype = "bfloat16"'
            )
        return self


class DataSection(_Table):
    # a JSONL (.gz, .zst) or Parquet file, a directory or a glob of them, local or gs://
    train: str = ""
    eval: str = ""
    max_length: PositiveInt = 512
    truncation: Literal[TRUNCATION] = "error"
    max_samples: int = 0  # 0 = all
    on_invalid: Literal[ON_INVALID] = "error"  # error (list every bad line, stop) | skip
    # written by teacher-cloud into the VM's job: each split's dataset digest as the
    # controller computed it, so a VM fingerprints its job without reading the dataset
    dataset_sha256: dict[Literal["train", "eval"], Annotated[str, AfterValidator(_sha256)]] = Field(
        default_factory=dict
    )
    # written by teacher-cloud --vms N into the tasks' job: each split's record index
    # (distill/data/record_index.py), so a task reads only its own shards' records
    record_index: dict[Literal["train", "eval"], str] = Field(default_factory=dict)


class LossWeights(_Table):
    """Weights of the loss terms (see the module docstring) and their hyper-parameters.

    Terms with weight 0 are not computed. ``jsd_beta`` is the JSD's teacher mixture weight,
    ``bild_top`` the number of teacher tokens BiLD uses (<= the stored k), ``temperature`` the
    KD temperature (KD terms are scaled by its square; CE is not tempered).
    """

    forward_kl: Weight = 0.9
    reverse_kl: Weight = 0.0
    jsd: Weight = 0.0
    jsd_beta: Annotated[float, Field(gt=0, lt=1)] = 0.5
    tvd: Weight = 0.0
    bild: Weight = 0.0
    bild_top: PositiveInt = 8
    ce: Weight = 0.1
    temperature: PositiveFloat = 1.0
    # cross-tokenizer terms (student.tokenizer; distill/student/xtok_terms.py)
    alm: Weight = 0.0  # ALM chunk likelihood
    xkl: Weight = 0.0  # the projected sparse forward KL (scaled by temperature**2)

    @model_validator(mode="after")
    def _some_term(self) -> LossWeights:
        if not self.active() and not self.cross_tokenizer():
            raise ValueError(
                f"loss: at least one of {', '.join((*TERMS, *XTOK_TERMS))} must be > 0"
            )
        return self

    def cross_tokenizer(self) -> dict[str, float]:
        """The cross-tokenizer terms with weight > 0 (``XTOK_TERMS`` order), and their weights."""
        return {n: float(getattr(self, n)) for n in XTOK_TERMS if getattr(self, n) > 0}

    def active(self) -> dict[str, float]:
        """The terms with weight > 0, in ``TERMS`` order, and their weights."""
        return {name: float(getattr(self, name)) for name in TERMS if getattr(self, name) > 0}

    def coefficients(self) -> dict[str, float]:
        """Per-term factors of the total: ``tau**2 * w`` for KD terms, ``w`` for CE."""
        t2 = float(self.temperature) ** 2
        return {n: (w if n == "ce" else t2 * w) for n, w in self.active().items()}


class TargetsSection(_Table):
    """Sparse teacher targets (distill/format/spec.py) and their codec (distill/format/codec.py)."""

    # The default is what bench/quality.py and bench/codec.py support (README "Benchmarks"):
    # 50 systematic draws in packed v2 blocks with zstd, ~28 bytes per target position.
    kind: Literal[KINDS] = "sample"
    # topk: entries; topp: the cap; topk+sample: the exact head
    k: Annotated[int, Field(ge=1, le=MAX_WIDTH)] = 16
    # topp: keep the smallest prefix with at least this mass
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    # sample, topk+sample: N draws with replacement
    draws: Annotated[int, Field(ge=1, le=MAX_WIDTH)] = 50
    sampling: Literal[SAMPLING] = "systematic"  # sample, topk+sample (see extract.py)
    codec: Literal[CODECS] = "packed"  # packed v2, blocks (codec.py); npz and v1: read only
    codec_version: int = 0  # 0: the newest (2)
    values: Literal[VALUE_MAPS] = "log8"  # packed: the exact entries' log-probs
    log_range: float = 20.0  # packed log8: codes span log-probs [-log_range, 0]
    zstd: bool = True  # packed: one zstd frame per block
    zstd_level: int = 3
    block_tokens: Annotated[int, Field(ge=1, le=2**24)] = 16384  # packed v2: tokens per block
    # cross-tokenizer distillation (#24): per sample the teacher tokens' character offsets, the
    # assistant content spans and the actual next token's log-prob; the tokenizer once per set
    alignment: bool = False

    @model_validator(mode="after")
    def _codec_rules(self) -> TargetsSection:
        """The codec's version, then the checks the format layer makes of a spec and codec."""
        try:
            check_writable(self.codec, self.codec_version, "")
            self.spec().check(where="targets")
            self.codec_spec().check("targets")
        except DistillError as e:
            raise ValueError(str(e)) from None
        return self

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
        """What decides the shards' bytes: the target kind's parameters and the codec."""
        d = {k: v for k, v in self.spec().info().items() if k not in ("tail", "width")}
        # named only when on: the fingerprints of jobs without it stay what they were
        return {
            **d,
            "codec": self.codec_spec().info(),
            **({"alignment": True} if self.alignment else {}),
        }


class StudentSection(_Table):
    init: Literal[STUDENT_INITS] = "teacher-layers"
    layers: PositiveInt = 8  # teacher-layers: number of teacher layers kept
    layer_selection: Literal[LAYER_SELECTIONS] = "ends"
    model: str = ""  # pretrained: a Hugging Face directory
    # a Hugging Face tokenizer directory ("" = the teacher's): another vocabulary needs
    # targets.alignment and loss.alm / loss.xkl, or CE alone (its own tokens, no teacher
    # term: the baseline a cross-tokenizer student is compared with)
    tokenizer: str = ""


class TrainSection(_Table):
    run_dir: str = "runs/job"
    epochs: PositiveInt = 1
    max_steps: int = 0  # 0 = epochs decide
    batch_size: PositiveInt = 8  # samples per micro-batch (per rank under torchrun)
    grad_accum: PositiveInt = 1  # micro-batches per optimizer step
    gradient_checkpointing: bool = False
    optimizer: Literal[OPTIMIZERS] = "adamw"
    optimizer_offload: bool = False  # optimizer state and fp32 master weights in CPU memory
    packing: bool = False  # several samples per row, no attention across them
    pack_tokens: int = 0  # row length when packing (0 = the shard set's max_length)
    lr: PositiveFloat = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_chunk: PositiveInt = 1024  # target positions per LM-head/loss chunk
    checkpoint_every: PositiveInt = 50
    eval_every: int = 0  # 0 = only at the end
    device: Literal[DEVICES] = "auto"
    dtype: Literal[TRAIN_DTYPES] = "float32"
    cache_dir: str = "~/.cache/distill/shards"
    cache_max_bytes: Size = ByteSize(2 * 1024**3)
    shuffle_buffer: PositiveInt = 256


ENGINES = ("vm", "batch")
MAX_VMS = 1000  # tasks of one Batch job (a limit well under Batch's own)
BATCH_MAX_RETRIES = 10  # Batch's maxRetryCount: "The valid value range is [0, 10]" (task.proto)


class CloudSection(_Table):
    """Where and how ``distill-ctl teacher-cloud`` runs the teacher (see docs/CLOUD.md)."""

    project: str = ""  # "" = GOOGLE_CLOUD_PROJECT, CLOUDSDK_CORE_PROJECT or gcloud's config
    # one region, in failover order
    zones: Annotated[list[Annotated[str, AfterValidator(_zone)]], Field(min_length=1)] = Field(
        default_factory=lambda: ["us-central1-a", "us-central1-b", "us-central1-c"]
    )
    image: str = ""  # "" = REGION-docker.pkg.dev/PROJECT/distill/teacher:VERSION
    service_account: str = ""  # "" = distill-teacher@PROJECT.iam.gserviceaccount.com
    # the VPC (infra/terraform/base makes "distill"; or "default")
    network: Annotated[str, AfterValidator(_vpc_name)] = "distill"
    subnetwork: Annotated[str, AfterValidator(_subnet_name)] = ""  # "" = <network>-<region>
    spot: bool = True  # false: on-demand (STANDARD provisioning, no preemptions)
    # dead-man switch per VM; 0 = 2 x the estimate + 1 h
    max_run_hours: Annotated[NonNegativeFloat, AfterValidator(_run_hours)] = 0.0
    max_preemptions: NonNegativeInt = 10  # relaunches before giving up
    provision_timeout_minutes: NonNegativeFloat = 30.0  # keep trying stocked-out zones this long
    poll_seconds: PositiveFloat = 20.0
    budget_usd: NonNegativeFloat = 0.0  # refuse to start when the estimate is above it (0 = none)
    # "vm": one VM that the controller relaunches; "batch": one Google Cloud Batch job of
    # `vms` tasks, each on its own Spot L4 VM, splitting the shards (docs/CLOUD.md, "Fan-out")
    engine: Literal[ENGINES] = "vm"
    vms: Annotated[int, Field(ge=1, le=MAX_VMS)] = 1
    # a gated or private hf: teacher: the Secret Manager secret holding a Hub token, as
    # "NAME" (this project's) or "projects/P/secrets/NAME[/versions/V]"; the VMs read it
    hf_token_secret: Annotated[str, AfterValidator(_secret_name)] = ""

    @model_validator(mode="after")
    def _vms_need_batch(self) -> CloudSection:
        if self.vms > 1 and self.engine != "batch":
            raise ValueError(
                f'cloud.vms = {self.vms} needs cloud.engine = "batch" (or pass --vms N): '
                "one VM runs the whole job otherwise"
            )
        return self

    @model_validator(mode="after")
    def _batch_retries(self) -> CloudSection:
        if self.engine == "batch" and self.max_preemptions > BATCH_MAX_RETRIES:
            raise ValueError(
                f"cloud.max_preemptions = {self.max_preemptions}: the Batch engine (--vms) "
                f"retries a task at most {BATCH_MAX_RETRIES} times (Batch's maxRetryCount is "
                f"0..{BATCH_MAX_RETRIES}); set cloud.max_preemptions to {BATCH_MAX_RETRIES} or "
                "less"
            )
        return self

    @model_validator(mode="after")
    def _one_region(self) -> CloudSection:
        regions = {region_of(z) for z in self.zones}
        if len(regions) != 1:
            raise ValueError(
                f"cloud.zones span regions {', '.join(sorted(regions))}: give zones of "
                "one region (the bucket, the subnet and the registry are regional)"
            )
        return self


class Job(_Table):
    """A whole job file. Its ``[job]`` table reads as ``job.name``, ``job.output``, ``job.seed``."""

    # the file's [job] table, under another attribute name so that code never says job.job
    job_table: JobSection = Field(default_factory=JobSection, alias="job")
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    data: DataSection = Field(default_factory=DataSection)
    targets: TargetsSection = Field(default_factory=TargetsSection)
    student: StudentSection = Field(default_factory=StudentSection)
    train: TrainSection = Field(default_factory=TrainSection)
    loss: LossWeights = Field(default_factory=LossWeights)
    cloud: CloudSection = Field(default_factory=CloudSection)
    _path: Path | None = PrivateAttr(None)  # the file; relative paths resolve against its dir

    @property
    def name(self) -> str:
        return self.job_table.name

    @property
    def output(self) -> str:
        """Where the shards go: a local path or gs://bucket/prefix, one shard set per split."""
        return self.job_table.output

    @property
    def seed(self) -> int:
        return self.job_table.seed

    @property
    def path(self) -> Path | None:
        """The file the job came from (None when built in code)."""
        return self._path

    @model_validator(mode="after")
    def _loss_fits_targets(self) -> Job:
        """Loss terms this target kind cannot support, and BiLD's k."""
        kind, loss = self.targets.kind, self.loss
        if loss.bild > 0 and kind != "topk":
            raise ValueError(
                f'loss.bild needs targets.kind = "topk" (BiLD ranks a fixed, exact '
                f"top-k), got {kind!r}"
            )
        if loss.reverse_kl > 0 and self.targets.spec().sampled:
            raise ValueError(
                f"loss.reverse_kl cannot use targets.kind = {kind!r}: sampled targets "
                "have no tail bucket, so KL(q || p_hat) is infinite off the sampled ids"
            )
        if loss.bild > 0 and loss.bild_top > self.targets.k:
            raise ValueError(f"loss.bild_top = {loss.bild_top} > targets.k = {self.targets.k}")
        self._check_cross_tokenizer()
        return self

    def _check_cross_tokenizer(self) -> None:
        """loss.alm / loss.xkl need a student tokenizer and aligned targets, and replace the
        terms that index the teacher's vocabulary (CE stays: the student's own tokens)."""
        xt = self.loss.cross_tokenizer()
        if not xt:
            return
        names = " and ".join(f"loss.{n}" for n in xt)
        if not self.student.tokenizer:
            raise ValueError(
                f"{names} distil into another tokenizer: set student.tokenizer (a Hugging Face "
                "tokenizer directory), or set them to 0"
            )
        if not self.targets.alignment:
            raise ValueError(
                f"{names} need targets.alignment = true (the teacher stores its token offsets "
                "and log-probs to align on); re-run the teacher with it"
            )
        same = [f"loss.{n}" for n in KD_TERMS if getattr(self.loss, n) > 0]
        if same:
            raise ValueError(
                f"{', '.join(same)} index the teacher's vocabulary and cannot train a student "
                f"with another tokenizer: set them to 0 with {names} (loss.xkl is the KL "
                "through the vocab map)"
            )

    def resolve(self, p: str) -> Path:
        """A data/model path from the job file, relative to the job file's directory."""
        path = Path(p).expanduser()
        if path.is_absolute() or self.path is None or path.exists():
            return path
        return (self.path.parent / path).resolve() if (self.path.parent / path).exists() else path

    def resolve_data(self, spec: str) -> str:
        """``data.train`` / ``data.eval``: ``gs://`` as is; a local path as :meth:`resolve`
        says; a relative glob against the job file's directory when it matches there."""
        if spec.startswith("gs://") or "://" in spec:
            return spec
        if not any(c in spec for c in "*?["):
            return str(self.resolve(spec))
        pattern = Path(spec).expanduser()
        if pattern.is_absolute() or self.path is None:
            return str(pattern)
        there = self.path.parent / pattern
        return str(there) if glob.glob(str(there), recursive=True) else str(pattern)

    def to_dict(self) -> dict[str, Any]:
        """The job as the tables of its file (``job_table`` as ``[job]``)."""
        return self.model_dump(by_alias=True)


# --- errors: pydantic's, as one line per problem that names the field -----------------------

_TYPES = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "list_type": "list",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _key(name: str, info: FieldInfo) -> str:
    return info.alias or name


def _walk(loc: tuple[str | int, ...]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The table (None below a table's fields) and the field that ``loc`` names in a job."""
    model: type[BaseModel] | None = Job
    field: FieldInfo | None = None
    for part in loc:
        if model is None:  # a list item: the list's field
            continue
        field = next((i for n, i in model.model_fields.items() if _key(n, i) == part), None)
        sub = field.annotation if field else None
        model = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
    return model, field


def _bounds(field: FieldInfo | None) -> str:
    """'> 0', '>= 1', '[1, 65535]' or '(0, 1)' from a field's annotated bounds."""
    b: dict[str, Any] = {}
    for m, k in itertools.product(field.metadata if field else [], ("gt", "ge", "lt", "le")):
        if getattr(m, k, None) is not None:
            b[k] = getattr(m, k)
    lo = next((f"{o}{b[k]}" for k, o in (("gt", "("), ("ge", "[")) if k in b), "")
    hi = next((f"{b[k]}{c}" for k, c in (("lt", ")"), ("le", "]")) if k in b), "")
    if lo and hi:
        return f"in {lo}, {hi}"
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " or ".join(f"{ops[k]} {v}" for k, v in b.items())


def _problem(err: Any, loc: tuple[str | int, ...]) -> str:
    """One pydantic error in the project's words; ``loc`` is the path from the job's top."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind, value = err["type"], err["input"]
    field = _walk(loc)[1]
    if kind == "extra_forbidden":
        owner = _walk(loc[:-1])[0] or Job
        known = ", ".join(sorted(_key(n, i) for n, i in owner.model_fields.items()))
        what = f"section [{path}]" if len(loc) == 1 else f"field {path}"
        return f"unknown {what} (known: {known})"
    if kind == "model_type":
        return f"[{path}] must be a table, got {type(value).__name__}"
    if kind in _TYPES:
        return f"{path}: expected {_TYPES[kind]}, got {type(value).__name__} {value!r}"
    if kind in _BOUNDS:
        return f"{path} must be {_bounds(field)}, got {value!r}"
    if kind == "literal_error" and field is not None:
        choices = ", ".join(map(str, typing.get_args(field.annotation)))
        return f"{path} = {value!r} is not one of: {choices}"
    if kind == "value_error":  # a rule over a table names its fields itself
        msg = str((err.get("ctx") or {}).get("error", err["msg"]))
        return f"{path} = {value!r}: {msg}" if len(loc) >= 2 else msg
    words = {
        "finite_number": "must be a finite number",
        "too_short": "must not be empty",
        "byte_size": 'must be a size: bytes, or e.g. "512MiB", "20GB"',
    }
    return f"{path} {words.get(kind, '(' + err['msg'] + ')')}, got {value!r}"


def describe(e: ValidationError, src: str = "", within: type[BaseModel] = Job) -> str:
    """Every problem of ``e`` on its own line, ``src: section.field ...``; ``within``: the
    table that was validated (a section built on its own, or the whole job)."""
    section = [_key(n, i) for n, i in Job.model_fields.items() if i.annotation is within]
    lines = [_problem(err, (*section, *err["loc"])) for err in e.errors()]
    return "\n".join(f"{src}: {line}" if src else line for line in lines)


# --- loading ------------------------------------------------------------------------------


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
    try:
        job = Job.model_validate(raw)
    except ValidationError as e:
        raise DistillError(describe(e, src)) from None
    job._path = path
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


def splits(job: Job) -> dict[str, str]:
    """Each split's dataset as the job names it: a ``gs://`` URL as written, a local path or
    glob resolved against the job file's directory (:meth:`Job.resolve_data`)."""
    out = {}
    for name in ("train", "eval"):
        p = getattr(job.data, name)
        if p:
            out[name] = job.resolve_data(p)
    if "train" not in out:
        raise DistillError(f"{job.path}: data.train is not set")
    return out
