"""KD losses on sparse teacher targets, computed in token chunks.

Forward KL with a tail bucket: the teacher's distribution is known on its stored support S
(top-k log-probs normalised over the full vocab) plus one bucket holding the rest, with mass
``p_tail = 1 - sum_S p``. The student's distribution is coarsened the same way, and

    KD = sum_{i in S} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

which is exactly KL between the two (k+1)-bucket distributions. It is mixed with cross-entropy
on the ground-truth next token: ``loss = kd_weight * KD + (1 - kd_weight) * CE``.

``chunked_kd_loss`` applies the LM head and the loss one chunk of rows at a time and takes the
gradient chunk by chunk, so the step's peak memory is O(chunk x vocab), not O(rows x vocab).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sparse_kd_terms(
    logits: Tensor, t_ids: Tensor, t_logprobs: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-row forward KL (sparse + tail) and cross-entropy from full student logits [n, V]."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    logq_s = logits.gather(1, t_ids) - lse[:, None]
    logq_tail = torch.logsumexp(logits.scatter(1, t_ids, float("-inf")), dim=-1) - lse
    t_lp = t_logprobs.to(logits.dtype)
    p = t_lp.exp()
    p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
    kd = (p * (t_lp - logq_s)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * logq_tail
    ce = lse - logits.gather(1, labels[:, None]).squeeze(1)
    return kd, ce


class _ChunkedLMHeadKD(torch.autograd.Function):
    """Loss and its gradients w.r.t. hidden rows and the LM-head weight, chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden, weight, t_ids, t_logprobs, labels, kd_weight: float, chunk: int
    ):
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        total, kd_sum, ce_sum = (hidden.new_zeros((), dtype=acc) for _ in range(3))
        w = weight.detach().requires_grad_(weight.requires_grad)
        for lo in range(0, n, chunk):
            h = hidden[lo : lo + chunk].detach().requires_grad_()
            with torch.enable_grad():
                kd, ce = sparse_kd_terms(
                    h @ w.T,
                    t_ids[lo : lo + chunk],
                    t_logprobs[lo : lo + chunk],
                    labels[lo : lo + chunk],
                )
                loss = (kd_weight * kd.sum() + (1.0 - kd_weight) * ce.sum()) / n
            inputs = [h, w] if weight.requires_grad else [h]
            grads = torch.autograd.grad(loss, inputs)
            grad_h[lo : lo + chunk] = grads[0]
            if grad_w is not None:
                grad_w += grads[1]
            total += loss.detach()
            kd_sum += kd.detach().sum()
            ce_sum += ce.detach().sum()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_grad_w = grad_w is not None
        kd_mean, ce_mean = kd_sum / max(n, 1), ce_sum / max(n, 1)
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return total, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, g, _g_kd, _g_ce):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * g.to(grad_h.dtype),
            grad_w * g.to(grad_w.dtype) if ctx.has_grad_w else None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    labels: Tensor,
    kd_weight: float = 0.9,
    chunk: int = 1024,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mean KD, mean CE) over rows; ``loss`` backpropagates to ``hidden`` and ``weight``.

    hidden [n, H] student hidden states at target positions; weight [V, H] the LM head;
    t_ids/t_logprobs [n, k] the teacher's sparse targets; labels [n] the ground-truth tokens.
    """
    return _ChunkedLMHeadKD.apply(
        hidden, weight, t_ids.long(), t_logprobs, labels.long(), float(kd_weight), int(chunk)
    )


@torch.no_grad()
def eval_metrics(
    hidden: Tensor,
    weight: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    labels: Tensor,
    chunk: int = 1024,
) -> dict[str, float]:
    """Summed KD, CE and teacher top-1 agreement over rows (divide by ``rows`` for means)."""
    kd_sum = ce_sum = agree = 0.0
    t_ids = t_ids.long()
    for lo in range(0, hidden.shape[0], chunk):
        logits = hidden[lo : lo + chunk] @ weight.T
        kd, ce = sparse_kd_terms(
            logits,
            t_ids[lo : lo + chunk],
            t_logprobs[lo : lo + chunk],
            labels[lo : lo + chunk].long(),
        )
        kd_sum += float(kd.sum())
        ce_sum += float(ce.sum())
        best = t_logprobs[lo : lo + chunk].float().argmax(-1, keepdim=True)
        top1 = t_ids[lo : lo + chunk].gather(1, best).squeeze(1)
        agree += float((logits.argmax(-1) == top1).sum())
    return {"kd": kd_sum, "ce": ce_sum, "agree": agree, "rows": float(hidden.shape[0])}
