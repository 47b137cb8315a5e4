"""Teacher pass: one forward pass over the dataset -> sparse targets in shards, manifest last.

Efficiency, compared with the usual loop (pad each batch to its longest sample, materialise
``[batch, seq, vocab]`` logits, take top-k, copy, write):

- batches are built by token budget from length-sorted samples, so little is padding;
- the LM head runs only at target positions (assistant tokens), in chunks of
  ``head_chunk`` rows, so full-vocab logits never exist for a whole batch;
- encoding and upload of a finished shard overlap the next shard's forward pass.

A teacher bigger than the device runs layered (``teacher.mode``, distill/teacher/layered.py):
consecutive shards are computed together, ``teacher.chunk_tokens`` at a time, each shard
batched exactly as here, so the shards, the resume rule and the manifest are the same.

Resumable by construction: record i of the dataset (its non-blank lines and rows, in file
order) always lands in shard ``i // samples_per_shard`` (:mod:`distill.data.prepare`), shard
writes are create-only, each shard gets a stats sidecar, and the manifest is written last. A
rerun skips complete shards, so no sample is dropped or duplicated. Only the shards a run
computes have their records checked and tokenised (on every core, before the model loads), into
a token store on local disk that the shards are read from.

Fan-out (Google Cloud Batch): task ``i`` of ``N`` (``BATCH_TASK_INDEX`` / ``BATCH_TASK_COUNT``,
or :class:`~distill.shardset.Part`) computes only the shards ``s`` with ``s % N == i``, with
no coordination. A task writes ``parts.json`` (the manifest without its shards, create-only)
instead of the manifest; :func:`~distill.shardset.finish_split` writes the manifest once every
shard is in the bucket.

The bucket side of all this (object names, ``run.json``, ``parts.json``, ``task-seconds/``,
the job fingerprint, the manifest's completion rule) is :mod:`distill.shardset`, which imports
no torch: the cloud controllers read it without loading a model. Each split runs from one
:class:`SplitContext`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from distill import models
from distill.checkpoints import source_id
from distill.config import Job, splits
from distill.data.dataset import MAX_REPORTED, Sample
from distill.data.prepare import Prepared, ShardChunks
from distill.errors import DistillError
from distill.format.manifest import MANIFEST, Manifest
from distill.format.shards import (
    ShardFormat,
    ShardStats,
    TargetSample,
    id_dtype,
    read_shard,
    shard_name,
    write_shard,
)
from distill.shardset import (
    Part,
    claim_output,
    put_parts,
    put_skipped,
    put_task_seconds,
    sidecar_name,
    skipped_lines,
    split_fingerprints,
    stored_manifest,
)
from distill.store.cache import sha256_file
from distill.store.storage import ObjectExists, Store, open_store
from distill.teacher.batching import prepare_split
from distill.teacher.extract import compute_targets
from distill.teacher.fit import resolve_way
from distill.teacher.layered import LayeredTeacher, chunk_groups
from distill.teacher.stop import Preempted, StopWatch

console = Console(stderr=True)


def _stats_from_remote(store: Store, name: str, tmpdir: Path, fmt: ShardFormat) -> ShardStats:
    """A shard uploaded before a crash but without its sidecar: recompute its stats."""
    local = tmpdir / name
    store.download(name, local)
    samples = list(read_shard(local, fmt.vocab_size))
    check = tmpdir / f"check-{name}"
    stats = write_shard(check, samples, fmt)  # the same samples always encode to the same bytes
    check.unlink()
    if stats.sha256 != sha256_file(local):
        raise DistillError(f"{store.join(name)}: shard bytes differ from their re-encoding")
    local.unlink()
    return dataclasses.replace(stats, name=name)


@dataclasses.dataclass(frozen=True, eq=False)
class SplitContext:
    """One split's teacher run, built once by :func:`run_teacher` and passed down whole.

    ``chunks``: the split's samples by shard (a :class:`~distill.data.prepare.ShardChunks`
    reads each from the token store when asked; another task's shards are empty). ``stop``
    (preemption, SIGTERM) is checked after every forward batch. ``skipped``: per shard, the
    dataset lines left out as invalid (recorded beside the shard and in the manifest).
    ``part``: compute only this fan-out task's shards and write ``parts.json``, not the
    manifest.
    """

    job: Job
    split: str
    chunks: Sequence[list[Sample]]
    store: Store
    model: Any  # a transformers model on its device, or a LayeredTeacher
    fingerprint: str  # the split's job fingerprint (distill.shardset.job_fingerprint)
    tok_fp: str  # the tokenizer's fingerprint
    teacher_dir: Path
    stop: StopWatch | None = None
    skipped: Callable[[int], list[int | str]] = lambda idx: []
    part: Part | None = None

    @functools.cached_property
    def fmt(self) -> ShardFormat:
        """How the shards are encoded: the job's codec and targets, the model's vocabulary."""
        t = self.job.targets
        return ShardFormat(t.codec_spec(), t.spec(), _vocab_size(self.model))

    @property
    def mine(self) -> list[int]:
        """The shard indices this run computes: all, or the part's ``s % N == i``."""
        part = self.part
        return [i for i in range(len(self.chunks)) if part is None or part.owns(i)]


def run_split(ctx: SplitContext) -> Manifest | None:
    """Produce (or resume) one split's shard set; returns its manifest.

    On ``ctx.stop`` the shard in flight is abandoned, finished shards' uploads complete, and
    :class:`Preempted` is raised. With ``ctx.part``, returns None: the task's shards and
    ``parts.json`` are written, and :func:`~distill.shardset.finish_split` writes the manifest
    once every task's shards are there.
    """
    split, store, part = ctx.split, ctx.store, ctx.part
    complete = _complete_set(store, split, ctx.fingerprint)
    if complete is not None:
        return complete
    claim_output(store, ctx.fingerprint)
    if ctx.job.targets.alignment:
        put_tokenizer(store, ctx.teacher_dir)
    existing = set(store.list())
    t0 = time.perf_counter()
    out = _SplitOutput(
        store, ctx.fmt, Path(tempfile.mkdtemp(prefix="distill-teacher-")), ctx.skipped
    )
    try:
        mine = ctx.mine
        stats = _shards_done(out, len(ctx.chunks), existing, mine)
        done = sum(1 for i in mine if stats[i] is not None)
        if done:
            console.print(f"{split}: resuming, {done}/{len(mine)} shards already in {store.url}")
        if part is not None:
            console.print(f"{split}: task {part.index} of {part.count}: shards {_ranges(mine)}")
            put_parts(store, _manifest(ctx, [], 0.0), len(ctx.chunks))
        try:
            _compute_shards(ctx, stats, out, t0)
        except Preempted:
            if part is not None:  # the attempt's finished shards took compute time too
                put_task_seconds(store, part, time.perf_counter() - t0)
            raise
        elapsed = time.perf_counter() - t0
        if part is not None:
            put_task_seconds(store, part, elapsed)
            console.print(f"[green]{split}: task {part.index}: {len(mine)} shards in {store.url}")
            return None
        manifest = _manifest(ctx, stats, elapsed)
        # A concurrent run may have finished first; its manifest describes the same shards.
        with contextlib.suppress(ObjectExists):
            store.put_bytes(MANIFEST, manifest.to_json())
        console.print(
            f"[green]{split}: {manifest.samples} samples, {manifest.target_tokens} target tokens, "
            f"{len(manifest.shards)} shards -> {store.url} ({elapsed:.1f}s)"
        )
        return manifest
    finally:  # done, preempted or failed: the scratch directory goes
        out.cleanup()


TOKENIZER = "tokenizer/"  # targets.alignment: the teacher tokenizer's files, once per set


def put_tokenizer(store: Store, teacher_dir: Path) -> list[str]:
    """The teacher tokenizer's files (``save_pretrained``: vocabulary, merges, chat template)
    under ``tokenizer/`` in the split's store, create-only (a resumed or concurrent run finds
    the same files there), before the manifest: a student maps ids to strings without the
    teacher model. Returns their names, sorted."""
    with tempfile.TemporaryDirectory(prefix="distill-tokenizer-") as tmp:
        models.load_tokenizer(teacher_dir).save_pretrained(tmp)
        names = []
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file():
                name = TOKENIZER + f.relative_to(tmp).as_posix()
                with contextlib.suppress(ObjectExists):
                    store.put_file(name, f)
                names.append(name)
    return names


def _ranges(idx: list[int]) -> str:
    """``0, 3, 6 ... 45`` for a long list of shard indices."""
    shown = ", ".join(map(str, idx[:3]))
    return shown + (f" ... {idx[-1]}" if len(idx) > 3 else "") + f" ({len(idx)})"


def _complete_set(store: Store, split: str, fingerprint: str) -> Manifest | None:
    """The split's manifest if its shard set is already complete (and from this job)."""
    m = stored_manifest(store, fingerprint)
    if m is not None:
        console.print(f"[green]{split}: complete shard set at {store.url}, nothing to do")
    return m


@dataclasses.dataclass(frozen=True)
class _SplitOutput:
    """Where one split's shards go: the store, their format and a local scratch directory."""

    store: Store
    fmt: ShardFormat
    tmp: Path
    skipped: Callable[[int], list[int | str]] = lambda idx: []

    def put_sidecar(self, name: str, st: ShardStats) -> None:
        """``shard-NNNNNN.json`` beside shard ``name``: its stats (create-only; a concurrent
        run's sidecar of the same shard says the same)."""
        with contextlib.suppress(ObjectExists):
            self.store.put_bytes(sidecar_name(name), json.dumps(dataclasses.asdict(st)).encode())

    def recover(self, name: str) -> ShardStats:
        """The stats of a shard already in the store, from its re-verified bytes."""
        return _stats_from_remote(self.store, name, self.tmp, self.fmt)

    def upload(self, idx: int, targets: list[TargetSample]) -> ShardStats:
        """Encode shard ``idx``, upload it (create-only), then its sidecar; the lines of its
        records left out as invalid go first (``skipped-NNNNNN.json``)."""
        name = shard_name(idx)
        local = self.tmp / name
        st = write_shard(local, targets, self.fmt)
        lines = self.skipped(idx)
        if lines:
            put_skipped(self.store, idx, lines)
        try:
            self.store.put_file(name, local)
        except ObjectExists:  # a concurrent or earlier run finished it: trust its bytes
            st = self.recover(name)
        self.put_sidecar(name, st)
        local.unlink(missing_ok=True)
        return st

    def cleanup(self) -> None:
        """Remove the scratch directory (its shards are uploaded or abandoned by now)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def _shards_done(
    out: _SplitOutput, n: int, existing: set[str], mine: list[int]
) -> list[ShardStats | None]:
    """Per shard index, the stats of a shard already stored (None: still to compute, or
    another task's: only the indices in ``mine`` are looked at).

    A shard whose sidecar is missing (a crash between the two writes) is re-verified from
    its bytes and gets its sidecar now.
    """
    stats: list[ShardStats | None] = [None] * n
    for idx in mine:
        name = shard_name(idx)
        if name in existing and sidecar_name(name) in existing:
            stats[idx] = ShardStats(**json.loads(out.store.read_bytes(sidecar_name(name))))
        elif name in existing:
            st = out.recover(name)
            out.put_sidecar(name, st)
            stats[idx] = st
    return stats


def _vocab_size(model: Any) -> int:
    return model.vocab_size if isinstance(model, LayeredTeacher) else models.vocab_size(model)


def _targets_by_shard(
    job: Job,
    model: Any,
    chunks: Sequence[list[Sample]],
    todo: list[int],
    on_batch: Callable[[int], None],
) -> Iterator[tuple[int, list[TargetSample]]]:
    """(shard index, its targets) for each shard of ``todo``, in order. A layered teacher
    computes those shards together, ``teacher.chunk_tokens`` at a time."""
    t = job.teacher
    if not isinstance(model, LayeredTeacher):
        for idx in todo:
            yield (
                idx,
                compute_targets(
                    model,
                    chunks[idx],
                    job.targets.spec(),
                    t.batch_tokens,
                    t.head_chunk,
                    on_batch,
                    job.seed,
                ),
            )
        return
    sizes = [_shard_tokens(chunks, i) for i in todo]
    for group in chunk_groups(sizes, t.chunk_tokens):
        idxs = [todo[g] for g in group]
        groups = [chunks[i] for i in idxs]
        results = model.compute_groups(
            groups, job.targets.spec(), t.batch_tokens, t.head_chunk, on_batch, job.seed
        )
        yield from zip(idxs, results, strict=True)


def _compute_shards(
    ctx: SplitContext, stats: list[ShardStats | None], out: _SplitOutput, t0: float
) -> None:
    """Compute the shards of ``ctx.mine`` that ``stats`` lacks and fill them in; a shard
    uploads during the next. ``t0``: the run's start (the bar's tokens/s)."""
    split, chunks = ctx.split, ctx.chunks
    todo = [i for i in ctx.mine if stats[i] is None]
    todo_tokens = sum(_shard_tokens(chunks, i) for i in todo)
    pending: list[tuple[int, Future[ShardStats]]] = []
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        _progress_bar(split) as bar,
    ):
        task = bar.add_task("", total=todo_tokens, rate="-")
        on_batch = _on_batch(bar, task, split, t0, ctx.stop)
        for idx, targets in _targets_by_shard(ctx.job, ctx.model, chunks, todo, on_batch):
            pending.append((idx, pool.submit(out.upload, idx, targets)))
            # Bound memory: at most one shard waits for its upload while the next is computed.
            while len(pending) > 1:
                i, fut = pending.pop(0)
                stats[i] = fut.result()
        for i, fut in pending:
            stats[i] = fut.result()


def _shard_tokens(chunks: Sequence[list[Sample]], i: int) -> int:
    """Real tokens of shard ``i`` (from the token store's index where there is one)."""
    if isinstance(chunks, ShardChunks):
        return chunks.tokens(i)
    return sum(len(s.input_ids) for s in chunks[i])


def _progress_bar(split: str) -> Progress:
    columns = (
        TextColumn(f"teacher {split}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, transient=False)


def _on_batch(
    bar: Progress, task: TaskID, split: str, t0: float, stop: StopWatch | None
) -> Callable[[int], None]:
    """After each forward batch: advance the bar (tokens/s since ``t0``), check ``stop``."""
    seen = 0

    def on_batch(ntok: int) -> None:
        nonlocal seen
        seen += ntok
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        bar.update(task, advance=ntok, rate=f"{rate:,.0f}")
        if stop is not None:
            stop.check(f"teacher {split}")  # the pool's exit lets pending uploads finish

    return on_batch


def _manifest(ctx: SplitContext, stats: list[ShardStats | None], elapsed: float) -> Manifest:
    """The split's manifest over its finished shards."""
    job, fmt = ctx.job, ctx.fmt
    spec, codec, vocab = fmt.spec, fmt.codec, fmt.vocab_size
    return Manifest(
        split=ctx.split,
        # a Hub or bucket checkpoint is named by its pin (commit sha, listing digest)
        teacher=source_id(ctx.teacher_dir) or job.teacher.model,
        teacher_config_sha256=sha256_file(ctx.teacher_dir / "config.json"),
        tokenizer_fingerprint=ctx.tok_fp,
        vocab_size=vocab,
        target_kind=spec.kind,
        width=spec.width,  # columns of the decoded [N, width] arrays; kind parameters: `targets`
        dtypes={
            "input_ids": id_dtype(vocab).name,
            "loss_mask": "uint8",
            "target_ids": id_dtype(vocab).name,
            "target_logprobs": "float32",  # as decoded (the codec quantises the stored bytes)
            **({"target_counts": "uint16"} if spec.sampled else {}),
            **(ALIGN_DTYPES if job.targets.alignment else {}),
        },
        max_length=job.data.max_length,
        job_fingerprint=ctx.fingerprint,
        shards=[s for s in stats if s is not None],
        teacher_seconds=elapsed,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        codec=codec.info(),
        targets={**spec.info(), **_alignment_info(ctx)},
        # a task's parts.json leaves them to finish_split (every task's skipped-* records)
        skipped_lines={}
        if ctx.part is not None
        else skipped_lines([_skipped_record(ctx.skipped(i)) for i in range(len(ctx.chunks))]),
    )


ALIGN_DTYPES = {"token_offsets": "int32", "content_spans": "int32", "token_logprobs": "float32"}


def _alignment_info(ctx: SplitContext) -> dict[str, Any]:
    """``targets.alignment``: the manifest says so and lists the tokenizer's files."""
    if not ctx.job.targets.alignment:
        return {}
    return {"alignment": True, "tokenizer": sorted(ctx.store.list(TOKENIZER))}


def _skipped_record(lines: list[int | str]) -> dict[str, Any]:
    """A shard's skipped lines as ``skipped-NNNNNN.json`` holds them."""
    return {"count": len(lines), "first_lines": lines[:MAX_REPORTED]}


def load_teacher(job: Job, teacher_dir: Path) -> Any:
    """The teacher as ``teacher.mode`` says (``auto``: :func:`~distill.teacher.fit.resolve_way`):
    the whole model on the device, or a :class:`LayeredTeacher`."""
    t = job.teacher
    device = models.pick_device(t.device)
    mode = resolve_way(job, teacher_dir, device)
    q = "" if t.quantize == "none" else f", {t.quantize} weights"
    console.print(f"teacher: {mode} on {device} ({t.dtype}{q})")
    if mode == "layered":
        return LayeredTeacher(teacher_dir, t.dtype, device)
    return models.load_model(teacher_dir, t.dtype, device, t.quantize).eval()


def run_teacher(job: Job, part: Part | None = None) -> dict[str, Manifest | None]:
    """The whole teacher pass for every split of a job; with ``part`` (default: from
    ``BATCH_TASK_INDEX``/``BATCH_TASK_COUNT``) only that task's shards, and no manifests."""
    part = part or Part.from_env()
    with StopWatch() as stop:  # SIGTERM, or GCE preemption where DISTILL_WATCH_PREEMPTION=1
        return _run_teacher(job, stop, part)


def _run_teacher(job: Job, stop: StopWatch, part: Part | None) -> dict[str, Manifest | None]:
    models.pick_device(job.teacher.device)  # no GPU where one is asked for: fail before any work
    teacher_dir = models.resolve_model(job.teacher.model)
    tokenizer = models.load_tokenizer(teacher_dir)
    tok_fp = models.tokenizer_fingerprint(tokenizer)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distill-data-")))
        prepared: dict[str, Prepared] = {}
        for split, spec in splits(job).items():  # validate all input before anything is written
            p = prepare_split(
                job,
                spec,
                tokenizer,
                scratch / split,
                part,
                dict(job.data.record_index).get(split, ""),
                dict(job.data.dataset_sha256).get(split, ""),
            )
            stack.callback(p.close)
            prepared[split] = p
            _report(split, spec, p, part)
        fps = split_fingerprints(job, teacher_dir, tok_fp)
        stores = {}
        for split in prepared:
            store = open_store(f"{job.output.rstrip('/')}/{split}")
            store.list()  # fails early on a missing bucket or missing credentials
            stores[split] = store
        model = load_teacher(job, teacher_dir)
        job.targets.spec().check(_vocab_size(model))
        stop.check("teacher")
        return {
            split: run_split(
                SplitContext(
                    job=job,
                    split=split,
                    chunks=p.chunks(),
                    store=stores[split],
                    model=model,
                    fingerprint=fps[split],
                    tok_fp=tok_fp,
                    teacher_dir=teacher_dir,
                    stop=stop,
                    skipped=p.skipped_in,
                    part=part,
                )
            )
            for split, p in prepared.items()
        }


def _report(split: str, spec: str, p: Prepared, part: Part | None) -> None:
    """What was read of a split: its samples and tokens (this task's share), lines skipped."""
    st = p.stats
    share = "" if part is None else f" of task {part.index}'s shards"
    console.print(
        f"{split}: {st.samples} samples, {st.tokens} tokens ({st.target_tokens} targets){share}"
        + (f", {st.truncated} truncated" if st.truncated else "")
    )
    if p.read:
        console.print(f"{split}: {p.read}")
    if st.invalid:
        console.print(
            f"[yellow]{split}: skipped {st.invalid} invalid line(s) of {spec} "
            f'(data.on_invalid = "skip"): lines {", ".join(map(str, st.invalid_lines))}'
            + (" ..." if st.invalid > len(st.invalid_lines) else "")
        )
