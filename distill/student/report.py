"""Human-facing reports: shard-set stats (`inspect`) and student comparisons (`eval`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from distill import models
from distill.config import Job
from distill.errors import DistillError
from distill.format.manifest import MANIFEST, Manifest
from distill.format.shards import read_shard
from distill.store.cache import ShardCache
from distill.store.storage import open_store
from distill.student.loader import ShardLoader, shard_refs


def shard_set_stats(url: str, cache_dir: Path | None = None) -> tuple[Manifest, dict[str, float]]:
    """Manifest plus measured stats: bytes per target token and mean top-k probability mass."""
    store = open_store(url)
    if not store.exists(MANIFEST):
        raise DistillError(f"no manifest at {store.join(MANIFEST)}: not a complete shard set")
    m = Manifest.from_json(store.read_bytes(MANIFEST), store.join(MANIFEST))
    cache = ShardCache(store, cache_dir or models.cache_root() / "shards", 2 * 1024**3)
    mass_sum, rows = 0.0, 0
    for path in cache.iter_local(shard_refs(m)):
        for s in read_shard(path):
            mass_sum += float(np.exp(s.target_logprobs.astype(np.float64)).sum())
            rows += s.target_ids.shape[0]
    stats = {
        "samples": m.samples,
        "tokens": m.tokens,
        "target_tokens": m.target_tokens,
        "bytes": m.nbytes,
        "bytes_per_token": m.nbytes / max(m.tokens, 1),
        "bytes_per_target_token": m.nbytes / max(m.target_tokens, 1),
        "mean_topk_mass": mass_sum / max(rows, 1),
    }
    return m, stats


def inspect_shards(url: str, console: Console) -> None:
    m, stats = shard_set_stats(url)
    t = Table(title=f"shard set {url}", show_header=False)
    for key in (
        "split",
        "teacher",
        "vocab_size",
        "target_kind",
        "width",
        "max_length",
        "schema_version",
        "created",
    ):
        t.add_row(key, str(getattr(m, key)))
    t.add_row("tokenizer", m.tokenizer_fingerprint[:16])
    t.add_row("dtypes", json.dumps(m.dtypes))
    t.add_row("targets", json.dumps(m.targets))
    t.add_row("codec", json.dumps(m.codec))
    t.add_row("shards", str(len(m.shards)))
    t.add_row("teacher seconds", f"{m.teacher_seconds:.1f}")
    for key, v in stats.items():
        t.add_row(key.replace("_", " "), f"{v:,.3f}" if isinstance(v, float) else f"{v:,}")
    console.print(t)


def _eval_model(job: Job, model_dir: Path, loader: ShardLoader) -> tuple[dict[str, float], Any]:
    from distill.student.evaluate import evaluate
    from distill.student.init import check_compatible

    device = models.pick_device(job.train.device)
    model = models.load_model(model_dir, "float32", device)
    check_compatible(
        model,
        models.load_tokenizer(model_dir),
        loader.manifest,
        str(model_dir),
        hint="held-out evaluation on the shards scores the teacher's vocabulary; a student "
        "with another tokenizer is scored in bits per byte of held-out text when it trained on "
        "its own tokens (student.tokenizer on targets written with targets.alignment = true)",
    )
    return evaluate(model, loader, job.train.loss_chunk), model


def _compare_own_tokens(
    job: Job, init_dir: Path, final_dir: Path, console: Console
) -> tuple[dict[str, Any], Any]:
    """A student with its own tokenizer: held-out bits per byte of assistant text (the
    shards' metrics index the teacher's vocabulary), initialised vs trained, on data.eval;
    and the trained model."""
    from distill.config import splits
    from distill.student.bits_per_byte import bits_per_byte, split_messages
    from distill.student.train import run_dir

    spec = splits(job).get("eval")
    if not spec:
        raise DistillError(f"{job.path}: data.eval is not set: nothing held out to score")
    records = list(split_messages(spec, run_dir(job) / "eval-records"))
    device = models.pick_device(job.train.device)
    result: dict[str, Any] = {"metric": "bits per byte of held-out assistant text"}
    for name, d in (("initialised", init_dir), ("trained", final_dir)):
        model = models.load_model(d, "float32", device)
        result[name] = bits_per_byte(model, models.load_tokenizer(d), records)
    before, after = result["initialised"], result["trained"]
    t = Table(
        title=f"held-out, the student's own tokens ({len(records)} samples, "
        f"{int(after['bytes']):,} bytes of assistant text)"
    )
    for col in ("student", "bits per byte", "tokens scored"):
        t.add_column(col)
    for name, r in (("initialised", before), ("trained", after)):
        t.add_row(name, f"{r['bpb']:.4f}", f"{int(r['tokens']):,}")
    console.print(t)
    return result, model


def compare_students(job: Job, question: str, console: Console) -> dict[str, Any]:
    """Evaluate the initialised and the trained student on the held-out shard set."""
    from distill.student.evaluate import generate_answer
    from distill.student.init import init_student
    from distill.student.train import make_loader, run_dir, trains_on_own_tokens

    out = run_dir(job)
    final_dir = out / "student"
    if not (final_dir / "config.json").is_file():
        raise DistillError(f"{final_dir} not found: run `distill-ctl train --job {job.path}` first")
    init_dir = init_student(job, out / "student-init")
    loader = make_loader(job, "eval", shuffle=False)
    if trains_on_own_tokens(job, models.load_tokenizer(final_dir), loader.manifest):
        result, model = _compare_own_tokens(job, init_dir, final_dir, console)
    else:
        result, model = _compare_on_shards(job, init_dir, final_dir, loader, console)
    if question:
        answer = generate_answer(model, models.load_tokenizer(final_dir), question)
        console.print(f"[bold]Q:[/bold] {question}\n[bold]A (trained student):[/bold] {answer}")
        result["question"], result["answer"] = question, answer
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    return result


def _compare_on_shards(
    job: Job, init_dir: Path, final_dir: Path, loader: ShardLoader, console: Console
) -> tuple[dict[str, Any], Any]:
    """The shards' held-out KD, CE and agreement, initialised vs trained; the trained model."""
    before, _ = _eval_model(job, init_dir, loader)
    after, model = _eval_model(job, final_dir, loader)
    t = Table(title=f"held-out ({int(after['target_tokens'])} target tokens)")
    for col in ("student", "KD loss (sparse fwd KL)", "CE", "teacher top-1 agreement"):
        t.add_column(col)
    for name, r in (("initialised", before), ("trained", after)):
        t.add_row(name, f"{r['kd']:.4f}", f"{r['ce']:.4f}", f"{r['top1_agreement']:.2%}")
    console.print(t)
    return {"initialised": before, "trained": after}, model
