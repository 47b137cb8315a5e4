"""Test-only loss helpers (not product API): the original forward-KL + CE mix."""

from __future__ import annotations

from torch import Tensor

from distill.student.losses import lm_head_loss


def chunked_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    labels: Tensor,
    kd_weight: float = 0.9,
    chunk: int = 1024,
    tail: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mean KD, mean CE) over rows; ``loss`` backpropagates to ``hidden`` and ``weight``.

    ``loss = kd_weight * KD + (1 - kd_weight) * CE`` with KD the forward KL at temperature 1;
    both means are always reported, even for ``kd_weight`` 0 or 1 (a factor may be 0).
    """
    kd_weight = float(kd_weight)
    coefs = (("forward_kl", kd_weight), ("ce", 1.0 - kd_weight))
    return lm_head_loss(
        hidden,
        weight,
        t_ids.long(),
        t_logprobs,
        labels.long(),
        coefs,
        (1.0, 0.5, 1, bool(tail)),
        int(chunk),
    )
