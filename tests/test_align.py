"""Cross-tokenizer alignment (distill/data/align.py) against a pure-Python reference: random
splittings (seeded), then the real SmolLM2 tokenizer against a small BPE trained here."""

from __future__ import annotations

import random

import numpy as np
import pytest
from helpers import STUDENT_TEMPLATE, bpe_tokenizer

from distill.data.align import align, content_spans
from distill.data.dataset import assistant_spans
from distill.errors import DistillError

# --- the reference: one character position and one token at a time --------------------------


def _shared(spans):
    base, out = 0, []
    for lo, hi in spans:
        out.append((lo, hi, base))
        base += hi - lo + 1
    return out


def _to_shared(p, turns):
    for lo, hi, base in turns:
        if lo <= p <= hi:
            return base + p - lo
    return None


def _ref_side(offsets, spans):
    turns = _shared(spans)
    toks = [(k, s, e) for k, (s, e) in enumerate(offsets) if e > s]
    after, points = {}, set()
    for n, (k, s, e) in enumerate(toks):
        a = n == len(toks) - 1 or toks[n + 1][1] >= e
        b = n == 0 or toks[n - 1][2] <= s
        after[k] = a
        if a and _to_shared(e, turns) is not None:
            points.add(_to_shared(e, turns))
        if b and _to_shared(s, turns) is not None:
            points.add(_to_shared(s, turns))
    inside = {}
    for k, s, e in toks:
        for lo, hi, base in turns:
            if lo <= s and e <= hi:
                inside[k] = (base + s - lo, base + e - lo)
    return turns, after, points, inside


def reference(t_off, t_spans, s_off, s_spans):
    tt, t_after, t_pts, t_in = _ref_side(t_off, t_spans)
    st, s_after, s_pts, s_in = _ref_side(s_off, s_spans)
    common = sorted(t_pts & s_pts)
    chunks = []
    for a, b in zip(common, common[1:], strict=False):
        if any(base <= a and b <= base + hi - lo for lo, hi, base in st):
            chunks.append((a, b))

    def chunk_of(inside, n):
        out = [-1] * n
        for k, (s, e) in inside.items():
            for c, (a, b) in enumerate(chunks):
                if a <= s and e <= b:
                    out[k] = c
        return out

    t_ends = {}
    for k, (s, e) in enumerate(t_off):
        p = _to_shared(e, tt) if e > s else None
        if p is not None and t_after[k] and p in common:
            t_ends[p] = k
    s2t = [-1] * len(s_off)
    for j, (s, e) in enumerate(s_off):
        p = _to_shared(e, st) if e > s else None
        if p is not None and s_after[j] and p in t_ends:
            s2t[j] = t_ends[p]
    return common, chunk_of(t_in, len(t_off)), chunk_of(s_in, len(s_off)), s2t, len(chunks)


def check_against_reference(t_off, t_spans, s_off, s_spans):
    got = align(t_off, t_spans, s_off, s_spans)
    common, tc, sc, s2t, n = reference(t_off, t_spans, s_off, s_spans)
    assert got.boundaries.tolist() == common
    assert got.teacher_chunk.tolist() == tc
    assert got.student_chunk.tolist() == sc
    assert got.student_to_teacher.tolist() == s2t
    assert got.n_chunks == n
    return got


# --- random splittings -----------------------------------------------------------------------

ALPHABET = "ab c\né日🙂 x"


def _random_tokens(rng: random.Random, text: str) -> list[tuple[int, int]]:
    """Random cuts of ``text``; some one-character tokens split in two with the same offsets
    (a multi-byte character over byte-level tokens), some (0, 0) special tokens."""
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1)))
    bounds = [0, *cuts, len(text)]
    toks: list[tuple[int, int]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        toks.append((a, b))
        if b - a == 1 and rng.random() < 0.3:
            toks.append((a, b))
        if rng.random() < 0.05:
            toks.append((0, 0))
    return toks


def _random_side(rng: random.Random, contents: list[str], tag: str):
    text, spans = "", []
    for c in contents:
        text += tag * rng.randint(int(bool(spans)), 3) + rng.choice(["", " ", "\n"])
        spans.append((len(text), len(text) + len(c)))
        text += c + rng.choice(["", " ", "</s>"])
    return text, spans


@pytest.mark.parametrize("seed", range(300))
def test_align_matches_the_reference_on_random_splittings(seed: int) -> None:
    rng = random.Random(seed)
    contents = [
        "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
        for _ in range(rng.randint(1, 3))
    ]
    t_text, t_spans = _random_side(rng, contents, "<T>")
    s_text, s_spans = _random_side(rng, contents, "[student]")
    t_off, s_off = _random_tokens(rng, t_text), _random_tokens(rng, s_text)
    got = check_against_reference(t_off, t_spans, s_off, s_spans)
    # both sides' tokens in a chunk spell the chunk's text (the tokens cover the content)
    for c in range(got.n_chunks):
        t_txt = "".join(t_text[a:b] for a, b in _dedup(t_off, got.teacher_chunk == c))
        s_txt = "".join(s_text[a:b] for a, b in _dedup(s_off, got.student_chunk == c))
        assert t_txt == s_txt != ""
    # the exact case: the same content read up to the same character
    for j, i in zip(*got.pairs(), strict=True):
        tj = _content_prefix(t_text, t_spans, t_off[i][1])
        sj = _content_prefix(s_text, s_spans, s_off[j][1])
        assert tj == sj


def _dedup(off, sel):
    seen, out = set(), []
    for k in np.flatnonzero(sel):
        if tuple(off[k]) not in seen:
            seen.add(tuple(off[k]))
            out.append(off[k])
    return out


def _content_prefix(text, spans, end):
    """The assistant content up to character ``end`` (turns joined by a separator)."""
    parts = []
    for lo, hi in spans:
        if end < lo:
            break
        parts.append(text[lo : min(hi, end)])
    return "\x00".join(parts)


def test_align_refuses_different_contents() -> None:
    with pytest.raises(DistillError, match="differ"):
        align([(0, 3)], [(0, 3)], [(0, 4)], [(0, 4), (5, 6)])
    with pytest.raises(DistillError, match="differ"):
        align([(0, 3)], [(0, 3)], [(0, 4)], [(0, 4)])
    with pytest.raises(DistillError, match="in order"):  # turns touch: templates separate them
        align([(0, 3)], [(0, 1), (1, 2)], [(0, 4)], [(0, 1), (2, 3)])


def test_align_worked_example() -> None:
    # shared "ab cd"; teacher: "ab" " cd"; student: "a" "b" " c" "d"; then template tokens
    t_text, s_text = "T:ab cd|", "S::ab cd#"
    t_off = [(0, 2), (2, 4), (4, 7), (7, 8)]
    s_off = [(0, 0), (0, 3), (3, 4), (4, 5), (5, 7), (7, 8), (8, 9)]
    got = check_against_reference(t_off, [(2, 7)], s_off, [(3, 8)])
    assert t_text[2:7] == s_text[3:8]
    assert got.boundaries.tolist() == [0, 2, 5]
    assert got.teacher_chunk.tolist() == [-1, 0, 1, -1]
    assert got.student_chunk.tolist() == [-1, -1, 0, 0, 1, 1, -1]
    # "T:" and "S::" end at the content's start; "ab" and "b"; " cd" and "d"
    assert got.student_to_teacher.tolist() == [-1, 0, -1, 1, -1, 2, -1]


# --- real tokenizers: SmolLM2 (teacher) and a BPE with another vocab (student) ----------------


@pytest.fixture(scope="module")
def bpe_student():
    """A byte-level BPE (vocab 2000) with its own chat template (tests/helpers.py)."""
    return bpe_tokenizer()


CHATS = [
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "The answer is 4. Définitivement, 日本語 too 🙂!"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "List two fruits."},
        {"role": "assistant", "content": "  Apples and   pears.\n\n- kiwi\n"},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "def f(x):\n    return x ** 2  # ÿ 😀😀"},
    ],
]


def _encode(tokenizer, chat):
    text, turns = assistant_spans(tokenizer, chat, "test")
    contents = [m["content"] for m in chat if m["role"] == "assistant"]
    spans = content_spans(text, contents, turns)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, spans, enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


@pytest.mark.parametrize("chat", CHATS, ids=["one-turn", "two-turns"])
def test_align_smollm2_against_a_bpe_student(smol_tokenizer, bpe_student, chat) -> None:
    t_text, t_spans, t_ids, t_off = _encode(smol_tokenizer, chat)
    s_text, s_spans, s_ids, s_off = _encode(bpe_student, chat)
    assert bpe_student.vocab_size != smol_tokenizer.vocab_size
    assert t_text != s_text
    assert [t_text[a:b] for a, b in t_spans] == [s_text[a:b] for a, b in s_spans]
    # offsets are characters, not bytes: each turn's content is found at its character span
    assert any(len(t_text[a:b].encode()) > b - a for a, b in t_spans)
    # a multi-byte character split over byte-level tokens: overlapping character offsets
    assert any(t_off[k + 1][0] < t_off[k][1] for k in range(len(t_off) - 1))
    got = check_against_reference(t_off, t_spans, s_off, s_spans)
    assert got.n_chunks > 5
    for c in range(got.n_chunks):  # a chunk decodes to the same text on both sides
        t_dec = smol_tokenizer.decode(np.asarray(t_ids)[got.teacher_chunk == c])
        s_dec = bpe_student.decode(np.asarray(s_ids)[got.student_chunk == c])
        assert t_dec == s_dec != ""
    s_pos, t_pos = got.pairs()
    assert len(s_pos) > 5
    for j, i in zip(s_pos, t_pos, strict=True):
        assert _content_prefix(t_text, t_spans, t_off[i][1]) == _content_prefix(
            s_text, s_spans, s_off[j][1]
        )
    # the prompt token before each turn's content: ChatML's "assistant\n" ends where an
    # unindented content starts; the student's "]: " + "The" merges into " The", which crosses
    # the edge (in no chunk; still aligned by its end where the teacher ends there too)
    s_arr, t_arr = np.asarray(s_off), np.asarray(t_off)
    contents = [m["content"] for m in chat if m["role"] == "assistant"]
    for c, (lo, _), (tlo, _) in zip(contents, s_spans, t_spans, strict=True):
        t_end = np.flatnonzero(t_arr[:, 1] == tlo)
        assert t_end.size == (c == c.lstrip())
        s_end = np.flatnonzero(s_arr[:, 1] == lo)
        if s_end.size and t_end.size:
            assert got.student_to_teacher[s_end[-1]] == t_end[-1]
        if not s_end.size:
            cross = np.flatnonzero((s_arr[:, 0] < lo) & (s_arr[:, 1] > lo))
            assert cross.size == 1 and got.student_chunk[cross[0]] == -1


def test_a_template_that_changes_the_content_is_a_bad_record(bpe_student) -> None:
    """With alignment the content must be rendered verbatim (stripped): a template that
    rewrites it makes the record invalid, named, as other per-record errors."""
    import copy

    from distill.data.encode import encode_block

    tok = copy.deepcopy(bpe_student)
    tok.chat_template = STUDENT_TEMPLATE.replace("m['content'] | trim", "m['content'] | upper")
    rec = (0, 1, "f.jsonl:1", {"messages": CHATS[0]})
    assert len(encode_block(tok, [rec], 256, "right")[0]) == 4
    (bad,) = encode_block(tok, [rec], 256, "right", alignment=True)
    assert bad[:2] == (0, 1) and "f.jsonl:1: assistant turn 0's content is not rendered" in bad[2]


@pytest.mark.parametrize("seed", range(60))
def test_target_pairs_and_chunk_logprobs_match_loops(seed: int) -> None:
    from distill.data.align import chunk_logprobs, target_pairs

    rng = random.Random(seed)
    contents = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 25)))]
    t_text, t_spans = _random_side(rng, contents, "<T>")
    s_text, s_spans = _random_side(rng, contents, "[student]")
    t_off, s_off = _random_tokens(rng, t_text), _random_tokens(rng, s_text)
    al = align(t_off, t_spans, s_off, s_spans)
    tm = np.array([rng.random() < 0.7 for _ in t_off], dtype=np.uint8)
    sm = np.array([rng.random() < 0.7 for _ in s_off], dtype=np.uint8)
    rows = [p for p in range(len(tm) - 1) if tm[p + 1]]  # the teacher's target positions
    want = [
        (j, rows.index(i))
        for j, i in enumerate(al.student_to_teacher.tolist())
        if i >= 0 and j + 1 < len(sm) and sm[j + 1] and i + 1 < len(tm) and tm[i + 1]
    ]
    j, r = target_pairs(al, sm, tm)
    assert list(zip(j.tolist(), r.tolist(), strict=True)) == want
    lps = -np.arange(1, len(rows) + 1, dtype=np.float64) / 7  # row r: -(r + 1) / 7
    sums, complete = chunk_logprobs(al.teacher_chunk, lps, tm, al.n_chunks)
    for c in range(al.n_chunks):
        toks = [t for t in range(len(t_off)) if al.teacher_chunk[t] == c]
        ok = bool(toks) and all(t >= 1 and tm[t] for t in toks)
        assert complete[c] == ok
        if ok:
            assert sums[c] == pytest.approx(sum(lps[rows.index(t - 1)] for t in toks))
