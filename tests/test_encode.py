"""The batched, multi-process encoder gives exactly the one-sample loop's ids and masks (the
real SmolLM2 tokenizer and chat template), and the same errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distill.data.encode import Encoder, blocks, encode_block, encode_serial, items
from distill.data.prepare import Rules, prepare
from distill.data.records import DataFile, iter_split
from distill.data.speed import tokens_per_second

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "train.jsonl"

CHATS = [
    {"prompt": "2+2?", "response": "4", "system": "Be brief."},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke"},
            {"role": "assistant", "content": "Why did the chicken cross the road?"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "a " * 40},
            {"role": "assistant", "content": "b " * 40},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d " * 30},
        ]
    },
    {"prompt": "Long answer please.", "response": " ".join(["word"] * 200)},
    {"prompt": "ünïcödé ✓ 日本語", "response": "émoji 🎉 ok"},
]


def _records(path: Path) -> list:
    return list(items(iter_split([DataFile(path.name, path, str(path))])))


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[0] == y[0]
        if len(x) == 3:
            assert x == y
            continue
        assert np.array_equal(x[1], y[1]) and np.array_equal(x[2], y[2]) and x[3] == y[3]
        assert x[1].dtype == y[1].dtype == np.int32 and x[2].dtype == y[2].dtype == np.uint8


@pytest.mark.parametrize("truncation", ["right", "error"])
def test_batched_equals_one_sample_loop_on_chats(smol_tokenizer, tmp_path, truncation):
    p = tmp_path / "chats.jsonl"
    p.write_text("\n".join(json.dumps(c) for c in CHATS * 3) + "\n", encoding="utf-8")
    recs = _records(p)
    for max_length in (48, 64, 512):
        want = encode_serial(smol_tokenizer, recs, max_length, truncation)
        _same(encode_block(smol_tokenizer, recs, max_length, truncation), want)
    # truncation happened and was refused / applied the same way
    short = encode_serial(smol_tokenizer, recs, 48, truncation)
    if truncation == "error":
        assert any(len(r) == 3 and "tokens > data.max_length=48" in r[2] for r in short)
    else:
        assert any(len(r) == 4 and r[3] for r in short)


def test_worker_processes_equal_the_one_sample_loop_on_the_demo_data(smol_tokenizer):
    recs = _records(DEMO)
    want = encode_serial(smol_tokenizer, recs, 256, "right")
    with Encoder(smol_tokenizer, workers=2) as enc:
        got = [r for bs in enc.encode(blocks(recs, 64), 256, "right") for r in bs]
    _same(got, want)


def test_prepare_in_workers_equals_in_process(smol_tokenizer, tmp_path):
    f = DataFile(DEMO.name, DEMO, str(DEMO))
    rules = Rules(128, "right")
    a = prepare([f], str(DEMO), smol_tokenizer, rules, per=100, workers=1)
    b = prepare([f], str(DEMO), smol_tokenizer, rules, per=100, workers=2)
    try:
        assert a.records == b.records == 879 and len(a.chunks()) == 9
        assert a.stats == b.stats
        for x, y in zip(a.chunks(), b.chunks(), strict=True):
            assert [s.key for s in x] == [s.key for s in y]
            for s, t in zip(x, y, strict=True):
                assert np.array_equal(s.input_ids, t.input_ids)
                assert np.array_equal(s.loss_mask, t.loss_mask)
    finally:
        a.close()
        b.close()


def test_tokens_per_second_reports_both_paths(smol_tokenizer):
    r = tokens_per_second([DataFile(DEMO.name, DEMO, str(DEMO))], smol_tokenizer, 256, workers=2)
    assert r["tokens"] > 50_000 and r["serial"] > 0 and r["parallel"] > 0
    assert r["workers"] == 2 and r["speedup"] == pytest.approx(r["parallel"] / r["serial"])


@pytest.mark.parametrize("max_length", [48, 512])
def test_alignment_keeps_offsets_and_content_spans(smol_tokenizer, tmp_path, max_length):
    """targets.alignment: the same ids and masks, plus each record's (truncated) offsets and
    its assistant contents' spans, which index the stripped contents in the rendered text."""
    from distill.data.dataset import assistant_spans

    p = tmp_path / "chats.jsonl"
    p.write_text("\n".join(json.dumps(c) for c in CHATS) + "\n", encoding="utf-8")
    recs = _records(p)
    plain = encode_block(smol_tokenizer, recs, max_length, "right")
    got = encode_block(smol_tokenizer, recs, max_length, "right", alignment=True)
    _same([r[:4] for r in got], plain)
    cut = 0
    for r, chat in zip(got, CHATS, strict=True):
        if len(r) == 3:  # nothing left to learn at this length: refused as without alignment
            continue
        i, ids, _, truncated, (off, spans) = r
        msgs = chat.get("messages") or [
            *([{"role": "system", "content": chat["system"]}] if "system" in chat else []),
            {"role": "user", "content": chat["prompt"]},
            {"role": "assistant", "content": chat["response"]},
        ]
        text, turns = assistant_spans(smol_tokenizer, msgs, "t")
        enc = smol_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert off.dtype == spans.dtype == np.int32
        np.testing.assert_array_equal(off, np.asarray(enc["offset_mapping"][: len(ids)]))
        said = [m["content"].strip() for m in msgs if m["role"] == "assistant"]
        end = int(off[:, 1].max())
        assert len(spans) == (len(said) if not truncated else len(spans)) > 0
        for (a, b), c, (lo, hi) in zip(spans.tolist(), said, turns, strict=False):
            assert lo <= a <= b <= min(hi, end) and text[a:b] == c[: b - a]
            assert b - a == len(c) or (truncated and b == end)
        cut += truncated
    assert cut > 0 if max_length == 48 else cut == 0


def test_prepare_with_alignment_in_workers_equals_in_process(smol_tokenizer):
    f = DataFile(DEMO.name, DEMO, str(DEMO))
    rules = Rules(128, "right", alignment=True)
    a = prepare([f], str(DEMO), smol_tokenizer, rules, per=300, workers=1)
    b = prepare([f], str(DEMO), smol_tokenizer, rules, per=300, workers=2)
    try:
        for x, y in zip(a.chunks(), b.chunks(), strict=True):
            for s, t in zip(x, y, strict=True):
                assert s.offsets is not None and s.offsets.shape == (len(s.input_ids), 2)
                assert np.array_equal(s.offsets, t.offsets)
                assert np.array_equal(s.content, t.content) and s.content.shape[1] == 2
    finally:
        a.close()
        b.close()


def test_token_store_keeps_offsets_and_spans_for_all_samples_or_none():
    from distill.data.tokens import TokenStore

    ids, mask = np.arange(3, dtype=np.int32), np.array([0, 1, 1], np.uint8)
    off = np.array([[0, 2], [2, 3], [3, 5]], np.int32)
    with TokenStore(["f"]) as st:
        st.append(0, 0, 1, ids, mask, off, np.zeros((0, 2), np.int32))  # no span: kept empty
        st.append(1, 0, 2, ids, mask, off + 5, np.array([[5, 9], [10, 10]], np.int32))
        with pytest.raises(ValueError, match="every sample or for none"):
            st.append(2, 0, 3, ids, mask)
        a, b = st.samples(0, 2)
        assert np.array_equal(a.offsets, off) and a.content.shape == (0, 2)
        assert np.array_equal(b.offsets, off + 5) and b.content.tolist() == [[5, 9], [10, 10]]
    with TokenStore(["f"]) as st:
        st.append(0, 0, 1, ids, mask)
        with pytest.raises(ValueError, match="every sample or for none"):
            st.append(1, 0, 2, ids, mask, off, np.zeros((0, 2), np.int32))
        (c,) = st.samples(0, 1)
        assert c.offsets is None and c.content is None
    with TokenStore(["f"]) as st:  # every sample without spans: an empty spans file
        st.append(0, 0, 1, ids, mask, off, np.zeros((0, 2), np.int32))
        (d,) = st.samples(0, 1)
        assert d.content.shape == (0, 2)
