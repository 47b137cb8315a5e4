"""The cross-tokenizer step's loss: ``ce * CE(the student's own tokens) + alm * ALM +
tau**2 * xkl * mean(projected KL)`` over an :class:`~distill.student.xtok_data.XBatch`
(the terms: :mod:`distill.student.xtok_terms`)."""

from __future__ import annotations

from torch import Tensor

from distill.config import LossWeights
from distill.student.xtok_data import XBatch
from distill.student.xtok_terms import alm_from_row_logprobs, label_logprobs, projected_kl


def xtok_loss(
    hidden: Tensor,
    weight: Tensor,
    batch: XBatch,
    weights: LossWeights,
    vmap: Tensor,
    chunk: int = 1024,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, the detached value of each term with weight > 0). hidden [B, T, H]: the
    student's last hidden states; weight [V, H]: its LM head. A term with no rows in the
    batch (no CE row, no complete chunk, no exact pair) is 0."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    zero = flat.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph when no term has rows
    total, terms = zero, {}
    rows = flat[batch.ce_index]
    if weights.ce > 0 or weights.alm > 0:  # one LM-head pass for both
        lp = label_logprobs(rows, weight, batch.labels, chunk)
        if weights.ce > 0:
            ce = -lp.mean() if lp.numel() else zero
            total, terms["ce"] = total + weights.ce * ce, ce.detach()
        if weights.alm > 0:
            alm = alm_from_row_logprobs(lp, batch.row_chunk, batch.chunk_lp, batch.complete)
            total, terms["alm"] = total + weights.alm * alm, alm.detach()
    if weights.xkl > 0:
        tau = float(weights.temperature)
        if batch.pair_index.numel():
            kl = projected_kl(
                flat[batch.pair_index], weight, batch.pair_ids, batch.pair_lp, vmap, tau, chunk
            ).mean()
        else:
            kl = zero
        total, terms["xkl"] = total + tau**2 * weights.xkl * kl, kl.detach()
    return total, {k: v.float() for k, v in terms.items()}
