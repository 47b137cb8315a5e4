"""Shared checks of a decoded sample against what was encoded, and the synthetic shard sets
written by earlier versions with the arrays they were written from (test_codec, test_legacy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distill.format.shards import TargetSample
from distill.format.spec import TargetSpec

OLD = Path(__file__).resolve().parent / "data" / "old_shards"
SYNTHETIC = OLD / "synthetic"
SETS = json.loads((SYNTHETIC / "index.json").read_text())["sets"]
FIELDS = ("input_ids", "loss_mask", "target_ids", "target_logprobs", "target_counts")
# the names the fixtures' arrays.npz files (written before the rename) give these fields
OLD_NAMES = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "topk_counts")
STORED = dict(zip(FIELDS, OLD_NAMES, strict=True))


def synthetic_set(name: str) -> tuple[TargetSpec, dict, int, list[TargetSample]]:
    """A synthetic set's (spec, codec info, vocab, the samples its shard was written from)."""
    info = SETS[name]
    with np.load(SYNTHETIC / name / "arrays.npz") as z:
        samples = [
            TargetSample(str(key), *(z.get(f"{i:02d}.{STORED[f]}") for f in FIELDS))
            for i, key in enumerate(z["keys"])
        ]
    return TargetSpec(**info["targets"]), info["codec"], info["vocab_size"], samples


def rows(s: TargetSample) -> list[dict[int, tuple[float, int]]]:
    """Per row {id: (value, count)} over the real entries (order-free)."""
    c = s.target_counts if s.target_counts is not None else np.zeros(s.target_ids.shape, np.uint16)
    return [
        {int(i): (float(v), int(n)) for i, v, n in zip(ri, rv, rc, strict=True) if np.isfinite(v)}
        for ri, rv, rc in zip(s.target_ids, s.target_logprobs, c, strict=True)
    ]


def assert_entries_within_bounds(
    a: TargetSample, b: TargetSample, spec: TargetSpec, values: str
) -> None:
    """``b`` (decoded) holds ``a``'s entries: ids and counts exact, each value within the
    value map's bound (log8: 20/510 in log space above -20; pow8: 1/510 in p**(1/4); f16:
    float16 rounding; sampled: float16 of the tail mass)."""
    for ra, rb in zip(rows(a), rows(b), strict=True):
        assert ra.keys() == rb.keys()  # ids exact
        for i, (va, ca) in ra.items():
            vb, cb = rb[i]
            assert ca == cb  # counts exact
            if ca:  # sampled: log(count / N) (+ the float16 tail mass m of topk+sample)
                m = va - np.log(ca / spec.draws)
                assert abs(vb - va) <= abs(m) * 2**-11 + 1e-5
            elif values == "f16":
                assert vb == float(np.float16(va))
            elif values == "log8":
                assert abs(vb - max(va, -20.0)) <= 20.0 / 510 + 1e-5
            else:
                assert abs(np.exp(vb / 4) - np.exp(va / 4)) <= 1 / 510 + 1e-6
