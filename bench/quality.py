"""Benchmark: student quality per target kind, from CE-only up to full-distribution online KD.

The teacher (SmolLM2-135M-Instruct by default) is distilled into a smaller student built from
its layers (``--layers``, ``--layer-selection``; ``distill.student.init.init_from_teacher_layers``,
built once so every arm starts from the same weights). Every arm trains that student on the
same samples, in the same order (``job.seed``), for the same steps, batch size and learning
rate, through ``distill.student.train.train`` on a job built with ``distill.config.job_from_dict``:

    ce-only        loss.forward_kl = 0, loss.ce = 1 (no teacher; the shards supply only tokens)
    topk-K         top-K log-probs + tail bucket
    sample-N       N iid draws with replacement (RS-KD), ids + counts, no tail bucket
    sample-N-sys   N systematic draws (``targets.sampling = "systematic"``), ids + counts
    topkK+sample-N[-sys]  exact top-K head + N draws from the renormalised tail
    full-online    the teacher stays in memory and its full next-token distribution is
                   computed on the fly for each batch; loss = forward KL over the whole vocab

``--arms`` picks them, in order (default: ce-only, topk-8, topk-64, sample-50, sample-50-sys,
full-online); ``gap_closed`` needs ce-only and full-online among them.

Every KD arm (the sparse kinds and full-online) uses the same loss weights: ``forward_kl =
1 - ce_mix``, ``ce = ce_mix`` (``--ce-mix``, default 0: pure forward KL), so full-online is
exactly the quantity the sparse kinds estimate. The sparse kinds' targets come from
``distill.teacher.run.run_teacher`` (one teacher pass per kind into a local shard set, packed
v2 blocks with zstd, exact values in ``--values``, default ``log8``). The full-online arm
also goes through ``distill.student.train.train``, with the ``Components`` that
:func:`online_kd` makes: a ``StudentBody`` that also runs the teacher on the batch, and
:func:`full_kl_loss` as the loss (passed in, nothing patched); the loop itself (loader, data
order, AdamW, warmup + cosine, clipping) is the one the other arms run.

Held-out metrics over the response-token positions of ``data/demo/eval.jsonl`` (position t
with token t+1 written by the assistant; p the teacher's full softmax, q the student's):

- ``heldout_kl``: mean KL(p || q) = sum_v p_v (log p_v - log q_v) over the FULL vocabulary,
  from the teacher's own logits (not from any sparse target);
- ``heldout_ce``: mean -log q(ground-truth next token);
- ``top1_agreement``: share of positions where argmax q == argmax p;
- ``ece``: expected calibration error of the student's top-1 prediction against the
  ground-truth token: conf = max_v q_v, correct = [argmax q == next token]; positions go to
  15 equal-width bins B_b = ((b-1)/15, b/15] of conf (b = 1..15), and
  ECE = sum_b |B_b| / n * |mean(correct in B_b) - mean(conf in B_b)|.

Plus, per arm, ``bytes_per_token`` (shard bytes per target position from the manifest: ids,
values, the input tokens and tar framing; 0 for ce-only; for full-online the float16 dense
equivalent 2 x vocab that an offline store of the full distribution would need, online stores
nothing), ``payload_bytes_per_token`` (the same without tar headers and block padding: with
the demo's short answers, ~22 positions per sample, the 512-byte member header and padding
are a large share), ``teacher_seconds`` (the pass's time from the manifest, model load
excluded; for full-online the teacher compute during training), ``train_seconds`` and
``gap_closed`` = (KL_ce-only - KL_arm) / (KL_ce-only - KL_full-online). Issue #4's target: a
sparse kind closing >= 95% of that gap at <= 40 bytes per token (checked on both byte counts).

Time, measured on a 2-core Xeon without native bf16 (AVX-512, no BF16/AMX): a teacher pass
takes ~60 s per kind in float32 (a bfloat16 teacher runs ~10x slower on such a CPU, hence the
float32 default), the 8-layer student trains at ~450 tokens/s, the full-online arm at ~220 (a
teacher forward per step). The defaults (all 879 demo samples, 200 steps of 8, ~1.8 epochs,
~100k tokens per arm, six arms) took 41 minutes there with the test suite sharing the cores for
~10 of them; ``--steps 300`` adds about 15 minutes; ``--quick`` takes about a minute.

    python bench/quality.py --quick
    python bench/quality.py --json bench/results/quality.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISTILL_CACHE", str(ROOT / ".cache" / "distill"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from distill import models  # noqa: E402
from distill.config import (  # noqa: E402
    Job,
    LossWeights,  # noqa: E402
    job_from_dict,
)
from distill.data.dataset import Sample, tokenize_file  # noqa: E402
from distill.format.codec import VALUE_MAPS  # noqa: E402
from distill.student import train as dtrain  # noqa: E402
from distill.teacher.batching import pad_batch, token_budget_batches  # noqa: E402
from distill.teacher.run import run_teacher  # noqa: E402

ECE_BINS = 15
DEFAULTS = {
    "train_samples": 0,
    "eval_samples": 0,
    "steps": 200,
    "batch_size": 8,
    "warmup": 10,
}
QUICK = {"train_samples": 32, "eval_samples": 16, "steps": 10, "batch_size": 2, "warmup": 2}


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def ece_bins(
    conf: Tensor, correct: Tensor, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, sum of conf, sum of correct) over equal-width bins ((b-1)/n, b/n]."""
    idx = (conf.double() * bins).ceil().long().clamp(1, bins) - 1
    idx = idx.cpu()
    count = torch.bincount(idx, minlength=bins).double()
    conf_sum = torch.bincount(idx, weights=conf.double().cpu(), minlength=bins)
    corr_sum = torch.bincount(idx, weights=correct.double().cpu(), minlength=bins)
    return count.numpy(), conf_sum.numpy(), corr_sum.numpy()


def ece_from_bins(count: np.ndarray, conf_sum: np.ndarray, corr_sum: np.ndarray) -> float:
    """sum_b |B_b| / n * |acc(B_b) - conf(B_b)| = sum_b |corr_sum_b - conf_sum_b| / n."""
    n = float(count.sum())
    return float(np.abs(corr_sum - conf_sum).sum() / n) if n > 0 else float("nan")


def expected_calibration_error(conf: Tensor, correct: Tensor, bins: int = ECE_BINS) -> float:
    """ECE of confidences ``conf`` [n] against 0/1 outcomes ``correct`` [n] (docstring above)."""
    return ece_from_bins(*ece_bins(conf, correct, bins))


class HeldOutMetrics:
    """Running sums of full-vocab KL(p || q), CE, top-1 agreement and ECE bins over rows."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.rows = 0
        self.kl = self.ce = self.agree = 0.0
        self.bins = [np.zeros(bins) for _ in range(3)]
        self.n_bins = bins

    @torch.no_grad()
    def add(self, s_logits: Tensor, t_logits: Tensor, labels: Tensor) -> None:
        """One chunk: student and teacher logits [n, V], ground-truth next tokens [n]."""
        log_q = torch.log_softmax(s_logits.float(), dim=-1)
        log_p = torch.log_softmax(t_logits.float(), dim=-1)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
        ce = -log_q.gather(1, labels[:, None].long()).squeeze(1)
        top_lq, pred = log_q.max(dim=-1)
        self.rows += int(labels.shape[0])
        self.kl += float(kl.double().sum())
        self.ce += float(ce.double().sum())
        self.agree += float((pred == log_p.argmax(dim=-1)).sum())
        for acc, part in zip(
            self.bins, ece_bins(top_lq.exp(), pred == labels, self.n_bins), strict=True
        ):
            acc += part

    def result(self) -> dict[str, float]:
        n = max(self.rows, 1)
        return {
            "heldout_kl": self.kl / n,
            "heldout_ce": self.ce / n,
            "top1_agreement": self.agree / n,
            "ece": ece_from_bins(*self.bins),
            "heldout_positions": float(self.rows),
        }


def gap_closed(kl_ce: float, kl_arm: float, kl_full: float) -> float:
    """(KL_ce-only - KL_arm) / (KL_ce-only - KL_full); NaN when full KD is no better than CE."""
    gap = kl_ce - kl_full
    return (kl_ce - kl_arm) / gap if gap > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Full-distribution online KD inside distill.student.train.train
# --------------------------------------------------------------------------------------------


def _wide(x: Tensor) -> Tensor:
    """float32, or float64 when already so (16-bit logits are widened before a softmax)."""
    return x if x.dtype == torch.float64 else x.float()


class _FullKL(torch.autograd.Function):
    """Full-vocab forward KL (+ CE) and its gradients, one chunk of rows at a time.

    Per row: d loss / d z = w_kl (q - p) + w_ce (q - onehot(label)) with q = softmax(z) the
    student's and p the teacher's distribution; gradients for ``hidden`` and ``weight`` follow
    from z = hidden @ weight.T, so memory is O(chunk x vocab).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden,
        weight,
        t_hidden,
        t_weight,
        labels,
        w_kl: float,
        w_ce: float,
        chunk: int,
        timer: list[float],
    ):
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight)
        total = hidden.new_zeros((), dtype=torch.float64)
        kl_sum = hidden.new_zeros((), dtype=torch.float64)
        ce_sum = hidden.new_zeros((), dtype=torch.float64)
        w = weight.detach()
        for lo in range(0, n, chunk):
            h = hidden[lo : lo + chunk].detach()
            t0 = time.perf_counter()
            log_p = torch.log_softmax(_wide(t_hidden[lo : lo + chunk] @ t_weight.T), dim=-1)
            p = log_p.exp()
            timer[0] += time.perf_counter() - t0
            log_q = torch.log_softmax(_wide(h @ w.T), dim=-1)
            q = log_q.exp()
            lab = labels[lo : lo + chunk].long()
            kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
            ce = -log_q.gather(1, lab[:, None]).squeeze(1)
            g = (w_kl + w_ce) * q - w_kl * p
            g.scatter_add_(1, lab[:, None], torch.full_like(ce[:, None], -w_ce))
            g = (g / max(n, 1)).to(h.dtype)
            grad_h[lo : lo + chunk] = g @ w
            grad_w += g.T @ h
            kl_sum += kl.double().sum()
            ce_sum += ce.double().sum()
            total += (w_kl * kl.double() + w_ce * ce.double()).sum() / max(n, 1)
        ctx.save_for_backward(grad_h, grad_w)
        kl_mean, ce_mean = kl_sum / max(n, 1), ce_sum / max(n, 1)
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return total.to(hidden.dtype), kl_mean, ce_mean

    @staticmethod
    def backward(ctx, g, *_):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g, grad_w * g, None, None, None, None, None, None, None


def full_kl_loss(
    hidden: Tensor,
    weight: Tensor,
    t_hidden: Tensor,
    t_weight: Tensor,
    labels: Tensor,
    weights: LossWeights,
    chunk: int = 1024,
    timer: list[float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``mean_rows(w_kl KL(p || q) + w_ce CE)`` over the full vocab; p from the teacher's rows.

    ``hidden`` [n, H] and ``weight`` [V, H]: the student's rows and LM head (gradients flow to
    both); ``t_hidden`` [n, H'] and ``t_weight`` [V, H']: the teacher's. Only
    ``weights.forward_kl`` and ``weights.ce`` are used (temperature 1).
    """
    w_kl, w_ce = float(weights.forward_kl), float(weights.ce)
    total, kl, ce = _FullKL.apply(
        hidden, weight, t_hidden, t_weight, labels, w_kl, w_ce, int(chunk), timer or [0.0]
    )
    terms = {"forward_kl": kl} if w_kl > 0 else {}
    if w_ce > 0:
        terms["ce"] = ce
    return total, terms


@dataclasses.dataclass
class OnlineStats:
    """What :func:`online_kd` measured: teacher seconds (body + head) and loss calls."""

    teacher_seconds: float = 0.0
    calls: int = 0


def online_kd(teacher: Any, chunk: int) -> tuple[dtrain.Components, OnlineStats]:
    """What makes ``distill.student.train.train`` distill from the live teacher's full
    distribution: its components (``train(job, components)``) and what they measure.

    The body is the loop's ``StudentBody`` that also runs the teacher on each batch (no grad)
    and keeps its final hidden states at the target positions; the loss is
    :func:`full_kl_loss` on them (the stored sparse targets of the shard set are ignored).
    Single process only.
    """
    stats = OnlineStats()
    pending: list[Tensor] = []
    t_weight = teacher.get_output_embeddings().weight

    class TeacherAndStudentBody(dtrain.StudentBody):
        def forward(self, batch: Any) -> Tensor:
            hidden = super().forward(batch)
            t0 = time.perf_counter()
            with torch.no_grad():
                t_h = teacher.base_model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    use_cache=False,
                ).last_hidden_state
                pending.append(t_h[batch.target_mask])
            stats.teacher_seconds += time.perf_counter() - t0
            return hidden

    def loss(
        hidden: Tensor,
        weight: Tensor,
        t_ids: Tensor,
        t_logprobs: Tensor,
        labels: Tensor,
        weights: LossWeights,
        chunk: int = chunk,
        tail: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if len(pending) != 1:
            raise RuntimeError("online_kd: expected one teacher batch per loss call")
        t_rows = pending.pop()
        if t_rows.shape[0] != hidden.shape[0]:
            raise RuntimeError("online_kd: teacher and student target rows differ")
        stats.calls += 1
        timer = [0.0]  # the teacher's head inside the loss
        out = full_kl_loss(hidden, weight, t_rows, t_weight, labels, weights, chunk, timer)
        stats.teacher_seconds += timer[0]
        return out

    return dtrain.Components(body=TeacherAndStudentBody, loss=loss), stats


# --------------------------------------------------------------------------------------------
# Held-out evaluation against the teacher's full distribution
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HeldOut:
    """Held-out batches with the teacher's final hidden states at their target positions."""

    batches: list[tuple[Tensor, Tensor, Tensor]]  # (input ids, attention mask, target mask)
    teacher_rows: list[Tensor]  # [n_b, H] per batch
    labels: list[Tensor]  # [n_b] ground-truth next tokens
    teacher_weight: Tensor  # [V, H]

    @property
    def positions(self) -> int:
        return sum(int(x.shape[0]) for x in self.labels)


@torch.no_grad()
def build_heldout(teacher: Any, samples: Sequence[Sample], batch_tokens: int) -> HeldOut:
    """Run the teacher once over the held-out samples (token-budget batches, as the pass)."""
    device = next(teacher.parameters()).device
    out = HeldOut([], [], [], teacher.get_output_embeddings().weight)
    for batch in token_budget_batches([len(s.input_ids) for s in samples], batch_tokens):
        ids, attn = pad_batch([samples[i].input_ids for i in batch], pad_id=0)
        tmask = torch.zeros(ids.shape, dtype=torch.bool)
        for b, i in enumerate(batch):
            m = samples[i].loss_mask
            tmask[b, : len(m) - 1] = torch.from_numpy(m[1:].astype(bool))
        ids, attn, tmask = ids.to(device), attn.to(device), tmask.to(device)
        hidden = teacher.base_model(
            input_ids=ids, attention_mask=attn, use_cache=False
        ).last_hidden_state
        labels = torch.zeros_like(ids)
        labels[:, :-1] = ids[:, 1:]
        out.batches.append((ids, attn, tmask))
        out.teacher_rows.append(hidden[tmask])
        out.labels.append(labels[tmask])
    return out


@torch.no_grad()
def evaluate_full(student: Any | None, held: HeldOut, chunk: int = 512) -> dict[str, float]:
    """Held-out metrics of ``student`` (None: the teacher against itself) over all positions."""
    acc = HeldOutMetrics()
    if student is not None:
        student.eval()
        s_weight = student.get_output_embeddings().weight
    for (ids, attn, tmask), t_rows, labels in zip(
        held.batches, held.teacher_rows, held.labels, strict=True
    ):
        if student is not None:
            s_rows = student.base_model(
                input_ids=ids, attention_mask=attn, use_cache=False
            ).last_hidden_state[tmask]
        for lo in range(0, labels.shape[0], chunk):
            t_logits = t_rows[lo : lo + chunk] @ held.teacher_weight.T
            s_logits = t_logits if student is None else s_rows[lo : lo + chunk] @ s_weight.T
            acc.add(s_logits, t_logits, labels[lo : lo + chunk])
    return acc.result()


# --------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Arm:
    """One training configuration; ``targets`` is None for the arms that store nothing."""

    name: str
    targets: dict[str, Any] | None
    loss: dict[str, float]
    online: bool = False


ARM_FORMS = (
    "ce-only",
    "full-online",
    "topk-K",
    "sample-N (iid draws)",
    "sample-N-sys (systematic draws)",
    "topkK+sample-N[-sys] (exact top-K head + N tail draws)",
)
DEFAULT_ARMS = "ce-only,topk-8,topk-64,sample-50,sample-50-sys,full-online"


def parse_arm(name: str, ce_mix: float) -> Arm:
    """An arm from its name (one of ``ARM_FORMS``); every KD arm gets the same loss weights."""
    kd = {"forward_kl": 1.0 - ce_mix, "ce": ce_mix}
    if name == "ce-only":
        return Arm(name, None, {"forward_kl": 0.0, "ce": 1.0})
    if name == "full-online":
        return Arm(name, None, kd, online=True)
    if m := re.fullmatch(r"topk-(\d+)", name):
        return Arm(name, {"kind": "topk", "k": int(m[1])}, kd)
    if m := re.fullmatch(r"(?:topk(\d+)\+)?sample-(\d+)(-sys)?", name):
        t: dict[str, Any] = {"kind": "sample", "draws": int(m[2])}
        if m[1]:
            t = {**t, "kind": "topk+sample", "k": int(m[1])}
        return Arm(name, {**t, "sampling": "systematic" if m[3] else "iid"}, kd)
    raise ValueError(f"unknown arm {name!r} (forms: {', '.join(ARM_FORMS)})")


def make_arms(names: Sequence[str], ce_mix: float) -> list[Arm]:
    """The arms, in the given order (names as in ``ARM_FORMS``)."""
    return [parse_arm(n.strip(), ce_mix) for n in names if n.strip()]


def base_job(args: argparse.Namespace, init_dir: Path) -> dict[str, Any]:
    """The job table shared by every arm (targets, output, run_dir and loss are filled in)."""
    return {
        "job": {"name": "quality", "seed": args.seed},
        "teacher": {
            "model": args.model,
            "dtype": args.teacher_dtype,
            "device": args.device,
            "batch_tokens": args.batch_tokens,
            "samples_per_shard": 128,
        },
        "data": {
            "train": str(args.train_data),
            "max_length": args.max_length,
            "truncation": "right",
            "max_samples": args.train_samples,
        },
        # the defaults' packed v2 blocks with zstd ("values" only when not the default: the
        # teacher passes' cache key stays that of earlier runs)
        "targets": {
            "codec": "packed",
            **({"values": args.values} if args.values != "log8" else {}),
        },
        "student": {"init": "pretrained", "model": str(init_dir)},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup,
            "checkpoint_every": max(args.steps, 1),
            "device": args.device,
            "cache_dir": str(args.workdir / "cache"),
        },
    }


def arm_job(base: dict[str, Any], arm: Arm, targets: dict[str, Any], workdir: Path) -> Job:
    """The arm's job: its target kind (or the shared shard set), run_dir and loss weights."""
    raw = json.loads(json.dumps(base))
    raw["targets"].update(targets)
    # one shard set per distinct teacher setting: rerunning with the same --workdir reuses it
    tag = hashlib.sha256(
        json.dumps(
            [raw["job"], raw["teacher"], raw["data"], raw["targets"]], sort_keys=True
        ).encode()
    ).hexdigest()[:10]
    t = raw["targets"]
    label = "-".join(str(t[k]) for k in ("kind", "k", "draws", "sampling") if k in t)
    label = label.replace("+", "_")
    raw["job"]["output"] = str(workdir / "targets" / f"{label}-{tag}")
    raw["train"]["run_dir"] = str(workdir / "runs" / arm.name)
    raw["loss"] = dict(arm.loss)
    return job_from_dict(raw, src=f"quality:{arm.name}")


def payload_bytes(shard_dir: Path) -> int:
    """Bytes of the shards' members alone (no tar headers, block padding or end records)."""
    total = 0
    for path in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(path) as tf:
            total += sum(m.size for m in tf.getmembers())
    return total


def machine_line(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    if device.startswith("cuda"):
        cpu += f", {torch.cuda.get_device_name()}"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {device}"
    )


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Teacher passes, training of every arm, held-out evaluation; one row per arm."""
    device = models.pick_device(args.device)
    teacher_dir = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(teacher_dir)
    init_dir = args.workdir / f"student-init-{args.layers}-{args.layer_selection}"
    if not (init_dir / "config.json").is_file():
        from distill.student.init import init_from_teacher_layers

        log(f"student: {args.layers} teacher layers ({args.layer_selection}) -> {init_dir}")
        init_from_teacher_layers(teacher_dir, args.layers, init_dir, args.layer_selection)
    arms = make_arms(args.arms, args.ce_mix)
    base = base_job(args, init_dir)

    # 1. one teacher pass per sparse kind (the first one also feeds ce-only and full-online)
    jobs: dict[str, Job] = {}
    passes: dict[str, dict[str, float]] = {}
    for arm in arms:
        if arm.targets is None:
            continue
        job = arm_job(base, arm, arm.targets, args.workdir)
        log(f"[teacher] {arm.name} -> {job.output}")
        m = run_teacher(job)["train"]
        jobs[arm.name] = job
        passes[arm.name] = {
            "bytes_per_token": m.nbytes / max(m.target_tokens, 1),
            "payload_bytes_per_token": payload_bytes(Path(job.output) / "train")
            / max(m.target_tokens, 1),
            "teacher_seconds": m.teacher_seconds,
            "train_positions": float(m.target_tokens),
            "train_tokens": float(m.tokens),
            "train_samples": float(m.samples),
        }
    # ce-only and full-online read the first sparse kind's shard set (only its tokens)
    shared_targets = next(a.targets for a in arms if a.targets is not None)

    # 2. the teacher in memory: held-out rows and the online arm
    teacher = models.load_model(teacher_dir, args.teacher_dtype, device).eval()
    teacher.requires_grad_(False)
    eval_samples = tokenize_file(
        args.eval_data, tokenizer, args.max_length, "right", args.eval_samples
    )
    t0 = time.perf_counter()
    held = build_heldout(teacher, eval_samples, args.batch_tokens)
    log(
        f"[held-out] {len(eval_samples)} samples, {held.positions} positions "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    reference = {
        "teacher": evaluate_full(None, held, args.eval_chunk),
        "init": evaluate_full(
            models.load_model(init_dir, "float32", device), held, args.eval_chunk
        ),
    }

    # 3. train and evaluate each arm
    vocab = models.vocab_size(teacher)
    rows: list[dict[str, Any]] = []
    for i, arm in enumerate(arms, 1):
        job = jobs.get(arm.name) or arm_job(base, arm, shared_targets, args.workdir)
        shutil.rmtree(dtrain.run_dir(job), ignore_errors=True)  # a fresh run, never a resume
        log(f"[train {i}/{len(arms)}] {arm.name}: {job.loss.active()}")
        components, stats = online_kd(teacher, job.train.loss_chunk) if arm.online else (None, None)
        summary = dtrain.train(job, components)
        if arm.online and (stats is None or stats.calls == 0):
            raise RuntimeError("online_kd: distill.student.train.train never called its loss")
        student = models.load_model(Path(summary["student_dir"]), "float32", device)
        metrics = evaluate_full(student, held, args.eval_chunk)
        del student
        (dtrain.run_dir(job) / dtrain.CHECKPOINT).unlink(missing_ok=True)
        if arm.targets is not None:
            info = passes[arm.name]
        elif arm.online:
            dense = 2.0 * vocab
            info = {
                "bytes_per_token": dense,
                "payload_bytes_per_token": dense,
                "teacher_seconds": stats.teacher_seconds,
            }
        else:
            info = {"bytes_per_token": 0.0, "payload_bytes_per_token": 0.0, "teacher_seconds": 0.0}
        rows.append(
            {
                "target": arm.name,
                "bytes_per_token": info["bytes_per_token"],
                "payload_bytes_per_token": info["payload_bytes_per_token"],
                **metrics,
                "teacher_seconds": info["teacher_seconds"],
                "train_seconds": summary["seconds"],
                "train_tokens_per_s": summary["tokens_per_s"],
                "final_train_loss": summary["final_loss"],
                "targets": arm.targets or ({"kind": "full"} if arm.online else {"kind": "none"}),
                "loss": arm.loss,
            }
        )
        log(
            f"  KL {metrics['heldout_kl']:.4f}  CE {metrics['heldout_ce']:.4f}  "
            f"top-1 {metrics['top1_agreement']:.3f}  ECE {metrics['ece']:.4f}  "
            f"({summary['seconds']:.0f}s)"
        )
    by = {r["target"]: r for r in rows}
    nan = float("nan")
    kl_ce = by["ce-only"]["heldout_kl"] if "ce-only" in by else nan
    kl_full = by["full-online"]["heldout_kl"] if "full-online" in by else nan
    settings = {
        "model": args.model,
        "teacher_dtype": args.teacher_dtype,
        "student_layers": args.layers,
        "layer_selection": args.layer_selection,
        "train_samples": int(next(iter(passes.values()))["train_samples"]),
        "train_positions": int(next(iter(passes.values()))["train_positions"]),
        "train_tokens": int(next(iter(passes.values()))["train_tokens"]),
        "eval_samples": len(eval_samples),
        "eval_positions": held.positions,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "seed": args.seed,
        "max_length": args.max_length,
        "codec": f"packed v2 {args.values}",
        "ce_mix": args.ce_mix,
        "machine": machine_line(device),
    }
    for r in rows:
        r["gap_closed"] = gap_closed(kl_ce, r["heldout_kl"], kl_full)
        r["settings"] = settings
    report(rows, reference, settings)
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt_bytes(b: float) -> str:
    return f"{b:,.1f}" if b < 1000 else f"{b:,.0f}"


def report(
    rows: list[dict[str, Any]], reference: dict[str, dict[str, float]], s: dict[str, Any]
) -> None:
    """Print the table, the gap closed per arm and the issue's target check."""
    print()
    print(
        f"quality: {s['model']} ({s['teacher_dtype']}) -> {s['student_layers']}-layer student "
        f"({s['layer_selection']}); {s['train_samples']} train samples "
        f"({s['train_positions']:,} positions), {s['steps']} steps x {s['batch_size']}, "
        f"lr {s['lr']:g}, seed {s['seed']}; held-out {s['eval_samples']} samples "
        f"({s['eval_positions']:,} positions); codec {s['codec']}; KD weights forward_kl "
        f"{1 - s['ce_mix']:g}, ce {s['ce_mix']:g}"
    )
    print(f"machine: {s['machine']}")
    print()
    head = (
        f"{'target':<13}{'bytes/tok':>11}{'payload':>9}{'teacher s':>11}{'train s':>9}"
        f"{'KL':>9}{'CE':>9}{'top-1':>8}{'ECE':>8}{'gap closed':>12}"
    )
    print(head)
    print("-" * len(head))
    for name in ("init", "teacher"):
        m = reference[name]
        print(
            f"{'(' + name + ')':<13}{'':>40}{m['heldout_kl']:>9.4f}"
            f"{m['heldout_ce']:>9.4f}{m['top1_agreement']:>8.3f}{m['ece']:>8.4f}"
        )
    for r in rows:
        gap = r["gap_closed"]
        print(
            f"{r['target']:<13}{fmt_bytes(r['bytes_per_token']):>11}"
            f"{fmt_bytes(r['payload_bytes_per_token']):>9}"
            f"{r['teacher_seconds']:>11.1f}{r['train_seconds']:>9.0f}{r['heldout_kl']:>9.4f}"
            f"{r['heldout_ce']:>9.4f}{r['top1_agreement']:>8.3f}{r['ece']:>8.4f}"
            f"{'n/a' if math.isnan(gap) else f'{gap:.1%}':>12}"
        )
    print()
    print(
        "bytes/tok: shard bytes per target position, from the manifest; payload: the members' "
        "bytes alone, without tar headers and padding (full-online: a dense float16 store's "
        "2 x vocab; nothing is stored online). teacher s: the pass (full-online: teacher "
        "compute during training). KL: full-vocab KL(teacher || student); CE: on the "
        "ground-truth token; top-1: agreement with the teacher's argmax; ECE: 15 bins."
    )
    sparse = [r for r in rows if r["target"] not in ("ce-only", "full-online")]
    print()
    for r in sparse:
        print(
            f"gap closed by {r['target']}: {r['gap_closed']:.1%} at "
            f"{fmt_bytes(r['bytes_per_token'])} bytes/token "
            f"({fmt_bytes(r['payload_bytes_per_token'])} payload)"
        )
    for key, what in (("bytes_per_token", "shard bytes"), ("payload_bytes_per_token", "payload")):
        ok = [r["target"] for r in sparse if r["gap_closed"] >= 0.95 and r[key] <= 40]
        print(
            f"issue #4 target (>= 95% of the gap at <= 40 bytes/token, {what}): "
            f"met by {', '.join(ok) if ok else 'none'}"
        )


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Bars of held-out KL per arm, annotated with bytes per token and the gap closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    names = [r["target"] for r in rows]
    kls = [r["heldout_kl"] for r in rows]
    colors = [
        "#999999" if n == "ce-only" else "#2b7bba" if n == "full-online" else "#e6862e"
        for n in names
    ]
    bars = ax.bar(names, kls, color=colors)
    for bar, r in zip(bars, rows, strict=True):
        b = r["bytes_per_token"]
        payload = fmt_bytes(r["payload_bytes_per_token"])
        label = "0 B/tok" if b == 0 else f"{fmt_bytes(b)} B/tok\n({payload} payload)"
        if r["target"] == "full-online":
            label = f"online\n(dense fp16 {fmt_bytes(b)} B/tok)"
        elif not math.isnan(r["gap_closed"]) and r["target"] != "ce-only":
            label += f"\n{r['gap_closed']:.1%} of gap"
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_ylabel("held-out KL(teacher || student), full vocab")
    ax.set_ylim(0, max(kls) * 1.25)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke run (32/16 samples, 10 steps of 2)"
    )
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--train-data", type=Path, default=ROOT / "data/demo/train.jsonl")
    p.add_argument("--eval-data", type=Path, default=ROOT / "data/demo/eval.jsonl")
    p.add_argument("--train-samples", type=int, help="first N train samples (0 = all) [0]")
    p.add_argument("--eval-samples", type=int, help="first N held-out samples (0 = all) [0]")
    p.add_argument("--steps", type=int, help="optimizer steps per arm [200]")
    p.add_argument("--batch-size", type=int, help="samples per step [8]")
    p.add_argument("--warmup", type=int, help="warmup steps [10]")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0, help="data order (job.seed)")
    p.add_argument("--layers", type=int, default=8, help="student layers taken from the teacher")
    p.add_argument("--layer-selection", default="ends", choices=("ends", "spaced"))
    p.add_argument("--max-length", type=int, default=384, help="tokens per sample (truncation)")
    p.add_argument(
        "--arms",
        default=DEFAULT_ARMS,
        help=f"comma-separated arms, in order; forms: {'; '.join(ARM_FORMS)} [{DEFAULT_ARMS}]",
    )
    p.add_argument("--ce-mix", type=float, default=0.0, help="CE weight of every KD arm")
    p.add_argument(
        "--values",
        default="log8",
        choices=VALUE_MAPS,
        help="packed v2 value map of exact entries (f16: float16, as npz stored) [log8]",
    )
    p.add_argument(
        "--teacher-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="float32: CPUs without native bf16 run a bf16 teacher ~10x slower [float32]",
    )
    p.add_argument("--batch-tokens", type=int, default=4096, help="teacher padded tokens/batch")
    p.add_argument("--eval-chunk", type=int, default=512, help="held-out rows per LM-head chunk")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument(
        "--workdir",
        type=Path,
        help="shards, students, runs (kept; shard sets are reused on a rerun) [a temp dir]",
    )
    p.add_argument("--plot", type=Path, default=ROOT / "bench/results/quality.png")
    p.add_argument("--json", type=Path, default=None, help="write one row per arm here")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        make_arms(args.arms.split(","), 0.0)
    except ValueError as e:
        p.error(str(e))
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not any(parse_arm(a, 0.0).targets for a in args.arms):
        p.error("--arms needs at least one sparse arm (its shard set feeds ce-only/full-online)")
    if not 0.0 <= args.ce_mix < 1.0:
        p.error("--ce-mix must be in [0, 1)")
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            args.workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quality-")))
        args.workdir = args.workdir.resolve()
        args.workdir.mkdir(parents=True, exist_ok=True)
        rows = run(args)
    s = rows[0]["settings"]
    title = (
        f"{s['student_layers']}-layer student, {s['steps']} steps x {s['batch_size']}, "
        f"{s['train_samples']} train / {s['eval_samples']} held-out samples"
    )
    print(f"\nplot: {plot(rows, args.plot, title)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        clean = [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            for r in rows
        ]
        args.json.write_text(json.dumps(clean, indent=1) + "\n")
        print(f"wrote {args.json}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
