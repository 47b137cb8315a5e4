"""Loss terms for a student whose vocabulary differs from the teacher's (#24 item 3).

Both work from what ``targets.alignment`` stores (distill/data/align.py gives the alignment)
and, like the same-vocabulary terms, apply the LM head one chunk of rows at a time: the step
never holds ``[rows, vocab]`` (:func:`row_values` recomputes each chunk's logits in backward).

**ALM chunk likelihood** (Minixhofer et al. 2025, "Universal Cross-Tokenizer Distillation via
Approximate Likelihood Matching", arXiv 2503.20083; their code: tokenkit,
``tokenkit/training/losses.py::compute_alm_loss``). A chunk ``c`` is a span of the shared
assistant text between two common token boundaries; both sides' tokens in it spell the same
text, so their likelihoods of it compare::

    LT_c = sum_{teacher tokens t in c} log p(t | prefix)     (the stored token_logprobs)
    LS_c = sum_{student tokens s in c} log q(s | prefix)     (the student's own log-softmax)
    lp_c = min(LT_c / tau - eps, -eps),  lq_c = min(LS_c / tau - eps, -eps)
    alm  = mean_c [ e^lp (lp - lq) + (1 - e^lp) (log1mexp(lp) - log1mexp(lq)) ]

the KL between Bernoulli(exp(lp)) and Bernoulli(exp(lq)), over the chunks complete on both
sides (each of their tokens a target: its log-prob is known). ``tau`` defaults to 100 and
``eps`` to 1e-6, tokenkit's ``bce_temp`` and ``epsilon``: a chunk's likelihood is far below 1,
and ``tau`` lifts ``exp(L / tau)`` into a range where the binary divergence has a gradient.
tokenkit's default ``binary_ce`` is ``-(p log q + (1 - p) log(1 - q))``, this KL plus the
teacher's binary entropy (a constant: same gradients, zero at a perfect match here). Not
taken over: tokenkit's ``append_space`` chunk extension (the probability of a word boundary
after the chunk; it needs the teacher's full distribution), its multiple chunk sizes and its
token-count weighting (``numerator``); chunks weigh equally here.

**Projected sparse KL** at the exact-aligned positions (``align.target_pairs``: student
position ``j`` and teacher row ``r`` have read the same text and predict the same
continuation). The teacher's stored support (``target_ids``, ``target_logprobs`` of row ``r``)
is mapped to student ids by :func:`vocab_map`, an exact match of the tokens' byte strings; the
teacher's mass on ids without a match joins its tail bucket, and the student's buckets are its
matched ids plus everything else. Then the same forward KL over (matched + 1) buckets as
:mod:`distill.student.terms` (temperature, tail conventions): with identical vocabularies and
the identity map it is exactly the ``forward_kl`` term. A row with no matched id has one
bucket on each side and contributes 0.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.student.terms import bucket_terms

ALM_TAU = 100.0  # tokenkit's bce_temp
ALM_EPS = 1e-6  # tokenkit's epsilon: keeps exp(lp) < 1, so log1mexp stays finite


class _RowValues(torch.autograd.Function):
    """Per-row values ``fn(hidden_rows @ weight.T, *row_args) -> [c]``, one chunk of rows at a
    time; backward recomputes each chunk's logits and backpropagates through ``fn`` there, so
    neither pass holds more than ``[chunk, vocab]``."""

    @staticmethod
    def forward(ctx, hidden, weight, fn, chunk, *row_args):
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(hidden, weight, *row_args)
        half = hidden.dtype in (torch.float16, torch.bfloat16)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32 if half else hidden.dtype)
        for lo in range(0, hidden.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            out[sl] = fn(hidden[sl] @ weight.T, *(a[sl] for a in row_args))
        return out

    @staticmethod
    def backward(ctx, g):
        hidden, weight, *row_args = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        w = weight.detach().requires_grad_(need_w)
        for lo in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(lo, lo + ctx.chunk)
            h = hidden[sl].detach().requires_grad_(need_h)
            with torch.enable_grad():
                vals = ctx.fn(h @ w.T, *(a[sl] for a in row_args))
            inputs = [x for x, need in ((h, need_h), (w, need_w)) if need]
            grads = list(torch.autograd.grad(vals, inputs, g[sl]))
            if need_h:
                grad_h[sl] = grads.pop(0)
            if need_w:
                grad_w += grads.pop(0)
        return (grad_h, grad_w, None, None, *(None for _ in row_args))


def row_values(
    hidden: Tensor, weight: Tensor, fn: Callable[..., Tensor], chunk: int, *row_args: Tensor
) -> Tensor:
    """``[n]`` values of ``fn(logits_rows, *row_args_rows)`` with ``logits = hidden @ weight.T``
    computed ``chunk`` rows at a time (in forward and again in backward); differentiable
    w.r.t. ``hidden`` [n, H] and ``weight`` [V, H]. ``row_args``: tensors with n rows."""
    if int(chunk) < 1:
        raise DistillError(f"chunk must be >= 1, got {chunk!r}")
    return _RowValues.apply(hidden, weight, fn, int(chunk), *row_args)


def _label_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return z.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)


def label_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """``[n]`` log q(label | row) of the student at each row, the LM head chunked."""
    return row_values(hidden, weight, _label_logprob, chunk, labels.long())


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012), NaN-free in
    the gradient too (each branch sees only inputs it is meant for)."""
    cut = -math.log(2.0)
    small = x < cut
    a = torch.where(small, x, cut)  # log1p(-exp(a)): accurate for a < -log 2
    b = torch.where(small, cut, x)  # log(-expm1(b)): accurate for b near 0
    return torch.where(small, torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(b)))


def binary_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(Bernoulli(e^log_p) || Bernoulli(e^log_q)) elementwise, for log-probs < 0."""
    return log_p.exp() * (log_p - log_q) - torch.expm1(log_p) * (log1mexp(log_p) - log1mexp(log_q))


def alm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    row_chunk: Tensor,
    teacher_chunk_lp: Tensor,
    complete: Tensor,
    temperature: float = ALM_TAU,
    chunk: int = 1024,
    eps: float = ALM_EPS,
) -> Tensor:
    """ALM's chunk-likelihood term (see the module docstring): the mean over complete chunks.

    hidden [n, H]: the student's hidden states at the rows predicting ``labels`` [n] (its own
    next tokens); row_chunk [n]: the chunk of each label token (``Alignment.student_chunk`` at
    ``j + 1``, see ``align.chunk_rows``), -1 for none; teacher_chunk_lp [C]: ``LT_c``
    (``align.chunk_logprobs``); complete [C] bool: chunks complete on both sides. No complete
    chunk: 0 (still a graph node of ``hidden``, so a backward runs)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    row_lp = row_values(hidden, weight, _label_logprob, chunk, labels.long()).to(acc)
    return alm_from_row_logprobs(row_lp, row_chunk, teacher_chunk_lp, complete, temperature, eps)


def alm_from_row_logprobs(
    row_lp: Tensor,
    row_chunk: Tensor,
    teacher_chunk_lp: Tensor,
    complete: Tensor,
    temperature: float = ALM_TAU,
    eps: float = ALM_EPS,
) -> Tensor:
    """:func:`alm_loss` from the student's label log-probs ``row_lp`` [n] already computed
    (:func:`label_logprobs`; the trainer shares them with CE: one LM-head pass for both)."""
    if float(temperature) <= 0:
        raise DistillError(f"ALM temperature must be > 0, got {temperature!r}")
    acc = row_lp.dtype
    n_chunks = teacher_chunk_lp.shape[0]
    inside = row_chunk >= 0
    ls = row_lp.new_zeros(n_chunks).index_add_(0, row_chunk[inside], row_lp[inside])
    keep = complete.bool()
    if not bool(keep.any()):
        return row_lp.sum() * 0.0
    tau = float(temperature)
    lt = teacher_chunk_lp.to(acc)[keep].clamp(min=-1e4)  # a -inf log-prob: p = 0, no NaN
    lp = (lt / tau - eps).clamp(max=-eps)
    lq = (ls[keep] / tau - eps).clamp(max=-eps)
    return binary_kl(lp, lq).mean()


def _projected_kl_rows(logits: Tensor, s_ids: Tensor, t_lp: Tensor, tau: float) -> Tensor:
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    z = z if tau == 1.0 else z / tau
    matched = s_ids >= 0
    ids = s_ids.clamp(min=0)
    lse = torch.logsumexp(z, dim=-1)
    a_s = (z.gather(1, ids) - lse[:, None]).masked_fill(~matched, float("-inf"))
    # [chunk, V]; an add, not a scatter: unmatched entries (id 0 here) must not overwrite a match
    on_s = torch.zeros_like(z).scatter_add_(1, ids, matched.to(z.dtype)) > 0
    a_t = torch.logsumexp(z.masked_fill(on_s, float("-inf")), dim=-1) - lse
    t = t_lp.to(z.dtype).masked_fill(~matched, float("-inf"))  # unmatched mass -> tail
    return bucket_terms(a_s, a_t, None, None, t, {"forward_kl"}, tau, padded=True)["forward_kl"]


def projected_kl(
    hidden: Tensor,
    weight: Tensor,
    t_ids: Tensor,
    t_logprobs: Tensor,
    vmap: Tensor,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> Tensor:
    """The projected sparse forward KL, per row [n] (no ``tau**2``: the caller scales it like
    the other KD terms). hidden [n, H]: the student at the aligned positions ``j``;
    t_ids/t_logprobs [n, k]: the teacher's stored rows ``r`` (``-inf``: padding, ignored);
    vmap [teacher vocab] int64: :func:`vocab_map`."""
    if float(temperature) <= 0:
        raise DistillError(f"temperature must be > 0, got {temperature!r}")
    t_ids = t_ids.long()
    if t_ids.numel() and int(t_ids.max()) >= vmap.shape[0]:
        raise DistillError(
            f"teacher id {int(t_ids.max())} is outside the vocab map ({vmap.shape[0]} ids)"
        )
    s_ids = vmap.to(t_ids.device)[t_ids]
    s_ids = torch.where(t_logprobs > float("-inf"), s_ids, -1)
    tau = float(temperature)

    def fn(logits: Tensor, s: Tensor, lp: Tensor) -> Tensor:
        return _projected_kl_rows(logits, s, lp, tau)

    return row_values(hidden, weight, fn, chunk, s_ids, t_logprobs)


# --- the vocabulary map ---------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` (byte-level BPE's printable alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_kind(tok: Any) -> str:
    dec = json.dumps(json.loads(tok.backend_tokenizer.to_str()).get("decoder"))
    if "ByteLevel" in dec:
        return "bytelevel"
    if "Metaspace" in dec or "\\u2581" in dec or "▁" in dec:
        return "metaspace"
    return "plain"


def token_keys(tok: Any) -> list[tuple[str, bytes] | None]:
    """Per id of a Hugging Face fast tokenizer, the key its text is compared by: ``("text",
    bytes)`` after the tokenizer's own conventions (byte-level BPE's printable alphabet, e.g.
    ``Ġ`` for a space; SentencePiece's ``▁`` for a space and ``<0xNN>`` byte tokens), or
    ``("added", content)`` for an added/special token (they match only each other), or None."""
    kind = _decoder_kind(tok)
    table = _byte_decoder()
    added = {int(i): t.content for i, t in tok.added_tokens_decoder.items()}
    out: list[tuple[str, bytes] | None] = []
    for i, s in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in added:
            out.append(("added", added[i].encode()))
        elif s is None:
            out.append(None)
        elif kind == "bytelevel":
            if all(c in table for c in s):
                out.append(("text", bytes(table[c] for c in s)))
            else:
                out.append(None)
        elif kind == "metaspace" and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            out.append(("text", bytes([int(s[3:5], 16)])))
        else:
            out.append(("text", (s.replace("▁", " ") if kind == "metaspace" else s).encode()))
    return out


def vocab_map(teacher_tok: Any, student_tok: Any, teacher_vocab_size: int = 0) -> Tensor:
    """``[max(len(teacher_tok), teacher_vocab_size)]`` int64: the student id whose text is
    exactly the teacher token's (:func:`token_keys`), -1 for none. One-to-one: a key held by
    two ids on either side (ambiguous) maps nothing. Built once per tokenizer pair."""
    t_keys, s_keys = token_keys(teacher_tok), token_keys(student_tok)
    t_count, s_count = Counter(t_keys), Counter(s_keys)
    s_index = {k: i for i, k in enumerate(s_keys) if k is not None and s_count[k] == 1}
    out = torch.full((max(len(t_keys), int(teacher_vocab_size)),), -1, dtype=torch.int64)
    for i, k in enumerate(t_keys):
        if k is not None and t_count[k] == 1 and k in s_index:
            out[i] = s_index[k]
    return out
