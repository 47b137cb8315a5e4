"""``targets.alignment`` end to end on the tiny teacher (#24 item 1): the shards carry the
teacher tokens' character offsets, the assistant content spans and the actual next token's
log-probability; the split holds the teacher tokenizer once; a student with another vocabulary
aligns to the stored tokens (item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_job
from test_align import _content_prefix, bpe_student  # noqa: F401  (a fixture)

from distill.config import load_job
from distill.data.align import align, chunk_logprobs, content_spans, target_pairs
from distill.data.dataset import assistant_spans, to_messages
from distill.format.manifest import MANIFEST, Manifest
from distill.format.shards import read_shard
from distill.teacher.run import run_teacher


def _run(tmp_path: Path, teacher: Path, name: str, *sets: str) -> tuple[Manifest, list, Path]:
    extra = dict(s.split("=", 1) for s in sets)
    path = make_job(tmp_path / name, teacher, str(tmp_path / name / "o"), n_train=64, **extra)
    job = load_job(path)
    run_teacher(job)
    split = tmp_path / name / "o" / "train"
    m = Manifest.from_json((split / MANIFEST).read_bytes(), "m")
    samples = [s for sh in m.shards for s in read_shard(split / sh.name, m.vocab_size)]
    return m, samples, path


@pytest.fixture(scope="module")
def runs(tiny_teacher_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("align-teacher")
    for d in ("plain", "aligned"):
        (tmp / d).mkdir()
    # the job's default target (50 systematic draws, packed v2 with zstd); max_length 128 with
    # truncation = "right" cuts some samples inside their answer
    plain = _run(tmp, tiny_teacher_dir, "plain", 'targets__kind="sample"')
    aligned = _run(
        tmp, tiny_teacher_dir, "aligned", 'targets__kind="sample"', "targets__alignment=true"
    )
    return plain, aligned, tmp


def test_alignment_is_opt_in_and_in_the_fingerprint(runs) -> None:
    (mp, sp, _), (ma, sa, _), _ = runs
    assert all(not s.aligned for s in sp) and all(s.aligned for s in sa)
    assert "alignment" not in mp.targets and "token_offsets" not in mp.dtypes
    assert ma.targets["alignment"] is True and ma.dtypes["token_logprobs"] == "float32"
    assert mp.job_fingerprint != ma.job_fingerprint
    assert load_job_default_fingerprint_has_no_alignment()
    # the targets themselves are the same
    for a, b in zip(sp, sa, strict=True):
        np.testing.assert_array_equal(a.target_ids, b.target_ids)
        np.testing.assert_array_equal(a.target_counts, b.target_counts)


def load_job_default_fingerprint_has_no_alignment() -> bool:
    from distill.config import job_from_dict

    return "alignment" not in job_from_dict({}).targets.fingerprint()


def test_bytes_per_target_position(runs, capsys) -> None:
    """The shards' bytes per target position, and the codec's alone (every sample in one
    block, no tar headers): with and without the alignment fields."""
    from distill.format.blockcodec import encode_block
    from distill.format.codec import ShardFormat
    from distill.format.shards import ALIGN_FIELDS

    (mp, _, _), (ma, sa, path), _ = runs
    before, after = mp.nbytes / mp.target_tokens, ma.nbytes / ma.target_tokens
    t = load_job(path).targets
    fmt = ShardFormat(t.codec_spec(), t.spec(), ma.vocab_size)
    keys = [s.key for s in sa]
    with_fields = len(encode_block(keys, [s.arrays() for s in sa], fmt))
    plain = [{**s.arrays(), **dict.fromkeys(ALIGN_FIELDS)} for s in sa]
    without = len(encode_block(keys, plain, fmt))
    n = ma.target_tokens
    with capsys.disabled():
        print(
            f"\nbytes per target position, default target ({t.kind}, {t.draws} {t.sampling} "
            f"draws, packed v2 + zstd), tiny teacher, {ma.samples} samples, {n} positions, "
            f"{ma.tokens} tokens:\n  shards: {before:.2f} -> {after:.2f} "
            f"(+{100 * (after / before - 1):.1f}%)\n  one block: {without / n:.2f} -> "
            f"{with_fields / n:.2f} (+{(with_fields - without) / n:.2f}: "
            f"{(with_fields - without - 2 * n) / ma.tokens:.2f} bytes per token besides the "
            "float16 log-prob)"
        )
    assert mp.target_tokens == ma.target_tokens and mp.tokens == ma.tokens
    assert before < after
    # float16 log-probs cost 2 bytes a position; offsets and spans well under a byte a token
    assert 2 * n < with_fields - without < 2 * n + ma.tokens


def test_offsets_spans_and_tokenizer_reproduce_the_rendered_text(runs, smol_tokenizer) -> None:
    from transformers import AutoTokenizer

    _, (ma, sa, path), tmp = runs
    split = tmp / "aligned" / "o" / "train"
    assert ma.targets["tokenizer"] and all((split / n).is_file() for n in ma.targets["tokenizer"])
    tok = AutoTokenizer.from_pretrained(split / "tokenizer")  # no teacher model needed
    assert tok.get_vocab() == smol_tokenizer.get_vocab()
    records = [json.loads(x) for x in Path(load_job(path).data.train).read_text().splitlines()]
    truncated = 0
    for s, rec in zip(sa, records, strict=True):
        msgs = to_messages(rec, "t")
        text, turns = assistant_spans(tok, msgs, "t")
        said = [m["content"] for m in msgs if m["role"] == "assistant"]
        spans = content_spans(text, said, turns)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        n = len(s.input_ids)
        assert s.input_ids.tolist() == enc["input_ids"][:n]
        np.testing.assert_array_equal(s.token_offsets, np.asarray(enc["offset_mapping"][:n]))
        end = int(s.token_offsets[-1, 1])
        truncated += n < len(enc["input_ids"])
        want = [(a, min(b, end)) for a, b in spans if a < end]
        assert s.content_spans.tolist() == [list(x) for x in want]
        # the stored tokenizer decodes the ids to the rendered text the offsets index
        assert tok.decode(s.input_ids) == text[:end]
    assert truncated > 0  # max_length 128 cuts some


def test_token_logprobs_match_a_dense_reference(runs, tiny_teacher_dir) -> None:
    from distill.models import load_model

    _, (_, sa, _), _ = runs
    model = load_model(tiny_teacher_dir, "float32", "cpu", "none").eval()
    for s in sa[:6]:
        with torch.no_grad():
            x = torch.from_numpy(s.input_ids.astype(np.int64))[None]
            lp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1).numpy()
        pos = s.target_positions()
        want = lp[pos, s.input_ids[pos + 1].astype(np.int64)]
        np.testing.assert_allclose(s.token_logprobs, want.astype(np.float16), rtol=2e-3, atol=2e-3)


def test_a_bpe_student_aligns_to_the_stored_tokens(runs, bpe_student, smol_tokenizer) -> None:  # noqa: F811
    _, (_, sa, path), _ = runs
    records = [json.loads(x) for x in Path(load_job(path).data.train).read_text().splitlines()]
    total = pairs = chunks = 0
    for s, rec in zip(sa, records, strict=True):
        msgs = to_messages(rec, "t")
        text, turns = assistant_spans(bpe_student, msgs, "s")
        said = [m["content"] for m in msgs if m["role"] == "assistant"]
        spans = content_spans(text, said, turns)
        # the teacher's sample may be truncated: the student keeps the same content
        t_sp = s.content_spans.tolist()
        spans = [(a, a + (tb - ta)) for (a, _), (ta, tb) in zip(spans, t_sp, strict=False)]
        enc = bpe_student(text, add_special_tokens=False, return_offsets_mapping=True)
        got = align(s.token_offsets, t_sp, enc["offset_mapping"], spans)
        t_text = smol_tokenizer.decode(s.input_ids)
        for j, i in zip(*got.pairs(), strict=True):  # the same content read so far
            t_end, s_end = int(s.token_offsets[i, 1]), enc["offset_mapping"][j][1]
            assert _content_prefix(t_text, t_sp, t_end) == _content_prefix(text, spans, s_end)
        total += len(got.pairs()[0])
        # item 3's inputs: the exact pairs at target positions (student position, teacher
        # target row) and the complete chunks' teacher log-likelihoods
        s_start = np.asarray(enc["offset_mapping"])[:, 0]
        s_mask = np.zeros(len(s_start), np.uint8)
        for lo, hi in turns:
            s_mask[(s_start >= lo) & (s_start < hi)] = 1
        j, r = target_pairs(got, s_mask, s.loss_mask)
        np.testing.assert_array_equal(s.target_positions()[r], got.student_to_teacher[j])
        assert (s_mask[j + 1] == 1).all()
        pairs += len(j)
        sums, complete = chunk_logprobs(
            got.teacher_chunk, s.token_logprobs, s.loss_mask, got.n_chunks
        )
        chunks += int(complete.sum())
        assert (sums[complete] < 0).all()
    assert total > 100 and pairs > 100 and chunks > 100


def test_resume_reproduces_the_bytes_and_the_set_trains(runs) -> None:
    """A shard without its sidecar is re-verified through decode -> encode (the alignment
    fields round-trip exactly: same bytes); the tokenizer's create-only files are found there;
    a same-vocab student trains from the set as from any other."""
    from distill.student.train import train

    _, (ma, _, path), tmp = runs
    split = tmp / "aligned" / "o" / "train"
    (split / MANIFEST).unlink()
    (split / "shard-000001.json").unlink()
    run_teacher(load_job(path))
    m2 = Manifest.from_json((split / MANIFEST).read_bytes(), "m")
    assert [s.sha256 for s in m2.shards] == [s.sha256 for s in ma.shards]
    assert m2.targets == ma.targets and m2.job_fingerprint == ma.job_fingerprint
    summary = train(load_job(path, ["train.epochs=1", "train.max_steps=2"]))
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
