"""Cross-tokenizer alignment: a teacher's and a student's tokens over the text both share.

The teacher and the student render the same conversation with their own chat templates, so
their texts differ outside the assistant content; inside it the text is the same. Given, per
side, the character offsets of its tokens (``[T, 2]`` start/end, as a Hugging Face fast
tokenizer's ``return_offsets_mapping`` gives them: characters, not bytes) and the character
spans of the assistant content in its text (the same strings, turn by turn), :func:`align`
computes once per sample, vectorised (numpy, no per-token Python loop):

- the **common boundaries**: positions of the shared text (see below) where both
  tokenisations have a token boundary;
- **chunks**: the spans between consecutive common boundaries inside one assistant turn; every
  token lying wholly inside a chunk gets its chunk id (ALM's unit: both sides' tokens in a
  chunk spell the same text, so their log-likelihoods compare), others ``-1``;
- per student token, the **teacher token that ends at the same character**, where both end on
  a common boundary (``-1`` else): the exact case, where the student at position ``j`` and the
  teacher at position ``i`` have read the same assistant text and predict the same
  continuation.

Shared coordinates: turn ``i``'s content is placed at ``base[i] = sum(len of turns < i) + i``
(a one-character gap between turns, so no chunk crosses from one turn into the next).

Conventions, as fast tokenizers give them:

- tokens with an empty span (``start == end``, e.g. special tokens added with ``(0, 0)``) have
  no boundary and no chunk;
- a token whose span overlaps the next one's (a multi-byte character split over byte-level
  tokens: both get the character's offsets) has no boundary after it; the character's tokens
  share a chunk;
- a token that crosses the edge of a turn's content (a leading space or newline of the template
  merged into the first word) is in no chunk; the edge is then no common boundary;
- a token ending exactly at a turn's start (the template's ``assistant\\n``) ends on a boundary:
  it predicts the turn's first token, and is aligned when both sides end there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.data.dataset import assistant_spans
from distill.errors import DistillError

Spans = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Alignment:
    """The result of :func:`align` (positions are token indices of each side's sequence)."""

    boundaries: np.ndarray  # [B] int64, the common boundaries in shared coordinates, ascending
    teacher_chunk: np.ndarray  # [T_t] int64, the chunk of each teacher token, -1: none
    student_chunk: np.ndarray  # [T_s] int64, the chunk of each student token, -1: none
    student_to_teacher: np.ndarray  # [T_s] int64, the teacher token ending at the same place
    n_chunks: int

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(student positions, teacher positions) of the exact case, ascending."""
        s = np.flatnonzero(self.student_to_teacher >= 0)
        return s, self.student_to_teacher[s]


def content_spans(
    text: str, contents: Sequence[str], turns: Spans, where: str = "content_spans"
) -> list[tuple[int, int]]:
    """Where each assistant turn's content sits in a rendered ``text``: the content stripped of
    leading and trailing whitespace (templates differ in whether they trim it), searched inside
    the turn's span ``turns[i]`` (:func:`distill.data.dataset.assistant_spans`). A template
    that does not render the content verbatim is refused (DistillError starting with
    ``where``)."""
    out = []
    for i, (c, (lo, hi)) in enumerate(zip(contents, turns, strict=True)):
        c = c.strip()
        at = text.find(c, lo, hi)
        if at < 0:
            raise DistillError(
                f"{where}: assistant turn {i}'s content is not rendered verbatim by the chat "
                "template; cannot align tokenizers on it"
            )
        out.append((at, at + len(c)))
    return out


def rendered_contents(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """(text, turns, contents): ``messages`` rendered by ``tokenizer``'s chat template, each
    assistant turn's span in it and its content's (:func:`content_spans`)."""
    text, turns = assistant_spans(tokenizer, messages, where)
    said = [m["content"] for m in messages if m["role"] == "assistant"]
    return text, turns, content_spans(text, said, turns, where)


def tokens_with_offsets(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T] int64, character offsets [T, 2] int64) of ``text``, no special tokens added."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(enc["input_ids"], dtype=np.int64), _as_offsets(enc["offset_mapping"])


def _as_offsets(offsets: Any) -> np.ndarray:
    a = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return a


def _bases(spans: Spans) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    lengths = sp[:, 1] - sp[:, 0]
    base = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    return sp[:, 0], sp[:, 1], base


def _locate(pos: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The turn whose closed span ``[lo, hi]`` holds each position, -1 for none."""
    if lo.size == 0:
        return np.full(pos.shape, -1, dtype=np.int64)
    i = np.searchsorted(lo, pos, side="right") - 1
    ok = (i >= 0) & (pos <= hi[np.maximum(i, 0)])
    return np.where(ok, i, -1)


@dataclass(frozen=True)
class _Side:
    inside: np.ndarray  # [T] bool: the token lies wholly inside a turn's content
    s: np.ndarray  # [T] shared start (valid where inside)
    e: np.ndarray  # [T] shared end (valid where inside)
    end_turn: np.ndarray  # [T] the turn whose closed span holds the token's end, -1: none
    e_shared: np.ndarray  # [T] the end in shared coordinates (valid where end_turn >= 0)
    after: np.ndarray  # [T] bool: a boundary after the token
    points: np.ndarray  # the side's boundaries in shared coordinates, ascending unique


def _side(offsets: Any, spans: Spans) -> _Side:
    off = _as_offsets(offsets)
    s, e = off[:, 0], off[:, 1]
    lo, hi, base = _bases(spans)
    nonempty = e > s
    idx = np.flatnonzero(nonempty)
    after = np.zeros(len(s), dtype=bool)
    before = np.zeros(len(s), dtype=bool)
    if idx.size:
        ns, ne = s[idx], e[idx]
        a = np.ones(idx.size, dtype=bool)
        a[:-1] = ns[1:] >= ne[:-1]  # the next token starts at or after this one's end
        b = np.ones(idx.size, dtype=bool)
        b[1:] = ne[:-1] <= ns[1:]
        after[idx], before[idx] = a, b
    st, et = _locate(s, lo, hi), _locate(e, lo, hi)
    inside = nonempty & (st >= 0) & (st == et)
    bi = base[np.maximum(st, 0)] - lo[np.maximum(st, 0)]
    be = base[np.maximum(et, 0)] - lo[np.maximum(et, 0)]
    e_sh = e + be
    pts = [
        e_sh[after & (et >= 0) & nonempty],
        (s + bi)[before & (st >= 0) & nonempty],
    ]
    return _Side(inside, s + bi, e + bi, et, e_sh, after, np.unique(np.concatenate(pts)))


def _chunks(side: _Side, bounds: np.ndarray, valid: np.ndarray, dense: np.ndarray) -> np.ndarray:
    out = np.full(side.inside.shape, -1, dtype=np.int64)
    if bounds.size < 2:
        return out
    c = np.searchsorted(bounds, side.s, side="right") - 1
    cc = np.clip(c, 0, bounds.size - 2)
    ok = side.inside & (c >= 0) & (c <= bounds.size - 2) & (side.e <= bounds[cc + 1]) & valid[cc]
    out[ok] = dense[cc[ok]]
    return out


def align(
    teacher_offsets: Any, teacher_spans: Spans, student_offsets: Any, student_spans: Spans
) -> Alignment:
    """Align two tokenisations over the assistant content both share (see the module
    docstring). ``*_spans``: per assistant turn, the ``(start, end)`` characters of its content
    in that side's text; turn ``i`` must be the same string on both sides (equal lengths are
    checked here)."""
    t_lo, t_hi, _ = _bases(teacher_spans)
    s_lo, s_hi, base = _bases(student_spans)
    if len(t_lo) != len(s_lo) or not np.array_equal(t_hi - t_lo, s_hi - s_lo):
        raise DistillError(
            "teacher and student assistant contents differ (turns or lengths); cannot align"
        )
    for spans in (teacher_spans, student_spans):
        sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        if (sp[:, 1] < sp[:, 0]).any() or (sp[1:, 0] <= sp[:-1, 1]).any():
            raise DistillError("assistant content spans must be in order and apart")
    t, s = _side(teacher_offsets, teacher_spans), _side(student_offsets, student_spans)
    bounds = np.intersect1d(t.points, s.points)
    # an interval between consecutive common boundaries is a chunk when it lies in one turn
    turn_start = base
    turn_end = base + (t_hi - t_lo)
    if bounds.size >= 2:
        left, right = bounds[:-1], bounds[1:]
        ti = np.searchsorted(turn_start, left, side="right") - 1
        valid = (ti >= 0) & (right <= turn_end[np.maximum(ti, 0)])
    else:
        valid = np.zeros(0, dtype=bool)
    dense = np.cumsum(valid) - 1
    # the exact case: both end on a common boundary at the same place
    tb = (t.end_turn >= 0) & t.after & np.isin(t.e_shared, bounds)
    t_pos = np.flatnonzero(tb)
    t_end = t.e_shared[t_pos]  # ascending, unique: boundary ends strictly increase
    s2t = np.full(s.inside.shape, -1, dtype=np.int64)
    sb = np.flatnonzero((s.end_turn >= 0) & s.after)
    if t_pos.size and sb.size:
        k = np.clip(np.searchsorted(t_end, s.e_shared[sb]), 0, t_end.size - 1)
        hit = t_end[k] == s.e_shared[sb]
        s2t[sb[hit]] = t_pos[k[hit]]
    return Alignment(
        boundaries=bounds,
        teacher_chunk=_chunks(t, bounds, valid, dense),
        student_chunk=_chunks(s, bounds, valid, dense),
        student_to_teacher=s2t,
        n_chunks=int(valid.sum()),
    )


def target_pairs(
    al: Alignment, student_mask: np.ndarray, teacher_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The exact case at target positions: ``(j, r)`` with student position ``j`` and the
    teacher's target row ``r`` (an index into the shard's ``[N, w]`` target arrays and
    ``token_logprobs``) where both sides' next token is an assistant token
    (``mask[j + 1] == mask[i + 1] == 1`` for ``i = student_to_teacher[j]``)."""
    sm, tm = np.asarray(student_mask), np.asarray(teacher_mask)
    j = np.flatnonzero(al.student_to_teacher >= 0)
    i = al.student_to_teacher[j]
    keep = (j + 1 < sm.size) & (i + 1 < tm.size)
    j, i = j[keep], i[keep]
    keep = (sm[j + 1] == 1) & (tm[i + 1] == 1)
    rows = np.cumsum(tm[1:], dtype=np.int64) - 1  # the target row of each position
    return j[keep], rows[i[keep]]


def chunk_logprobs(
    chunk: np.ndarray, token_logprobs: np.ndarray, loss_mask: np.ndarray, n_chunks: int
) -> tuple[np.ndarray, np.ndarray]:
    """ALM's per-chunk log-likelihood on the side whose per-token log-probabilities are
    stored per target row (the teacher's ``token_logprobs``: row ``r`` holds the log-prob of
    the token after the ``r``-th target position): ``(sums [n_chunks] float64, complete
    [n_chunks] bool)``, a chunk complete when each of its tokens is an assistant token (so its
    log-prob is stored)."""
    chunk, mask = np.asarray(chunk), np.asarray(loss_mask)
    lp = np.zeros(chunk.size, dtype=np.float64)
    stored = np.zeros(chunk.size, dtype=bool)
    stored[1:] = mask[1:] == 1  # token t is predicted at target position t - 1
    rows = np.cumsum(mask[1:], dtype=np.int64) - 1
    t = np.flatnonzero(stored)
    lp[t] = np.asarray(token_logprobs, dtype=np.float64)[rows[t - 1]]
    inside = chunk >= 0
    sums = np.bincount(chunk[inside], weights=lp[inside], minlength=n_chunks)
    tokens = np.bincount(chunk[inside], minlength=n_chunks)
    missing = np.bincount(chunk[inside & ~stored], minlength=n_chunks)
    return sums, (tokens > 0) & (missing == 0)


def chunk_rows(
    chunk: np.ndarray, loss_mask: np.ndarray, n_chunks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ALM's rows on the side that computes its log-probabilities itself (the student):
    ``(positions [m], chunks [m], complete [n_chunks] bool)``, the positions ``j`` whose next
    token ``j + 1`` lies in a chunk and is an assistant token (the student's log-prob of it at
    ``j`` counts towards that chunk), and the chunks all of whose tokens are such (as
    :func:`chunk_logprobs` defines complete)."""
    chunk, mask = np.asarray(chunk), np.asarray(loss_mask)
    nxt = chunk[1:]
    j = np.flatnonzero((nxt >= 0) & (mask[1:] == 1))
    inside = chunk >= 0
    stored = np.zeros(chunk.size, dtype=bool)
    stored[1:] = mask[1:] == 1
    tokens = np.bincount(chunk[inside], minlength=n_chunks)
    missing = np.bincount(chunk[inside & ~stored], minlength=n_chunks)
    return j, nxt[j], (tokens > 0) & (missing == 0)
