"""Distillation losses on sparse teacher targets, computed in token chunks.

The terms themselves (forward/reverse KL, JSD, TVD on the stored support plus a tail bucket,
BiLD, CE; temperature, padding, sampled targets) are defined once in
:mod:`distill.student.terms`. Here: the reference path that derives them from full logits
with autograd (:func:`sparse_distill_terms`), and :func:`chunked_distill_loss`, which applies
the LM head and the loss one chunk of rows at a time and takes the gradient chunk by chunk,
so the step's peak memory is O(chunk x vocab), not O(rows x vocab). It runs the fused kernel
(:mod:`distill.student.kd_kernel`) where that applies, else the reference path.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from distill.config import TERMS, LossWeights
from distill.errors import DistillError
from distill.student import kd_kernel
from distill.student.terms import BUCKET_TERMS, bucket_terms


def sparse_distill_terms(
    logits: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    labels: Tensor,
    names: Collection[str],
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    bild_top: int = 8,
    tail: bool = True,
) -> dict[str, Tensor]:
    """Per-row values [n] of the named terms (a subset of ``TERMS``) from full logits [n, V].

    No ``tau**2`` factor is applied here. Only the named terms are computed. ``tail=False``:
    sampled targets, the teacher's tail bucket is 0 (see the module docstring).
    """
    unknown = set(names) - set(TERMS)
    if unknown:
        raise DistillError(f"unknown loss terms {sorted(unknown)}; known: {', '.join(TERMS)}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    tau = float(temperature)
    z = logits if tau == 1.0 else logits / tau
    t_lp = t_logprobs.to(logits.dtype)
    present = t_lp > float("-inf")  # -inf: padding of a variable-width row
    padded = not bool(present.all())
    if padded:  # padding repeats the row's first id: exclude it like S from q_tail
        t_ids = torch.where(present, t_ids, t_ids[:, :1])
    a_s = a_t = a_l = x_s = None
    lse = None
    if "ce" in names:
        lse = torch.logsumexp(logits, dim=-1)
        a_l = logits.gather(1, labels[:, None]).squeeze(1) - lse
    if BUCKET_TERMS.intersection(names) or "bild" in names:
        x_s = z.gather(1, t_ids)
    if BUCKET_TERMS.intersection(names):
        lse_z = lse if (tau == 1.0 and lse is not None) else torch.logsumexp(z, dim=-1)
        s = x_s.masked_fill(~present, float("-inf")) if padded else x_s
        a_s = s - lse_z[:, None]
        a_t = torch.logsumexp(z.scatter(1, t_ids, float("-inf")), dim=-1) - lse_z
    return bucket_terms(
        a_s, a_t, a_l, x_s, t_lp, names, tau, jsd_beta, bild_top, tail=tail, padded=padded
    )


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Loss and its gradients w.r.t. hidden rows and the LM-head weight, chunk by chunk.

    ``coefs`` is ((name, factor), ...): the total is ``sum factor * mean(term)``; a factor may
    be 0 for a term that is only reported. Outputs: total, then one detached mean per term.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden,
        weight,
        t_ids,
        t_logprobs,
        labels,
        coefs: tuple[tuple[str, float], ...],
        opts: tuple[float, float, int, bool],
        chunk: int,
    ):
        temperature, jsd_beta, bild_top, tail = opts
        names = [name for name, _ in coefs]
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        total = hidden.new_zeros((), dtype=acc)
        sums = [hidden.new_zeros((), dtype=acc) for _ in coefs]
        w = weight.detach().requires_grad_(weight.requires_grad)
        for lo in range(0, n, chunk):
            h = hidden[lo : lo + chunk].detach().requires_grad_()
            with torch.enable_grad():
                terms = sparse_distill_terms(
                    h @ w.T,
                    t_ids[lo : lo + chunk],
                    t_logprobs[lo : lo + chunk],
                    labels[lo : lo + chunk],
                    names,
                    temperature,
                    jsd_beta,
                    bild_top,
                    tail,
                )
                loss = sum(c * terms[name].sum() for name, c in coefs) / n
            inputs = [h, w] if weight.requires_grad else [h]
            grads = torch.autograd.grad(loss, inputs)
            grad_h[lo : lo + chunk] = grads[0]
            if grad_w is not None:
                grad_w += grads[1]
            total += loss.detach()
            for s, name in zip(sums, names, strict=True):
                s += terms[name].detach().sum()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_grad_w = grad_w is not None
        means = [s / max(n, 1) for s in sums]
        ctx.mark_non_differentiable(*means)
        return (total, *means)

    @staticmethod
    def backward(ctx, g, *_grads_of_means):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * g.to(grad_h.dtype),
            grad_w * g.to(grad_w.dtype) if ctx.has_grad_w else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def lm_head_loss(hidden, weight, t_ids, t_logprobs, labels, coefs, opts, chunk):
    """``_ChunkedLMHeadLoss.apply``, or the same loss with a hand-written single-buffer gradient
    (distill/student/kd_kernel.py) where that applies. ``coefs`` ((name, factor), ...) and
    ``opts`` (temperature, jsd_beta, bild_top, tail) as :class:`_ChunkedLMHeadLoss` takes them:
    the total, then one detached row mean per term."""
    args = (hidden, weight, t_ids, t_logprobs, labels, coefs, opts, chunk)
    if kd_kernel.supports(hidden, weight, coefs):
        return kd_kernel.FusedLMHeadLoss.apply(*args)
    return _ChunkedLMHeadLoss.apply(*args)


def chunked_distill_loss(
    hidden: Tensor,
    weight: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    labels: Tensor,
    weights: LossWeights,
    chunk: int = 1024,
    tail: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, per-term means) over rows; ``total`` backpropagates to ``hidden`` and ``weight``.

    ``tail`` is the shard set's ``manifest.tail``: False for sampled targets (no tail bucket).

    ``total = mean_rows(tau**2 * sum_KD w_t term_t + w_ce ce)``. The dict holds the detached
    row means of exactly the terms with weight > 0 (keys from ``TERMS``), unscaled by
    ``tau**2`` and at temperature ``tau``. hidden [n, H] student hidden states at target
    positions; weight [V, H] the LM head; t_ids/t_logprobs [n, k] the teacher's sparse targets;
    labels [n] the ground-truth tokens.
    """
    if not isinstance(weights, LossWeights):
        raise DistillError(f"weights must be a LossWeights, got {type(weights).__name__}")
    if int(chunk) < 1:
        raise DistillError(f"chunk must be >= 1, got {chunk!r}")
    if weights.bild > 0 and weights.bild_top > t_ids.shape[-1]:
        raise DistillError(
            f"LossWeights.bild_top={weights.bild_top} exceeds the {t_ids.shape[-1]} stored "
            "teacher ids per token"
        )
    if not tail and weights.reverse_kl > 0:
        raise DistillError(
            "LossWeights.reverse_kl needs a tail bucket: against sampled targets (tail=False) "
            "KL(q || p_hat) is infinite off the sampled ids"
        )
    coefs = tuple(weights.coefficients().items())
    opts = (float(weights.temperature), float(weights.jsd_beta), int(weights.bild_top), bool(tail))
    total, *means = lm_head_loss(
        hidden, weight, t_ids.long(), t_logprobs, labels.long(), coefs, opts, int(chunk)
    )
    return total, {name: m for (name, _), m in zip(coefs, means, strict=True)}


@torch.no_grad()
def eval_metrics(
    hidden: Tensor,
    weight: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    labels: Tensor,
    chunk: int = 1024,
    weights: LossWeights | None = None,
    tail: bool = True,
) -> dict[str, float]:
    """Summed KD, CE and teacher top-1 agreement over rows (divide by ``rows`` for means).

    ``kd`` is the forward KL at temperature 1. With ``weights``, also the sums of each term
    with weight > 0 (at ``weights.temperature``, unscaled, keyed by name) and ``loss``, the
    sum of the per-row total that ``chunked_distill_loss`` averages.
    """
    extra: Sequence[str] = list(weights.active()) if weights is not None else []
    coefs = weights.coefficients() if weights is not None else {}
    sums = dict.fromkeys(["kd", "ce", *extra, *(["loss"] if weights is not None else [])], 0.0)
    # at temperature 1 the base terms and the weighted ones come from a single pass
    merged = weights is None or weights.temperature == 1.0
    hyper = (weights.jsd_beta, weights.bild_top) if weights is not None else (0.5, 1)
    agree = 0.0
    t_ids = t_ids.long()
    for lo in range(0, hidden.shape[0], chunk):
        logits = hidden[lo : lo + chunk] @ weight.T
        args = (logits, t_ids[lo : lo + chunk], t_logprobs[lo : lo + chunk])
        lab = labels[lo : lo + chunk].long()
        base = sparse_distill_terms(
            *args, lab, {"forward_kl", "ce", *(extra if merged else [])}, 1.0, *hyper, tail
        )
        sums["kd"] += float(base["forward_kl"].sum())
        sums["ce"] += float(base["ce"].sum())
        if weights is not None:
            terms = base
            if not merged:
                terms = sparse_distill_terms(
                    *args,
                    lab,
                    extra,
                    weights.temperature,
                    weights.jsd_beta,
                    weights.bild_top,
                    tail,
                )
            for name in extra:
                if name != "ce":  # CE is untempered: already summed above
                    sums[name] += float(terms[name].sum())
            sums["loss"] += float(sum(c * terms[name].sum() for name, c in coefs.items()))
        best = t_logprobs[lo : lo + chunk].float().argmax(-1, keepdim=True)
        top1 = t_ids[lo : lo + chunk].gather(1, best).squeeze(1)
        agree += float((logits.argmax(-1) == top1).sum())
    return {**sums, "agree": agree, "rows": float(hidden.shape[0])}
