"""Shard sets written by older distill versions (npz v0, packed v1) still read: real SmolLM2
shard sets (tests/data/old_shards/*) and synthetic ones written by distill's own old writers
(tests/data/old_shards/synthetic/*, with the arrays they were written from)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from codec_checks import (
    FIELDS,
    OLD,
    SETS,
    STORED,
    SYNTHETIC,
    assert_entries_within_bounds,
    rows,
    synthetic_set,
)

from distill.errors import DistillError
from distill.format.codec import Codec, ShardFormat
from distill.format.legacy import decode_packed as decode_v1
from distill.format.manifest import Manifest
from distill.format.shards import TargetSample, read_shard, write_shard


def assert_same(a: TargetSample, b: TargetSample) -> None:
    assert a.key == b.key
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), f


def first_member(path: Path) -> tuple[tarfile.TarInfo, bytes]:
    with tarfile.open(path) as tf:
        info = tf.getmembers()[0]
        return info, tf.extractfile(info).read()  # type: ignore[union-attr]


V1 = sorted(n for n in SETS if n.startswith("v1-"))


@pytest.mark.parametrize("name", V1)
def test_packed_v1_reads_exact_ids_mask_counts_and_bounded_values(name):
    """What the packed v1 writer stored reads back: ids, mask and counts exact, values within
    the value map's bound, pads the row's first id."""
    spec, codec, vocab, samples = synthetic_set(name)
    shard = SYNTHETIC / name / "shard-000000.tar"
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == SETS[name]["sha256"]
    back = list(read_shard(shard, vocab))
    assert [s.key for s in back] == [s.key for s in samples]
    values = codec["values"]
    for s, b in zip(samples, back, strict=True):
        assert np.array_equal(b.input_ids, s.input_ids)
        assert b.input_ids.dtype == (np.int32 if vocab > 2**16 else np.uint16)
        assert np.array_equal(b.loss_mask, s.loss_mask)
        assert b.target_ids.shape == s.target_ids.shape == (s.loss_mask[1:].sum(), spec.width)
        if s.key == "z-clamp":  # values out of range on purpose: the next test checks them
            assert [r.keys() for r in rows(s)] == [r.keys() for r in rows(b)]  # ids exact
        else:
            assert_entries_within_bounds(s, b, spec, values)
        n_real = np.isfinite(b.target_logprobs).sum(1)
        for r, n in enumerate(n_real):  # padding: the row's first id
            assert (b.target_ids[r, n:] == b.target_ids[r, 0]).all()


@pytest.mark.parametrize("name", V1)
def test_packed_v2_stores_exactly_what_packed_v1_stored(tmp_path, name):
    """The same arrays written as packed v2 (several blocks) decode bit for bit as the v1
    shard does, keys in order, samples without target rows included."""
    spec, codec, vocab, samples = synthetic_set(name)
    v2 = Codec("packed", 2, values=codec["values"], zstd=codec["zstd"], block_tokens=80)
    write_shard(tmp_path / "v2.tar", samples, ShardFormat(v2, spec, vocab))
    v1 = list(read_shard(SYNTHETIC / name / "shard-000000.tar", vocab))
    for a, b in zip(v1, read_shard(tmp_path / "v2.tar", vocab), strict=True):
        assert_same(a, b)


@pytest.mark.parametrize("name", ["v1-topk8-log8-zstd", "v1-topk8-pow8"])
def test_packed_v1_log8_clamps_below_minus_l_and_pow8_never_gives_zero(name):
    (clamp,) = [s for s in read_shard(SYNTHETIC / name / "shard-000000.tar") if s.key == "z-clamp"]
    got = dict(zip(clamp.target_ids[0].tolist(), clamp.target_logprobs[0].tolist(), strict=True))
    assert clamp.target_ids[0].tolist() == sorted(clamp.target_ids[0].tolist())  # ids ascending
    if name.endswith("zstd"):  # log8
        assert got[7] == pytest.approx(-20.0) and got[5] == pytest.approx(0.0)
    else:
        assert np.isfinite(clamp.target_logprobs).all()


def test_npz_v0_reads_the_arrays_it_was_written_from():
    spec, _, vocab, samples = synthetic_set("npz-topk4+sample30")
    back = list(read_shard(SYNTHETIC / "npz-topk4+sample30" / "shard-000000.tar", vocab))
    assert [s.key for s in back] == [s.key for s in samples]
    for s, b in zip(samples, back, strict=True):
        for f in ("input_ids", "loss_mask", "target_ids", "target_counts"):
            assert getattr(b, f).dtype == getattr(s, f).dtype
            assert np.array_equal(getattr(b, f), getattr(s, f)), f
        assert b.target_logprobs.dtype == np.float16  # npz stores float16 log-probs
        assert np.array_equal(b.target_logprobs, s.target_logprobs.astype(np.float16))
        assert b.target_ids.shape[1] == spec.width


@pytest.mark.parametrize("zstd", [False, True])
def test_truncated_or_corrupt_v1_sample_is_a_distill_error(tmp_path, zstd):
    name = "v1-topk4+sample30-f16-zstd" if zstd else "v1-topk4+sample30-log8"
    shard = SYNTHETIC / name / "shard-000000.tar"
    info, data = first_member(shard)
    assert info.offset_data == 512  # one 512-byte header per sample, no PAX header
    bad = [data[:10], data[:-1], data[: len(data) // 2], data + b"x", b""]
    for i in range(0, len(data), max(1, len(data) // 25)):  # single-byte flips everywhere
        bad.append(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :])
    for d in bad:
        try:
            back, _ = decode_v1(d, "s")
        except DistillError:
            continue
        # a flip the header does not see (e.g. in k) may still decode; it must then be sane
        TargetSample("k", **back).validate("s")
    # in a shard: a corrupt member, and a cut-off tar
    raw = bytearray(shard.read_bytes())
    raw[info.offset_data + 80] ^= 0xFF  # inside the member's payload
    (tmp_path / "b.tar").write_bytes(bytes(raw))
    with pytest.raises(DistillError, match="corrupt"):
        list(read_shard(tmp_path / "b.tar"))
    (tmp_path / "c.tar").write_bytes(shard.read_bytes()[:700])
    with pytest.raises(DistillError, match="corrupt"):
        list(read_shard(tmp_path / "c.tar"))


def test_unknown_v1_sample_version_and_other_vocab_are_refused():
    shard = SYNTHETIC / "v1-topk8-pow8" / "shard-000000.tar"
    _, data = first_member(shard)
    with pytest.raises(DistillError, match="packed sample version 9 is not supported"):
        decode_v1(data[:3] + bytes([9]) + data[4:], "s")
    with pytest.raises(DistillError, match="packed for vocab size 500, the manifest says 49152"):
        list(read_shard(shard, 49152))


def npz_shard(path: Path, members: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    """A shard as the code before codecs wrote it: npz members, one per sample."""
    with path.open("wb") as f:
        w = wds.TarWriter(f, mtime=0.0)
        for key, arrays in members:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            w.write({"__key__": key, "targets.npz": buf.getvalue()})
        w.close()


def test_old_npz_v0_shard_set_is_readable(tmp_path):
    """Written as the code before codecs did: four-array npz members, no codec in the manifest."""
    rng = np.random.default_rng(3)
    path = tmp_path / "shard-000000.tar"
    mask = np.array([0, 0, 1, 1, 1], np.uint8)
    members = [
        (
            f"old-{i}",
            {
                "input_ids": rng.integers(0, 49152, 5).astype(np.uint16),
                "loss_mask": mask,
                "topk_ids": rng.integers(0, 49152, (3, 4)).astype(np.uint16),
                "topk_logprobs": -rng.random((3, 4)).astype(np.float16),
            },
        )
        for i in range(3)
    ]
    npz_shard(path, members)
    samples = list(read_shard(path))
    assert [s.key for s in samples] == ["old-0", "old-1", "old-2"]
    assert samples[0].target_logprobs.dtype == np.float16 and samples[0].target_counts is None
    old_manifest = {
        "split": "train",
        "teacher": "t",
        "teacher_config_sha256": "c",
        "tokenizer_fingerprint": "f",
        "vocab_size": 49152,
        "target_kind": "topk",
        "k": 4,
        "dtypes": {"topk_ids": "uint16"},
        "max_length": 64,
        "job_fingerprint": "j",
        "shards": [],
        "teacher_seconds": 0.0,
        "created": "",
        "schema_version": 1,
        "extra": {},
    }
    m = Manifest.from_json(json.dumps(old_manifest).encode(), "m")
    assert m.codec == {"name": "npz", "version": 0} and m.codec_spec() == Codec("npz", 0)
    assert m.targets == {"kind": "topk", "k": 4, "tail": True, "width": 4} and m.tail
    # schema 1 named the width k and the entries topk_*: read under today's names
    assert m.width == 4 and m.dtypes == {"target_ids": "uint16"} and m.schema_version == 2


def test_inconsistent_npz_sample_is_refused(tmp_path):
    """An npz member stores its arrays as given: rows that do not match the mask are refused."""
    rng = np.random.default_rng(2)
    mask = (rng.random(10) < 0.5).astype(np.uint8)
    mask[-1] = 1
    n = int(mask[1:].sum())
    arrays = {
        "input_ids": rng.integers(0, 49152, 10).astype(np.uint16),
        "loss_mask": mask,
        "topk_ids": rng.integers(0, 49152, (n - 1, 4)).astype(np.uint16),
        "topk_logprobs": -rng.random((n - 1, 4)).astype(np.float16),
    }
    npz_shard(tmp_path / "a.tar", [("k", arrays)])
    with pytest.raises(DistillError, match="inconsistent shapes"):
        list(read_shard(tmp_path / "a.tar"))


def _digest(s: TargetSample) -> str:
    h = hashlib.sha256()
    for f in FIELDS:
        a = getattr(s, f)
        h.update(STORED[f].encode())  # the digests were taken with the names of their time
        if a is not None:
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(json.loads((OLD / "expected.json").read_text())["sets"]))
def test_real_old_shard_sets_read_as_they_did(tmp_path, name):
    """Real SmolLM2 targets written and decoded at commit 5494d02 (npz v0, packed v1): this
    distill decodes the same arrays and reads them through the loader."""
    from distill.store.cache import ShardCache
    from distill.store.storage import open_store
    from distill.student.loader import ShardLoader

    want = json.loads((OLD / "expected.json").read_text())["sets"][name]
    m = Manifest.from_json((OLD / name / "manifest.json").read_bytes(), name)
    shard = OLD / name / m.shards[0].name
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == want["sha256"] == m.shards[0].sha256
    samples = list(read_shard(shard, m.vocab_size))
    assert {s.key: _digest(s) for s in samples} == want["samples"]
    assert list(want["samples"]) == [s.key for s in samples]  # order kept
    assert m.codec_spec().version in (0, 1) and m.targets.get("sampling", "iid") == "iid"
    cache = ShardCache(open_store(str(OLD / name)), tmp_path / "cache", 1 << 20)
    loader = ShardLoader(m, cache, batch_size=4, shuffle=False)
    batches = list(loader.batches())
    assert sum(len(b.keys) for b in batches) == m.samples == 6
    assert batches[0].t_ids.shape[1] == m.width
