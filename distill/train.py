"""Student training from stored sparse targets (nanoGPT-style: one readable loop).

Per step: student body -> hidden states at target positions -> chunked LM head + KD/CE loss
-> AdamW with warmup and cosine decay. Checkpoints hold the model, optimizer, scheduler and
the data position (epoch, batches done), so a killed run resumes where it stopped. The final
student is a Hugging Face directory (model + tokenizer) at ``<run_dir>/student``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill import models
from distill.cache import ShardCache
from distill.config import Job
from distill.errors import DistillError
from distill.loader import ShardLoader
from distill.losses import chunked_kd_loss
from distill.manifest import MANIFEST, Manifest
from distill.storage import Store, open_store
from distill.student import check_compatible, init_student

console = Console(stderr=True)
CHECKPOINT = "checkpoint.pt"


def open_targets(job: Job, split: str) -> tuple[Store, Manifest]:
    """The complete shard set of one split, or a clear error saying how to make it."""
    store = open_store(f"{job.job.output.rstrip('/')}/{split}")
    if not store.exists(MANIFEST):
        raise DistillError(
            f"no complete shard set at {store.url} (no {MANIFEST}); run "
            f"`distill-ctl teacher --job {job.path or 'JOB'}` first"
        )
    return store, Manifest.from_json(store.read_bytes(MANIFEST), store.join(MANIFEST))


def make_loader(job: Job, split: str, shuffle: bool) -> ShardLoader:
    store, manifest = open_targets(job, split)
    cache = ShardCache(
        store, Path(job.train.cache_dir).expanduser(), job.train.cache_max_bytes, prefetch=2
    )
    return ShardLoader(
        manifest, cache, job.train.batch_size, job.job.seed, job.train.shuffle_buffer, shuffle
    )


def run_dir(job: Job) -> Path:
    return Path(job.train.run_dir).expanduser()


def train_fingerprint(job: Job, manifest: Manifest) -> str:
    """What a checkpoint must agree with to be resumed (operational knobs excluded)."""
    t = dataclasses.asdict(job.train)
    for k in (
        "checkpoint_every",
        "eval_every",
        "cache_dir",
        "cache_max_bytes",
        "device",
        "run_dir",
    ):
        t.pop(k)
    keys = {
        "targets": manifest.job_fingerprint,
        "student": dataclasses.asdict(job.student),
        "train": t,
        "seed": job.job.seed,
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def lr_at(step: int, job: Job, total: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``; a multiplier of ``train.lr``."""
    w = job.train.warmup_steps
    if step < w:
        return (step + 1) / w
    frac = (step - w) / max(1, total - w)
    r = job.train.min_lr_ratio
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint intact


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing
        raise DistillError(
            f"{path}: corrupt checkpoint ({type(e).__name__}); delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("kind") != "distill.checkpoint":
        raise DistillError(f"{path}: not a distill checkpoint; delete it or use another run_dir")
    if state.get("fingerprint") != fingerprint:
        raise DistillError(
            f"{path} belongs to a different job (targets, student or training settings "
            "changed); use another train.run_dir, or restore the original job file"
        )
    return state


def train(job: Job, stop_after_steps: int = 0) -> dict[str, Any]:
    """Train (or resume) the student; returns a summary. ``stop_after_steps`` simulates a kill."""
    out = run_dir(job)
    out.mkdir(parents=True, exist_ok=True)
    loader = make_loader(job, "train", shuffle=True)
    manifest = loader.manifest
    device = models.pick_device(job.train.device)
    init_dir = init_student(job, out / "student-init")
    tokenizer = models.load_tokenizer(init_dir)
    model = models.load_model(init_dir, "float32", device)
    check_compatible(model, tokenizer, manifest, loader.cache.store.join(MANIFEST))
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=job.train.lr,
        weight_decay=job.train.weight_decay,
        betas=(0.9, 0.95),
    )
    steps_per_epoch = len(loader)
    total = job.train.max_steps or job.train.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, job, total))
    fp = train_fingerprint(job, manifest)
    step = epoch = skip = 0
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = _load_checkpoint(ckpt, fp)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
        console.print(f"resuming from {ckpt}: step {step}/{total}, epoch {epoch}")
    autocast = torch.autocast(
        device_type=device.split(":")[0],
        dtype=torch.bfloat16,
        enabled=job.train.dtype == "bfloat16",
    )
    weight = model.get_output_embeddings().weight
    log = (out / "metrics.jsonl").open("a")
    tokens_seen, t_start, last_loss = 0, time.perf_counter(), None
    cols = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} | {task.fields[rate]} tok/s"),
        TimeRemainingColumn(),
    )
    with Progress(*cols, console=console) as bar:
        task = bar.add_task("", total=total, completed=step, loss="-", rate="-")
        while step < total:
            for batch in loader.batches(epoch, skip):
                b = batch.to(device)
                with autocast:
                    hidden = model.base_model(
                        input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
                    ).last_hidden_state
                loss, kd, ce = chunked_kd_loss(
                    hidden[b.target_mask],
                    weight,
                    b.t_ids,
                    b.t_logprobs,
                    b.labels,
                    job.train.kd_weight,
                    job.train.loss_chunk,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if job.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
                opt.step()
                sched.step()
                step += 1
                skip += 1
                last_loss = float(loss.detach())
                tokens_seen += batch.tokens
                rate = tokens_seen / (time.perf_counter() - t_start)
                rec = {
                    "step": step,
                    "epoch": epoch,
                    "loss": last_loss,
                    "kd": float(kd),
                    "ce": float(ce),
                    "lr": sched.get_last_lr()[0],
                    "tokens_per_s": rate,
                }
                log.write(json.dumps(rec) + "\n")
                bar.update(task, completed=step, loss=f"{last_loss:.3f}", rate=f"{rate:,.0f}")
                if step % job.train.checkpoint_every == 0 or step == total:
                    _save_checkpoint(
                        ckpt,
                        {
                            "kind": "distill.checkpoint",
                            "fingerprint": fp,
                            "step": step,
                            "epoch": epoch,
                            "batches_in_epoch": skip,
                            "model": model.state_dict(),
                            "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(),
                        },
                    )
                    log.flush()
                if stop_after_steps and step >= stop_after_steps and step < total:
                    log.close()
                    raise KeyboardInterrupt(f"stopped after {step} steps (simulated kill)")
                if step >= total:
                    break
            else:
                epoch, skip = epoch + 1, 0
                continue
            break
    log.close()
    final = out / "student"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    elapsed = time.perf_counter() - t_start
    summary = {
        "steps": step,
        "epochs_done": epoch,
        "final_loss": last_loss,
        "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
        "seconds": elapsed,
        "data_wait_share": loader.wait_seconds / max(elapsed, 1e-9),
        "student_dir": str(final),
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"[green]student saved to {final} ({step} steps, {elapsed:.0f}s)")
    return summary
