"""The alignment fields of packed v2 blocks (``targets.alignment``, #24): token offsets,
assistant content spans and the actual next token's log-probability round-trip; blocks
without them keep their bytes and read as before."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from test_codec import KINDS, decode1, encode1, make_samples, packed2

from distill.errors import DistillError
from distill.format.blockcodec import decode_block, encode_block
from distill.format.codec import ShardFormat
from distill.format.shards import TargetSample, read_shard, write_shard

FLAGS = 6  # the flags byte of a block's header: magic (3), version, kind, value map, flags


def with_alignment(s: TargetSample, seed: int) -> TargetSample:
    """``s`` with random offsets as fast tokenizers give them: contiguous tokens, some
    overlapping (a multi-byte character over byte-level tokens), some (0, 0) specials."""
    rng = np.random.default_rng(seed)
    t = len(s.input_ids)
    off, end = np.zeros((t, 2), dtype=np.int32), 0
    for i in range(t):
        r = rng.random()
        if r < 0.05:
            off[i] = (0, 0)
            continue
        start = end - 1 if (r < 0.2 and end > 0) else end
        end = max(end, start + int(rng.integers(1, 9)))
        off[i] = (start, end)
    spans = np.array([[1, max(2, end // 2)], [end // 2 + 1, end + 1]], dtype=np.int32)
    n = int(s.loss_mask[1:].sum())
    lps = np.log(rng.random(n) + 1e-3).astype(np.float16).astype(np.float32)
    return TargetSample(
        **{
            **s.__dict__,
            "token_offsets": off,
            "content_spans": spans[: seed % 3],
            "token_logprobs": lps,
        }
    )


def assert_alignment_equal(a: TargetSample, b: TargetSample) -> None:
    np.testing.assert_array_equal(a.token_offsets, b.token_offsets)
    np.testing.assert_array_equal(a.content_spans.reshape(-1, 2), b.content_spans)
    np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs)  # float16 exact
    for f in ("input_ids", "loss_mask"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.kind)
@pytest.mark.parametrize("zstd", [False, True])
def test_alignment_fields_round_trip_through_shards(tmp_path, spec, zstd) -> None:
    fmt = ShardFormat(packed2(zstd=zstd, block_tokens=64), spec, 500)
    samples = [with_alignment(s, i) for i, s in enumerate(make_samples(spec, n=9))]
    st = write_shard(tmp_path / "a.tar", samples, fmt)
    back = list(read_shard(tmp_path / "a.tar"))
    assert [b.key for b in back] == [s.key for s in samples]
    for a, b in zip(samples, back, strict=True):
        assert b.aligned and b.token_offsets.dtype == np.int32
        assert b.token_logprobs.dtype == np.float32
        assert_alignment_equal(a, b)
    # the targets decode as without the alignment fields, and the fields cost bytes
    plain = [
        TargetSample(
            **{
                k: getattr(s, k)
                for k in (
                    "key",
                    "input_ids",
                    "loss_mask",
                    "target_ids",
                    "target_logprobs",
                    "target_counts",
                )
            }
        )
        for s in samples
    ]
    st0 = write_shard(tmp_path / "p.tar", plain, fmt)
    for a, b in zip(read_shard(tmp_path / "p.tar"), back, strict=True):
        assert not a.aligned and a.token_logprobs is None
        np.testing.assert_array_equal(a.target_ids, b.target_ids)
        np.testing.assert_array_equal(a.target_logprobs, b.target_logprobs)
    assert st.sha256 != st0.sha256
    keys = [s.key for s in samples]
    with_fields = encode_block(keys, [s.arrays() for s in samples], fmt)
    assert len(with_fields) > len(encode_block(keys, [s.arrays() for s in plain], fmt))
    assert write_shard(tmp_path / "b.tar", samples, fmt).sha256 == st.sha256  # deterministic


def test_blocks_without_alignment_keep_flag_zero_and_their_bytes() -> None:
    spec = KINDS[0]
    fmt = ShardFormat(packed2(zstd=False), spec, 500)
    s = make_samples(spec, n=1)[0]
    data = encode1(s, fmt)
    assert data[FLAGS] == 0  # flags byte: neither zstd nor alignment
    arrays, _ = decode1(data)
    assert all(arrays.get(f) is None for f in ("token_offsets", "content_spans", "token_logprobs"))
    aligned = encode1(with_alignment(s, 1), fmt)
    assert aligned[FLAGS] == 2
    # the body starts with the same counts and ten section lengths
    assert aligned[32 : 32 + 52] == data[32 : 32 + 52]


def test_mixed_alignment_in_a_block_is_refused() -> None:
    spec = KINDS[0]
    fmt = ShardFormat(packed2(), spec, 500)
    a, b = make_samples(spec, n=2)
    with pytest.raises(DistillError, match="some samples carry alignment"):
        encode_block([a.key, b.key], [with_alignment(a, 0).arrays(), b.arrays()], fmt)


def test_bad_offsets_are_refused_and_corrupt_alignment_is_detected() -> None:
    spec = KINDS[0]
    fmt = ShardFormat(packed2(zstd=False), spec, 500)
    s = with_alignment(make_samples(spec, n=1)[0], 1)
    bad = s.token_offsets.copy()
    bad[1] = (bad[1, 1] + 1, bad[1, 1])  # end < start
    with pytest.raises(DistillError, match="offsets"):
        encode1({**s.arrays(), "token_offsets": bad}, fmt)
    data = encode1(s, fmt)
    with pytest.raises(DistillError):
        decode_block(data[:-3], "x")  # cut inside the log-prob section
    # an unknown flag bit (a newer writer) is refused, not misread
    head = bytearray(data[:28])
    head[FLAGS] |= 4
    crc = struct.pack("<I", zlib.crc32(data[32:], zlib.crc32(bytes(head))))
    with pytest.raises(DistillError, match="flags"):
        decode_block(bytes(head) + crc + data[32:], "x")


def test_validate_refuses_inconsistent_alignment_shapes() -> None:
    s = with_alignment(make_samples(KINDS[0], n=1)[0], 1)
    s.validate("ok")
    s.token_logprobs = s.token_logprobs[:-1]
    with pytest.raises(DistillError, match="inconsistent"):
        s.validate("x")


def test_old_shard_sets_read_without_alignment_fields() -> None:
    from pathlib import Path

    old = Path(__file__).resolve().parent / "data" / "old_shards"
    tars = sorted(old.glob("*/shard-000000.tar"))
    assert len(tars) == 3  # npz v0 and two packed v1 sets, real SmolLM2 targets
    for tar in tars:
        samples = list(read_shard(tar))
        assert samples and all(not s.aligned for s in samples)
        assert all(s.content_spans is None and s.token_logprobs is None for s in samples)
