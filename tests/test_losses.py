"""The sparse KD maths against a dense reference computed from full logits (values and grads)."""

import pytest
import torch

from distill.losses import chunked_kd_loss, eval_metrics
from distill.teacher import sparse_topk


def dense_reference(h, w, t_logits, k, labels, kd_weight):
    """KL between teacher and student coarsened to {top-k ids} + {everything else}, from
    full-vocab distributions with boolean masks; plus CE. Independent of distill.losses."""
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
    assert abs(float(kd)) < 1e-10 and abs(float(loss)) < 1e-10


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
    assert abs(float(loss) - float(ref)) < 5e-3 * float(ref)


def test_eval_metrics_sums_and_agreement():
    h, w, t_logits, labels = make()
    _, ref_kd, ref_ce, ids, logp = dense_reference(h, w, t_logits, 8, labels, 1.0)
    m = eval_metrics(h.detach(), w.detach(), ids, logp.gather(1, ids), labels, chunk=6)
    n = h.shape[0]
    assert m["rows"] == n
    assert abs(m["kd"] / n - float(ref_kd)) < 1e-9
    assert abs(m["ce"] / n - float(ref_ce)) < 1e-9
    expect = float(((h @ w.T).argmax(-1) == t_logits.argmax(-1)).sum())
    assert m["agree"] == expect


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_sparse_topk_equals_dense_topk_of_log_softmax(chunk):
    h, w, _, _ = make()
    ids, lps = sparse_topk(h.detach(), w.detach(), 5, chunk)
    dense = (h @ w.T).detach().log_softmax(-1).topk(5, dim=-1)
    assert torch.equal(ids, dense.indices)
    torch.testing.assert_close(lps, dense.values.float())
    # normalised over the full vocab: the tail mass is what the top-k leaves
    assert torch.all(lps.exp().sum(-1) <= 1 + 1e-6)
