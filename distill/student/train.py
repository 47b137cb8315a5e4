"""Student training from stored sparse targets (nanoGPT-style: one readable loop).

Per step: student body -> hidden states at target positions -> chunked LM head + KD/CE loss
-> AdamW with warmup and cosine decay. Checkpoints hold the model, optimizer, scheduler and
the data position (epoch, batches done), so a killed run resumes where it stopped. The final
student is a Hugging Face directory (model + tokenizer) at ``<run_dir>/student``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
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
from distill.config import Job
from distill.errors import DistillError
from distill.format.manifest import MANIFEST, Manifest
from distill.store.cache import ShardCache
from distill.store.storage import Store, open_store
from distill.student import distributed
from distill.student.evaluate import evaluate
from distill.student.init import check_compatible, init_student
from distill.student.loader import Batch, ShardLoader
from distill.student.losses import chunked_distill_loss
from distill.student.observe import RunLog, memory_bytes, plot_losses
from distill.student.optim import build_optimizer

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


def make_loader(job: Job, split: str, shuffle: bool, rank: int = 0, world: int = 1) -> ShardLoader:
    store, manifest = open_targets(job, split)
    # One ShardCache owns a directory (it tracks its size in memory and clears stale temp files
    # when it starts), so each split and each rank gets its own: the held-out loader runs
    # while the training loader's prefetch threads are still downloading.
    cache_dir = Path(job.train.cache_dir).expanduser() / split
    if world > 1:
        cache_dir = cache_dir / f"rank{rank}"
    cache = ShardCache(store, cache_dir, job.train.cache_max_bytes, prefetch=2)
    return ShardLoader(
        manifest,
        cache,
        job.train.batch_size,
        job.job.seed,
        job.train.shuffle_buffer,
        shuffle,
        rank=rank,
        world=world,
    )


def run_dir(job: Job) -> Path:
    return Path(job.train.run_dir).expanduser()


def train_fingerprint(job: Job, manifest: Manifest, world: int = 1) -> str:
    """What a checkpoint must agree with to be resumed (operational knobs excluded)."""
    t = dataclasses.asdict(job.train)
    for k in (
        "checkpoint_every",
        "eval_every",
        "cache_dir",
        "cache_max_bytes",
        "device",
        "run_dir",
        "gradient_checkpointing",
        "optimizer_offload",
    ):
        t.pop(k)
    keys = {
        "targets": manifest.job_fingerprint,
        "student": dataclasses.asdict(job.student),
        "train": t,
        "seed": job.job.seed,
        "loss": dataclasses.asdict(job.loss),
        "world": world,
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


class StudentBody(torch.nn.Module):
    """The student's body as one module (what DDP wraps): ids -> last hidden states.

    The LM head is applied by the chunked loss, outside this forward, on target rows only.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        extra = {}
        if getattr(batch, "position_ids", None) is not None:  # packed rows
            extra["position_ids"] = batch.position_ids
        return self.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            **extra,
        ).last_hidden_state


def _make_train_loader(job: Job, rank: int, world: int) -> ShardLoader:
    loader = make_loader(job, "train", shuffle=True, rank=rank, world=world)
    if job.train.packing:
        from distill.student.packing import pack_collate

        row = job.train.pack_tokens or loader.manifest.max_length
        loader.collate_fn = lambda samples: pack_collate(samples, row)
    return loader


def _dummy_batch(device: str) -> Batch:
    """A one-token stand-in for a rank whose slice of the last global batch is empty."""
    z = torch.zeros((1, 1), dtype=torch.long, device=device)
    return Batch(
        z,
        torch.ones_like(z),
        torch.zeros((1, 1), dtype=torch.bool, device=device),
        torch.zeros((0, 1), dtype=torch.long, device=device),
        torch.zeros((0, 1), device=device),
        torch.zeros(0, dtype=torch.long, device=device),
        keys=[],
    )


def train(job: Job, stop_after_steps: int = 0) -> dict[str, Any]:
    """Train (or resume) the student; returns a summary. ``stop_after_steps`` simulates a kill.

    Under ``torchrun`` (WORLD_SIZE > 1) it runs DDP: rank r trains on the r-th slice of every
    global batch, rank 0 logs, evaluates and saves.
    """
    rank, world, device = distributed.setup(job.train.device)
    main = rank == 0
    out = run_dir(job)
    out.mkdir(parents=True, exist_ok=True)
    loader = _make_train_loader(job, rank, world)
    manifest = loader.manifest
    init_dir = out / "student-init"
    if main:
        init_dir = init_student(job, init_dir)
    distributed.barrier()
    init_dir = init_student(job, init_dir)  # built by rank 0; the others only resolve it
    tokenizer = models.load_tokenizer(init_dir)
    model = models.load_model(init_dir, "float32", device)
    check_compatible(model, tokenizer, manifest, loader.cache.store.join(MANIFEST))
    if not manifest.tail and job.loss.reverse_kl > 0:
        raise DistillError(
            f"{loader.cache.store.url} holds sampled targets (no tail bucket): loss.reverse_kl "
            "is infinite off the sampled ids; set loss.reverse_kl = 0"
        )
    if job.train.gradient_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.train()
    body: torch.nn.Module = StudentBody(model)
    if world > 1:
        body = torch.nn.parallel.DistributedDataParallel(
            body, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None
        )
    opt = build_optimizer(
        model.parameters(),
        job.train.optimizer,
        job.train.lr,
        job.train.weight_decay,
        offload=job.train.optimizer_offload,
    )
    accum = job.train.grad_accum
    steps_per_epoch = math.ceil(len(loader) / accum)
    total = job.train.max_steps or job.train.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, job, total))
    fp = train_fingerprint(job, manifest, world)
    step = epoch = skip = 0
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = _load_checkpoint(ckpt, fp)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
        if main:
            console.print(f"resuming from {ckpt}: step {step}/{total}, epoch {epoch}")
    autocast = torch.autocast(
        device_type=device.split(":")[0],
        dtype=torch.bfloat16,
        enabled=job.train.dtype == "bfloat16",
    )
    weight = model.get_output_embeddings().weight
    loss_weights = job.loss
    eval_loader = (
        make_loader(job, "eval", shuffle=False)
        if (main and job.train.eval_every and job.data.eval)
        else None
    )
    log = RunLog(out, enabled=main)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tokens_seen, t_start, last_loss, peak_mem = 0, time.perf_counter(), None, 0
    cols = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} | {task.fields[rate]} tok/s | {task.fields[mem]}"),
        TimeRemainingColumn(),
    )

    def save() -> None:
        if main:
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

    with Progress(*cols, console=console, disable=not main) as bar:
        task = bar.add_task("", total=total, completed=step, loss="-", rate="-", mem="-")
        while step < total:
            micro: list[Batch | None] = []
            batches = loader.batches(epoch, skip)
            exhausted = False
            while not exhausted and step < total:
                micro = list(itertools.islice(batches, accum))
                exhausted = len(micro) < accum
                if not micro:
                    break
                terms_sum: dict[str, float] = {}
                loss_sum = 0.0
                for i, batch in enumerate(micro):
                    b = batch.to(device) if batch is not None else _dummy_batch(device)
                    sync = i == len(micro) - 1 or world == 1
                    ctx = body.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                    with ctx:
                        with autocast:
                            hidden = body(b)
                        loss, terms = chunked_distill_loss(
                            hidden[b.target_mask],
                            weight,
                            b.t_ids,
                            b.t_logprobs,
                            b.labels,
                            loss_weights,
                            job.train.loss_chunk,
                            tail=manifest.tail,
                        )
                        if batch is None:  # join the collective step with a zero gradient
                            loss = hidden.sum() * 0.0 + weight.sum() * 0.0
                        (loss / len(micro)).backward()
                    if batch is not None:
                        tokens_seen += batch.tokens * world
                        loss_sum += float(loss.detach()) / len(micro)
                        for name, v in terms.items():
                            terms_sum[name] = terms_sum.get(name, 0.0) + float(v) / len(micro)
                if job.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                skip += len(micro)
                last_loss = loss_sum
                elapsed = time.perf_counter() - t_start
                rate = tokens_seen / max(elapsed, 1e-9)
                mem = memory_bytes(device)
                peak_mem = max(peak_mem, mem)
                log.write(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": last_loss,
                        **terms_sum,
                        "lr": sched.get_last_lr()[0],
                        "tokens_per_s": rate,
                        "memory_bytes": mem,
                        "data_wait_share": loader.wait_seconds / max(elapsed, 1e-9),
                    }
                )
                bar.update(
                    task,
                    completed=step,
                    loss=f"{last_loss:.3f}",
                    rate=f"{rate:,.0f}",
                    mem=f"{mem / 2**30:.2f} GiB",
                )
                if eval_loader is not None and step % job.train.eval_every == 0:
                    r = evaluate(model, eval_loader, job.train.loss_chunk)
                    log.write({"step": step, "split": "eval", **r})
                    model.train()
                if step % job.train.checkpoint_every == 0 or step == total:
                    save()
                if stop_after_steps and step >= stop_after_steps and step < total:
                    log.close()
                    raise KeyboardInterrupt(f"stopped after {step} steps (simulated kill)")
            if step < total:
                epoch, skip = epoch + 1, 0
    elapsed = time.perf_counter() - t_start
    summary = {
        "steps": step,
        "epochs_done": epoch,
        "final_loss": last_loss,
        "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
        "seconds": elapsed,
        "data_wait_share": loader.wait_seconds / max(elapsed, 1e-9),
        "peak_memory_bytes": peak_mem,
        "world_size": world,
        "student_dir": str(out / "student"),
    }
    if main:
        if eval_loader is not None and step % job.train.eval_every:
            log.write(
                {
                    "step": step,
                    "split": "eval",
                    **evaluate(model, eval_loader, job.train.loss_chunk),
                }
            )
        log.close()
        final = out / "student"
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        png = plot_losses(out / "metrics.jsonl", out / "loss_curves.png")
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        console.print(
            f"[green]student saved to {final} ({step} steps, {elapsed:.0f}s)"
            + (f"; loss curves: {png}" if png else "")
        )
    distributed.barrier()
    distributed.teardown()
    return summary
