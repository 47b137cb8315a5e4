"""The loss terms on sparse teacher targets: one definition for both loss paths.

The teacher's distribution is known on its stored support S (top-k log-probs normalised over
the full vocab) plus one *tail bucket* holding the rest, with mass ``p_tail = 1 - sum_S p``
(clamped at 0). The student's softmax is coarsened the same way: ``q_i`` for ``i in S`` and
``q_tail = sum_{j not in S} q_j`` (a logsumexp over the non-S logits). Every bucket term below
is a divergence between these two (k+1)-bucket distributions ``p`` and ``q``:

    forward_kl  KL(p || q)  = sum_b p_b (log p_b - log q_b)
    reverse_kl  KL(q || p)  = sum_b q_b (log q_b - log p_b),   log p_tail -> log max(p_tail, eps)
    jsd         beta KL(p || m) + (1 - beta) KL(q || m),       m = beta p + (1 - beta) q
    tvd         0.5 sum_b |p_b - q_b|

(``eps = TAIL_EPS``: with ``p_tail = 0`` the true reverse KL is infinite whenever
``q_tail > 0``; the clamp makes it a large finite penalty instead of inf/NaN.) The JSD is the
generalized JSD of GKD (Agarwal et al. 2024, eq. 1; TRL's ``generalized_jsd_loss`` for
0 < beta < 1) with the mixture weight ``beta`` on the *teacher*: ``beta = 0.5`` is the symmetric
JSD; near 0 it behaves like ``beta * KL(p || q)``, near 1 like ``(1 - beta) * KL(q || p)``.

Plus two terms that are not bucket divergences:

    bild  BiLD's teacher-led logits-difference loss (t-LD, Li et al. 2024, arXiv 2406.13555):
          take the teacher's top ``bild_top`` stored ids in descending teacher order t_1..t_b;
          for the b(b-1)/2 pairs i < j form d^T_ij = (l^T_i - l^T_j) / tau and
          d^S_ij = (z_i - z_j) / tau; loss = KL(softmax(d^T) || softmax(d^S)) over the pairs.
          Teacher logits are only known up to a per-row constant, but the stored log-probs are
          logits minus that constant, so their differences are the logit differences.
          As in the authors' code (github.com/fpcsong/BiLD, ``bild_loss``): pairs i < j only,
          ties broken by ``topk``; bild_top = 1 has no pairs and gives 0. Only t-LD: the
          paper's BiLD = t-LD + s-LD, and s-LD needs teacher logits at the *student's* top
          tokens, which are not stored. (The authors' code has no tau**2 factor; here BiLD
          gets it like every KD term, so divide the weight by tau**2 to match it.)
    ce    cross-entropy of the (untempered) student on the ground-truth next token.

Temperature ``tau``: every KD term (all but ``ce``) uses student logits ``z / tau`` and the
teacher bucket distribution ``softmax([log p_S, log p_tail] / tau)`` (the tail treated as one
pseudo-token; at ``tau = 1`` the stored probabilities are used as they are), and is multiplied
by ``tau**2`` in the total (Hinton et al.) so gradient magnitudes stay comparable across
temperatures:

    loss = mean_rows( tau**2 * sum_{t in KD} w_t * term_t + w_ce * ce )

Caveat: ``p_tail = 1 - sum_S p`` carries the rounding error of the stored log-probs (~1e-16
in float64, ~1e-4 and up to ~5e-4 from float16 shards), and tempering raises it to the power
``1 / tau``, so at ``tau > 1`` a tail that should be ~0 can get visible mass in the bucket terms.

Sampled targets (``tail=False``; the manifest's ``targets.tail``): the stored values are
``log p_hat`` with ``p_hat = count / N`` (see distill/teacher/extract.py), an unbiased estimate of
the teacher's distribution that already sums to 1, so the teacher's tail bucket is exactly 0
(no ``1 - sum`` from rounded values). The student keeps its full softmax: ``log q_i`` over
the whole vocab on S and ``q_tail`` = its mass off S, so every bucket term equals the same
divergence between ``p_hat`` (zero off S) and the full ``q``. The forward KL is then the
cross-entropy of the full student softmax against ``p_hat`` minus the constant ``-H(p_hat)``,
its gradient w.r.t. the student logits is ``q - p_hat`` (``sum p_hat = 1``), and
``E[q - p_hat] = q - p``: unbiased for the full forward-KL gradient at ``tau = 1``. Dropping
``q_tail`` and renormalising ``q`` over S instead would be biased (no push-down off S). JSD
and TVD are defined but biased (non-linear in ``p_hat``); reverse KL is infinite (refused).

Padding: entries whose stored value is ``-inf`` (variable-width rows, see
distill/teacher/extract.py) are absent from both sides: ``p = q = 0`` there, and their ids (a copy
of the row's first id) are excluded from ``q_tail`` like S.

:func:`bucket_terms` computes every term from four small per-row tensors of the student's
softmax; both the reference path (:func:`distill.student.losses.sparse_distill_terms`,
autograd over full logits) and the fused path (:mod:`distill.student.kd_kernel`, a
hand-written gradient) derive those tensors their own way and call it.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import Tensor

from distill.errors import DistillError

TAIL_EPS = 1e-8  # floor on the teacher's tail mass inside log p_tail for the reverse KL
BUCKET_TERMS = frozenset(("forward_kl", "reverse_kl", "jsd", "tvd"))


def _kl(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """Row sums of ``a (log a - log b)`` with ``0 log 0 = 0``, NaN-free in value and gradient."""
    pos = a > 0
    diff = torch.where(pos, log_a, 0.0) - torch.where(pos, log_b, 0.0)
    return torch.where(pos, a * diff, 0.0).sum(-1)


def _teacher_buckets(
    t_lp: Tensor, tau: float, tail: bool = True, empty: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(log p, p) [n, k+1] over S + tail; at ``tau != 1`` softmax([log p_S, log p_tail] / tau).

    ``tail=False``: p_tail = 0 exactly (sampled targets). ``empty`` [n]: rows whose tail holds
    no token at all (S is the whole vocabulary): their p_tail is 0 too, whatever rounding left
    of ``1 - sum p_S`` (an empty bucket contributes nothing, not ``p_tail log(p_tail / 0)``)."""
    p_s = t_lp.exp()
    if tail:
        p_tail = (1.0 - p_s.sum(-1, keepdim=True)).clamp(min=0.0)
        if empty is not None:
            p_tail = torch.where(empty[:, None], 0.0, p_tail)
    else:
        p_tail = torch.zeros_like(p_s[:, :1])
    log_p = torch.cat([t_lp, p_tail.log()], dim=-1)  # log 0 = -inf: an empty tail
    if tau == 1.0:
        return log_p, torch.cat([p_s, p_tail], dim=-1)
    log_p = (log_p / tau).log_softmax(-1)
    return log_p, log_p.exp()


def bucket_terms(
    a_s: Tensor | None,
    a_t: Tensor | None,
    a_l: Tensor | None,
    x_s: Tensor | None,
    t_lp: Tensor,
    names: Collection[str],
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    bild_top: int = 8,
    tail: bool = True,
    padded: bool = False,
) -> dict[str, Tensor]:
    """Per-row terms [c] from a_S = log q_S [c, k], a_T = log q_tail [c], a_L = log q_L [c]
    and x_S = the (tempered, shifted) logits at S [c, k]. Shared by ``sparse_distill_terms``
    (autograd over full logits) and ``distill.student.kd_kernel`` (the fused path).

    ``a_S`` is ``-inf`` at padded entries (``padded``: some row has one). Each input may be
    None when no named term uses it.
    """
    tau = float(temperature)
    out: dict[str, Tensor] = {}
    if "ce" in names:
        assert a_l is not None
        out["ce"] = -a_l
    if BUCKET_TERMS.intersection(names):
        assert a_s is not None and a_t is not None
        log_q = torch.cat([a_s, a_t[:, None]], dim=-1)
        q = log_q.exp()
        # q_tail = 0 exactly: no token outside S (the student's tail logsumexp is over nothing)
        log_p, p = _teacher_buckets(t_lp, tau, tail, empty=torch.isneginf(a_t.detach()))
        if "forward_kl" in names:
            out["forward_kl"] = _kl(p, log_p, log_q)
        if "reverse_kl" in names:
            floor = math.log(TAIL_EPS)
            log_p_floor = torch.cat([log_p[:, :-1], log_p[:, -1:].clamp(min=floor)], dim=-1)
            out["reverse_kl"] = _kl(q, log_q, log_p_floor)
        if "jsd" in names:
            b = float(jsd_beta)
            # clamp -inf (padding, an empty tail) so logaddexp's gradient has no -inf - -inf
            lo_p, lo_q = log_p.clamp(min=-1e4), log_q.clamp(min=-1e4)
            log_m = torch.logaddexp(math.log(b) + lo_p, math.log1p(-b) + lo_q)
            out["jsd"] = b * _kl(p, log_p, log_m) + (1.0 - b) * _kl(q, log_q, log_m)
        if "tvd" in names:
            out["tvd"] = 0.5 * (p - q).abs().sum(-1)
    if "bild" in names:
        assert x_s is not None
        if padded:
            raise DistillError("BiLD needs fixed-width top-k targets (these rows are padded)")
        k = x_s.shape[1]
        if not 1 <= bild_top <= k:
            raise DistillError(f"bild_top={bild_top} must be in [1, {k}] (the stored top-k)")
        top_lp, pos = t_lp.topk(bild_top, dim=-1)  # descending teacher order
        i, j = torch.triu_indices(bild_top, bild_top, offset=1, device=t_lp.device)
        d_t = (top_lp[:, i] - top_lp[:, j]) / tau
        z_s = x_s.gather(1, pos)
        d_s = z_s[:, i] - z_s[:, j]
        log_pt, log_ps = d_t.log_softmax(-1), d_s.log_softmax(-1)
        out["bild"] = _kl(log_pt.exp(), log_pt, log_ps)
    return out
