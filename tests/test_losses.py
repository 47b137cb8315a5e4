"""The sparse KD maths against a dense reference computed from full logits (values and grads)."""

import pytest
import torch
from kd_reference import chunked_kd_loss
from pydantic import ValidationError

from distill.config import LossWeights
from distill.errors import DistillError
from distill.format.spec import TargetSpec
from distill.student.losses import chunked_distill_loss, eval_metrics
from distill.student.terms import TAIL_EPS
from distill.teacher.extract import extract


def dense_reference(h, w, t_logits, k, labels, kd_weight):
    """KL between teacher and student coarsened to {top-k ids} + {everything else}, from
    full-vocab distributions with boolean masks; plus CE. Independent of distill.student.losses."""
    logq = (h @ w.T).log_softmax(-1)
    logp = t_logits.log_softmax(-1)
    ids = logp.topk(k, dim=-1).indices
    support = torch.zeros_like(logp, dtype=torch.bool).scatter(1, ids, True)
    p, q = logp.exp(), logq.exp()
    p_tail, q_tail = (p * ~support).sum(-1), (q * ~support).sum(-1)
    kd = (torch.where(support, p * (logp - logq), 0)).sum(-1) + p_tail * (
        p_tail.log() - q_tail.log()
    )
    ce = -logq.gather(1, labels[:, None]).squeeze(1)
    return (kd_weight * kd + (1 - kd_weight) * ce).mean(), kd.mean(), ce.mean(), ids, logp


def make(n=37, hdim=16, vocab=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hdim, generator=g, dtype=dtype, requires_grad=True)
    t_logits = torch.randn(n, vocab, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    return h, w, t_logits, labels


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("k", [1, 8, 63])
@pytest.mark.parametrize("kd_weight", [0.0, 0.7, 1.0])
def test_chunked_loss_matches_dense_reference(chunk, k, kd_weight):
    h, w, t_logits, labels = make()
    ref, ref_kd, ref_ce, ids, logp = dense_reference(h, w, t_logits, k, labels, kd_weight)
    ref.backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    lps = logp.gather(1, ids)
    loss, kd, ce = chunked_kd_loss(h, w, ids, lps, labels, kd_weight, chunk)
    (loss * 3.0).backward()  # the upstream gradient must scale both results
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kd, ref_kd.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, 3 * ref_gh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, 3 * ref_gw, rtol=1e-9, atol=1e-12)


def test_loss_is_zero_when_student_equals_teacher_on_the_buckets():
    h, w, _, labels = make()
    with torch.no_grad():
        t_logits = h @ w.T
    logp = t_logits.log_softmax(-1)
    top = logp.topk(8, dim=-1)
    loss, kd, _ = chunked_kd_loss(h, w, top.indices, top.values, labels, 1.0, 7)
    assert abs(kd.item()) < 1e-10 and abs(loss.item()) < 1e-10


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    h, w, t_logits, labels = make()
    w.requires_grad_(False)
    top = t_logits.log_softmax(-1).topk(4, dim=-1)
    loss, _, _ = chunked_kd_loss(h, w, top.indices, top.values, labels, 0.5, 4)
    loss.backward()
    assert w.grad is None and h.grad is not None and h.grad.abs().sum() > 0


def test_float16_stored_logprobs_and_float32_student_stay_close_to_reference():
    h, w, t_logits, labels = make(dtype=torch.float32)
    ref, *_, ids, logp = dense_reference(h, w, t_logits, 16, labels, 0.9)
    lps16 = logp.gather(1, ids).half()  # what the shards store
    loss, _, _ = chunked_kd_loss(h, w, ids, lps16, labels, 0.9, 8)
    assert abs(loss.item() - ref.item()) < 5e-3 * ref.item()


def test_eval_metrics_sums_and_agreement():
    h, w, t_logits, labels = make()
    _, ref_kd, ref_ce, ids, logp = dense_reference(h, w, t_logits, 8, labels, 1.0)
    m = eval_metrics(h.detach(), w.detach(), ids, logp.gather(1, ids), labels, chunk=6)
    n = h.shape[0]
    assert m["rows"] == n
    assert abs(m["kd"] / n - ref_kd.item()) < 1e-9
    assert abs(m["ce"] / n - ref_ce.item()) < 1e-9
    expect = float(((h @ w.T).argmax(-1) == t_logits.argmax(-1)).sum())
    assert m["agree"] == expect


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_sparse_topk_equals_dense_topk_of_log_softmax(chunk):
    h, w, _, _ = make()
    t = extract(h.detach(), w.detach(), TargetSpec(kind="topk", k=5), chunk)
    ids, lps = t.ids, t.values
    dense = (h @ w.T).detach().log_softmax(-1).topk(5, dim=-1)
    assert torch.equal(ids, dense.indices)
    torch.testing.assert_close(lps, dense.values.float())
    # normalised over the full vocab: the tail mass is what the top-k leaves
    assert torch.all(lps.exp().sum(-1) <= 1 + 1e-6)


# --- weighted combination: every term against a dense full-vocab reference -----------------

TERM_NAMES = ("forward_kl", "reverse_kl", "jsd", "tvd", "bild", "ce")


def dense_terms(h, w, t_logits, k, labels, tau=1.0, beta=0.5, bild_top=8, eps=1e-8):
    """Per-row terms from full-vocab logits with boolean masks; independent of distill.student.

    Teacher buckets at tau: p_i^(1/tau) on the support and p_tail^(1/tau), renormalised (the
    tail as one pseudo-token). Student: softmax(z / tau) with the tail mass a masked sum.
    BiLD from the teacher's *raw logits*: every ordered pair (a, c) of its top-bild_top tokens
    with teacher logit a > c, as a mask over the V x V matrix of differences.
    """
    z = h @ w.T
    logp_full = t_logits.log_softmax(-1)
    ids = logp_full.topk(k, dim=-1).indices
    sup = torch.zeros_like(logp_full, dtype=torch.bool).scatter(1, ids, True)
    p1 = logp_full.exp()
    pt_unnorm = torch.where(sup, p1 ** (1 / tau), 0.0)
    tail_unnorm = (p1 * ~sup).sum(-1) ** (1 / tau)
    norm = pt_unnorm.sum(-1) + tail_unnorm
    p, p_tail = pt_unnorm / norm[:, None], tail_unnorm / norm
    q = (z / tau).softmax(-1)
    q_tail = (q * ~sup).sum(-1)

    ps, qs = torch.where(sup, p, 1.0), torch.where(sup, q, 1.0)  # off-support: finite dummies

    def on_buckets(f, *tails):
        return torch.where(sup, f(ps, qs), 0.0).sum(-1) + f(*tails)

    def xlogy_ratio(a, b):  # a log(a / b) with 0 log 0 = 0, NaN-free gradients
        pos = a > 0
        return torch.where(pos, a * (torch.where(pos, a, 1.0) / torch.where(pos, b, 1.0)).log(), 0)

    def jsd(a, b, beta=beta):
        m = beta * a + (1 - beta) * b
        return beta * xlogy_ratio(a, m) + (1 - beta) * xlogy_ratio(b, m)

    out = {
        "forward_kl": on_buckets(xlogy_ratio, p_tail, q_tail),
        "reverse_kl": on_buckets(lambda a, b: xlogy_ratio(b, a), p_tail.clamp(min=eps), q_tail),
        "jsd": on_buckets(jsd, p_tail, q_tail),
        "tvd": 0.5 * on_buckets(lambda a, b: (a - b).abs(), p_tail, q_tail),
        "ce": -(z.log_softmax(-1)).gather(1, labels[:, None]).squeeze(1),
    }
    top = torch.zeros_like(sup).scatter(1, t_logits.topk(bild_top, dim=-1).indices, True)
    pairs = top[:, :, None] & top[:, None, :] & (t_logits[:, :, None] > t_logits[:, None, :])
    d_t = (t_logits[:, :, None] - t_logits[:, None, :]) / tau
    d_s = (z[:, :, None] - z[:, None, :]) / tau
    flat = pairs.flatten(1)
    pt = d_t.masked_fill(~pairs, float("-inf")).flatten(1).softmax(-1)
    ps_ = d_s.masked_fill(~pairs, float("-inf")).flatten(1).softmax(-1)
    out["bild"] = torch.where(flat, xlogy_ratio(pt, ps_), 0.0).sum(-1)
    return out, ids, logp_full.gather(1, ids)


def dense_total(terms, lw):
    kd = sum(getattr(lw, n) * terms[n] for n in TERM_NAMES if n != "ce")
    return (lw.temperature**2 * kd + lw.ce * terms["ce"]).mean()


WEIGHT_CASES = {
    "forward_kl": dict(forward_kl=1.0, ce=0.0),
    "reverse_kl": dict(forward_kl=0.0, reverse_kl=1.0, ce=0.0),
    "jsd": dict(forward_kl=0.0, jsd=1.0, jsd_beta=0.3, ce=0.0),
    "tvd": dict(forward_kl=0.0, tvd=1.0, ce=0.0),
    "bild": dict(forward_kl=0.0, bild=1.0, bild_top=5, ce=0.0),
    "ce": dict(forward_kl=0.0, ce=1.0),
    "all": dict(
        forward_kl=0.5, reverse_kl=0.3, jsd=0.7, jsd_beta=0.8, tvd=0.2, bild=0.4, bild_top=6, ce=0.1
    ),
}


@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("tau", [1.0, 0.6, 2.5])
@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_distill_loss_matches_dense_reference(case, tau, chunk):
    lw = LossWeights(**WEIGHT_CASES[case], temperature=tau)
    h, w, t_logits, labels = make(seed=1)
    ref_terms, ids, lps = dense_terms(
        h, w, t_logits, 8, labels, tau, lw.jsd_beta, lw.bild_top, TAIL_EPS
    )
    ref = dense_total(ref_terms, lw)
    ref.backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, terms = chunked_distill_loss(h, w, ids, lps, labels, lw, chunk)
    (loss * 3.0).backward()
    assert set(terms) == {n for n in TERM_NAMES if getattr(lw, n) > 0}
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    for name, value in terms.items():
        assert not value.requires_grad
        torch.testing.assert_close(value, ref_terms[name].mean().detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, 3 * ref_gh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, 3 * ref_gw, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 63])
def test_all_terms_at_extreme_supports(k):
    lw = LossWeights(**{**WEIGHT_CASES["all"], "bild_top": k}, temperature=1.7)
    h, w, t_logits, labels = make(seed=2)
    ref_terms, ids, lps = dense_terms(h, w, t_logits, k, labels, 1.7, 0.8, k, TAIL_EPS)
    ref = dense_total(ref_terms, lw)
    ref.backward()
    ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, terms = chunked_distill_loss(h, w, ids, lps, labels, lw, 7)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    if k == 1:  # one token: no pairs, BiLD is identically zero
        assert float(terms["bild"]) == 0.0
    torch.testing.assert_close(h.grad, ref_gh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_gw, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_empty_teacher_tail_stays_finite(tau):
    """All teacher mass on the stored ids (p_tail = 0): reverse KL uses log max(p_tail, eps).

    The stored probabilities sum to 1 only up to rounding, so the tail that the loss sees is
    ~1e-16, not 0; tempering turns it into ~1e-16 ** (1 / tau). That is invisible at tau = 1
    (checked exactly) but not at tau = 2 (checked loosely).
    """
    h, w, t_logits, labels = make(seed=3)
    top = t_logits.topk(4, dim=-1)
    t_logits = torch.full_like(t_logits, float("-inf")).scatter(1, top.indices, top.values)
    lw = LossWeights(**{**WEIGHT_CASES["all"], "bild_top": 4}, temperature=tau)
    ref_terms, ids, lps = dense_terms(h, w, t_logits, 4, labels, tau, 0.8, 4, TAIL_EPS)
    assert all(torch.isfinite(v).all() for v in ref_terms.values())
    ref = dense_total(ref_terms, lw)
    ref.backward()
    ref_gh = h.grad.clone()
    h.grad = w.grad = None
    loss, terms = chunked_distill_loss(h, w, ids, lps, labels, lw, 5)
    loss.backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    rtol, atol = (1e-10, 1e-12) if tau == 1.0 else (1e-3, 1e-6)
    torch.testing.assert_close(loss, ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(h.grad, ref_gh, rtol=100 * rtol, atol=atol)


def test_distill_loss_with_kl_and_ce_equals_chunked_kd_loss():
    h, w, t_logits, labels = make()
    top = t_logits.log_softmax(-1).topk(8, dim=-1)
    loss, kd, ce = chunked_kd_loss(h, w, top.indices, top.values, labels, 0.7, 6)
    total, terms = chunked_distill_loss(
        h, w, top.indices, top.values, labels, LossWeights(forward_kl=0.7, ce=0.3), 6
    )
    torch.testing.assert_close(total, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["forward_kl"], kd, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["ce"], ce, rtol=1e-12, atol=0)


def test_all_divergences_vanish_when_student_equals_teacher():
    h, w, _, labels = make()
    with torch.no_grad():
        t_logits = h @ w.T
    top = t_logits.log_softmax(-1).topk(8, dim=-1)
    lw = LossWeights(forward_kl=1.0, reverse_kl=1.0, jsd=1.0, tvd=1.0, bild=1.0, ce=0.0)
    loss, terms = chunked_distill_loss(h, w, top.indices, top.values, labels, lw, 7)
    assert abs(float(loss.detach())) < 1e-10
    assert all(abs(float(v)) < 1e-10 for v in terms.values())
    # BiLD only sees logit differences: zero at any temperature
    lw = LossWeights(forward_kl=0.0, bild=1.0, ce=0.0, temperature=3.0)
    _, terms = chunked_distill_loss(h, w, top.indices, top.values, labels, lw, 7)
    assert abs(float(terms["bild"])) < 1e-10


def test_float16_stored_logprobs_with_all_terms_stay_close_to_reference():
    h, w, t_logits, labels = make(dtype=torch.float32)
    lw = LossWeights(**WEIGHT_CASES["all"], temperature=2.0)
    ref_terms, ids, lps = dense_terms(h, w, t_logits, 16, labels, 2.0, 0.8, 6, TAIL_EPS)
    ref = dense_total(ref_terms, lw)
    loss, _ = chunked_distill_loss(h, w, ids, lps.half(), labels, lw, 8)
    assert abs(float(loss.detach()) - ref.item()) < 5e-3 * ref.item()


def test_distill_loss_frozen_head_gets_no_gradient():
    h, w, t_logits, labels = make()
    w.requires_grad_(False)
    top = t_logits.log_softmax(-1).topk(4, dim=-1)
    lw = LossWeights(reverse_kl=0.5, bild=0.5, bild_top=4)
    loss, _ = chunked_distill_loss(h, w, top.indices, top.values, labels, lw, 4)
    loss.backward()
    assert w.grad is None and h.grad is not None and h.grad.abs().sum() > 0


def test_eval_metrics_with_weights_reports_every_term():
    h, w, t_logits, labels = make()
    n = h.shape[0]
    for tau in (1.0, 2.0):
        lw = LossWeights(**WEIGHT_CASES["all"], temperature=tau)
        ref_terms, ids, lps = dense_terms(h, w, t_logits, 8, labels, tau, 0.8, 6, TAIL_EPS)
        kd1 = dense_terms(h, w, t_logits, 8, labels)[0]["forward_kl"]
        m = eval_metrics(h.detach(), w.detach(), ids, lps, labels, chunk=6, weights=lw)
        assert abs(m["kd"] / n - kd1.mean().item()) < 1e-9
        for name in TERM_NAMES:
            assert abs(m[name] / n - ref_terms[name].mean().item()) < 1e-9, name
        assert abs(m["loss"] / n - dense_total(ref_terms, lw).item()) < 1e-9


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("forward_kl", -0.1),
        ("reverse_kl", float("nan")),
        ("jsd", float("inf")),
        ("tvd", -1),
        ("bild", "1"),
        ("ce", None),
        ("jsd_beta", 0.0),
        ("jsd_beta", 1.0),
        ("jsd_beta", -0.5),
        ("temperature", 0.0),
        ("temperature", -2.0),
        ("temperature", float("nan")),
        ("bild_top", 0),
        ("bild_top", 2.0),
        ("bild_top", True),
    ],
)
def test_loss_weights_rejects_bad_values(field, value):
    with pytest.raises(DistillError, match=field):
        LossWeights(**{field: value})


def test_loss_weights_rejects_all_zero_and_is_frozen():
    with pytest.raises(DistillError, match="at least one"):
        LossWeights(forward_kl=0.0, ce=0.0)
    lw = LossWeights()
    with pytest.raises(ValidationError, match="frozen"):
        lw.ce = 1.0  # type: ignore[misc]
    assert lw.active() == {"forward_kl": 0.9, "ce": 0.1}


def test_bild_top_larger_than_stored_k_is_an_error():
    h, w, t_logits, labels = make()
    top = t_logits.log_softmax(-1).topk(4, dim=-1)
    with pytest.raises(DistillError, match="bild_top"):
        chunked_distill_loss(h, w, top.indices, top.values, labels, LossWeights(bild=1.0), 8)
