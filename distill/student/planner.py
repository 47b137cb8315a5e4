"""Memory planner: estimate a training step's peak memory and pick settings that fit.

The estimate adds up, for the job's student:

- weights, gradients and optimizer state (exact parameter count from the config, on the meta
  device; AdamW keeps two fp32 moments, 8-bit AdamW two bytes, CPU offload none on the device);
- activations saved for backward, per token and layer (a Llama-style block: norms, q/k/v,
  rotary copies, attention output, the MLP's gate/up/act/product), or with gradient
  checkpointing one boundary tensor per layer plus one block being recomputed;
- the attention probabilities when the kernel materialises them (the math path: heads x T);
- the chunked loss: a ``loss_chunk x vocab`` block of fp32 logits and its temporaries, plus
  the fp32 gradient buffer for the LM head that the chunked loss accumulates.

``plan`` then searches micro-batch size, gradient accumulation and checkpointing for the
largest micro-batch that fits the budget with a safety margin, keeping the job's effective
batch (``batch_size x grad_accum``). :func:`show_plan` is ``distill-ctl plan``,
:func:`apply_auto` is ``train --auto``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distill.config import Job, parse_bytes
from distill.errors import DistillError

if TYPE_CHECKING:
    from rich.console import Console

SAFETY = 0.9  # plan to use at most this share of the budget
CHUNK_TEMPORARIES = 1  # fp32 [chunk, vocab] buffers alive at once (distill/kd_kernel.py)


@dataclass
class Estimate:
    micro_batch: int
    tokens: int  # tokens per micro-batch (micro_batch x max_length, padded)
    checkpointing: bool
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _arch(config: Any) -> dict[str, int]:
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return {
        "hidden": h,
        "inter": getattr(config, "intermediate_size", 4 * h),
        "layers": config.num_hidden_layers,
        "heads": heads,
        "kv_dim": kv * head_dim,
        "vocab": config.vocab_size,
    }


def count_params(config: Any) -> int:
    """Exact parameter count (tied embeddings counted once), without allocating weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate(
    config: Any,
    params: int,
    micro_batch: int,
    seq_len: int,
    *,
    checkpointing: bool,
    optimizer: str = "adamw",
    offload: bool = False,
    bf16: bool = False,
    loss_chunk: int = 1024,
    target_share: float = 1.0,
    math_attention: bool = True,
) -> Estimate:
    """Peak bytes of one training step, by part."""
    a = _arch(config)
    t = micro_batch * seq_len
    act = 2 if bf16 else 4
    h, i, kvd, lay = a["hidden"], a["inter"], a["kv_dim"], a["layers"]
    per_layer_token = (8 * h + 3 * kvd + 5 * i) * act
    attn_probs = a["heads"] * seq_len * act if math_attention else 0
    if checkpointing:
        # one boundary tensor per layer, plus the block being recomputed, its gradients and
        # attention-backward temporaries (x3, calibrated by bench/plan_check.py)
        acts = t * lay * h * act + 3 * t * (per_layer_token + attn_probs)
    else:
        acts = t * lay * (per_layer_token + attn_probs)
    acts += 3 * t * h * 4  # embeddings out, final norm, hidden states handed to the loss
    rows = min(loss_chunk, max(1, int(t * target_share)))
    opt_bytes = 0 if offload else {"adamw": 8, "adamw8bit": 2}[optimizer] * params
    parts = {
        "weights": 4 * params + (2 * params if bf16 else 0),  # + autocast's bf16 weight cache
        "gradients": 4 * params,
        "optimizer": opt_bytes,
        "activations": acts,
        "loss_chunk": CHUNK_TEMPORARIES * rows * a["vocab"] * 4 + a["vocab"] * h * 4,
    }
    return Estimate(micro_batch, t, checkpointing, parts)


@dataclass
class Plan:
    budget: int
    estimate: Estimate
    grad_accum: int
    effective_batch: int
    fits: bool
    notes: list[str] = field(default_factory=list)


def student_config(job: Job) -> Any:
    """The student's config without building the student (meta only)."""
    from transformers import AutoConfig

    from distill import models

    if job.student.init == "pretrained":
        return AutoConfig.from_pretrained(models.resolve_model(job.student.model))
    config = AutoConfig.from_pretrained(models.resolve_model(job.teacher.model, weights=False))
    config.num_hidden_layers = min(job.student.layers, config.num_hidden_layers)
    if job.student.tokenizer:  # another vocabulary: its embeddings, LM head and loss rows
        tokenizer = models.load_tokenizer(job.resolve(job.student.tokenizer))
        config.vocab_size = len(tokenizer)  # as init_from_teacher_layers builds it
    return config


def plan(job: Job, budget: int, config: Any = None, seq_len: int | None = None) -> Plan:
    """Largest micro-batch (<= the job's effective batch) that fits ``budget`` bytes."""
    config = config if config is not None else student_config(job)
    params = count_params(config)
    seq = seq_len or job.data.max_length
    eff = job.train.batch_size * job.train.grad_accum
    common = dict(
        optimizer=job.train.optimizer,
        offload=job.train.optimizer_offload,
        bf16=job.train.dtype == "bfloat16",
        loss_chunk=job.train.loss_chunk,
    )
    best: Estimate | None = None
    for ckpt in (False, True):
        for mb in (m for m in range(eff, 0, -1) if eff % m == 0):  # keep the effective batch
            e = estimate(config, params, mb, seq, checkpointing=ckpt, **common)
            if e.total <= SAFETY * budget:
                best = e
                break
        if best is not None and best.micro_batch >= min(eff, 4):
            break  # big enough without recomputation (or with it, on the second pass)
    notes: list[str] = []
    if best is None:
        smallest = estimate(config, params, 1, seq, checkpointing=True, **common)
        levers = []
        if job.train.optimizer == "adamw" and not job.train.optimizer_offload:
            levers.append('train.optimizer_offload = true (or train.optimizer = "adamw8bit")')
        if job.train.dtype != "bfloat16":
            levers.append('train.dtype = "bfloat16"')
        levers.append(f"a smaller train.loss_chunk (now {job.train.loss_chunk})")
        levers.append(f"a smaller data.max_length (now {seq})")
        levers.append("a smaller student (student.layers)")
        raise DistillError(
            f"the job cannot fit {_gib(budget)}: even 1 sample with gradient checkpointing "
            f"needs ~{_gib(smallest.total)} ({_parts(smallest)}); try " + "; ".join(levers)
        )
    accum = -(-eff // best.micro_batch)
    if best.micro_batch * accum != eff:
        notes.append(f"effective batch {eff} -> {best.micro_batch * accum} (rounded up)")
    return Plan(budget, best, accum, best.micro_batch * accum, True, notes)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _parts(e: Estimate) -> str:
    return ", ".join(f"{k} {_gib(v)}" for k, v in e.parts.items())


def device_budget() -> int:
    """The GPU's total memory, or this machine's RAM when there is no GPU."""
    import os

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def apply(job: Job, p: Plan) -> Job:
    """The job with a plan written into it (what ``train --auto`` does)."""
    train = job.train.model_copy(
        update={
            "batch_size": p.estimate.micro_batch,
            "grad_accum": p.grad_accum,
            "gradient_checkpointing": p.estimate.checkpointing,
        }
    )
    return job.model_copy(update={"train": train})


def describe(p: Plan) -> list[tuple[str, str]]:
    e = p.estimate
    rows = [(k, _gib(v)) for k, v in e.parts.items()]
    rows += [
        ("estimated peak", _gib(e.total)),
        ("budget", f"{_gib(p.budget)} (planning to {SAFETY:.0%})"),
        ("micro-batch", f"{e.micro_batch} samples ({e.tokens} tokens)"),
        ("gradient accumulation", str(p.grad_accum)),
        ("gradient checkpointing", "on" if e.checkpointing else "off"),
    ]
    rows += [("note", n) for n in p.notes]
    return rows


def apply_auto(job: Job, gpu_mem: str | None = None) -> tuple[Job, str]:
    """``train --auto``: plan for ``gpu_mem`` (default: :func:`device_budget`); the job with
    the plan written into it, and what was chosen (one line)."""
    budget = parse_bytes(gpu_mem) if gpu_mem else device_budget()
    p = plan(job, budget)
    job = apply(job, p)
    return job, (
        f"--auto: micro-batch {job.train.batch_size}, grad_accum {job.train.grad_accum}, "
        f"checkpointing {job.train.gradient_checkpointing} "
        f"(estimated peak {p.estimate.total / 2**30:.2f} GiB of {budget / 2**30:.2f} GiB)"
    )


def show_plan(job: Job, gpu_mem: str, source: str, console: Console) -> None:
    """``distill-ctl plan``: the plan for ``gpu_mem`` as a table, then the flags that apply it
    (``source``: the job file, for the title)."""
    from rich.table import Table

    p = plan(job, parse_bytes(gpu_mem))
    t = Table(title=f"memory plan for {source} ({job.train.optimizer}, {job.train.dtype})")
    t.add_column("item")
    t.add_column("value")
    for k, v in describe(p):
        t.add_row(k, v)
    console.print(t)
    console.print(
        f"use: --set train.batch_size={p.estimate.micro_batch} "
        f"--set train.grad_accum={p.grad_accum} "
        f"--set train.gradient_checkpointing={str(p.estimate.checkpointing).lower()}"
        "  (or: distill-ctl train --auto --gpu-mem ...)"
    )
