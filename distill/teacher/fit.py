"""Will the teacher fit? Peak memory and a throughput model for each way to run it.

Ways (``teacher.mode`` x ``teacher.quantize``):

- ``resident``: the whole model on the device (``none``: the job's dtype; ``int8`` / ``nf4``:
  bitsandbytes weights for the decoder's linear layers, embeddings and head unquantised);
- ``layered`` (distill/teacher/layered.py): on the device two decoder layers (the one
  computing and the one being prefetched), the LM head, one batch's temporaries; in host
  memory the chunk's activations (``chunk_tokens x hidden``).

Throughput of a layered chunk of ``C`` tokens on a GPU of ``peak`` FLOP/s at ``mfu``:
compute ``C x FLOPs/token / (peak x mfu)``; weight streaming ``weights / disk bytes/s``, which
the prefetch overlaps with compute layer by layer, so only the first layer's read and any
layer whose read outlasts its compute are exposed; activation I/O ``2 x layers x C x hidden
x dtype bytes / host-link bytes/s`` (every layer reads and writes the chunk's activations).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import Job
from distill.errors import DistillError
from distill.hardware import l4

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + cuBLAS workspace, outside torch's allocator
ALLOCATOR_MARGIN = 0.05  # fragmentation headroom kept free
# bytes per weight of the quantised linear layers (nf4: 4 bits + one fp32 absmax per 64)
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64}
# the L4 VM's rates (distill/hardware/l4.toml): weights read from the disk (the load in the
# cost estimate, the layered pass's streaming) and activations host <-> GPU (layered)
WEIGHTS_STREAM_BYTES_PER_S = l4().machine.disk_read_bytes_per_s
HOST_LINK_BYTES_PER_S = l4().machine.host_link_bytes_per_s
HOST_MARGIN_BYTES = 4 * GIB  # host memory kept for the OS, the tokenised data, shard encoding


@dataclass(frozen=True)
class TeacherProfile:
    """What the estimate needs from a model config (counted on the meta device)."""

    params: int  # every parameter once (tied embeddings once)
    non_embedding_params: int  # params minus the input embedding and an untied LM head
    hidden: int
    vocab: int
    layers: int
    heads: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # kv heads x head_dim
    intermediate: int
    model_type: str = ""  # the config's (the layered pass supports layered.ARCHS)
    safetensors: bool | None = None  # the local checkpoint has *.safetensors (None: not looked)

    def layered_refusal(self) -> str:
        """Why the layered pass cannot run this teacher ("" when it can)."""
        from distill.teacher.layered import ARCHS

        if self.model_type not in ARCHS:
            return (
                f"layered mode supports the {', '.join(ARCHS)} families, not "
                f"{self.model_type or 'this'!r} model_type"
            )
        if self.safetensors is False:
            return "layered mode reads safetensors weights and the teacher directory has none"
        return ""

    def layer_params(self) -> int:
        """One decoder layer's parameters (the final norm's few are spread over the layers)."""
        return -(-self.non_embedding_params // self.layers)


def has_safetensors(model_dir: Path) -> bool:
    """Whether the checkpoint's weights are safetensors (a Hub or bucket checkpoint's planning
    folder says so from its listing: the weights are not there)."""
    from distill.checkpoints import source_record

    rec = source_record(model_dir)
    if rec is not None:
        return any(n.endswith(".safetensors") for n in rec.files)
    return any(model_dir.glob("*.safetensors"))


def teacher_profile(config: Any, model_dir: Path | None = None) -> TeacherProfile:
    """Exact parameter counts from ``config`` without allocating weights; with ``model_dir``
    (the local checkpoint) whether it holds safetensors weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p.numel() for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    excluded = {id(embed)} | ({id(head.weight)} if head is not None else set())
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return TeacherProfile(
        params=sum(params.values()),
        non_embedding_params=sum(n for i, n in params.items() if i not in excluded),
        hidden=h,
        vocab=int(embed.shape[0]),
        layers=config.num_hidden_layers,
        heads=heads,
        q_dim=heads * head_dim,
        kv_dim=kv * head_dim,
        intermediate=getattr(config, "intermediate_size", None) or 4 * h,
        model_type=getattr(config, "model_type", "") or "",
        safetensors=None if model_dir is None else has_safetensors(Path(model_dir)),
    )


def _batch_parts(
    p: TeacherProfile, dtype: str, batch_tokens: int, head_chunk: int, max_length: int, kind: str
) -> dict[str, int]:
    """One forward batch's temporaries and one LM-head chunk."""
    b = DTYPE_BYTES[dtype]
    # One decoder layer's temporaries for batch_tokens tokens: residual + norm + the larger of
    # the MLP (gate, up, act, product) and attention (q, k, v, rotary copies, repeat_kv'd k/v,
    # output), attention scores as the math path materialises them, and the hidden states
    # handed to the head (last hidden state + gathered target rows).
    per_token = (
        4 * p.hidden
        + max(4 * p.intermediate, 6 * p.q_dim + 3 * p.kv_dim)
        + p.heads * min(max_length, batch_tokens)
    )
    return {
        "activations": batch_tokens * per_token * b,
        # the chunk's logits in the teacher dtype, their fp32 copy, and logsumexp's fp32 temp;
        # kinds other than top-k also sort the chunk (fp32 values + int64 indices)
        "head_chunk": head_chunk * p.vocab * (b + 8 + (0 if kind == "topk" else 12)),
    }


def teacher_memory(
    p: TeacherProfile,
    dtype: str,
    batch_tokens: int,
    head_chunk: int,
    max_length: int,
    kind: str = "topk",
    quantize: str = "none",
) -> dict[str, int]:
    """Peak GPU bytes of the resident teacher pass, by part (no KV cache, no gradients)."""
    b = DTYPE_BYTES[dtype]
    embeddings = p.params - p.non_embedding_params
    body = p.non_embedding_params * (QUANT_BYTES[quantize] if quantize != "none" else b)
    return {
        "weights": int(embeddings * b + body),
        **_batch_parts(p, dtype, batch_tokens, head_chunk, max_length, kind),
        "cuda_context": CUDA_CONTEXT_BYTES,
    }


def layered_memory(
    p: TeacherProfile, dtype: str, batch_tokens: int, head_chunk: int, max_length: int, kind: str
) -> dict[str, int]:
    """Peak GPU bytes of the layered pass, by part."""
    b = DTYPE_BYTES[dtype]
    return {
        "layer_weights": 2 * p.layer_params() * b,  # computing + prefetched
        "lm_head": p.vocab * p.hidden * b,
        **_batch_parts(p, dtype, batch_tokens, head_chunk, max_length, kind),
        "cuda_context": CUDA_CONTEXT_BYTES,
    }


def layered_host_bytes(p: TeacherProfile, dtype: str, chunk_tokens: int, max_length: int) -> int:
    """Host bytes of the layered pass: the chunk's activations (padding ~10%: batching.py)
    and the input embedding (read for the embedding lookup, then freed)."""
    b = DTYPE_BYTES[dtype]
    padded = int(chunk_tokens * 1.1) + max_length
    return padded * p.hidden * b + p.vocab * p.hidden * b


def usable_bytes(total: int, cuda: bool = True) -> int:
    """What a device of ``total`` bytes offers the pass (context kept, fragmentation margin)."""
    if not cuda:
        return int(total * (1 - ALLOCATOR_MARGIN))
    return int((total - CUDA_CONTEXT_BYTES) * (1 - ALLOCATOR_MARGIN)) + CUDA_CONTEXT_BYTES


@dataclass(frozen=True)
class Way:
    """One way to run the teacher and what it needs."""

    mode: str
    quantize: str
    device: dict[str, int]  # peak device bytes by part
    host: int  # peak host bytes beyond the device copy (layered: the chunk's activations)
    budget: int  # usable device bytes
    host_budget: int | None  # usable host bytes (None: not checked)
    unavailable: str = ""  # why this way cannot run the teacher at all ("" when it can)

    @property
    def peak(self) -> int:
        return sum(self.device.values())

    @property
    def fits(self) -> bool:
        host_ok = self.host_budget is None or self.host <= self.host_budget
        return not self.unavailable and self.peak <= self.budget and host_ok

    def label(self) -> str:
        return self.mode + ("" if self.quantize == "none" else f" + {self.quantize}")


def ways(
    job: Job, p: TeacherProfile, budget: int, host_budget: int | None, cuda: bool = True
) -> list[Way]:
    """Every way to run ``job``'s teacher: resident (unquantised, int8, nf4), layered."""
    t = job.teacher
    ml, kind = job.data.max_length, job.targets.kind
    usable = usable_bytes(budget, cuda)
    out = []
    for q in ("none", "int8", "nf4") if cuda else ("none",):
        dt = t.dtype if q == "none" or t.dtype != "float32" else "bfloat16"
        mem = teacher_memory(p, dt, t.batch_tokens, t.head_chunk, ml, kind, q)
        if not cuda:
            del mem["cuda_context"]
        out.append(Way("resident", q, mem, 0, usable, host_budget))
    lay = layered_memory(p, t.dtype, t.batch_tokens, t.head_chunk, ml, kind)
    host = layered_host_bytes(p, t.dtype, t.chunk_tokens, ml)
    if not cuda:  # host and device are the same memory
        del lay["cuda_context"]
        lay["chunk_activations"] = host
        host = 0
    out.append(Way("layered", "none", lay, host, usable, host_budget, p.layered_refusal()))
    return out


def choose(
    job: Job,
    p: TeacherProfile,
    budget: int,
    host_budget: int | None,
    cuda: bool = True,
    where: str = "the device",
) -> Way:
    """The way the job runs: its ``teacher.mode`` and ``teacher.quantize`` (``auto``: resident
    if that fits, else layered); :class:`DistillError` naming the fix when it does not fit."""
    t = job.teacher
    all_ways = ways(job, p, budget, host_budget, cuda)
    by = {(w.mode, w.quantize): w for w in all_ways}
    resident = by.get(("resident", t.quantize)) or by[("resident", "none")]
    layered = by[("layered", "none")]
    if t.mode == "resident" or (t.mode == "auto" and (resident.fits or t.quantize != "none")):
        way = resident
    else:
        way = layered
    if way.fits:
        return way
    fitting = [w.label() for w in all_ways if w.fits]
    hint = f"ways that fit: {', '.join(fitting)} (teacher.mode, teacher.quantize)"
    if not fitting:
        hint = "nothing fits: a bigger GPU, or a smaller teacher.batch_tokens / chunk_tokens"
    if way.unavailable:
        need = f"~{resident.peak / GIB:.1f} GiB of {resident.budget / GIB:.1f} GiB usable"
        raise DistillError(
            f"teacher {t.model} ({p.params / 1e9:.2f}B params) cannot run layered on {where}: "
            f"{way.unavailable} (resident needs {need}); {hint}"
        )
    need = f"~{way.peak / GIB:.1f} GiB of {way.budget / GIB:.1f} GiB usable"
    if way.host:
        need += f", host ~{way.host / GIB:.1f} GiB"
        if host_budget is not None:
            need += f" of {host_budget / GIB:.1f} GiB"
    raise DistillError(
        f"teacher {t.model} ({p.params / 1e9:.2f}B params, {t.dtype}) does not fit "
        f"{where} in {way.label()} mode: needs {need} ({parts(way)}); {hint}"
    )


def parts(way: Way) -> str:
    return ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in way.device.items())


@dataclass(frozen=True)
class Throughput:
    """Seconds per chunk of ``chunk_tokens`` real tokens, by where they go."""

    chunk_tokens: int
    compute_s: float
    stream_s: float  # reading every layer's weights once (overlapped with compute)
    exposed_stream_s: float  # the part of it the compute waits for
    activation_io_s: float

    @property
    def seconds(self) -> float:
        return self.compute_s + self.exposed_stream_s + self.activation_io_s

    @property
    def tokens_per_s(self) -> float:
        return self.chunk_tokens / self.seconds

    @property
    def stream_share(self) -> float:
        """Exposed weight streaming as a share of the pass's time."""
        return self.exposed_stream_s / self.seconds


def flops_per_token(p: TeacherProfile, max_length: int, target_share: float = 1.0) -> float:
    """Forward FLOPs per token (the cost estimate's formula, distill/cloud/counting.py, with
    context max_length / 2 and the head at ``target_share`` of the positions)."""
    return (
        2 * p.non_embedding_params
        + 2 * p.layers * p.q_dim * max_length / 2
        + 2 * p.hidden * p.vocab * target_share
    )


def throughput(
    p: TeacherProfile,
    dtype: str,
    way: Way,
    chunk_tokens: int,
    flops_token: float,
    sustained_flops: float,
    stream_bps: float = WEIGHTS_STREAM_BYTES_PER_S,
    link_bps: float = HOST_LINK_BYTES_PER_S,
) -> Throughput:
    """The throughput model (module docstring) for a chunk; resident: compute only."""
    compute = chunk_tokens * flops_token / sustained_flops
    if way.mode == "resident":
        return Throughput(chunk_tokens, compute, 0.0, 0.0, 0.0)
    b = DTYPE_BYTES[dtype]
    layer_read = p.layer_params() * b / stream_bps
    layer_compute = compute / p.layers
    exposed = layer_read + (p.layers - 1) * max(0.0, layer_read - layer_compute)
    io = 2 * p.layers * chunk_tokens * 1.1 * p.hidden * b / link_bps
    return Throughput(chunk_tokens, compute, p.layers * layer_read, exposed, io)


def device_budget(device: str) -> tuple[int, int | None, bool]:
    """(device bytes, host bytes, is CUDA) of this machine for ``device``."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.startswith("cuda"):
        import torch

        total = int(torch.cuda.get_device_properties(0).total_memory)
        return total, host - HOST_MARGIN_BYTES, True
    return host - HOST_MARGIN_BYTES, None, False


def resolve_way(job: Job, model_dir: Any, device: str) -> str:
    """``teacher.mode`` for this run: as the job says, or for ``auto`` resident when it fits
    this machine's ``device`` (:func:`device_budget`), else layered."""
    if job.teacher.mode != "auto":
        return job.teacher.mode
    from transformers import AutoConfig

    p = teacher_profile(AutoConfig.from_pretrained(model_dir), model_dir)
    budget, host, cuda = device_budget(device)
    return choose(job, p, budget, host, cuda, where=f"this machine's {device}").mode
