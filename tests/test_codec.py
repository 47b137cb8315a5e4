"""The packed v2 codec: exact round trips, quantisation bounds, blocks, refusals, and its bytes
pinned (shard sets of older distill versions: test_legacy.py)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from codec_checks import assert_entries_within_bounds, rows

from distill.errors import DistillError
from distill.format.bitpack import bits_for, pack_bits, unpack_bits
from distill.format.blockcodec import decode_block, encode_block
from distill.format.codec import Codec, ShardFormat
from distill.format.manifest import Manifest
from distill.format.shards import TargetSample, read_shard, write_shard
from distill.format.spec import TargetSpec
from distill.teacher.extract import draw_uniforms, extract

KINDS = [
    TargetSpec("topk", k=8),
    TargetSpec("topp", k=12, top_p=0.8),
    TargetSpec("sample", draws=30),
    TargetSpec("topk+sample", k=4, draws=30),
]


def make_samples(
    spec: TargetSpec, vocab: int = 500, n: int = 6, seed: int = 0
) -> list[TargetSample]:
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, 16, generator=g) * 1.5
    out = []
    vdt = np.uint16 if vocab <= 2**16 else np.int32
    for i in range(n):
        t = int(rng.integers(3, 60))
        mask = (rng.random(t) < 0.6).astype(np.uint8)
        mask[-1] = 1
        rows = int(mask[1:].sum())
        key = f"d-{i:07d}"
        u = draw_uniforms(0, key, rows, spec.draws) if spec.sampled else None
        x = extract(torch.randn(rows, 16, generator=g), weight, spec, 7, u)
        out.append(
            TargetSample(
                key=key,
                input_ids=rng.integers(0, vocab, t).astype(vdt),
                loss_mask=mask,
                target_ids=x.ids.numpy().astype(vdt),
                target_logprobs=x.values.numpy(),
                target_counts=x.counts.numpy().astype(np.uint16) if spec.sampled else None,
            )
        )
    return out


def packed2(values: str = "log8", zstd: bool = True, block_tokens: int = 16384) -> Codec:
    return Codec("packed", 2, values=values, zstd=zstd, block_tokens=block_tokens)


def encode1(s: TargetSample | dict, fmt: ShardFormat) -> bytes:
    """One sample as a one-sample block."""
    arrays = s.arrays() if isinstance(s, TargetSample) else s
    return encode_block(["s"], [arrays], fmt)


def decode1(data: bytes) -> tuple[dict, int]:
    (((_, arrays),), vocab) = decode_block(data, "x")
    return arrays, vocab


@pytest.mark.parametrize("b", [0, 1, 3, 7, 8, 9, 13, 16, 17, 24, 31, 32, 33])
def test_bit_packing_round_trips(b):
    rng = np.random.default_rng(b)
    v = rng.integers(0, 2**b, 101, dtype=np.uint64) if b else np.zeros(101, np.uint64)
    buf = pack_bits(v, b)
    assert len(buf) == (101 * b + 7) // 8
    assert np.array_equal(unpack_bits(buf, 101, b), v.astype(np.int64))
    assert (
        bits_for(0) == 0 and bits_for(1) == 1 and bits_for(49151) == 16 and bits_for(128255) == 17
    )


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.kind)
@pytest.mark.parametrize("values", ["log8", "pow8", "f16"])
@pytest.mark.parametrize("zstd", [False, True])
def test_round_trip_exact_ids_mask_counts_and_bounded_values(spec, values, zstd):
    fmt = ShardFormat(packed2(values, zstd), spec, 500)
    for s in make_samples(spec):
        data = encode1(s, fmt)
        back, vocab = decode1(data)
        assert vocab == 500
        assert (
            np.array_equal(back["input_ids"], s.input_ids) and back["input_ids"].dtype == np.uint16
        )
        assert np.array_equal(back["loss_mask"], s.loss_mask)
        assert back["target_ids"].shape == s.target_ids.shape == (s.loss_mask[1:].sum(), spec.width)
        assert_entries_within_bounds(s, TargetSample(s.key, **back), spec, values)
        # padding: the row's first id, -inf, count 0; re-encoding gives the same bytes
        n_real = np.isfinite(back["target_logprobs"]).sum(1)
        for r, n in enumerate(n_real):
            assert (back["target_ids"][r, n:] == back["target_ids"][r, 0]).all()
        assert encode1(back, fmt) == data


def test_log8_clamps_below_minus_l_and_pow8_never_gives_zero():
    spec = TargetSpec("topk", k=3)
    s = TargetSample(
        "k",
        np.array([1, 2], np.uint16),
        np.array([0, 1], np.uint8),
        np.array([[5, 9, 7]], np.uint16),
        np.array([[-0.01, -3.0, -50.0]], np.float32),
    )
    back, _ = decode1(encode1(s, ShardFormat(packed2("log8"), spec, 10)))
    got = dict(
        zip(back["target_ids"][0].tolist(), back["target_logprobs"][0].tolist(), strict=True)
    )
    assert got[7] == pytest.approx(-20.0) and got[5] == pytest.approx(0.0)  # ids ascending
    back, _ = decode1(encode1(s, ShardFormat(packed2("pow8"), spec, 10)))
    assert np.isfinite(back["target_logprobs"]).all()


def test_large_and_small_vocabularies():
    for vocab in (128256, 37):
        spec = TargetSpec("topk", k=4)
        fmt = ShardFormat(packed2("f16"), spec, vocab)
        for s in make_samples(spec, vocab=vocab, n=3):
            back, _ = decode1(encode1(s, fmt))
            assert back["input_ids"].dtype == (np.int32 if vocab > 2**16 else np.uint16)
            assert np.array_equal(back["input_ids"], s.input_ids)
            assert [set(r) for r in rows(s)] == [set(r) for r in rows(TargetSample(s.key, **back))]


@pytest.mark.parametrize("codec", [packed2(zstd=False), packed2()], ids=["packed", "zstd"])
def test_shards_round_trip_through_tar_and_are_deterministic(tmp_path, codec):
    spec = TargetSpec("sample", draws=30)
    samples = make_samples(spec, n=8)
    fmt = ShardFormat(codec, spec, 500)
    a = write_shard(tmp_path / "a.tar", samples, fmt)
    assert a.sha256 == write_shard(tmp_path / "b.tar", samples, fmt).sha256
    back = list(read_shard(tmp_path / "a.tar", 500))
    assert [s.key for s in back] == [s.key for s in samples]
    for s, b in zip(samples, back, strict=True):
        assert [{i: c for i, (_, c) in r.items()} for r in rows(s)] == [
            {i: c for i, (_, c) in r.items()} for r in rows(b)
        ]
    assert a.target_tokens == sum(s.target_ids.shape[0] for s in samples)


@pytest.mark.parametrize(
    ("codec", "match"),
    [
        ({"name": "packed", "version": 3}, "shard codec 'packed' version 3 is not supported"),
        ({"name": "brotli", "version": 1}, "shard codec 'brotli' version 1 is not supported"),
        ({"name": "npz", "version": 1}, "shard codec 'npz' version 1"),
        ({"name": "packed", "version": 1, "values": "log3"}, "values = 'log3'"),
        ({"name": "packed", "version": 1, "colour": 1}, "malformed codec"),
    ],
)
def test_unknown_codec_in_manifest_is_refused(codec, match):
    m = Manifest("train", "t", "c", "f", 49152, "topk", 4, {}, 64, "j", [], codec=codec)
    with pytest.raises(DistillError, match=match):
        Manifest.from_json(m.to_json(), "m")


def test_encoder_refuses_inconsistent_targets():
    spec = TargetSpec("sample", draws=30)
    s = make_samples(spec, n=1)[0]
    fmt = ShardFormat(packed2(), spec, 500)
    with pytest.raises(DistillError, match="no draw counts"):
        encode1({**s.arrays(), "target_counts": None}, fmt)
    c = s.target_counts.copy()
    c[0, 0] += 1
    with pytest.raises(DistillError, match="must sum to 30"):
        encode1({**s.arrays(), "target_counts": c}, fmt)
    with pytest.raises(DistillError, match="width"):
        encode1(s, ShardFormat(packed2(), TargetSpec("sample", draws=31), 500))
    with pytest.raises(DistillError, match="outside the vocab"):
        encode1(s, ShardFormat(packed2(), spec, 10))


def test_only_packed_v2_is_written(tmp_path):
    """Older codecs are read only: the writer refuses them, naming what it writes."""
    spec = TargetSpec("topk", k=8)
    samples = make_samples(spec, n=1)
    assert Codec() == Codec("packed", 2)
    for old in (Codec("npz", 0), Codec("packed", 1)):
        with pytest.raises(DistillError, match="writes only packed v2, not"):
            write_shard(tmp_path / "a.tar", samples, ShardFormat(old, spec, 500))


# --- packed v2: blocks of samples per tar member -------------------------------------------


def edge_samples(spec: TargetSpec) -> list[TargetSample]:
    """A sample whose first token is masked and has no target rows, and a one-token sample."""
    out = []
    for key, mask in (("e-first", [1, 0, 0]), ("e-one", [0])):
        m = np.array(mask, np.uint8)
        out.append(
            TargetSample(
                key,
                np.arange(len(m), dtype=np.uint16),
                m,
                np.zeros((0, spec.width), np.uint16),
                np.zeros((0, spec.width), np.float32),
                np.zeros((0, spec.width), np.uint16) if spec.sampled else None,
            )
        )
    return out


def assert_same(a: TargetSample, b: TargetSample) -> None:
    assert a.key == b.key
    for f in ("input_ids", "loss_mask", "target_ids", "target_logprobs", "target_counts"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), f


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.kind)
@pytest.mark.parametrize("values", ["log8", "f16"])
@pytest.mark.parametrize("zstd", [False, True])
def test_blocks_decode_as_one_sample_blocks_in_order(tmp_path, spec, values, zstd):
    """Several blocks per shard (block_tokens small) and samples without target rows decode
    bit for bit as each sample alone does, keys in order (v2 against v1, which stored the same
    sections per sample: test_legacy.py)."""
    samples = make_samples(spec, n=9, seed=5)
    samples = samples[:4] + edge_samples(spec) + samples[4:]
    write_shard(tmp_path / "one.tar", samples, ShardFormat(packed2(values, zstd, 1), spec, 500))
    fmt = ShardFormat(packed2(values, zstd, block_tokens=80), spec, 500)
    st = write_shard(tmp_path / "v2.tar", samples, fmt)
    one = list(read_shard(tmp_path / "one.tar", 500))
    v2 = list(read_shard(tmp_path / "v2.tar", 500))
    assert [s.key for s in v2] == [s.key for s in samples]
    for a, b in zip(one, v2, strict=True):
        assert_same(a, b)
    assert (st.samples, st.first_key, st.last_key) == (11, samples[0].key, samples[-1].key)
    assert st.tokens == sum(len(s.input_ids) for s in samples)
    assert st.target_tokens == sum(s.target_ids.shape[0] for s in samples)
    # several members, each named after its block's first sample; no 10 KiB record padding
    with tarfile.open(tmp_path / "v2.tar") as tf:
        members = tf.getmembers()
    assert len(members) > 2 and all(m.name.endswith(".targets.dpb") for m in members)
    assert members[0].name == f"{samples[0].key}.targets.dpb"
    framed = sum(512 + m.size + -m.size % 512 for m in members)
    assert st.nbytes == (tmp_path / "v2.tar").stat().st_size == framed + 1024
    # the same samples, and their decoded copies, encode to the same bytes (resume relies on it)
    assert write_shard(tmp_path / "again.tar", samples, fmt).sha256 == st.sha256
    assert write_shard(tmp_path / "re.tar", v2, fmt).sha256 == st.sha256


def test_blocks_beat_one_member_per_sample_and_zstd_shares_the_template(tmp_path):
    spec = TargetSpec("sample", draws=30)
    samples = make_samples(spec, n=40, seed=6)
    template = np.arange(30, dtype=np.uint16)  # every sample starts with the same 30 tokens
    for s in samples:
        s.input_ids = np.concatenate([template, s.input_ids])
        s.loss_mask[0] = 0  # now a target position iff it is one in the sample (it is not)
        s.loss_mask = np.concatenate([np.zeros(30, np.uint8), s.loss_mask])
    size = {}  # one: a block per sample, one tar member each (as npz v0 and packed v1 stored)
    for name, codec in (
        ("one", packed2(zstd=False, block_tokens=1)),
        ("v2", packed2(zstd=False)),
        ("v2z", packed2()),
    ):
        size[name] = write_shard(tmp_path / f"{name}.tar", samples, ShardFormat(codec, spec, 500))
    assert size["v2"].nbytes < size["one"].nbytes / 3
    assert size["v2z"].nbytes < size["v2"].nbytes - 30 * 40  # the template is stored ~once
    for name in size:
        assert [s.key for s in read_shard(tmp_path / f"{name}.tar")] == [s.key for s in samples]


def test_block_split_is_by_tokens():
    from distill.format.blockcodec import split_blocks

    assert split_blocks([5, 5, 5, 5, 5], 10) == [(0, 2), (2, 4), (4, 5)]
    assert split_blocks([30, 1, 1], 10) == [(0, 1), (1, 3)]
    assert split_blocks([3], 100) == [(0, 1)]


@pytest.mark.parametrize("zstd", [False, True])
def test_corrupt_or_truncated_block_is_a_distill_error(tmp_path, zstd):
    from distill.format.blockcodec import decode_block, encode_block

    spec = TargetSpec("topk+sample", k=4, draws=30)
    fmt = ShardFormat(packed2(zstd=zstd), spec, 500)
    samples = make_samples(spec, n=4, seed=7)
    data = encode_block([s.key for s in samples], [s.arrays() for s in samples], fmt)
    out, vocab = decode_block(data, "b")
    assert vocab == 500 and [k for k, _ in out] == [s.key for s in samples]
    bad = [data[:10], data[:-1], data[: len(data) // 2], data + b"x", b""]
    for i in range(0, len(data), max(1, len(data) // 40)):  # single-byte flips everywhere
        bad.append(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :])
    for d in bad:
        with pytest.raises(DistillError, match="^b: "):
            decode_block(d, "b")
    with pytest.raises(DistillError, match="packed block version 7 is not supported"):
        decode_block(data[:3] + bytes([7]) + data[4:], "b")
    # in a shard: a flipped payload byte, a cut-off file, a renamed member, another vocab
    write_shard(tmp_path / "a.tar", samples, fmt)
    raw = bytearray((tmp_path / "a.tar").read_bytes())
    raw[512 + 100] ^= 0xFF
    (tmp_path / "b.tar").write_bytes(bytes(raw))
    with pytest.raises(DistillError, match="corrupt"):
        list(read_shard(tmp_path / "b.tar"))
    for cut in (700, len(raw) - 1024, len(raw) - 1):
        (tmp_path / "c.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:cut])
        with pytest.raises(DistillError, match="corrupt"):
            list(read_shard(tmp_path / "c.tar"))
    with tarfile.open(tmp_path / "a.tar") as tf, tarfile.open(tmp_path / "d.tar", "w") as out:
        for m in tf.getmembers():
            data_m = tf.extractfile(m).read()
            m.name = "other-key.targets.dpb"
            out.addfile(m, io.BytesIO(data_m))
    with pytest.raises(DistillError, match="first sample is"):
        list(read_shard(tmp_path / "d.tar"))
    with pytest.raises(DistillError, match="packed for vocab size 500, the manifest says 49152"):
        list(read_shard(tmp_path / "a.tar", 49152))


def test_block_encoder_refuses_rows_that_do_not_match_the_mask():
    from distill.format.blockcodec import encode_block

    spec = TargetSpec("topk", k=8)
    s = make_samples(spec, n=1)[0]
    a = {**s.arrays(), "target_ids": s.target_ids[:-1], "target_logprobs": s.target_logprobs[:-1]}
    with pytest.raises(DistillError, match="target rows"):
        encode_block([s.key], [a], ShardFormat(packed2(), spec, 500))


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.kind)
def test_webdataset_stage_yields_what_the_loader_yields(tmp_path, spec):
    """``wds.WebDataset(urls).compose(wds_samples)`` gives one dict per sample, v2 blocks
    expanded, with exactly the samples (and so the batches) of the student's loader."""
    from distill.format.shards import wds_samples
    from distill.store.cache import ShardCache
    from distill.store.storage import open_store
    from distill.student.loader import ShardLoader, collate

    samples = make_samples(spec, n=13, seed=5)
    fmt = ShardFormat(packed2(block_tokens=40), spec, 500)
    stats = [
        write_shard(tmp_path / f"shard-{i:06d}.tar", samples[lo : lo + 5], fmt)
        for i, lo in enumerate(range(0, len(samples), 5))
    ]
    m = Manifest(
        split="train",
        teacher="t",
        teacher_config_sha256="c",
        tokenizer_fingerprint="f",
        vocab_size=500,
        target_kind=spec.kind,
        width=spec.width,
        dtypes={},
        max_length=64,
        job_fingerprint="j",
        shards=stats,
        codec=fmt.codec.info(),
        targets=spec.info(),
    )
    urls = [str(tmp_path / s.name) for s in stats]
    got = list(wds.WebDataset(urls, shardshuffle=False).compose(wds_samples))
    assert [d["__key__"] for d in got] == [s.key for s in samples]
    with tarfile.open(urls[0]) as tf:
        assert len(tf.getmembers()) < 5  # blocks: fewer members than samples
    cache = ShardCache(open_store(str(tmp_path)), tmp_path / "cache", 1 << 20)
    loaded = list(ShardLoader(m, cache, batch_size=4, shuffle=False).batches())
    fields = ("input_ids", "loss_mask", "target_ids", "target_logprobs", "target_counts")
    as_samples = [TargetSample(d["__key__"], *(d[f] for f in fields)) for d in got]
    for s, b in zip(as_samples, read_shard_all(urls), strict=True):
        assert_same(s, b)
    for i, batch in enumerate(loaded):
        want = collate(as_samples[4 * i : 4 * i + 4])
        assert batch.keys == want.keys
        for f in ("input_ids", "attention_mask", "target_mask", "t_ids", "labels"):
            assert torch.equal(getattr(batch, f), getattr(want, f)), f
        torch.testing.assert_close(batch.t_logprobs, want.t_logprobs)


def read_shard_all(urls: list[str]) -> list[TargetSample]:
    return [s for u in urls for s in read_shard(Path(u), 500)]


OLD = Path(__file__).resolve().parent / "data" / "old_shards"


# --- packed v2 bytes: fixed sample sets encode to the bytes they did at 70f08f6 ------------

V2_SHA256 = {  # the synthetic legacy sets' arrays, written as packed v2 (block_tokens 80)
    "v1-topk8-log8-zstd": "0bbcdd71aeecd265923222d8c3eba25750116e27daecf0307995241880d5437d",
    "v1-topk8-pow8": "40c58838a03a4c0d39251cb27239d40f424532b39989eb09f63e5000353c7b7e",
    "v1-topp12-pow8-zstd": "6f31c4cfc67267e9dff2967578d0b8292e8fdc3143503fcb94ee8b9306604e9b",
    "v1-topp12-f16": "d17d6de8c2f8ee0f3e413ea52d7e0ca50f008649785c5e3c9beed743825138b8",
    "v1-sample30-log8-zstd": "d31070b40b5cea190df2632db342e7ef29165bfb289558ebaeeeee67b07ca2ce",
    "v1-topk4+sample30-log8": "98e9012e6484bc1e46005574070c9e0f352f56a75a1d40ed5d583c0261982b20",
    "v1-topk4+sample30-f16-zstd": (
        "597ce43944eabfd9996431b409a5ac80c9fe8ab4a8cd9784b6a131c93b32d230"
    ),
    "v1-topk4-f16-vocab128256": "f3bd881b82961410a0ee2bced44a276c2a2044d6fce6a9204c14893714832eca",
    "v1-topk4-f16-vocab37": "ada62fa1b5564c78a6b437a00529491c8f3ca6a2058f04804605cea41d00f2b0",
    "npz-topk4+sample30": "821429144b56e4400bb58e01a8b5fc9c2a8aa5b4021a12652f44ad1b5e95ed59",
}
V2_REAL_SHA256 = {  # the real SmolLM2 sets' decoded samples: log8 + zstd, f16 (block_tokens 100)
    "npz-v0-topk8/log8": "6c1b84a5b1e8665c838ebe8b7163d7e1112cc9285428525767dd4a17fd05f836",
    "npz-v0-topk8/f16": "829039f83c030ea324dc75c4fb940c051e4755dc9fb5fc41bad7a3606661863f",
    "packed-v1-topk4+sample16-f16/log8": (
        "83c0ccddfb9090426e48ea9231ed935b8bc12823f75ca28935fe7491da15e0f9"
    ),
    "packed-v1-topk4+sample16-f16/f16": (
        "7dddcbfe318c68f2c3379ffdb6a09d8e2176f4dbdded70c71ddbb2c86b7046b5"
    ),
    "packed-v1-sample20-log8-zstd/log8": (
        "7bfb3e2c58ba9d63db2943c0a561871495651b9e6a7618731bf693cc44e6856a"
    ),
    "packed-v1-sample20-log8-zstd/f16": (
        "6ec20993e3b28346f1625c59d010b51c60b0738e97ea9a744e9b84308304e8d2"
    ),
}


@pytest.mark.parametrize("name", sorted(V2_SHA256))
def test_packed_v2_bytes_are_unchanged(tmp_path, name):
    """A fixed sample set (tests/data/old_shards/synthetic) encodes to the same bytes as
    before the codec's functions were split: shard sha256s recorded at 70f08f6."""
    from codec_checks import synthetic_set

    spec, codec, vocab, samples = synthetic_set(name)
    c = Codec(
        "packed",
        2,
        values=codec.get("values", "log8"),
        zstd=codec.get("zstd", True),
        block_tokens=80,
    )
    assert (
        write_shard(tmp_path / "a.tar", samples, ShardFormat(c, spec, vocab)).sha256
        == (V2_SHA256[name])
    )


@pytest.mark.parametrize("name", sorted(V2_REAL_SHA256))
def test_packed_v2_bytes_of_real_targets_are_unchanged(tmp_path, name):
    """Real SmolLM2 targets (tests/data/old_shards) encode to the bytes they did at 70f08f6."""
    set_name, values = name.split("/")
    m = Manifest.from_json((OLD / set_name / "manifest.json").read_bytes(), set_name)
    spec = TargetSpec(**{k: v for k, v in m.targets.items() if k not in ("tail", "width")})
    samples = list(read_shard(OLD / set_name / m.shards[0].name, m.vocab_size))
    c = (
        Codec("packed", 2, values="log8", zstd=True)
        if values == "log8"
        else Codec("packed", 2, values="f16", zstd=False, block_tokens=100)
    )
    st = write_shard(tmp_path / "a.tar", samples, ShardFormat(c, spec, m.vocab_size))
    assert st.sha256 == V2_REAL_SHA256[name]
