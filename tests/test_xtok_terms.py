"""The cross-tokenizer loss terms (distill/student/xtok_terms.py) against dense references
computed from the full ``[rows, vocab]`` log-softmax (values and gradients), chunking
invariance, edge cases, and the vocab map on SmolLM2 against a BPE student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_align import CHATS, _encode, bpe_student  # noqa: F401  (a fixture)

from distill.data.align import align, chunk_logprobs, chunk_rows
from distill.errors import DistillError
from distill.student.losses import sparse_distill_terms
from distill.student.xtok_terms import (
    alm_loss,
    binary_kl,
    log1mexp,
    projected_kl,
    token_keys,
    vocab_map,
)

torch.set_num_threads(1)
F64 = torch.float64


def _student(n=29, hdim=8, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(vocab, hdim, generator=g, dtype=F64, requires_grad=True)
    return h, w, g


def _grads(loss, h, w):
    gh, gw = torch.autograd.grad(loss, [h, w])
    return gh, gw


# --- log1mexp / binary KL --------------------------------------------------------------------


def test_log1mexp_is_accurate_and_finite_at_both_ends() -> None:
    x = torch.tensor([-80.0, -5.0, -0.7, -0.69, -1e-3, -1e-9], dtype=F64, requires_grad=True)
    y = log1mexp(x)
    # log(-expm1(x)) is accurate but for x << 0, where -expm1(x) rounds to 1: check there
    # against exp(x) itself (log(1 - e^x) ~ -e^x)
    ref = torch.log(-torch.expm1(x.detach()))
    torch.testing.assert_close(y[1:], ref[1:], rtol=1e-12, atol=0)
    assert y[0].item() == pytest.approx(-np.exp(-80.0), rel=1e-12)
    assert torch.log(1 - torch.exp(x[-1])).item() != pytest.approx(y[-1].item(), rel=1e-9)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()
    # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    torch.testing.assert_close(g, -torch.exp(x) / -torch.expm1(x), rtol=1e-9, atol=0)


def test_binary_kl_is_the_bernoulli_kl() -> None:
    lp = torch.tensor([-0.1, -2.0, -0.5], dtype=F64)
    lq = torch.tensor([-0.3, -2.0, -4.0], dtype=F64)
    p, q = lp.exp(), lq.exp()
    ref = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(binary_kl(lp, lq), ref, rtol=1e-12, atol=1e-15)
    assert binary_kl(lp, lq)[1].item() == 0.0


# --- ALM ----------------------------------------------------------------------------------------


def _alm_case(seed=0, n=29, n_chunks=7, vocab=40):
    h, w, g = _student(n=n, vocab=vocab, seed=seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    row_chunk = torch.randint(-1, n_chunks, (n,), generator=g)
    lt = -torch.rand(n_chunks, generator=g, dtype=F64) * 30
    complete = torch.rand(n_chunks, generator=g) < 0.7
    complete[0] = True
    return h, w, labels, row_chunk, lt, complete


def alm_dense(h, w, labels, row_chunk, lt, complete, tau, eps=1e-6):
    """The obvious way: the full log-softmax, a Python loop over chunks, the Bernoulli KL
    written with probabilities."""
    logq = (h @ w.T).log_softmax(-1)
    lp_rows = logq[torch.arange(len(labels)), labels]
    out = []
    for c in range(len(lt)):
        if not complete[c]:
            continue
        ls = sum((lp_rows[i] for i in range(len(labels)) if row_chunk[i] == c), h.new_zeros(()))
        lp = torch.clamp(lt[c] / tau - eps, max=-eps)
        lq = torch.clamp(ls / tau - eps, max=-eps)
        p, q = lp.exp(), lq.exp()
        out.append(p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)))
    return torch.stack(out).mean()


@pytest.mark.parametrize("tau", [1.0, 3.0, 100.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_alm_matches_the_dense_reference(tau: float, seed: int) -> None:
    h, w, labels, row_chunk, lt, complete = _alm_case(seed)
    ref = alm_dense(h, w, labels, row_chunk, lt, complete, tau)
    got = alm_loss(h, w, labels, row_chunk, lt, complete, tau, chunk=5)
    assert ref.item() > 0
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)
    for a, b in zip(_grads(3 * got, h, w), _grads(3 * ref, h, w), strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-14)


def test_alm_is_chunking_invariant() -> None:
    h, w, labels, row_chunk, lt, complete = _alm_case(2)
    runs = []
    for chunk in (1, 4, 29, 1000):
        loss = alm_loss(h, w, labels, row_chunk, lt, complete, 10.0, chunk=chunk)
        runs.append((loss, *_grads(loss, h, w)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


def test_alm_without_complete_chunks_is_zero_with_zero_gradient() -> None:
    h, w, labels, row_chunk, lt, _ = _alm_case(3)
    loss = alm_loss(h, w, labels, row_chunk, lt, torch.zeros(len(lt), dtype=torch.bool))
    gh, gw = _grads(loss, h, w)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()
    # no rows at all
    e = h[:0]
    loss = alm_loss(e, w, labels[:0], row_chunk[:0], lt[:0], torch.zeros(0, dtype=torch.bool))
    assert loss.item() == 0.0


def test_alm_is_zero_when_the_student_matches_the_teacher_and_pulls_towards_it() -> None:
    h, w, labels, row_chunk, lt, complete = _alm_case(4)
    with torch.no_grad():
        lp_rows = (h @ w.T).log_softmax(-1)[torch.arange(len(labels)), labels]
        same = torch.zeros_like(lt).index_add_(
            0, row_chunk[row_chunk >= 0], lp_rows[row_chunk >= 0]
        )
    loss = alm_loss(h, w, labels, row_chunk, same, complete, 100.0)
    assert abs(loss.item()) < 1e-12
    # a teacher more confident than the student: a gradient step raises the student's LS
    loss = alm_loss(h, w, labels, row_chunk, same / 2, complete, 100.0)
    gh, gw = _grads(loss, h, w)
    with torch.no_grad():
        lp2 = ((h - 0.01 * gh) @ (w - 0.01 * gw).T).log_softmax(-1)
        lp2 = lp2[torch.arange(len(labels)), labels]
    keep = (row_chunk >= 0) & complete[row_chunk.clamp(min=0)]
    assert lp2[keep].sum() > lp_rows[keep].sum()


def test_alm_with_a_minus_inf_teacher_chunk_is_finite() -> None:
    h, w, labels, row_chunk, lt, complete = _alm_case(5)
    lt[0] = float("-inf")
    loss = alm_loss(h, w, labels, row_chunk, lt, complete, 1.0)
    gh, gw = _grads(loss, h, w)
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()


def test_chunk_rows_agrees_with_chunk_logprobs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        t = int(rng.integers(2, 30))
        chunk = rng.integers(-1, 5, t)
        mask = (rng.random(t) < 0.8).astype(np.int64)
        j, c, complete = chunk_rows(chunk, mask, 5)
        _, ref_complete = chunk_logprobs(chunk, np.zeros(int(mask[1:].sum())), mask, 5)
        np.testing.assert_array_equal(complete, ref_complete)
        expected = [k for k in range(t - 1) if chunk[k + 1] >= 0 and mask[k + 1] == 1]
        assert j.tolist() == expected and c.tolist() == [chunk[k + 1] for k in expected]


# --- projected sparse KL -------------------------------------------------------------------------


def _kl_case(seed=0, n=23, k=6, vt=50, vs=40):
    h, w, g = _student(n=n, vocab=vs, seed=seed)
    t_logits = torch.randn(n, vt, generator=g, dtype=F64) * 2
    top = t_logits.log_softmax(-1).topk(k, dim=-1)
    vmap = torch.full((vt,), -1, dtype=torch.int64)
    matched = torch.randperm(vt, generator=g)[: vt * 2 // 3]
    vmap[matched] = torch.randperm(vs, generator=g)[: len(matched)]
    return h, w, top.indices, top.values, vmap


def projected_dense(h, w, t_ids, t_lp, vmap, tau):
    """Full-vocab masks: the student's buckets are its mapped ids plus the rest."""
    logq = (h @ w.T / tau).log_softmax(-1)
    out = []
    for r in range(len(t_ids)):
        s = vmap[t_ids[r]]
        m = s >= 0
        log_ps = t_lp[r][m]
        p_tail = 1 - log_ps.exp().sum()
        log_p = torch.cat([log_ps, p_tail.log()[None]])
        log_p = (log_p / tau).log_softmax(-1)
        q_s = logq[r][s[m]].exp()
        on = torch.zeros(w.shape[0], dtype=torch.bool)
        on[s[m]] = True
        q_tail = logq[r].exp()[~on].sum()
        log_q = torch.cat([q_s.log(), q_tail.log()[None]])
        out.append((log_p.exp() * (log_p - log_q)).sum())
    return torch.stack(out)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_projected_kl_matches_the_dense_reference(tau: float, seed: int) -> None:
    h, w, t_ids, t_lp, vmap = _kl_case(seed)
    ref = projected_dense(h, w, t_ids, t_lp, vmap, tau)
    got = projected_kl(h, w, t_ids, t_lp, vmap, tau, chunk=4)
    assert (ref > -1e-12).all() and (ref > 1e-3).sum() > len(ref) // 2
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)
    weights = torch.rand(len(ref), dtype=F64)  # a non-uniform upstream gradient per row
    for a, b in zip(
        _grads((got * weights).sum(), h, w), _grads((ref * weights).sum(), h, w), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-14)


def test_projected_kl_is_chunking_invariant() -> None:
    h, w, t_ids, t_lp, vmap = _kl_case(2)
    runs = []
    for chunk in (1, 5, 23, 1000):
        loss = projected_kl(h, w, t_ids, t_lp, vmap, 1.5, chunk=chunk).mean()
        runs.append((loss, *_grads(loss, h, w)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_projected_kl_with_equal_vocabularies_is_the_forward_kl_term(tau: float) -> None:
    h, w, g = _student(n=19, vocab=40, seed=6)
    t_logits = torch.randn(19, 40, generator=g, dtype=F64) * 2
    top = t_logits.log_softmax(-1).topk(8, dim=-1)
    identity = torch.arange(40)
    got = projected_kl(h, w, top.indices, top.values, identity, tau, chunk=7)
    ref = sparse_distill_terms(
        h @ w.T, top.indices, top.values, torch.zeros(19, dtype=torch.long), {"forward_kl"}, tau
    )["forward_kl"]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
    for a, b in zip(_grads(got.sum(), h, w), _grads(ref.sum(), h, w), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


def test_projected_kl_with_nothing_matched_is_zero_and_partial_matches_use_the_tail() -> None:
    h, w, t_ids, t_lp, vmap = _kl_case(7)
    none = torch.full_like(vmap, -1)
    got = projected_kl(h, w, t_ids, t_lp, none)
    gh, gw = _grads(got.sum(), h, w)
    assert not got.any() and not gh.any() and not gw.any()
    # one matched teacher id (student id 0, so the unmatched entries' placeholder id collides
    # with it): two buckets where a row holds it, {that id} and the rest, on both sides
    tid = int(t_ids[0, 0])
    only = torch.full_like(vmap, -1)
    only[tid] = 0
    got = projected_kl(h, w, t_ids, t_lp, only)
    q = (h @ w.T).softmax(-1)[:, 0].detach()
    has = (t_ids == tid).any(-1)
    p = torch.where(t_ids == tid, t_lp.exp(), 0.0).sum(-1)
    ref = torch.where(has, p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)), 0.0)
    assert has.sum() >= 1 and (~has).sum() >= 1
    torch.testing.assert_close(got.detach(), ref, rtol=1e-9, atol=1e-14)


def test_projected_kl_ignores_padding_and_refuses_ids_outside_the_map() -> None:
    h, w, t_ids, t_lp, vmap = _kl_case(8)
    padded_lp = t_lp.clone()
    padded_lp[:, -2:] = float("-inf")
    # padding is absent: the same as the teacher putting that mass in its tail
    unmapped = vmap.clone()
    got = projected_kl(h, w, t_ids, padded_lp, vmap)
    ref = projected_dense(h, w, t_ids[:, :-2], t_lp[:, :-2], unmapped, 1.0)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-9, atol=1e-14)
    with pytest.raises(DistillError, match="outside the vocab map"):
        projected_kl(h, w, t_ids, t_lp, vmap[:10])


def test_a_frozen_head_gets_no_gradient_and_bfloat16_rows_are_computed_in_float32() -> None:
    h, w, t_ids, t_lp, vmap = _kl_case(10)
    w.requires_grad_(False)
    projected_kl(h, w, t_ids, t_lp, vmap).sum().backward()
    assert w.grad is None and h.grad is not None and h.grad.abs().sum() > 0
    ref = projected_kl(h.detach().float(), w.float(), t_ids, t_lp, vmap)
    hb = h.detach().bfloat16().requires_grad_()
    got = projected_kl(hb, w.bfloat16(), t_ids, t_lp, vmap)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
    got.sum().backward()
    assert hb.grad is not None and hb.grad.dtype == torch.bfloat16


def test_terms_refuse_bad_arguments() -> None:
    h, w, t_ids, t_lp, vmap = _kl_case(9)
    with pytest.raises(DistillError, match="chunk"):
        projected_kl(h, w, t_ids, t_lp, vmap, chunk=0)
    with pytest.raises(DistillError, match="temperature"):
        projected_kl(h, w, t_ids, t_lp, vmap, temperature=0.0)
    with pytest.raises(DistillError, match="temperature"):
        alm_loss(*_alm_case(0), temperature=-1.0)


# --- the vocab map on real tokenizers ---------------------------------------------------------


def test_vocab_map_smollm2_to_a_bpe_student(smol_tokenizer, bpe_student) -> None:  # noqa: F811
    t, s = smol_tokenizer, bpe_student
    vmap = vocab_map(t, s, teacher_vocab_size=len(t) + 5)
    assert vmap.shape == (len(t) + 5,) and (vmap[len(t) :] == -1).all()
    words = [" the", "the", " and", " of", " is", ".", ",", "\n"] + [str(d) for d in range(10)]
    for word in words:
        (ti,) = t.encode(word, add_special_tokens=False)
        (si,) = s.encode(word, add_special_tokens=False)
        assert vmap[ti].item() == si, word
    # every match is the same text; a one-to-one map
    pairs = [(i, int(j)) for i, j in enumerate(vmap.tolist()) if j >= 0]
    assert len(pairs) > 1000
    assert len({j for _, j in pairs}) == len(pairs)
    t_str = t.convert_ids_to_tokens([i for i, _ in pairs])
    s_str = s.convert_ids_to_tokens([j for _, j in pairs])
    assert t_str == s_str  # both byte-level: the same printable alphabet
    # specials match only by content: the two templates' markers differ, so none here
    for i in t.all_special_ids:
        assert vmap[i].item() == -1
    keys = token_keys(s)
    (space_the,) = s.encode(" the", add_special_tokens=False)
    assert keys[space_the] == ("text", b" the")
    (eos,) = s.convert_tokens_to_ids(["</s>"])
    assert keys[eos] == ("added", b"</s>")


def test_token_keys_of_a_metaspace_tokenizer() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁the": 1, "the": 2, "<0x0A>": 3, "▁": 4, "é": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    keys = token_keys(fast)
    assert keys[1:] == [
        ("text", b" the"),
        ("text", b"the"),
        ("text", b"\n"),
        ("text", b" "),
        ("text", "é".encode()),
    ]
    assert keys[0] == ("added", b"<unk>")


@pytest.mark.parametrize("chat", CHATS, ids=["one-turn", "two-turns"])
def test_alm_on_a_real_alignment_is_zero_for_a_byte_level_model_on_both_sides(
    smol_tokenizer,
    bpe_student,  # noqa: F811
    chat,
) -> None:
    """Both sides a "model" giving each token probability ``exp(-c * its bytes)``: on any
    chunk (the same text on both sides) the teacher's stored sum and the student's sum agree,
    whatever the two tokenisations, so ALM is 0 through align -> chunk_logprobs (teacher
    rows) and chunk_rows (student rows); another ``c`` on the student side is not."""
    rng = np.random.default_rng(0)
    _, t_spans, t_ids, t_off = _encode(smol_tokenizer, chat)
    _, s_spans, s_ids, s_off = _encode(bpe_student, chat)
    al = align(t_off, t_spans, s_off, s_spans)
    t_keys = token_keys(smol_tokenizer)
    t_bytes = np.array([len(t_keys[i][1]) for i in t_ids])
    s_keys = token_keys(bpe_student)
    s_bytes = np.array([len(s_keys[i][1]) for i in s_ids])
    tm = (rng.random(len(t_ids)) < 0.9).astype(np.uint8)  # some tokens not targets: chunks
    sm = (rng.random(len(s_ids)) < 0.9).astype(np.uint8)  # incomplete on either side drop out
    c = 0.3
    t_rows = np.flatnonzero(tm[1:]) + 1  # the token each stored row predicts
    lt, t_complete = chunk_logprobs(al.teacher_chunk, -c * t_bytes[t_rows], tm, al.n_chunks)
    j, row_chunk, s_complete = chunk_rows(al.student_chunk, sm, al.n_chunks)
    complete = t_complete & s_complete
    assert complete.sum() > 5 and (~complete).sum() > 0
    vocab = len(bpe_student)
    labels = torch.as_tensor(np.asarray(s_ids)[j + 1])

    def loss_for(c_student: float) -> float:
        # logits: a at the label, 0 elsewhere, so that log q(label) = -c_student * bytes
        q = torch.as_tensor(np.exp(-c_student * s_bytes[j + 1]), dtype=F64)
        logits = torch.zeros(len(j), vocab, dtype=F64)
        logits[torch.arange(len(j)), labels] = torch.log((vocab - 1) * q / (1 - q))
        return alm_loss(
            logits,
            torch.eye(vocab, dtype=F64),
            labels,
            torch.as_tensor(row_chunk),
            torch.as_tensor(lt),
            torch.as_tensor(complete),
            temperature=1.0,
            chunk=16,
        ).item()

    assert abs(loss_for(c)) < 1e-10
    assert loss_for(0.4) > 1e-3
