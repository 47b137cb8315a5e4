"""The fused LM-head loss (distill/kd_kernel.py) against the autograd path and a dense reference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from distill.config import LossWeights
from distill.errors import DistillError
from distill.student import kd_kernel
from distill.student.kd_kernel import FusedLMHeadLoss, first_occurrence
from distill.student.losses import _ChunkedLMHeadLoss, chunked_distill_loss
from distill.student.terms import TAIL_EPS

ROOT = Path(__file__).resolve().parent.parent
N, H, V = 23, 8, 40

CASES = {
    "forward_kl": dict(forward_kl=1.0, ce=0.0),
    "reverse_kl": dict(forward_kl=0.0, reverse_kl=1.0, ce=0.0),
    "jsd": dict(forward_kl=0.0, jsd=1.0, jsd_beta=0.3, ce=0.0),
    "tvd": dict(forward_kl=0.0, tvd=1.0, ce=0.0),
    "bild": dict(forward_kl=0.0, bild=1.0, bild_top=3, ce=0.0),
    "ce": dict(forward_kl=0.0, ce=1.0),
    "kl+ce": dict(forward_kl=0.9, ce=0.1),
    "all": dict(
        forward_kl=0.5, reverse_kl=0.3, jsd=0.7, jsd_beta=0.8, tvd=0.2, bild=0.4, bild_top=3, ce=0.1
    ),
}


def make(k, n=N, vocab=V, seed=0, label_in_s=0.5, pad=False, dtype=torch.float64):
    """(hidden, weight, t_ids, t_logprobs, labels): distinct teacher ids per row, log-probs over
    the full vocab (a random 40-99% of the mass on S); labels in S for a ``label_in_s`` share of
    rows. ``pad``: the rows' last entries become padding (-inf, the row's first id)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, dtype=dtype, requires_grad=True)
    w = (2 * torch.randn(vocab, H, generator=g, dtype=dtype)).requires_grad_()
    ids = torch.rand(n, vocab, generator=g).argsort(-1)[:, :k]
    mass = 0.4 + 0.59 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    if k == vocab:  # S is the whole vocab: the teacher's mass too (an empty tail)
        mass = torch.ones_like(mass)
    lps = (torch.randn(n, k, generator=g, dtype=torch.float64) * 2).log_softmax(-1) + mass.log()
    in_s = (torch.rand(n, generator=g) < label_in_s) | (k == vocab)
    col = torch.randint(0, k, (n,), generator=g)
    off_s = torch.ones(n, vocab, dtype=torch.float64).scatter(1, ids, 1e-300 if k < vocab else 1.0)
    outside = torch.multinomial(off_s, 1, generator=g).squeeze(1)
    labels = torch.where(in_s, ids.gather(1, col[:, None]).squeeze(1), outside)
    if pad:
        width = torch.randint(1, k + 1, (n,), generator=g)
        absent = torch.arange(k)[None, :] >= width[:, None]
        ids = torch.where(absent, ids[:, :1], ids)
        lps = lps.masked_fill(absent, float("-inf"))
    return h, w, ids, lps.to(dtype), labels


def dense_terms(z, ids, lps, labels, tau, beta, bild_top, tail):
    """Per-row terms from full logits [n, V] with boolean masks over the vocab (padding: the
    -inf entries are dropped from both sides); independent of distill.student.losses/kd_kernel."""
    present = lps > float("-inf")
    sup = torch.zeros_like(z, dtype=torch.bool)
    sup[torch.arange(z.shape[0])[:, None].expand_as(ids)[present], ids[present]] = True
    q = (z / tau).softmax(-1)
    q_s = torch.where(present, q.gather(1, ids), 0.0)
    q_t = torch.where(sup, 0.0, q).sum(-1)
    p_s = lps.exp()
    p_t = (1 - p_s.sum(-1)).clamp(min=0) if tail else torch.zeros_like(p_s[:, 0])
    p_t = torch.where(sup.all(-1), 0.0, p_t)  # no token outside S: an empty tail bucket
    p = torch.cat([p_s, p_t[:, None]], -1) ** (1 / tau)
    p = p / p.sum(-1, keepdim=True)
    qq = torch.cat([q_s, q_t[:, None]], -1)

    def xlogy_ratio(a, b):  # a log(a / b), 0 where a = 0
        pos = a > 0
        return torch.where(pos, a * (torch.where(pos, a, 1.0) / torch.where(pos, b, 1.0)).log(), 0)

    p_floor = torch.cat([p[:, :-1], p[:, -1:].clamp(min=TAIL_EPS)], -1)
    m = beta * p + (1 - beta) * qq
    out = {
        "forward_kl": xlogy_ratio(p, qq).sum(-1),
        "reverse_kl": xlogy_ratio(qq, p_floor).sum(-1),
        "jsd": (beta * xlogy_ratio(p, m) + (1 - beta) * xlogy_ratio(qq, m)).sum(-1),
        "tvd": 0.5 * (p - qq).abs().sum(-1),
        "ce": -z.log_softmax(-1).gather(1, labels[:, None]).squeeze(1),
    }
    bild_top = min(bild_top, ids.shape[1])  # unused (weight 0) when larger
    top, pos = lps.topk(bild_top, dim=-1)
    zs = z.gather(1, ids.gather(1, pos))
    i, j = torch.triu_indices(bild_top, bild_top, offset=1)
    pt = ((top[:, i] - top[:, j]) / tau).softmax(-1)
    ps = ((zs[:, i] - zs[:, j]) / tau).softmax(-1)
    out["bild"] = xlogy_ratio(pt, ps).sum(-1)
    return out


def run(fn, h, w, ids, lps, labels, lw, chunk, tail=True, upstream=3.0):
    """(total, means, grad_h, grad_w) of ``fn`` (FusedLMHeadLoss or _ChunkedLMHeadLoss)."""
    h = h.detach().requires_grad_(h.requires_grad)
    w = w.detach().requires_grad_(w.requires_grad)
    coefs = tuple(lw.coefficients().items())
    opts = (float(lw.temperature), float(lw.jsd_beta), int(lw.bild_top), tail)
    total, *means = fn.apply(h, w, ids.long(), lps, labels.long(), coefs, opts, chunk)
    (total * upstream).backward()
    return total.detach(), torch.stack(means), h.grad, w.grad


def assert_same(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def check(k, lw, chunk, tail=True, frozen=False, **make_kw):
    h, w, ids, lps, labels = make(k, **make_kw)
    w.requires_grad_(not frozen)
    fast = run(FusedLMHeadLoss, h, w, ids, lps, labels, lw, chunk, tail)
    slow = run(_ChunkedLMHeadLoss, h, w, ids, lps, labels, lw, chunk, tail)
    assert_same(fast, slow)
    # dense reference
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_(w.requires_grad)
    terms = dense_terms(h2 @ w2.T, ids, lps, labels, lw.temperature, lw.jsd_beta, lw.bild_top, tail)
    coefs = lw.coefficients()
    ref = sum(c * terms[name] for name, c in coefs.items()).mean()
    (3.0 * ref).backward()
    ref_means = torch.stack([terms[name].mean() for name in coefs]).detach()
    assert_same(fast, (ref.detach(), ref_means, h2.grad, w2.grad), rtol=1e-9, atol=1e-12)
    return fast


@pytest.mark.parametrize("chunk", [1, 6, 1000])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_fused_equals_autograd_path_and_dense_reference(case, tau, chunk):
    check(5, LossWeights(**CASES[case], temperature=tau), chunk)


@pytest.mark.parametrize("k", [1, 2, V - 1, V])
@pytest.mark.parametrize("label_in_s", [0.0, 1.0])
def test_extreme_supports_and_label_inside_or_outside_s(k, label_in_s):
    lw = LossWeights(**{**CASES["all"], "bild_top": min(k, 3)})
    check(k, lw, 7, label_in_s=label_in_s)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_a_stored_width_equal_to_the_vocab_leaves_an_empty_tail_and_finite_values(tau):
    """k = V: no token lies outside S, so the tail bucket is empty on both sides. The stored
    log-probs' rounding leaves 1 - sum p_S slightly above 0 (float32 storage: ~1e-7); that
    must not make the reported forward KL +inf (its gradient was already right)."""
    lw = LossWeights(**{**CASES["all"], "bild_top": 3}, temperature=tau)
    h, w, ids, lps, labels = make(V, label_in_s=1.0)
    lps = lps - 1e-7  # the mass float32 storage leaves unaccounted: p_tail = 1 - sum > 0
    assert float((1 - lps.exp().sum(-1)).min()) > 0
    fast = run(FusedLMHeadLoss, h, w, ids, lps, labels, lw, 7)
    slow = run(_ChunkedLMHeadLoss, h, w, ids, lps, labels, lw, 7)
    for t in fast:
        assert torch.isfinite(t).all()
    assert_same(fast, slow)
    # the dense reference with the empty tail (it renormalises p over S: ~V x 1e-7 apart)
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    terms = dense_terms(h2 @ w2.T, ids, lps, labels, tau, lw.jsd_beta, lw.bild_top, True)
    coefs = lw.coefficients()
    ref = sum(c * terms[name] for name, c in coefs.items()).mean()
    (3.0 * ref).backward()
    means = torch.stack([terms[name].mean() for name in coefs]).detach()
    assert_same(fast, (ref.detach(), means, h2.grad, w2.grad), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.6])
@pytest.mark.parametrize("case", ["forward_kl", "jsd", "tvd", "ce", "kl+ce"])
def test_sampled_targets_without_tail_and_padding(case, tau):
    lw = LossWeights(**CASES[case], temperature=tau)
    h, w, ids, lps, labels = make(6, pad=True)
    lps = lps - torch.logsumexp(lps, -1, keepdim=True)  # sampled: sums to 1
    fast = run(FusedLMHeadLoss, h, w, ids, lps, labels, lw, 4, tail=False)
    slow = run(_ChunkedLMHeadLoss, h, w, ids, lps, labels, lw, 4, tail=False)
    assert_same(fast, slow)
    assert all(torch.isfinite(t).all() for t in fast)


@pytest.mark.parametrize("case", ["all", "kl+ce"])
def test_padded_rows_with_tail(case):
    check(6, LossWeights(**{**CASES[case], "bild": 0.0}), 5, pad=True)


def test_bild_on_padded_rows_is_refused_like_the_autograd_path():
    h, w, ids, lps, labels = make(6, pad=True)
    for fn in (FusedLMHeadLoss, _ChunkedLMHeadLoss):
        with pytest.raises(DistillError, match="BiLD needs fixed-width"):
            run(fn, h, w, ids, lps, labels, LossWeights(**CASES["bild"]), 5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_frozen_weight_gets_no_gradient(tau):
    fast = check(4, LossWeights(**CASES["all"], temperature=tau), 5, frozen=True)
    assert fast[3] is None and fast[2].abs().sum() > 0


def test_public_entry_point_dispatches_to_the_fused_path(monkeypatch):
    h, w, ids, lps, labels = make(5)
    lw = LossWeights(**CASES["all"])
    total, _ = chunked_distill_loss(h, w, ids, lps, labels, lw, 4)
    assert total.grad_fn.name() == "FusedLMHeadLossBackward"
    monkeypatch.setattr(kd_kernel, "ENABLED", False)
    total, _ = chunked_distill_loss(h, w, ids, lps, labels, lw, 4)
    assert total.grad_fn.name() == "_ChunkedLMHeadLossBackward"


def test_no_grad_eval_and_empty_input_and_double_backward():
    h, w, ids, lps, labels = make(5)
    lw = LossWeights(**CASES["all"])
    with torch.no_grad():
        total, terms = chunked_distill_loss(h, w, ids, lps, labels, lw, 4)
    ref, _, _, _ = run(_ChunkedLMHeadLoss, h, w, ids, lps, labels, lw, 4)
    torch.testing.assert_close(total, ref, rtol=1e-12, atol=0)
    total, _ = chunked_distill_loss(h[:0], w, ids[:0], lps[:0], labels[:0], lw, 4)
    total.backward()
    assert float(total.detach()) == 0.0 and w.grad.abs().sum() == 0 and h.grad.shape == (N, H)
    total, _ = chunked_distill_loss(h, w, ids, lps, labels, lw, 4)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        total.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tail_far_below_the_top_stays_finite_and_matches_autograd_path(dtype):
    """S's logits ~ 1000 above every tail logit: exp(tail - max) underflows to 0 even in
    float64, but log q_tail (~ -1000) must stay finite as in the autograd path's logsumexp."""
    k, g = 5, torch.Generator().manual_seed(4)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    w[:, 0] = 0.0
    w[:k, 0] = 1000.0 + torch.rand(k, generator=g, dtype=torch.float64)
    h = 0.1 * torch.randn(N, H, generator=g, dtype=torch.float64)
    h[:, 0] = 1.0
    ids = torch.arange(k).repeat(N, 1)
    lps = torch.randn(N, k, generator=g, dtype=torch.float64).log_softmax(-1) + math.log(0.9)
    labels = torch.randint(0, V, (N,), generator=g)
    lw = LossWeights(forward_kl=0.5, reverse_kl=0.1, jsd=0.2, tvd=0.2, bild=0.3, bild_top=5, ce=0.2)
    args = (h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), ids, lps.to(dtype), labels)
    fast = run(FusedLMHeadLoss, *args, lw, 6)
    slow = run(_ChunkedLMHeadLoss, *args, lw, 6)
    assert all(torch.isfinite(t).all() for t in fast)
    assert float(fast[1][0]) > 50  # forward KL ~ p_tail * 1000: the tail is not -inf
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_same(fast, slow, rtol=tol, atol=tol)


def test_float32_and_bfloat16_hidden_stay_close_to_float64():
    lw = LossWeights(**CASES["all"], temperature=1.5)
    h, w, ids, lps, labels = make(5, vocab=300, n=40)
    ref = run(FusedLMHeadLoss, h, w, ids, lps, labels, lw, 8)
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        hh = h.detach().to(dt).requires_grad_()
        ww = w.detach().float().requires_grad_()
        out = run(FusedLMHeadLoss, hh, ww, ids, lps.float(), labels, lw, 8)
        assert out[2].dtype == dt and out[3].dtype == torch.float32
        h_ref = ref[2] if dt != torch.bfloat16 else None
        for a, b in zip(out, (ref[0], ref[1], h_ref, ref[3]), strict=True):
            if b is not None:
                scale = float(b.abs().max())
                assert float((a.double() - b).abs().max()) <= tol * scale


def test_first_occurrence_marks_each_distinct_id_once():
    ids = torch.tensor([[3, 1, 3, 3, 2], [0, 0, 0, 0, 0], [4, 3, 2, 1, 0]])
    expect = [[1, 1, 0, 0, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert first_occurrence(ids).tolist() == [[bool(v) for v in r] for r in expect]


def test_repeated_ids_in_s_match_autograd_path():
    h, w, ids, lps, labels = make(6)
    ids = ids.clone()
    ids[:, 3] = ids[:, 1]  # not produced by topk/sampling, but handled exactly
    lw = LossWeights(**CASES["all"])
    fast = run(FusedLMHeadLoss, h, w, ids, lps, labels, lw, 5)
    slow = run(_ChunkedLMHeadLoss, h, w, ids, lps, labels, lw, 5)
    assert_same(fast, slow)


# --- memory: no [V, H]-sized (or several [chunk, V]) temporaries per chunk ------------------

MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from distill.student import kd_kernel
    from distill.student.losses import LossWeights, chunked_distill_loss
    kd_kernel.ENABLED = sys.argv[1] == "fused"
    n, h, v, k, chunk = 256, 256, 50_000, 16, 32
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g, requires_grad=True)
    w = (torch.randn(v, h, generator=g) / 16).requires_grad_()
    ids = torch.randint(0, v, (n, k), generator=g)
    lps = torch.full((n, k), -4.0)
    labels = torch.randint(0, v, (n,), generator=g)
    lw = LossWeights(forward_kl=0.5, reverse_kl=0.2, tvd=0.2, bild=0.1, bild_top=4, ce=0.1)
    chunked_distill_loss(hid[:2], w, ids[:2], lps[:2], labels[:2], lw, chunk)[0].backward()
    hid.grad = w.grad = None
    try:
        open("/proc/self/clear_refs", "w").write("5")
        reset = True
    except OSError:
        reset = False
    base = status("VmRSS")
    chunked_distill_loss(hid, w, ids, lps, labels, lw, chunk)[0].backward()
    print(json.dumps({"peak": status("VmHWM") - base, "reset": reset}))
    """
)


def _peak(path: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEM_SCRIPT, path],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_fused_path_peak_memory_is_one_gradient_accumulator_and_one_buffer():
    """V x H = 51 MB fp32, chunk x V = 6.4 MB: the fused path's step may add the grad_W
    accumulator, grad_h and one [chunk, V] buffer (+ slack), not a [V, H] tensor per chunk."""
    v, h, chunk = 50_000, 256, 32
    head, buf = v * h * 4, chunk * v * 4
    fused = _peak("fused")
    if not fused["reset"]:
        pytest.skip("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    assert fused["peak"] < head + 2 * buf + 8 * 2**20, fused
    autograd = _peak("autograd")  # the test has teeth: the autograd path exceeds the bound
    assert autograd["peak"] > head + 2 * buf + 8 * 2**20, autograd
    assert math.isfinite(fused["peak"])
