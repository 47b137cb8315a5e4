"""Benchmark: bytes per target position and encode/decode speed of each target/codec setting.

Input: real teacher targets by default. SmolLM2-135M-Instruct (``--model``) runs once over the
first ``--samples`` demo samples in float32 on the CPU; the final hidden states at the target
positions are cached under ``$DISTILL_CACHE/bench`` and every configuration extracts its
targets from them with :func:`distill.teacher.extract.extract` (the teacher's code path).
``--synthetic`` uses Zipf-like random logits instead (no model needed).

Per configuration, over whole shards written with :func:`distill.format.shards.write_shard` and read
back with :func:`distill.format.shards.read_shard` (tar framing included, as the student sees them):

- ``bytes_per_token``: shard bytes per target position (``payload_bytes_per_token``: the
  members' bytes alone, without the tar headers);
- ``encode_mb_s`` / ``decode_mb_s``: shard MB (1e6 bytes) written / read per second,
  single-threaded, best of ``--repeats``; ``encode_tokens_s`` / ``decode_tokens_s``: target
  positions per second (compare decoding with the student's consumption);
- ``l1_error``: mean over positions of sum_i |p_i - p_decoded_i| against the float32
  extraction (0 for exact counts; quantisation error of the stored probabilities).

The naive baseline stores float32 log-probs and int64 ids of the top 64 (and int64 input ids)
in an npz member per sample. The ``npz-v0`` rows are the format of earlier distill versions
(uint16 ids, float16 log-probs, one npz member per sample), written here by the bench itself
(distill only reads them now) and read by :func:`~distill.format.shards.read_shard`; every
other row is ``packed`` v2 (blocks of samples), the codec jobs write, under its settings (value
map, zstd). ``default`` marks the shipped setting (the job defaults of ``distill.config``: 50
systematic draws, packed v2 + zstd). ``decode_x_student`` is the decode
rate over what the student consumes (``student_tokens_s``, target positions/s: measured by
``bench/quality.py``, read from ``bench/results/quality.json``, or ``--student-rate``).

    python bench/codec.py --json /tmp/codec.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISTILL_CACHE", str(ROOT / ".cache" / "distill"))

from distill.format.codec import Codec, ShardFormat  # noqa: E402
from distill.format.legacy import NPZ_COUNTS, NPZ_FIELDS  # noqa: E402
from distill.format.shards import TargetSample, read_shard, write_shard  # noqa: E402
from distill.format.spec import TargetSpec  # noqa: E402
from distill.teacher.extract import draw_uniforms, extract  # noqa: E402

QUALITY_JSON = ROOT / "bench" / "results" / "quality.json"


def student_rate(path: Path = QUALITY_JSON) -> tuple[float, str]:
    """Target positions per second the student consumes: the fastest KD arm's measured training
    rate in ``bench/quality.py``'s results (tokens/s x target positions per token)."""
    rows = json.loads(path.read_text()) if path.is_file() else []
    best = max(
        (r for r in rows if r.get("target") not in ("ce-only", None)),
        key=lambda r: r.get("train_tokens_per_s", 0.0),
        default=None,
    )
    if best is None:
        return 3000.0, "no bench/results/quality.json: 3,000 target positions/s assumed"
    s = best["settings"]
    rate = best["train_tokens_per_s"] * s["train_positions"] / s["train_tokens"]
    return rate, (
        f"the {best['target']} arm of bench/quality.py: {best['train_tokens_per_s']:,.0f} "
        f"tokens/s x {s['train_positions'] / s['train_tokens']:.3f} target positions per token"
    )


@dataclass
class Rows:
    """Final hidden states at the target positions of some samples, plus those samples."""

    hidden: torch.Tensor  # [R, H]
    weight: torch.Tensor  # [V, H]
    keys: list[str]
    input_ids: list[np.ndarray]
    loss_masks: list[np.ndarray]
    source: str

    @property
    def rows_per_sample(self) -> list[int]:
        return [int(m[1:].sum()) for m in self.loss_masks]


def real_rows(model_ref: str, n_samples: int) -> Rows:
    from distill import models
    from distill.data.dataset import tokenize_file

    cache = Path(os.environ["DISTILL_CACHE"]) / "bench" / f"codec-rows-{n_samples}.npz"
    if not cache.exists():
        d = models.resolve_model(model_ref)
        tok = models.load_tokenizer(d)
        data = ROOT / "data" / "demo" / "train.jsonl"
        samples = tokenize_file(data, tok, 384, "right", n_samples)
        model = models.load_model(d, "float32", "cpu").eval()
        hs = []
        with torch.no_grad():
            for s in samples:
                ids = torch.from_numpy(s.input_ids.astype(np.int64))[None]
                h = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
                hs.append(h[torch.from_numpy(s.loss_mask[1:].astype(bool))].numpy())
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache,
            hidden=np.concatenate(hs).astype(np.float32),
            weight=model.get_output_embeddings().weight.detach().numpy().astype(np.float32),
            lengths=np.array([len(s.input_ids) for s in samples]),
            input_ids=np.concatenate([s.input_ids for s in samples]).astype(np.int32),
            loss_mask=np.concatenate([s.loss_mask for s in samples]).astype(np.uint8),
            keys=np.array([s.key for s in samples]),
        )
    z = np.load(cache)
    cut = np.cumsum(z["lengths"])[:-1]
    return Rows(
        torch.from_numpy(z["hidden"]),
        torch.from_numpy(z["weight"]),
        [str(k) for k in z["keys"]],
        np.split(z["input_ids"], cut),
        np.split(z["loss_mask"], cut),
        f"{model_ref}, {len(z['lengths'])} demo samples",
    )


def synthetic_rows(n_samples: int, vocab: int = 49152, seed: int = 0) -> Rows:
    """Zipf-like teacher distributions: logits = -1.1 log(rank) + noise, ranks permuted."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 120, n_samples)
    masks = []
    for t in lengths:
        m = np.zeros(t, np.uint8)
        m[int(t * 0.4) :] = 1
        masks.append(m)
    r = sum(int(m[1:].sum()) for m in masks)
    h = 8
    # low-rank trick: logits = hidden @ weight.T with a rank-h part; add the Zipf profile via
    # a per-row permutation-free bias column: weight[:, 0] = log-Zipf profile, hidden[:, 0] = 1
    zipf = -1.1 * np.log1p(rng.permutation(vocab)).astype(np.float32)
    weight = np.concatenate([zipf[:, None], rng.normal(0, 1.0, (vocab, h))], 1).astype(np.float32)
    hidden = np.concatenate([np.ones((r, 1)), rng.normal(0, 1.0, (r, h))], 1).astype(np.float32)
    return Rows(
        torch.from_numpy(hidden),
        torch.from_numpy(weight),
        [f"syn-{i:07d}" for i in range(n_samples)],
        [rng.integers(0, vocab, t).astype(np.int32) for t in lengths],
        masks,
        f"synthetic Zipf-like, {n_samples} samples",
    )


def targets_for(rows: Rows, spec: TargetSpec) -> list[TargetSample]:
    per = rows.rows_per_sample
    u = None
    if spec.sampled:
        u = np.concatenate(
            [draw_uniforms(0, k, n, spec.draws) for k, n in zip(rows.keys, per, strict=True)]
        )
    t = extract(rows.hidden, rows.weight, spec, 256, u)
    ids, vals, counts = t.ids.numpy(), t.values.numpy(), t.counts.numpy().astype(np.uint16)
    out, lo = [], 0
    vdt = np.uint16 if rows.weight.shape[0] <= 2**16 else np.int32
    for key, x, m, n in zip(rows.keys, rows.input_ids, rows.loss_masks, per, strict=True):
        out.append(
            TargetSample(
                key=key,
                input_ids=x.astype(vdt),
                loss_mask=m,
                target_ids=ids[lo : lo + n].astype(vdt),
                target_logprobs=vals[lo : lo + n],
                target_counts=counts[lo : lo + n] if spec.sampled else None,
            )
        )
        lo += n
    return out


def l1_error(ref: list[TargetSample], got: list[TargetSample]) -> float:
    """Mean over positions of sum |p - p_decoded| (ids matched per row, order-free)."""
    total, rows = 0.0, 0
    for a, b in zip(ref, got, strict=True):
        n, w = a.target_ids.shape
        if n == 0:
            continue
        v = max(int(a.target_ids.max()), int(b.target_ids.max())) + 1
        pa = np.zeros((n, v))
        pb = np.zeros((n, v))
        r = np.arange(n)[:, None]
        np.add.at(
            pa, (r, a.target_ids.astype(np.int64)), np.exp(a.target_logprobs.astype(np.float64))
        )
        np.add.at(
            pb, (r, b.target_ids.astype(np.int64)), np.exp(b.target_logprobs.astype(np.float64))
        )
        total += float(np.abs(pa - pb).sum())
        rows += n
    return total / max(rows, 1)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def naive_shard(path: Path, ref: list[TargetSample]) -> int:
    """The baseline: per sample an npz of int64 ids and float32 log-probs (top 64)."""
    import webdataset as wds

    with path.open("wb") as f:
        w = wds.TarWriter(f, mtime=0)  # int mtime: no PAX header, as write_shard
        for s in ref:
            buf = io.BytesIO()
            np.savez(
                buf,
                input_ids=s.input_ids.astype(np.int64),
                loss_mask=s.loss_mask,
                target_ids=s.target_ids.astype(np.int64),
                target_logprobs=s.target_logprobs.astype(np.float32),
            )
            w.write({"__key__": s.key, "naive.npz": buf.getvalue()})
        w.close()
    return path.stat().st_size


def naive_read(path: Path) -> int:
    import tarfile

    n = 0
    with tarfile.open(path, "r|") as tf:
        for info in tf:
            with np.load(io.BytesIO(tf.extractfile(info).read())) as z:  # type: ignore[union-attr]
                arrays = [z[k] for k in ("input_ids", "loss_mask", "target_ids", "target_logprobs")]
                n += arrays[2].shape[0]
    return n


def npz_v0_shard(path: Path, ref: list[TargetSample]) -> int:
    """npz v0 as earlier distill versions wrote it: per sample an uncompressed npz of the arrays
    with float16 log-probs (and the counts of sampled kinds), member ``KEY.targets.npz``."""
    import webdataset as wds

    with path.open("wb") as f:
        w = wds.TarWriter(f, mtime=0)
        for s in ref:
            buf = io.BytesIO()
            arrays = {k: v for k, v in s.arrays().items() if v is not None}
            arrays["target_logprobs"] = s.target_logprobs.astype(np.float16)
            stored = {**NPZ_FIELDS, "target_counts": NPZ_COUNTS}  # v0's own array names
            np.savez(buf, **{stored[k]: v for k, v in arrays.items()})
            w.write({"__key__": s.key, "targets.npz": buf.getvalue()})
        w.close()
    return path.stat().st_size


def run_config(
    name: str,
    spec: TargetSpec,
    codec: Codec | str,
    rows: Rows,
    tmp: Path,
    repeats: int,
    default: bool = False,
    cache: dict[TargetSpec, list[TargetSample]] | None = None,
) -> dict[str, Any]:
    cache = cache if cache is not None else {}
    if spec not in cache:
        cache[spec] = targets_for(rows, spec)
    ref = cache[spec]
    positions = sum(s.target_ids.shape[0] for s in ref)
    path = tmp / f"{name.replace(' ', '_').replace('/', '_')}.tar"
    if codec == "naive":  # the baseline
        enc_s, nbytes = timed(lambda: naive_shard(path, ref), repeats)
        dec_s, _ = timed(lambda: naive_read(path), repeats)
        err = 0.0
    else:
        if codec == "npz-v0":  # written by the bench, read by distill
            enc_s, nbytes = timed(lambda: npz_v0_shard(path, ref), repeats)
        else:
            assert isinstance(codec, Codec)
            fmt = ShardFormat(codec, spec, int(rows.weight.shape[0]))
            enc_s, st = timed(lambda: write_shard(path, ref, fmt), repeats)
            nbytes = st.nbytes
        dec_s, back = timed(lambda: list(read_shard(path)), repeats)
        err = l1_error(ref, back)
    payload = _payload_bytes(path)
    return {
        "config": name,
        "bytes_per_token": nbytes / positions,
        "payload_bytes_per_token": payload / positions,
        "encode_mb_s": nbytes / 1e6 / enc_s,
        "encode_tokens_s": positions / enc_s,
        "decode_mb_s": nbytes / 1e6 / dec_s,
        "decode_tokens_s": positions / dec_s,
        "l1_error": err,
        "default": default,
    }


def _payload_bytes(path: Path) -> int:
    import tarfile

    with tarfile.open(path) as tf:
        return sum(m.size for m in tf.getmembers())


def configs() -> list[tuple[str, TargetSpec, Codec | str]]:
    """(name, targets, codec): a packed v2 codec, or "naive" / "npz-v0" (the bench's writers)."""

    def packed(values: str = "log8", zstd: bool = False) -> Codec:
        return Codec("packed", 2, values=values, zstd=zstd)

    sample50 = TargetSpec("sample", draws=50)
    sys50 = TargetSpec("sample", draws=50, sampling="systematic")
    sys32 = TargetSpec("sample", draws=32, sampling="systematic")
    out: list[tuple[str, TargetSpec, Codec | str]] = [
        ("naive top-64 fp32+int64", TargetSpec("topk", 64), "naive"),
        ("npz-v0 topk k=16 (fp16)", TargetSpec("topk", 16), "npz-v0"),
        ("npz-v0 sample N=50", sample50, "npz-v0"),
    ]
    for k in (8, 16, 64):
        for z in (False, True):
            out.append(
                (
                    f"packed-v2 topk k={k} log8{' +zstd' if z else ''}",
                    TargetSpec("topk", k),
                    packed(zstd=z),
                )
            )
    out += [
        ("packed-v2 topk k=16 pow8", TargetSpec("topk", 16), packed("pow8")),
        ("packed-v2 topk k=16 f16", TargetSpec("topk", 16), packed("f16")),
        ("packed-v2 topp p=0.95 k<=64 log8", TargetSpec("topp", 64, 0.95), packed()),
        ("packed-v2 topk+sample k=8 N=50 log8", TargetSpec("topk+sample", 8, draws=50), packed()),
        ("packed-v2 sample N=50", sample50, packed()),
        ("packed-v2 sample N=50 +zstd", sample50, packed(zstd=True)),
        ("packed-v2 sample-sys N=50", sys50, packed()),
        ("packed-v2 sample-sys N=50 +zstd", sys50, packed(zstd=True)),
        ("packed-v2 sample-sys N=32 +zstd", sys32, packed(zstd=True)),
        (
            "packed-v2 topk+sample-sys k=8 N=42 +zstd",
            TargetSpec("topk+sample", 8, draws=42, sampling="systematic"),
            packed(zstd=True),
        ),
    ]
    return out


def shipped_default() -> tuple[TargetSpec, Codec]:
    """The target spec and codec of a job file that sets nothing under [targets]."""
    from distill.config import TargetsSection

    t = TargetsSection()
    return t.spec(), t.codec_spec()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--synthetic", action="store_true", help="Zipf-like logits, no model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="", help="run configs whose name contains this")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--student-rate",
        type=float,
        default=0.0,
        help="target positions/s the student consumes (0: from bench/results/quality.json)",
    )
    args = p.parse_args(argv)
    rate, rate_src = (args.student_rate, "--student-rate") if args.student_rate else student_rate()
    torch.set_num_threads(1)
    rows = synthetic_rows(args.samples) if args.synthetic else real_rows(args.model, args.samples)
    print(
        f"input: {rows.source}, {sum(rows.rows_per_sample)} target positions, "
        f"vocab {rows.weight.shape[0]}"
    )
    results = []
    cache: dict[TargetSpec, list[TargetSample]] = {}
    with tempfile.TemporaryDirectory(prefix="distill-codec-") as d:
        default = shipped_default()
        for name, spec, codec in configs():
            if args.only and args.only not in name:
                continue
            is_default = (spec, codec) == default
            results.append(
                run_config(name, spec, codec, rows, Path(d), args.repeats, is_default, cache)
            )
    cols = ("B/tok", "payload", "enc MB/s", "enc tok/s", "dec MB/s", "dec tok/s", "x student")
    cols = (*cols, "L1 err")
    hdr = f"{'config':36s} " + " ".join(f"{c:>9s}" for c in cols)
    print(hdr)
    for r in results:
        print(
            f"{r['config'] + (' *' if r['default'] else ''):36s} {r['bytes_per_token']:9.1f} "
            f"{r['payload_bytes_per_token']:9.1f} {r['encode_mb_s']:9.1f} "
            f"{r['encode_tokens_s']:9,.0f} {r['decode_mb_s']:9.1f} "
            f"{r['decode_tokens_s']:9,.0f} {r['decode_tokens_s'] / rate:9.0f} "
            f"{r['l1_error']:9.4f}"
        )
    print(
        f"(* shipped default; 'x student': decode rate / {rate:,.0f} target positions/s, what "
        f"the student consumes ({rate_src}); the target is >= 20)"
    )
    for r in results:
        r["student_tokens_s"] = rate
        r["decode_x_student"] = r["decode_tokens_s"] / rate
    naive = next((r for r in results if r["config"].startswith("naive")), None)
    for r in (r for r in results if r["default"]):
        print(f"default {r['config']}: {r['bytes_per_token']:.1f} bytes/target position", end="")
        if naive:
            print(
                f" vs naive top-64 fp32+int64 {naive['bytes_per_token']:.1f} "
                f"({r['bytes_per_token'] / naive['bytes_per_token']:.3f}x)",
                end="",
            )
        print(
            f"; decodes {r['decode_tokens_s']:,.0f} target positions/s vs the student's "
            f"{rate:,.0f} ({r['decode_x_student']:.0f}x)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
