"""Write the synthetic legacy fixtures (npz v0, packed v1) with distill's own old writers.

Run once, from the repository root, before the writers were removed:
``PYTHONPATH=$PWD:tests python tests/data/old_shards/synthetic/make.py``. Per set: the shard the
old writer wrote (``shard-000000.tar``) and the arrays it was written from (``arrays.npz``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from test_codec import edge_samples, make_samples

from distill.format.codec import Codec, ShardFormat
from distill.format.shards import TargetSample, write_shard
from distill.format.spec import TargetSpec

HERE = Path(__file__).resolve().parent
FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "topk_counts")

TOPK, TOPP = TargetSpec("topk", k=8), TargetSpec("topp", k=12, top_p=0.8)
SAMPLE, MIXED = TargetSpec("sample", draws=30), TargetSpec("topk+sample", k=4, draws=30)
SETS = {  # name: (spec, codec, vocab)
    "v1-topk8-log8-zstd": (TOPK, Codec("packed", 1, values="log8", zstd=True), 500),
    "v1-topk8-pow8": (TOPK, Codec("packed", 1, values="pow8"), 500),
    "v1-topp12-pow8-zstd": (TOPP, Codec("packed", 1, values="pow8", zstd=True), 500),
    "v1-topp12-f16": (TOPP, Codec("packed", 1, values="f16"), 500),
    "v1-sample30-log8-zstd": (SAMPLE, Codec("packed", 1, values="log8", zstd=True), 500),
    "v1-topk4+sample30-log8": (MIXED, Codec("packed", 1, values="log8"), 500),
    "v1-topk4+sample30-f16-zstd": (MIXED, Codec("packed", 1, values="f16", zstd=True), 500),
    "v1-topk4-f16-vocab128256": (TargetSpec("topk", k=4), Codec("packed", 1, values="f16"), 128256),
    "v1-topk4-f16-vocab37": (TargetSpec("topk", k=4), Codec("packed", 1, values="f16"), 37),
    "npz-topk4+sample30": (MIXED, Codec(), 500),
}


def clamp_sample(spec: TargetSpec) -> TargetSample:
    """One top-k row with a log-prob near 0 and one far below -L (log8 clamps it to -L)."""
    ids = np.array([[5, 9, 7, 11, 13, 17, 19, 23][: spec.k]], np.uint16)
    lps = np.array([[-0.01, -3.0, -50.0, -4.0, -5.0, -6.0, -7.0, -8.0][: spec.k]], np.float32)
    return TargetSample(
        "z-clamp", np.array([1, 2], np.uint16), np.array([0, 1], np.uint8), ids, lps
    )


def samples_for(name: str, spec: TargetSpec, vocab: int) -> list[TargetSample]:
    out = make_samples(spec, vocab=vocab, n=4 if vocab == 500 else 2, seed=len(name))
    out = out[:2] + edge_samples(spec) + out[3:]
    if spec.kind == "topk" and vocab == 500:
        out.append(clamp_sample(spec))
    return out


def main() -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    index = {}
    for name, (spec, codec, vocab) in SETS.items():
        d = HERE / name
        d.mkdir(exist_ok=True)
        samples = samples_for(name, spec, vocab)
        fmt = None if codec.name == "npz" else ShardFormat(codec, spec, vocab)
        st = write_shard(d / "shard-000000.tar", samples, fmt)
        arrays = {
            f"{i:02d}.{f}": getattr(s, f)
            for i, s in enumerate(samples)
            for f in FIELDS
            if getattr(s, f) is not None
        }
        np.savez_compressed(d / "arrays.npz", keys=np.array([s.key for s in samples]), **arrays)
        index[name] = {
            "targets": {k: v for k, v in spec.info().items() if k not in ("tail", "width")},
            "codec": codec.info(),
            "vocab_size": vocab,
            "sha256": st.sha256,
        }
    about = (
        f"Synthetic targets written by distill's own npz v0 / packed v1 writers at commit "
        f"{commit} (tests/data/old_shards/synthetic/make.py, removed with the writers); "
        "arrays.npz holds the arrays each shard was written from."
    )
    (HERE / "index.json").write_text(json.dumps({"about": about, "sets": index}, indent=1) + "\n")


if __name__ == "__main__":
    main()
