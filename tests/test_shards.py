"""Shard and manifest round trips, and corrupt input."""

import numpy as np
import pytest

from distill.errors import DistillError
from distill.format.codec import Codec, ShardFormat
from distill.format.manifest import Manifest
from distill.format.shards import TargetSample, read_shard, write_shard
from distill.format.spec import TargetSpec


def fmt(k: int) -> ShardFormat:
    """Packed v2 with float16 values: what the samples below hold, stored exactly."""
    return ShardFormat(Codec(values="f16"), TargetSpec("topk", k), 49152)


def sample(key: str, t: int, k: int, rng: np.random.Generator) -> TargetSample:
    """Top-k rows as the codec orders them (ids ascending) with float16-exact values."""
    mask = (rng.random(t) < 0.5).astype(np.uint8)
    mask[-1] = 1
    n = int(mask[1:].sum())
    return TargetSample(
        key=key,
        input_ids=rng.integers(0, 49152, t).astype(np.uint16),
        loss_mask=mask,
        target_ids=np.cumsum(rng.integers(1, 6000, (n, k)), axis=1).astype(np.uint16),
        target_logprobs=-rng.random((n, k)).astype(np.float16).astype(np.float32),
    )


def test_shard_round_trip_is_exact_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    samples = [sample(f"d-{i:07d}", int(rng.integers(2, 40)), 8, rng) for i in range(20)]
    st = write_shard(tmp_path / "a.tar", samples, fmt(8))
    st2 = write_shard(tmp_path / "b.tar", samples, fmt(8))
    assert st.sha256 == st2.sha256 and st.nbytes == (tmp_path / "a.tar").stat().st_size
    assert (st.samples, st.first_key, st.last_key) == (20, "d-0000000", "d-0000019")
    assert st.tokens == sum(len(s.input_ids) for s in samples)
    back = list(read_shard(tmp_path / "a.tar"))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back, strict=True):
        for f in ("input_ids", "loss_mask", "target_ids", "target_logprobs"):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype and np.array_equal(x, y)


def test_truncated_or_garbage_shard_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(1)
    write_shard(tmp_path / "a.tar", [sample(f"k{i}", 30, 4, rng) for i in range(5)], fmt(4))
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DistillError, match="corrupt"):
        list(read_shard(tmp_path / "cut.tar"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(DistillError, match="corrupt"):
        list(read_shard(tmp_path / "junk.tar"))


def test_inconsistent_sample_is_refused(tmp_path):
    """Packed v2 cannot store rows that do not match the mask: the writer refuses them (a
    reader meeting one in an npz v0 shard refuses it too: test_legacy.py)."""
    rng = np.random.default_rng(2)
    s = sample("k", 10, 4, rng)
    s.target_ids = s.target_ids[:-1]
    s.target_logprobs = s.target_logprobs[:-1]
    with pytest.raises(DistillError, match="target rows, its loss mask"):
        write_shard(tmp_path / "a.tar", [s], fmt(4))


def test_manifest_round_trip_and_unknown_schema(tmp_path):
    rng = np.random.default_rng(3)
    st = write_shard(tmp_path / "a.tar", [sample("k", 10, 4, rng)], fmt(4))
    m = Manifest(
        split="train",
        teacher="t",
        teacher_config_sha256="c",
        tokenizer_fingerprint="f",
        vocab_size=49152,
        target_kind="topk",
        width=4,
        dtypes={"target_ids": "uint16"},
        max_length=64,
        job_fingerprint="j",
        shards=[st, st],
    )
    back = Manifest.from_json(m.to_json(), "m")
    assert back == m and back.samples == 2 and back.nbytes == 2 * st.nbytes
    raw = m.to_json().replace(b'"schema_version": 2', b'"schema_version": 99')
    with pytest.raises(DistillError, match="schema version 99 is not supported"):
        Manifest.from_json(raw, "m")
    with pytest.raises(DistillError, match="not valid JSON"):
        Manifest.from_json(b"{", "m")


def test_token_budget_batches_cover_everything_once_and_bound_padding():
    from distill.teacher.batching import token_budget_batches

    rng = np.random.default_rng(4)
    lengths = [int(x) for x in rng.integers(5, 300, 500)]
    batches = token_budget_batches(lengths, 1024)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) * longest <= 1024 or len(b) == 1
        assert min(lengths[i] for i in b) >= 0.9 * longest
