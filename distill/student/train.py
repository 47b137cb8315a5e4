"""Student training from stored sparse targets (nanoGPT-style: one readable loop).

Per step: student body -> hidden states at target positions -> chunked LM head + KD/CE loss
-> AdamW with warmup and cosine decay. Checkpoints hold the model, optimizer, scheduler and
the data position (epoch, batches done), so a killed run resumes where it stopped. The final
student is a Hugging Face directory (model + tokenizer) at ``<run_dir>/student``.

The student's body and the loss are :class:`Components` of the loop, passed to :func:`train`
(torchtune-style: injected, never patched); the defaults are what ``distill-ctl train`` runs,
and bench/quality.py's online arm passes its own.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from distill import models
from distill.config import XTOK_TERMS, Job, LossWeights
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
from distill.student.xtok_data import XBatch
from distill.student.xtok_loss import xtok_loss

console = Console(stderr=True)
CHECKPOINT = "checkpoint.pt"


def open_targets(job: Job, split: str) -> tuple[Store, Manifest]:
    """The complete shard set of one split, or a clear error saying how to make it."""
    store = open_store(f"{job.output.rstrip('/')}/{split}")
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
        job.seed,
        job.train.shuffle_buffer,
        shuffle,
        rank=rank,
        world=world,
    )


def run_dir(job: Job) -> Path:
    return Path(job.train.run_dir).expanduser()


def train_fingerprint(job: Job, manifest: Manifest, world: int = 1) -> str:
    """What a checkpoint must agree with to be resumed (operational knobs excluded)."""
    t = job.train.model_dump()
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
    student, loss = job.student.model_dump(), job.loss.model_dump()
    # the cross-tokenizer settings count only when used (checkpoints from before them resume)
    if not student["tokenizer"]:
        student.pop("tokenizer")
    for k in XTOK_TERMS:
        if not loss[k]:
            loss.pop(k)
    keys = {
        "targets": manifest.job_fingerprint,
        "student": student,
        "train": t,
        "seed": job.seed,
        "loss": loss,
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


class LossFn(Protocol):
    """The loop's loss, :func:`~distill.student.losses.chunked_distill_loss`'s signature: the
    student's hidden states at the target rows and its LM head weight, the stored targets and
    the ground-truth labels -> (total, the detached mean of each term); ``total``
    backpropagates to ``hidden`` and ``weight``."""

    def __call__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        t_ids: torch.Tensor,
        t_logprobs: torch.Tensor,
        labels: torch.Tensor,
        weights: LossWeights,
        chunk: int = ...,
        tail: bool = ...,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclasses.dataclass(frozen=True)
class Components:
    """The parts of the loop a caller may replace, injected into :func:`train`.

    ``body``: the student model -> the module whose forward maps a :class:`Batch` to the last
    hidden states (what DDP wraps); ``loss``: a :class:`LossFn`, called once per micro-batch
    with the hidden states at the target positions. The defaults train from stored targets.
    """

    body: Callable[[Any], torch.nn.Module] = StudentBody
    loss: LossFn = chunked_distill_loss


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


@dataclasses.dataclass
class Run:
    """What the loop needs, built once by :func:`setup`."""

    job: Job
    rank: int
    world: int
    device: str
    out: Path
    loader: ShardLoader
    tokenizer: Any
    model: Any
    body: torch.nn.Module
    loss: LossFn
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    total: int
    fingerprint: str
    autocast: torch.autocast
    weight: torch.Tensor
    eval_loader: ShardLoader | None
    log: RunLog
    vmap: torch.Tensor | None = None  # cross-tokenizer: teacher id -> student id (-1: none)

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, evaluates and saves."""
        return self.rank == 0


@dataclasses.dataclass
class Position:
    """Where the run is: the step done and its data position (saved in the checkpoint)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


@dataclasses.dataclass
class Meter:
    """Counters for the step records and the summary."""

    t_start: float
    tokens_seen: int = 0
    last_loss: float | None = None
    peak_mem: int = 0


def train(job: Job, components: Components | None = None) -> dict[str, Any]:
    """Train (or resume) the student; returns a summary.

    Under ``torchrun`` (WORLD_SIZE > 1) it runs DDP: rank r trains on the r-th slice of every
    global batch, rank 0 logs, evaluates and saves. ``components``: the body and the loss
    (default: :class:`Components`'s, training from the stored targets).
    """
    run, pos = setup(job, components)
    meter = Meter(t_start=time.perf_counter())
    data = global_batches(run.loader, job.train.grad_accum, pos.epoch, pos.batches_in_epoch)
    try:
        with _progress_bar(run.main) as bar:
            task = bar.add_task(
                "", total=run.total, completed=pos.step, loss="-", rate="-", mem="-"
            )
            for step in range(pos.step + 1, run.total + 1):
                epoch, batches_in_epoch, micro = next(data)
                loss, terms, tokens = train_step(run, micro)
                pos = Position(step, epoch, batches_in_epoch)
                meter.tokens_seen += tokens
                meter.last_loss = loss
                _log_step(run, pos, meter, terms, bar, task)
                if run.eval_loader is not None and step % job.train.eval_every == 0:
                    _log_eval(run, step)
                if step % job.train.checkpoint_every == 0 or step == run.total:
                    _save(run, pos)
    except BaseException:
        run.log.close()  # a crash or Ctrl-C still leaves the records so far on disk
        raise
    return finish(run, pos, meter)


def setup(job: Job, components: Components | None = None) -> tuple[Run, Position]:
    """Processes, loaders, the student, optimizer and schedule; resumes from the checkpoint."""
    parts = components or Components()
    rank, world, device = distributed.setup(job.train.device)
    out = run_dir(job)
    out.mkdir(parents=True, exist_ok=True)
    loader = _make_train_loader(job, rank, world)
    tokenizer, model, own_tokens = _load_student(job, out, loader, main=rank == 0, device=device)
    vmap = None
    if own_tokens:
        from distill.student.xtok_setup import cross_tokenizer_data

        vmap = cross_tokenizer_data(job, loader, tokenizer, out, world).to(device)
    body = _wrap_body(parts.body(model), world, device)
    opt = build_optimizer(
        model.parameters(),
        job.train.optimizer,
        job.train.lr,
        job.train.weight_decay,
        offload=job.train.optimizer_offload,
    )
    steps_per_epoch = math.ceil(len(loader) / job.train.grad_accum)
    total = job.train.max_steps or job.train.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, job, total))
    fp = train_fingerprint(job, loader.manifest, world)
    pos = _resume(out / CHECKPOINT, fp, model, opt, sched, total, main=rank == 0)
    autocast = torch.autocast(
        device_type=device.split(":")[0],
        dtype=torch.bfloat16,
        enabled=job.train.dtype == "bfloat16",
    )
    weight = model.get_output_embeddings().weight
    eval_loader = (
        make_loader(job, "eval", shuffle=False)
        # held-out metrics score the teacher's vocabulary: none for another tokenizer yet
        if (rank == 0 and job.train.eval_every and job.data.eval and vmap is None)
        else None
    )
    log = RunLog(out, enabled=rank == 0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = Run(
        job=job,
        rank=rank,
        world=world,
        device=device,
        out=out,
        loader=loader,
        tokenizer=tokenizer,
        model=model,
        body=body,
        loss=parts.loss,
        opt=opt,
        sched=sched,
        total=total,
        fingerprint=fp,
        autocast=autocast,
        weight=weight,
        eval_loader=eval_loader,
        log=log,
        vmap=vmap,
    )
    return run, pos


def trains_on_own_tokens(job: Job, tokenizer: Any, manifest: Manifest) -> bool:
    """Whether the student trains on its own tokens through the aligned data path
    (distill/student/xtok_data.py): a cross-tokenizer term is on, or ``student.tokenizer`` is
    not the teacher's tokenizer and CE is the only term on aligned targets (the CE-only
    baseline of a student with another vocabulary). The teacher's own tokenizer given as
    ``student.tokenizer`` keeps the same-tokenizer path (held-out eval, packing, torchrun)."""
    if job.loss.cross_tokenizer():
        return True
    if not (job.student.tokenizer and job.targets.alignment):
        return False
    if set(job.loss.active()) != {"ce"}:
        return False
    return models.tokenizer_fingerprint(tokenizer) != manifest.tokenizer_fingerprint


def _load_student(
    job: Job, out: Path, loader: ShardLoader, main: bool, device: str
) -> tuple[Any, Any, bool]:
    """The initial student (built by rank 0), checked against the targets, in train mode;
    whether it trains on its own tokens (:func:`trains_on_own_tokens`)."""
    manifest = loader.manifest
    init_dir = out / "student-init"
    if main:
        init_dir = init_student(job, init_dir)
    distributed.barrier()
    init_dir = init_student(job, init_dir)  # built by rank 0; the others only resolve it
    tokenizer = models.load_tokenizer(
        job.resolve(job.student.tokenizer) if job.student.tokenizer else init_dir
    )
    model = models.load_model(init_dir, "float32", device)
    own_tokens = trains_on_own_tokens(job, tokenizer, manifest)
    if own_tokens:
        if models.vocab_size(model) < len(tokenizer):
            raise DistillError(
                f"the student's LM head has {models.vocab_size(model)} rows, fewer than "
                f"student.tokenizer's {len(tokenizer)} tokens"
            )
    else:
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
    return tokenizer, model, own_tokens


def _wrap_body(body: torch.nn.Module, world: int, device: str) -> torch.nn.Module:
    """The student's body, under DDP when there are several processes."""
    if world > 1:
        body = torch.nn.parallel.DistributedDataParallel(
            body, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None
        )
    return body


def _resume(
    ckpt: Path,
    fingerprint: str,
    model: Any,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    total: int,
    main: bool,
) -> Position:
    """Load ``ckpt`` into model, optimizer and schedule if it exists; the position to go on from."""
    if not ckpt.exists():
        return Position()
    state = _load_checkpoint(ckpt, fingerprint)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    pos = Position(state["step"], state["epoch"], state["batches_in_epoch"])
    if main:
        console.print(f"resuming from {ckpt}: step {pos.step}/{total}, epoch {pos.epoch}")
    return pos


def global_batches(
    loader: ShardLoader, accum: int, epoch: int, skip: int
) -> Iterator[tuple[int, int, list[Batch | None]]]:
    """(epoch, batches done in it, micro-batches) per optimizer step, from ``(epoch, skip)`` on.

    A step takes ``accum`` of this rank's batches; the last of an epoch may take fewer. Epochs
    follow each other without end; the loop stops asking after its last step.
    """
    while True:
        batches = loader.batches(epoch, skip)
        while True:
            micro = list(itertools.islice(batches, accum))
            if micro:
                skip += len(micro)
                yield epoch, skip, micro
            if len(micro) < accum:
                break
        epoch, skip = epoch + 1, 0


def train_step(run: Run, micro: list[Batch | None]) -> tuple[float, dict[str, float], int]:
    """One optimizer step over ``micro`` (gradient accumulation).

    Returns the mean loss, the mean of each loss term and the tokens seen (all ranks).
    """
    terms_sum: dict[str, float] = {}
    loss_sum, tokens = 0.0, 0
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1 or run.world == 1
        loss, terms = _forward_backward(run, batch, sync, len(micro))
        if batch is not None:
            tokens += batch.tokens * run.world
            loss_sum += float(loss.detach()) / len(micro)
            for name, v in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + float(v) / len(micro)
    if run.job.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.job.train.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    return loss_sum, terms_sum, tokens


def _forward_backward(
    run: Run, batch: Batch | None, sync: bool, n: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch and its gradient (scaled by ``1/n``); DDP syncs iff ``sync``.

    A rank with no batch (``None``) joins the collective step with a zero gradient.
    """
    b = batch.to(run.device) if batch is not None else _dummy_batch(run.device)
    ctx = run.body.no_sync() if (run.world > 1 and not sync) else contextlib.nullcontext()
    with ctx:
        with run.autocast:
            hidden = run.body(b)
        if isinstance(b, XBatch):
            assert run.vmap is not None
            loss, terms = xtok_loss(
                hidden, run.weight, b, run.job.loss, run.vmap, run.job.train.loss_chunk
            )
            (loss / n).backward()
            return loss, terms
        loss, terms = run.loss(
            hidden[b.target_mask],
            run.weight,
            b.t_ids,
            b.t_logprobs,
            b.labels,
            run.job.loss,
            run.job.train.loss_chunk,
            tail=run.loader.manifest.tail,
        )
        if batch is None:
            loss = hidden.sum() * 0.0 + run.weight.sum() * 0.0
        (loss / n).backward()
    return loss, terms


def _progress_bar(main: bool) -> Progress:
    cols = (
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} | {task.fields[rate]} tok/s | {task.fields[mem]}"),
        TimeRemainingColumn(),
    )
    return Progress(*cols, console=console, disable=not main)


def _log_step(
    run: Run, pos: Position, meter: Meter, terms: dict[str, float], bar: Progress, task: TaskID
) -> None:
    """The step's record in metrics.jsonl / TensorBoard, and the progress bar."""
    elapsed = time.perf_counter() - meter.t_start
    rate = meter.tokens_seen / max(elapsed, 1e-9)
    mem = memory_bytes(run.device)
    meter.peak_mem = max(meter.peak_mem, mem)
    run.log.write(
        {
            "step": pos.step,
            "epoch": pos.epoch,
            "loss": meter.last_loss,
            **terms,
            "lr": run.sched.get_last_lr()[0],
            "tokens_per_s": rate,
            "memory_bytes": mem,
            "data_wait_share": run.loader.wait_seconds / max(elapsed, 1e-9),
        }
    )
    bar.update(
        task,
        completed=pos.step,
        loss=f"{meter.last_loss:.3f}",
        rate=f"{rate:,.0f}",
        mem=f"{mem / 2**30:.2f} GiB",
    )


def _log_eval(run: Run, step: int) -> None:
    """Held-out metrics at ``step`` (rank 0, which alone has an eval loader)."""
    assert run.eval_loader is not None
    r = evaluate(run.model, run.eval_loader, run.job.train.loss_chunk)
    run.log.write({"step": step, "split": "eval", **r})
    run.model.train()


def _save(run: Run, pos: Position) -> None:
    """The checkpoint (rank 0): model, optimizer, schedule and data position."""
    if run.main:
        _save_checkpoint(
            run.out / CHECKPOINT,
            {
                "kind": "distill.checkpoint",
                "fingerprint": run.fingerprint,
                "step": pos.step,
                "epoch": pos.epoch,
                "batches_in_epoch": pos.batches_in_epoch,
                "model": run.model.state_dict(),
                "optimizer": run.opt.state_dict(),
                "scheduler": run.sched.state_dict(),
            },
        )
        run.log.flush()


def finish(run: Run, pos: Position, meter: Meter) -> dict[str, Any]:
    """The summary; rank 0 also evaluates a last time, saves the student and the loss curves."""
    elapsed = time.perf_counter() - meter.t_start
    summary = {
        "steps": pos.step,
        "epochs_done": pos.epoch,
        "final_loss": meter.last_loss,
        "tokens_per_s": meter.tokens_seen / max(elapsed, 1e-9),
        "seconds": elapsed,
        "data_wait_share": run.loader.wait_seconds / max(elapsed, 1e-9),
        "peak_memory_bytes": meter.peak_mem,
        "world_size": run.world,
        "student_dir": str(run.out / "student"),
    }
    if run.main:
        if run.eval_loader is not None and pos.step % run.job.train.eval_every:
            run.log.write(
                {
                    "step": pos.step,
                    "split": "eval",
                    **evaluate(run.model, run.eval_loader, run.job.train.loss_chunk),
                }
            )
        run.log.close()
        final = run.out / "student"
        run.model.save_pretrained(final)
        run.tokenizer.save_pretrained(final)
        png = plot_losses(run.out / "metrics.jsonl", run.out / "loss_curves.png")
        (run.out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        console.print(
            f"[green]student saved to {final} ({pos.step} steps, {elapsed:.0f}s)"
            + (f"; loss curves: {png}" if png else "")
        )
    distributed.barrier()
    distributed.teardown()
    return summary
