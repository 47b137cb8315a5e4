"""Distillation losses on sparse teacher targets, computed in token chunks.

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
``log p_hat`` with ``p_hat = count / N`` (see distill/targets.py), an unbiased estimate of the
teacher's distribution that already sums to 1, so the teacher's tail bucket is exactly 0
(no ``1 - sum`` from rounded values). The student keeps its full softmax: ``log q_i`` over
the whole vocab on S and ``q_tail`` = its mass off S, so every bucket term equals the same
divergence between ``p_hat`` (zero off S) and the full ``q``. The forward KL is then the
cross-entropy of the full student softmax against ``p_hat`` minus the constant ``-H(p_hat)``,
its gradient w.r.t. the student logits is ``q - p_hat`` (``sum p_hat = 1``), and
``E[q - p_hat] = q - p``: unbiased for the full forward-KL gradient at ``tau = 1``. Dropping
``q_tail`` and renormalising ``q`` over S instead would be biased (no push-down off S). JSD
and TVD are defined but biased (non-linear in ``p_hat``); reverse KL is infinite (refused).

Padding: entries whose stored value is ``-inf`` (variable-width rows, see
distill/targets.py) are absent from both sides: ``p = q = 0`` there, and their ids (a copy of
the row's first id) are excluded from ``q_tail`` like S.

``chunked_distill_loss`` applies the LM head and the loss one chunk of rows at a time and takes
the gradient chunk by chunk, so the step's peak memory is O(chunk x vocab), not
O(rows x vocab). ``chunked_kd_loss`` is the original forward-KL + CE mix on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from distill.errors import DistillError

TAIL_EPS = 1e-8  # floor on the teacher's tail mass inside log p_tail for the reverse KL
KD_TERMS = ("forward_kl", "reverse_kl", "jsd", "tvd", "bild")
TERMS = (*KD_TERMS, "ce")
_BUCKET_TERMS = frozenset(("forward_kl", "reverse_kl", "jsd", "tvd"))


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (see the module docstring) and their hyper-parameters.

    Terms with weight 0 are not computed. ``jsd_beta`` is the JSD's teacher mixture weight,
    ``bild_top`` the number of teacher tokens BiLD uses (<= the stored k), ``temperature`` the
    KD temperature (KD terms are scaled by its square; CE is not tempered).
    """

    forward_kl: float = 0.9
    reverse_kl: float = 0.0
    jsd: float = 0.0
    jsd_beta: float = 0.5
    tvd: float = 0.0
    bild: float = 0.0
    bild_top: int = 8
    ce: float = 0.1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "bild_top":
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise DistillError(f"LossWeights.bild_top must be an integer >= 1, got {v!r}")
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise DistillError(f"LossWeights.{f.name} must be a finite number, got {v!r}")
        for name in TERMS:
            if getattr(self, name) < 0:
                raise DistillError(f"LossWeights.{name} must be >= 0, got {getattr(self, name)!r}")
        if not any(getattr(self, name) > 0 for name in TERMS):
            raise DistillError(f"LossWeights: at least one of {', '.join(TERMS)} must be > 0")
        if not 0.0 < self.jsd_beta < 1.0:
            raise DistillError(f"LossWeights.jsd_beta must be in (0, 1), got {self.jsd_beta!r}")
        if self.temperature <= 0:
            raise DistillError(f"LossWeights.temperature must be > 0, got {self.temperature!r}")

    def active(self) -> dict[str, float]:
        """The terms with weight > 0, in ``TERMS`` order, and their weights."""
        return {name: float(getattr(self, name)) for name in TERMS if getattr(self, name) > 0}

    def coefficients(self) -> dict[str, float]:
        """Per-term factors of the total: ``tau**2 * w`` for KD terms, ``w`` for CE."""
        t2 = float(self.temperature) ** 2
        return {n: (w if n == "ce" else t2 * w) for n, w in self.active().items()}


def _kl(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """Row sums of ``a (log a - log b)`` with ``0 log 0 = 0``, NaN-free in value and gradient."""
    pos = a > 0
    diff = torch.where(pos, log_a, 0.0) - torch.where(pos, log_b, 0.0)
    return torch.where(pos, a * diff, 0.0).sum(-1)


def _teacher_buckets(t_lp: Tensor, tau: float, tail: bool = True) -> tuple[Tensor, Tensor]:
    """(log p, p) [n, k+1] over S + tail; at ``tau != 1`` softmax([log p_S, log p_tail] / tau).

    ``tail=False``: p_tail = 0 exactly (sampled targets)."""
    p_s = t_lp.exp()
    if tail:
        p_tail = (1.0 - p_s.sum(-1, keepdim=True)).clamp(min=0.0)
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
    (autograd over full logits) and ``distill.kd_kernel`` (the fused path).

    ``a_S`` is ``-inf`` at padded entries (``padded``: some row has one). Each input may be
    None when no named term uses it.
    """
    tau = float(temperature)
    out: dict[str, Tensor] = {}
    if "ce" in names:
        assert a_l is not None
        out["ce"] = -a_l
    if _BUCKET_TERMS.intersection(names):
        assert a_s is not None and a_t is not None
        log_q = torch.cat([a_s, a_t[:, None]], dim=-1)
        q = log_q.exp()
        log_p, p = _teacher_buckets(t_lp, tau, tail)
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
    if _BUCKET_TERMS.intersection(names) or "bild" in names:
        x_s = z.gather(1, t_ids)
    if _BUCKET_TERMS.intersection(names):
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


def _lm_head_loss(hidden, weight, t_ids, t_logprobs, labels, coefs, opts, chunk):
    """``_ChunkedLMHeadLoss.apply``, or the same loss with a hand-written single-buffer gradient
    (distill/kd_kernel.py) where that applies."""
    from distill import kd_kernel  # lazy: kd_kernel imports this module

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
    ``tau**2`` and at temperature ``tau``; there is no ``kd`` alias (``chunked_kd_loss`` keeps
    that name). Shapes as in ``chunked_kd_loss``.
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
    total, *means = _lm_head_loss(
        hidden, weight, t_ids.long(), t_logprobs, labels.long(), coefs, opts, int(chunk)
    )
    return total, {name: m for (name, _), m in zip(coefs, means, strict=True)}


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
    both means are always reported, even for ``kd_weight`` 0 or 1.
    hidden [n, H] student hidden states at target positions; weight [V, H] the LM head;
    t_ids/t_logprobs [n, k] the teacher's sparse targets; labels [n] the ground-truth tokens.
    """
    kd_weight = float(kd_weight)
    coefs = (("forward_kl", kd_weight), ("ce", 1.0 - kd_weight))
    return _lm_head_loss(
        hidden,
        weight,
        t_ids.long(),
        t_logprobs,
        labels.long(),
        coefs,
        (1.0, 0.5, 1, bool(tail)),
        int(chunk),
    )


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
