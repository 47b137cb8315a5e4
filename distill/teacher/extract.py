"""Sparse teacher targets: what the teacher keeps of each next-token distribution.

One extraction function per kind, each taking a chunk of full-vocab logits ``[rows, V]``
and returning :class:`Extracted` (ids, values, draw counts, entries per row):

``topk``
    the ``k`` most likely ids with their log-probs normalised over the full vocab; the tail
    mass ``1 - sum p`` is implied (``tail = True``).
``topp``
    the smallest prefix of the sorted distribution whose cumulative mass is ``>= top_p``,
    capped at ``k`` entries; a variable number of entries per row, tail implied.
``sample``
    ``N = draws`` draws with replacement from the full softmax (RS-KD, "Sparse Logit
    Sampling", arXiv 2503.16870); the unique ids with their counts ``c_i``. The stored value is
    ``log(c_i / N)``: the target ``p_hat_i = c_i / N`` has ``E[p_hat] = p`` and sums to 1, so
    there is **no** tail bucket (``tail = False``) and the forward-KL gradient w.r.t. the
    student's logits, ``q - p_hat``, is an unbiased estimate of the full ``q - p``.
``topk+sample``
    an exact head H (the top ``k``, log-probs stored as in ``topk``) plus ``N`` draws from
    the renormalised tail ``p_j / (1 - P_H)`` over ``j not in H``; a sampled tail id gets
    ``log(c_j / N) + log(1 - P_H)``. ``E[c_j / N * (1 - P_H)] = p_j``, so the target is exact on
    H, unbiased on the tail, sums to 1, and has no tail bucket (``tail = False``).

``sampling`` (sampled kinds) picks the N uniforms of a row. ``iid``: N independent
uniforms (RS-KD's estimator). ``systematic``: one uniform U per row and ``u_j = (j + U) / N``
for j = 0..N-1, i.e. N evenly spaced points of the CDF (in vocab order) with a random offset.
Each ``u_j`` is still uniform on [0, 1), so ``E[c_i] = N p_i`` exactly (unbiased), but the
count of id i is always ``floor(N p_i)`` or ``ceil(N p_i)``: likely ids get their mass
almost exactly, and the variance of ``p_hat_i`` drops from ``p_i (1 - p_i) / N`` to
``f (1 - f) / N^2`` with ``f = frac(N p_i)``.

Variable-width rows (all kinds but ``topk``) are padded to the kind's fixed width with a
sentinel: the row's first id, value ``-inf`` and count 0. Every row has at least one entry,
and column 0 is always a real entry. The losses treat ``-inf`` entries as absent.

Draws are deterministic: they come from inverse-CDF sampling (float64 cumulative sums) with
uniforms from :func:`draw_uniforms`, a numpy generator seeded from ``(job.seed, sample key)``,
so a rerun on the same hardware writes the same shards (resume relies on that), whatever the
batching.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.data.dataset import Sample
from distill.errors import DistillError
from distill.format.shards import TargetSample, id_dtype
from distill.format.spec import KINDS, SAMPLING, TargetSpec
from distill.teacher.batching import pad_batch, token_budget_batches


@dataclass
class Extracted:
    """Sparse targets of ``rows`` positions, padded to a fixed width (see module docstring)."""

    ids: Tensor  # [rows, w] int64
    values: Tensor  # [rows, w] float32: log-probs (log estimates for sampled entries), -inf pad
    counts: Tensor  # [rows, w] int32: draws per id (0: exact head entry or pad)
    n: Tensor  # [rows] int32: real entries per row
    actual: Tensor | None = None  # [rows] float32: log p(the actual next token), when asked


def _pad(ids: Tensor, values: Tensor, counts: Tensor, n: Tensor) -> Extracted:
    """Set columns >= n to the sentinel (first id, -inf, 0)."""
    pad = torch.arange(ids.shape[1], device=ids.device)[None, :] >= n[:, None]
    ids = torch.where(pad, ids[:, :1], ids)
    values = values.masked_fill(pad, float("-inf"))
    return Extracted(ids, values, counts.masked_fill(pad, 0), n.int())


def topk_targets(logits: Tensor, k: int) -> Extracted:
    """The k most likely ids and their full-vocab log-probs, descending."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = torch.topk(logits, k, dim=-1)
    n = torch.full((logits.shape[0],), k, dtype=torch.int32, device=logits.device)
    return Extracted(
        top.indices, top.values - lse, torch.zeros_like(top.indices, dtype=torch.int32), n
    )


def topp_targets(logits: Tensor, top_p: float, k: int) -> Extracted:
    """The smallest descending prefix with mass >= top_p, at most k entries; padded to k."""
    t = topk_targets(logits, k)
    cum = t.values.double().exp().cumsum(-1)
    n = ((cum < top_p).sum(-1) + 1).clamp(max=k)
    return _pad(t.ids, t.values, t.counts, n)


def _draw(logits: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse-CDF draws; per row the unique ids sorted by count (desc, then id), counts, n."""
    rows, draws = uniforms.shape
    p = torch.softmax(logits.float(), dim=-1).double()
    cdf = p.cumsum(-1)
    u = uniforms.to(cdf.device, torch.float64) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[1] - 1)
    s, _ = idx.sort(dim=-1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    rank = new.long().cumsum(-1) - 1
    ids = torch.zeros_like(s).scatter_(1, rank, s)  # duplicates write the same id
    counts = torch.zeros_like(s).scatter_add_(1, rank, torch.ones_like(s))
    n = rank[:, -1] + 1
    # stable sort by count, descending: ties keep ascending id order; pads (count 0) go last
    order = torch.sort(-counts, dim=-1, stable=True).indices
    ids, counts = ids.gather(1, order), counts.gather(1, order)
    return ids, counts, n


def systematic_uniforms(uniforms: Tensor) -> Tensor:
    """``u_j = (j + U) / N`` per row from the row's first uniform U (``[rows, N]`` in and out)."""
    draws = uniforms.shape[1]
    j = torch.arange(draws, device=uniforms.device, dtype=torch.float64)
    return (j[None, :] + uniforms[:, :1].to(torch.float64)) / draws


def sample_targets(
    logits: Tensor, draws: int, uniforms: Tensor, sampling: str = "iid"
) -> Extracted:
    """N = draws draws from the full softmax: unique ids, counts, values log(count / N).

    ``uniforms`` [rows, N] in [0, 1); ``sampling = "systematic"`` uses only their first
    column (see the module docstring)."""
    if uniforms.shape != (logits.shape[0], draws):
        raise DistillError(
            f"uniforms must be [{logits.shape[0]}, {draws}], got {tuple(uniforms.shape)}"
        )
    if sampling == "systematic":
        uniforms = systematic_uniforms(uniforms)
    elif sampling != "iid":
        raise DistillError(f"sampling = {sampling!r} is not one of: {', '.join(SAMPLING)}")
    ids, counts, n = _draw(logits, uniforms)
    values = (counts.double() / draws).log().float()
    return _pad(ids, values, counts.int(), n)


def topk_sample_targets(
    logits: Tensor, k: int, draws: int, uniforms: Tensor, sampling: str = "iid"
) -> Extracted:
    """Exact top-k head plus N draws from the renormalised tail (see the module docstring)."""
    logits = logits.float()
    head = topk_targets(logits, k)
    rest = logits.scatter(1, head.ids, float("-inf"))
    log_tail = torch.logsumexp(rest, -1, keepdim=True) - torch.logsumexp(logits, -1, keepdim=True)
    t = sample_targets(rest, draws, uniforms, sampling)
    values = torch.cat([head.values, t.values + log_tail], dim=1)
    ids = torch.cat([head.ids, t.ids], dim=1)
    counts = torch.cat([head.counts, t.counts], dim=1)
    n = t.n + k
    # tail pads: the row's first (head) id, -inf, 0
    return _pad(ids, values, counts, n)


def extract_chunk(logits: Tensor, spec: TargetSpec, uniforms: Tensor | None = None) -> Extracted:
    """Dispatch on ``spec.kind`` for one chunk of full-vocab logits."""
    if spec.kind == "topk":
        return topk_targets(logits, spec.k)
    if spec.kind == "topp":
        return topp_targets(logits, spec.top_p, spec.k)
    if spec.kind not in KINDS:
        raise DistillError(f"targets.kind = {spec.kind!r} is not one of: {', '.join(KINDS)}")
    if uniforms is None:
        raise DistillError(f"targets.kind = {spec.kind!r} needs uniforms (see draw_uniforms)")
    if spec.kind == "sample":
        return sample_targets(logits, spec.draws, uniforms, spec.sampling)
    return topk_sample_targets(logits, spec.k, spec.draws, uniforms, spec.sampling)


@torch.no_grad()
def extract(
    hidden: Tensor,
    weight: Tensor,
    spec: TargetSpec,
    chunk: int,
    uniforms: Tensor | np.ndarray | None = None,
    next_ids: Tensor | None = None,
) -> Extracted:
    """Targets of ``hidden @ weight.T``, ``chunk`` rows at a time (O(chunk x vocab) memory).

    ``uniforms`` [rows, draws] in [0, 1) is needed by the sampled kinds. ``next_ids`` [rows]:
    the actual next token of each row; its log-probability comes back as ``actual``.
    """
    if isinstance(uniforms, np.ndarray):
        uniforms = torch.from_numpy(uniforms)
    parts, actual = [], []
    for lo in range(0, hidden.shape[0], chunk):
        logits = hidden[lo : lo + chunk] @ weight.T
        u = None if uniforms is None else uniforms[lo : lo + chunk].to(hidden.device)
        parts.append(extract_chunk(logits, spec, u))
        if next_ids is not None:
            actual.append(actual_logprobs(logits, next_ids[lo : lo + chunk].to(logits.device)))
    if not parts:
        w, dev = spec.width, hidden.device
        return Extracted(
            torch.zeros(0, w, dtype=torch.long, device=dev),
            torch.zeros(0, w, device=dev),
            torch.zeros(0, w, dtype=torch.int32, device=dev),
            torch.zeros(0, dtype=torch.int32, device=dev),
        )
    ids, values, counts, n = (
        torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "values", "counts", "n")
    )
    return Extracted(ids, values, counts, n, torch.cat(actual) if next_ids is not None else None)


def actual_logprobs(logits: Tensor, next_ids: Tensor) -> Tensor:
    """[rows] float32 ``log softmax(logits)[next_ids]`` (in float32, as the targets are)."""
    x = logits.float()
    return x.gather(1, next_ids.long()[:, None])[:, 0] - torch.logsumexp(x, dim=-1)


def draw_uniforms(seed: int, key: str, rows: int, draws: int) -> np.ndarray:
    """[rows, draws] float64 uniforms for one sample, a pure function of (seed, key) (the
    systematic scheme uses each row's first one)."""
    digest = hashlib.sha256(key.encode()).digest()
    words = np.frombuffer(digest[:16], dtype="<u4").tolist()
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, *words])
    return rng.random((rows, draws))


def target_rows_mask(samples: Sequence[Sample], batch: Sequence[int], shape: Any) -> Tensor:
    """[B, T] bool: position t of a batch row is a target when token t+1 is an assistant token."""
    tmask = torch.zeros(shape, dtype=torch.bool)
    for b, i in enumerate(batch):
        m = samples[i].loss_mask
        tmask[b, : len(m) - 1] = torch.from_numpy(m[1:].astype(bool))
    return tmask


@torch.no_grad()
def batch_targets(
    hidden: Tensor,
    samples: Sequence[Sample],
    batch: Sequence[int],
    weight: Tensor,
    spec: TargetSpec,
    head_chunk: int,
    seed: int,
) -> list[TargetSample]:
    """One batch's targets from its final hidden states ``[B, T, H]`` (after the last norm),
    in ``batch`` order; the LM head runs only at target rows, ``head_chunk`` rows at a time."""
    vdt = id_dtype(weight.shape[0])
    tmask = target_rows_mask(samples, batch, hidden.shape[:2])
    rows = hidden[tmask.to(hidden.device)]
    uniforms = None
    if spec.sampled:  # rows are in (sample, position) order, as the split below
        uniforms = np.concatenate(
            [draw_uniforms(seed, samples[i].key, samples[i].n_targets, spec.draws) for i in batch]
        )
    # targets.alignment (the samples carry offsets): the actual next token's log-prob too
    aligned = [samples[i].offsets is not None for i in batch]
    if any(aligned) and not all(aligned):
        raise DistillError("a batch mixes samples with and without alignment offsets")
    next_ids = None
    if aligned and aligned[0]:  # in the rows' (sample, position) order
        nxt = [samples[i].input_ids[1:][samples[i].loss_mask[1:] == 1] for i in batch]
        next_ids = torch.from_numpy(np.concatenate(nxt).astype(np.int64))
    t = extract(rows, weight, spec, head_chunk, uniforms, next_ids)
    top_ids, top_lps = t.ids.cpu().numpy(), t.values.cpu().numpy()
    actual = None if t.actual is None else t.actual.cpu().numpy().astype(np.float32)
    counts = t.counts.cpu().numpy().astype(np.uint16) if spec.sampled else None
    out, lo = [], 0
    for i in batch:
        s = samples[i]
        n = s.n_targets
        out.append(
            TargetSample(
                key=s.key,
                input_ids=s.input_ids.astype(vdt),
                loss_mask=s.loss_mask,
                target_ids=top_ids[lo : lo + n].astype(vdt),
                target_logprobs=top_lps[lo : lo + n],  # float32; npz stores float16
                target_counts=None if counts is None else counts[lo : lo + n],
                token_offsets=s.offsets,
                content_spans=s.content,
                token_logprobs=None if actual is None else actual[lo : lo + n],
            )
        )
        lo += n
    return out


def as_spec(spec: TargetSpec | int) -> TargetSpec:
    """``spec``, or top-k for an int k."""
    return TargetSpec(kind="topk", k=spec) if isinstance(spec, int) else spec


@torch.no_grad()
def compute_targets(
    model: Any,
    samples: Sequence[Sample],
    spec: TargetSpec | int,
    batch_tokens: int,
    head_chunk: int,
    on_batch: Any = None,
    seed: int = 0,
) -> list[TargetSample]:
    """Sparse targets (``spec``, or an int k for top-k) for each sample, in input order.

    Sampled kinds draw with uniforms seeded from ``(seed, sample key)``: reruns are identical.
    """
    spec = as_spec(spec)
    device = next(model.parameters()).device
    weight = model.get_output_embeddings().weight
    out: list[TargetSample | None] = [None] * len(samples)
    for batch in token_budget_batches([len(s.input_ids) for s in samples], batch_tokens):
        ids, attn = pad_batch([samples[i].input_ids for i in batch], pad_id=0)
        hidden = model.base_model(
            input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False
        ).last_hidden_state
        for i, t in zip(
            batch,
            batch_targets(hidden, samples, batch, weight, spec, head_chunk, seed),
            strict=True,
        ):
            out[i] = t
        if on_batch is not None:
            on_batch(int(attn.sum()))
    return out  # type: ignore[return-value]
