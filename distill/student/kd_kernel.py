"""LM head + distillation loss with a hand-written gradient: one [rows, V] buffer per chunk.

Every term of distill/student/terms.py depends on the student logits ``x`` of a row (``x = z / s``,
``s`` the temperature of the term's group, see below) only through four small tensors. With
``q = softmax(x)``, ``S`` the row's stored ids, ``L`` its label:

    a_S = log q_S          [k]   d a_S,i / d x_j = [j = S_i] - q_j
    a_T = log q_tail       []    d a_T   / d x_j = [j not in S] q_j / q_tail - q_j
    a_L = log q_L          []    d a_L   / d x_j = [j = L] - q_j
    x_S = x at S (BiLD)    [k]   d x_S,i / d x_j = [j = S_i]

So with the small gradients ``g_S, g_T, g_L, g_x`` of the loss w.r.t. them (autograd over the
[rows, k+1] term code, cheap) and ``G = sum_i g_S,i + g_T + g_L``, the gradient w.r.t. ``x`` is

    d loss / d x_j = q_j (g_T / q_tail [j not in S] - G)
                     + sum_i [j = S_i] (g_S,i + g_x,i) + [j = L] g_L

and ``d loss / d z = (d loss / d x) / s``. Per chunk of rows, in ONE preallocated buffer ``E``:

    E = h @ W.T (/ s);  x_S = E[S], x_L = E[L];  E[S] = -inf;  t = rowmax E  (the tail's max)
    E = exp(E - t);  Z_T = rowsum E  (>= 1: the tail mass never underflows, E[S] = 0)
    log Z = logaddexp(t + log Z_T, logsumexp over the distinct ids of S of x_S)
    log q_S = x_S - log Z,  log q_tail = t + log Z_T - log Z,  log q_L = x_L - log Z
    E *= (g_T / Z_T - G exp(t - log Z)) / s               (q_j = E_j exp(t - log Z) off S)
    E[S] += (g_S + g_x - q_S G) / s;  E[L] += g_L / s     (scatter_add: the label may be in S)
    grad_h[rows] = E @ W;  grad_W += E.T @ h               (into one accumulator)

No sum of the form ``1 - sum`` appears: the tail mass is a sum of positives, exact even when
``q_tail << 1``. Without bucket terms (CE and/or BiLD only) ``t`` is the row max and S is not
masked. The ``1 / rows_total`` of the mean is in the small gradients already.

Groups: CE is untempered while the KD terms see ``z / tau``. At ``tau = 1`` (or with only KD
terms, or only CE) one softmax serves every term: one group, one buffer. At ``tau != 1`` with
both, there are two groups (KD at ``s = tau``, CE at ``s = 1``) and two buffers of half the
rows each, so the peak stays at ``chunk x V`` elements; their gradients are summed before the
matmuls.

Padding (``-inf`` stored values, ids a copy of the row's first id) and repeated ids: as in
``sparse_distill_terms``, absent entries have ``q = 0`` and no gradient, their ids are excluded
from the tail, and ``Z`` counts each distinct id of S once.

Dtypes: the matmuls and the buffer are float64 when hidden or weight is float64, float32
otherwise; bf16/fp16 inputs (e.g. autocast outputs) are cast to float32 (per chunk for the
hidden rows, once for the weight), so logits are not rounded to bf16 as an autocast matmul
would; autocast is disabled inside. Gradients are returned in the inputs' dtypes.

Backward: the gradients are computed in the forward; backward scales them in place by the
upstream gradient (nothing when it is 1) and hands them over without a copy, so the graph can
be backpropagated through only once (``retain_graph`` double backward raises).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from distill.student.terms import BUCKET_TERMS, bucket_terms

ENABLED = True  # False: chunked_distill_loss always takes the autograd path

Coefs = tuple[tuple[str, float], ...]


def supports(hidden: Tensor, weight: Tensor, coefs: Coefs) -> bool:
    """Whether the fused path applies (every term, tail mode and temperature is supported)."""
    return (
        ENABLED
        and hidden.dim() == 2
        and weight.dim() == 2
        and hidden.is_floating_point()
        and weight.is_floating_point()
        and hidden.device == weight.device
        and not hidden.is_sparse
        and not weight.is_sparse
        and len(coefs) > 0
    )


def first_occurrence(ids: Tensor) -> Tensor:
    """[c, k] bool: True at the first occurrence of each distinct id of a row."""
    ordered, order = ids.sort(dim=1, stable=True)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return torch.empty_like(new).scatter_(1, order, new)


def _groups(coefs: Coefs, tau: float) -> list[tuple[float, Coefs]]:
    """(scale s, coefs) per softmax: x = z / s for every term of the group."""
    kd = tuple((n, c) for n, c in coefs if n != "ce")
    ce = tuple((n, c) for n, c in coefs if n == "ce")
    if tau == 1.0 or not kd or not ce:
        return [(tau if kd else 1.0, coefs)]
    return [(tau, kd), (1.0, ce)]


class _Rows(NamedTuple):
    """One chunk's stored targets, prepared once for every group."""

    ids: Tensor  # [c, k] stored ids; padding repeats the row's first id
    first: Tensor  # [c, k] bool: the first occurrence of each distinct id of a row
    present: Tensor  # [c, k] bool: a stored value (not -inf padding)
    lab: Tensor  # [c] the labels
    t_lp: Tensor  # [c, k] stored log-probs (the compute dtype)
    padded: bool  # any padding in the chunk


class _Norm(NamedTuple):
    """What the gradient needs of one group's normalisation (None: not computed)."""

    xs: Tensor | None  # [c, k] logits at S
    shift: Tensor | None  # [c] t: the max over the tail (bucket terms) or the row
    z_rel: Tensor | None  # [c] Z_T (bucket terms) or Z, relative to exp(t)
    log_z: Tensor | None  # [c] log Z


def _chunk_rows(ids: Tensor, t_logprobs: Tensor, lab: Tensor, cdt: torch.dtype) -> _Rows:
    t_lp = t_logprobs.to(cdt)
    present = t_lp > float("-inf")
    padded = not bool(present.all())
    if padded:  # padding repeats the row's first id
        ids = torch.where(present, ids, ids[:, :1])
    return _Rows(ids, first_occurrence(ids), present, lab, t_lp, padded)


def _kinds(names: list[str]) -> tuple[bool, bool, bool]:
    """(bucket terms, CE, BiLD) among ``names``."""
    return bool(BUCKET_TERMS.intersection(names)), "ce" in names, "bild" in names


def _group_to_grad(
    x: Tensor,
    rows: _Rows,
    scale: float,
    coefs: Coefs,
    opts: tuple[float, float, int, bool],
    n: int,
    want_grad: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One group on one chunk. ``x`` [c, V] holds the group's logits ``z / s``; in place it
    becomes ``d loss / d z`` (when ``want_grad``). Returns the chunk's loss and row terms.
    """
    names = [name for name, _ in coefs]
    leaf, norm = _normalise(x, rows, names)
    loss, terms = _leaf_terms(leaf, rows, names, coefs, opts, n)
    if want_grad:
        g = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values())), strict=True))
        _grad_into(x, g, rows, norm, 1.0 / scale, names)
    return loss.detach(), terms


def _normalise(x: Tensor, rows: _Rows, names: list[str]) -> tuple[dict[str, Tensor], _Norm]:
    """The small tensors the terms read (``a_s``, ``a_t``, ``a_l``, ``x_s``); ``x`` -> ``E``.

    With bucket terms the buffer is shifted by the max ``t`` over the *tail* (S set to -inf
    first), so ``E = exp(x - t)`` is 0 on S and ``Z_T = sum E >= 1``: ``log q_tail`` never
    underflows to -inf, however peaked the row. ``log Z = logaddexp(t + log Z_T,
    logsumexp(distinct x_S))`` and ``q_j = E_j exp(t - log Z)``. Otherwise ``t`` is the row max.
    """
    buckets, ce, bild = _kinds(names)
    ninf = float("-inf")
    xs = x.gather(1, rows.ids) if (buckets or bild) else None
    xl = x.gather(1, rows.lab[:, None]).squeeze(1) if ce else None
    leaf: dict[str, Tensor] = {}
    shift = z_rel = log_z = None
    if buckets or ce:
        if buckets:
            assert xs is not None
            x.scatter_(1, rows.ids, ninf)
        shift = x.amax(1)
        if buckets:  # S = the whole vocab: an empty tail (t = 0, Z_T = 0)
            shift = torch.where(torch.isfinite(shift), shift, 0.0)
        x.sub_(shift[:, None]).exp_()
        z_rel = x.sum(1)  # Z_T (buckets) or Z, relative to exp(t)
        log_z = shift + z_rel.log()
        if buckets:
            assert xs is not None
            log_zt = log_z
            log_z = torch.logaddexp(log_zt, torch.where(rows.first, xs, ninf).logsumexp(1))
            leaf["a_s"] = torch.where(rows.present, xs - log_z[:, None], ninf)
            leaf["a_t"] = log_zt - log_z
        if ce:
            assert xl is not None
            leaf["a_l"] = xl - log_z
    if bild:
        assert xs is not None
        leaf["x_s"] = xs.clone()
    return leaf, _Norm(xs, shift, z_rel, log_z)


def _leaf_terms(
    leaf: dict[str, Tensor],
    rows: _Rows,
    names: list[str],
    coefs: Coefs,
    opts: tuple[float, float, int, bool],
    n: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The chunk's loss (differentiable w.r.t. ``leaf``) and its detached row terms."""
    temperature, jsd_beta, bild_top, tail = opts
    for t in leaf.values():
        t.requires_grad_()
    with torch.enable_grad():
        terms = bucket_terms(
            leaf.get("a_s"),
            leaf.get("a_t"),
            leaf.get("a_l"),
            leaf.get("x_s"),
            rows.t_lp,
            names,
            temperature,
            jsd_beta,
            bild_top,
            tail,
            rows.padded,
        )
        loss = sum(c * terms[name].sum() for name, c in coefs) / n
    assert isinstance(loss, Tensor)
    return loss, {k: v.detach() for k, v in terms.items()}


def _grad_into(
    x: Tensor, g: dict[str, Tensor], rows: _Rows, norm: _Norm, inv: float, names: list[str]
) -> None:
    """``x`` (``E`` after :func:`_normalise`) becomes ``d loss / d z`` from the small
    gradients ``g`` (module docstring); ``inv = 1 / s``."""
    buckets, ce, bild = _kinds(names)
    xs, shift, z_rel, log_z = norm
    on_s = g["x_s"] if bild else None  # BiLD: d x_S,i / d x_j = [j = S_i]
    if buckets or ce:
        assert shift is not None and z_rel is not None and log_z is not None
        rel = (shift - log_z).exp()  # q_j = E_j * rel
        g_big = torch.zeros_like(rel)  # G = sum g_S + g_T + g_L
        row = torch.zeros_like(rel)  # the factor of E_j off S
        if buckets:
            g_s = torch.where(rows.present, g["a_s"], 0.0)  # absent entries: no gradient
            g_big = g_big + g_s.sum(1) + g["a_t"]
            row = torch.where(z_rel > 0, g["a_t"] / z_rel, 0.0)  # g_T q_j / q_T; empty tail: 0
        if ce:
            g_big = g_big + g["a_l"]
        x.mul_(((row - g_big * rel) * inv)[:, None])
        if buckets:  # S entries of x are 0 here: their gradient is scattered in full
            assert xs is not None
            q_s = (xs - log_z[:, None]).exp()
            s_part = g_s - torch.where(rows.first, q_s * g_big[:, None], 0.0)
            on_s = s_part if on_s is None else s_part + on_s
        if ce:
            x.scatter_add_(1, rows.lab[:, None], (g["a_l"] * inv)[:, None])
    else:  # BiLD alone: only the logits at S get a gradient
        x.zero_()
    if on_s is not None:
        x.scatter_add_(1, rows.ids, on_s * inv)


def _logits(h: Tensor, w: Tensor, xs: list[Tensor], groups: list[tuple[float, Coefs]]) -> None:
    """Fill each group's buffer with its logits ``h @ w.T / s`` (one matmul)."""
    torch.mm(h, w.T, out=xs[0])
    for x, (scale, _) in zip(xs[1:], groups[1:], strict=True):
        x.copy_(xs[0])  # two groups: the second is CE, at scale 1
        if scale != 1.0:
            x.div_(scale)
    if groups[0][0] != 1.0:
        xs[0].div_(groups[0][0])


def _backprop_chunk(
    xs: list[Tensor],
    h: Tensor,
    w: Tensor,
    grad_h: Tensor | None,
    grad_w: Tensor | None,
    lo: int,
    hi: int,
) -> None:
    """Rows ``lo:hi`` of ``grad_h`` and their share of ``grad_w`` from the groups' summed
    ``d loss / d z`` (the first chunk writes ``grad_w``, the others add to it)."""
    g = xs[0]
    for x in xs[1:]:
        g.add_(x)
    if grad_h is not None:
        if grad_h.dtype == g.dtype:
            torch.mm(g, w, out=grad_h[lo:hi])
        else:
            grad_h[lo:hi] = torch.mm(g, w)
    if grad_w is not None:
        if lo == 0:  # the first chunk writes the accumulator: no zero fill
            torch.mm(g.T, h, out=grad_w)
        else:
            grad_w.addmm_(g.T, h)


class FusedLMHeadLoss(torch.autograd.Function):
    """``_ChunkedLMHeadLoss`` (same arguments and outputs) with the gradient of the module
    docstring: total, then one detached row mean per term of ``coefs``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        t_ids: Tensor,
        t_logprobs: Tensor,
        labels: Tensor,
        coefs: Coefs,
        opts: tuple[float, float, int, bool],
        chunk: int,
    ) -> tuple[Tensor, ...]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        wide = torch.float64 in (hidden.dtype, weight.dtype)
        cdt = torch.float64 if wide else torch.float32
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        groups = _groups(coefs, float(opts[0]))
        rows = max(1, -(-int(chunk) // len(groups)))
        total = hidden.new_zeros((), dtype=acc)
        sums = {name: hidden.new_zeros((), dtype=acc) for name, _ in coefs}
        grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
            w = weight.detach().to(cdt)
            bufs = [hidden.new_empty((min(rows, n), vocab), dtype=cdt) for _ in groups]
            for lo in range(0, n, rows):
                hi = min(lo + rows, n)
                h = hidden[lo:hi].detach().to(cdt)
                targets = _chunk_rows(t_ids[lo:hi], t_logprobs[lo:hi], labels[lo:hi], cdt)
                xs = [b[: hi - lo] for b in bufs]
                _logits(h, w, xs, groups)
                for x, (scale, group) in zip(xs, groups, strict=True):
                    loss, terms = _group_to_grad(
                        x, targets, scale, group, opts, n, need_h or need_w
                    )
                    total += loss.to(acc)
                    for name, v in terms.items():
                        sums[name] += v.sum().to(acc)
                if need_h or need_w:
                    _backprop_chunk(xs, h, w, grad_h, grad_w, lo, hi)
            del bufs
            if grad_w is not None and n == 0:
                grad_w.zero_()
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        ctx.fused_grads = (grad_h, grad_w)
        means = [sums[name] / max(n, 1) for name, _ in coefs]
        ctx.mark_non_differentiable(*means)
        return (total, *means)

    @staticmethod
    def backward(ctx, g: Tensor, *_grads_of_means: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.fused_grads is None:
            raise RuntimeError(
                "the fused distillation loss hands its gradients over in the first backward: "
                "backpropagating through it twice (retain_graph) is not supported; set "
                "distill.student.kd_kernel.ENABLED = False for the autograd path"
            )
        grad_h, grad_w = ctx.fused_grads
        ctx.fused_grads = None  # no reference left here: autograd can take the buffers as .grad
        if bool(g != 1):
            for t in (grad_h, grad_w):
                if t is not None:
                    t.mul_(g.to(t.dtype))
        return grad_h, grad_w, None, None, None, None, None, None
