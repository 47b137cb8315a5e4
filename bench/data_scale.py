"""Benchmark: the data path at scale (issue #22), each figure beside a named baseline, in one run.

Synthetic chats (varied multi-turn conversations built from the demo data's turns, a fixed seed)
at two sizes, ``--ratio`` apart, the larger ``--tokens`` (SmolLM2's tokenizer and chat
template). Each measurement runs in a fresh process:

1. **tokenisation**: tokens/s of :class:`~distill.data.encode.Encoder` on every core (the
   batched path) against the one-sample loop that ``tokenize_file`` ran before (``render`` per
   record, :func:`~distill.data.encode.encode_serial`), on the same records read into memory
   (reading excluded, as :func:`distill.data.speed.tokens_per_second` times them); the ids and
   masks of the two are compared on every record;
2. **a fan-out task's preparation**: everything task 0 of N does before its first forward pass
   (:func:`distill.teacher.batching.prepare_split`, what the teacher calls: count the records,
   check and tokenise its own shards' records into the token store; then read its first
   shard), at N = 1, 4 and 16 on the larger size;
3. **peak memory before the first forward pass**: the same child's peak RSS during the
   preparation (VmHWM reset when it starts, torch and the tokenizer already resident, as in the
   teacher; the encoder workers' peak separately), N = 1, at both sizes;
4. **cost-estimate**: ``distill-ctl cost-estimate`` (sampled) and ``--exact``, each a fresh
   process timed from start to exit, on the larger size; the sampled counts' error against the
   exact ones, and whether each exact count falls inside the 95% bound the estimate prints.

Before measuring it waits (``--quiet-load``, ``--max-wait``) for the 1-minute load average to
fall below 0.8, and records the load at the start and end of each measurement.

    python bench/data_scale.py                 # 20M tokens and 2M (about 8 min on 2 cores)
    python bench/data_scale.py --quick         # 2M and 200k tokens
    python bench/data_scale.py --tiny          # 500 and 50 lines, in this process (the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO = ROOT / "data" / "demo" / "train.jsonl"
MODEL = "builtin:smollm2-135m-instruct"
RESULT = "DATA_SCALE_RESULT "
SEED = 0
MAX_LENGTH = 2048
SAMPLES_PER_SHARD = 256  # the job default
TASKS = (1, 4, 16)
TINY_LINES = 500  # --tiny: the larger size (the smaller: a tenth)
# issue #22's "done when", on a 2-core machine
TARGET_SPEEDUP = 1.7
TARGET_PREP_RATIO = 1 / 8
TARGET_MEMORY_GROWTH = 0.20
TARGET_COST_SECONDS = 60.0
SYSTEMS = (
    "You are a helpful assistant.",
    "You are terse: answer in one sentence.",
    "You are a patient tutor. Explain your reasoning step by step before you answer.",
    "Answer as a friendly chatbot would, and keep it light.",
    "You are an assistant for a small shop's customers; be polite and precise.",
)


def machine() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return platform.processor() or platform.machine()


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(limit: float, poll_s: float, max_wait_s: float) -> dict[str, Any]:
    """Wait until the 1-minute load average is below ``limit`` (polling every ``poll_s``), at
    most ``max_wait_s``; whether it went quiet, after how long."""
    t0 = time.monotonic()
    first = load1()
    while load1() >= limit and time.monotonic() - t0 < max_wait_s:
        print(f"  load {load1():.2f} >= {limit}: waiting", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    return {
        "limit": limit,
        "load_when_asked": first,
        "load_at_start": load1(),
        "waited_s": time.monotonic() - t0,
        "quiet": load1() < limit,
    }


# --- the synthetic dataset --------------------------------------------------------------------


def demo_turns(path: Path = DEMO) -> list[tuple[str, str]]:
    """(user, assistant) pairs of the demo data: its chats' turns and its prompt/response rows."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        if "messages" in obj:
            msgs = obj["messages"]
            pairs += [
                (u["content"], a["content"])
                for u, a in zip(msgs, msgs[1:], strict=False)
                if u["role"] == "user" and a["role"] == "assistant"
            ]
        else:
            pairs.append((obj["prompt"], obj["response"]))
    return pairs


def chats(lines: int, seed: int = SEED) -> Any:
    """``lines`` synthetic records, always the same for a seed: 1 to 8 turns of demo pairs, an
    answer sometimes several demo answers long, a system message in 30% of them; a one-turn
    record is a prompt/response row a third of the time, else a chat."""
    pairs = demo_turns()
    rng = random.Random(seed)
    for i in range(lines):
        turns = rng.choice((1, 1, 2, 2, 3, 3, 4, 5, 6, 8))
        system = rng.choice(SYSTEMS) if rng.random() < 0.3 else None
        msgs = [{"role": "system", "content": system}] if system else []
        for _ in range(turns):
            user, answer = pairs[rng.randrange(len(pairs))]
            if rng.random() < 0.15:
                more = [pairs[rng.randrange(len(pairs))][1] for _ in range(rng.randint(2, 6))]
                answer = " ".join([answer, *more])
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if turns == 1 and rng.random() < 1 / 3:
            row = {"prompt": msgs[-2]["content"], "response": msgs[-1]["content"]}
            yield {**row, **({"system": system} if system else {}), "id": i}
        else:
            yield {"messages": msgs, "id": i}


def write_chats(path: Path, lines: int, seed: int = SEED) -> int:
    """Write ``lines`` records of :func:`chats` as JSONL; its bytes."""
    with path.open("w", encoding="utf-8") as f:
        for obj in chats(lines, seed):
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path.stat().st_size


def tokens_per_line(tokenizer: Any, n: int = 2000, seed: int = SEED) -> float:
    """Mean tokens of the first ``n`` records of :func:`chats` (the sizes' line counts)."""
    from distill.data.encode import encode_block

    block = [
        (i, i + 1, f"synthetic:{i + 1}", json.dumps(o).encode())
        for i, o in enumerate(chats(n, seed))
    ]
    out = encode_block(tokenizer, block, MAX_LENGTH, "right")
    return sum(len(r[1]) for r in out if len(r) == 4) / n


def write_job(path: Path, data: Path) -> Path:
    """The bench's job: the synthetic split as train, the job defaults but the length."""
    path.write_text(
        "[job]\n"
        f'name = "data-scale"\noutput = "{path.parent / "out"}"\n'
        f'[teacher]\nmodel = "{MODEL}"\nsamples_per_shard = {SAMPLES_PER_SHARD}\n'
        f'[data]\ntrain = "{data}"\nmax_length = {MAX_LENGTH}\ntruncation = "right"\n'
    )
    return path


# --- the measurements (each in a fresh child, or in this process with --tiny) -----------------


def proc_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process, KiB (Linux /proc)."""
    text = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+)", text, re.M)}


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``5`` to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    st = proc_kib()
    return st["VmHWM"] <= st["VmRSS"] + 1024


def tokenizer_of() -> Any:
    from distill import models

    return models.load_tokenizer(models.resolve_model(MODEL))


def measure_tokenise(data: Path, tokenizer: Any) -> dict[str, Any]:
    """Tokens/s of the one-sample loop and of the Encoder on every core over the same records
    (in memory), and whether every record's ids and mask are the same."""
    import numpy as np

    from distill.data.encode import Encoder, blocks, cores, encode_serial, items
    from distill.data.records import DataFile, iter_split

    recs = list(items(iter_split([DataFile(data.name, data, str(data))])))
    load0 = load1()
    t = time.perf_counter()
    serial = encode_serial(tokenizer, recs, MAX_LENGTH, "right")
    serial_s = time.perf_counter() - t
    workers = cores()
    t = time.perf_counter()
    with Encoder(tokenizer, workers) as enc:
        parallel = [r for bs in enc.encode(blocks(recs), MAX_LENGTH, "right") for r in bs]
    parallel_s = time.perf_counter() - t
    load_end = load1()
    same = len(serial) == len(parallel) and all(
        a[0] == b[0]
        and len(a) == len(b)
        and (len(a) == 3 or (np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])))
        for a, b in zip(serial, parallel, strict=True)
    )
    tokens = sum(len(r[1]) for r in parallel if len(r) == 4)
    return {
        "records": len(recs),
        "tokens": tokens,
        "workers": workers,
        "serial_s": serial_s,
        "parallel_s": parallel_s,
        "serial_tokens_per_s": tokens / serial_s,
        "parallel_tokens_per_s": tokens / parallel_s,
        "speedup": serial_s / parallel_s,
        "same_ids_and_masks": same,
        "records_compared": len(serial),
        "load": [load0, load_end],
    }


def measure_prepare(job_path: Path, tasks: int, scratch: Path, tokenizer: Any) -> dict[str, Any]:
    """Task 0 of ``tasks``: the teacher's preparation of its split (prepare_split), then its
    first shard read from the token store; the seconds and the peak memory."""
    import distill.teacher.batching as batching  # the teacher's imports (torch), as it runs
    from distill.config import load_job, splits
    from distill.shardset import Part

    job = load_job(job_path)
    spec = splits(job)["train"]
    before = proc_kib()
    reset = reset_hwm()  # the peak from here on: the preparation's (imports resident)
    load0 = load1()
    t = time.perf_counter()
    p = batching.prepare_split(job, spec, tokenizer, scratch, Part(0, tasks))
    try:
        chunks = p.chunks()
        first = next(s for s in range(len(chunks)) if chunks.owned(s))
        n_first = len(chunks[first])
        seconds = time.perf_counter() - t
        store_bytes = sum(f.stat().st_size for f in p.store.dir.iterdir())
        stats = p.stats
        records, shards = p.records, p.shards
    finally:
        p.close()
    load_end = load1()
    after = proc_kib()
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child
    read_s = read_every_record(p.files, job.teacher.samples_per_shard)
    return {
        "tasks": tasks,
        "seconds": seconds,
        "records": records,
        "shards": shards,
        "task_shards": -(-shards // tasks),
        "task_samples": stats.samples,
        "task_tokens": stats.tokens,
        "first_shard_samples": n_first,
        "store_bytes": store_bytes,
        "tokens_per_s": stats.tokens / seconds,
        "rss_before_kib": before["VmRSS"],
        "hwm_before_kib": before["VmHWM"],  # the imports' and the tokenizer's peak
        "hwm_reset": reset,
        "peak_kib": after["VmHWM"],  # since the reset: during the preparation
        "peak_above_start_kib": after["VmHWM"] - before["VmRSS"],
        "worker_peak_kib": workers,
        "read_every_record_s": read_s,
        "load": [load0, load_end],
    }


def read_every_record(files: list[Any], per: int) -> float:
    """Seconds of what every task does with the records it does not own, measured on its own:
    count them, then pass over them twice (the check and the encode passes), keeping none."""
    from distill.data.records import Select, count_records, iter_split

    t = time.perf_counter()
    count_records(files)
    none = Select(lambda i: i // per < 0)
    for _ in range(2):
        for _ in iter_split(files, none, per):
            pass
    return time.perf_counter() - t


def child_main(kind: str, argv: dict[str, Any]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = tokenizer_of()
    if kind == "tokenise":
        out = measure_tokenise(Path(argv["data"]), tokenizer)
    else:
        out = measure_prepare(Path(argv["job"]), argv["tasks"], Path(argv["scratch"]), tokenizer)
    print(RESULT + json.dumps(out), flush=True)


def spawn(kind: str, **kw: Any) -> dict[str, Any]:
    """One measurement in a fresh Python process."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        json.dumps(kw, default=str),
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    sys.exit(f"{kind} {kw} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def measure_cost(
    job_path: Path, exact: bool, sample_lines: int, fresh: bool, tokenizer: Any = None
) -> dict[str, Any]:
    """``distill-ctl cost-estimate`` (``--exact``): its wall time (a fresh process, imports
    included) and its counts, bounds and how each split was counted."""
    out = job_path.parent / f"cost-{'exact' if exact else 'sampled'}.json"
    args = ["cost-estimate", "--job", str(job_path), "--json", str(out)]
    if exact:
        args.append("--exact")
    elif sample_lines:  # else the default (20,000 lines)
        args += ["--sample-lines", str(sample_lines)]
    load0 = load1()
    t = time.perf_counter()
    if fresh:
        code = "import sys; from distill.cli import main; sys.argv[0] = 'distill-ctl'; main()"
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**_env(), "COLUMNS": "200"},
        )
        if proc.returncode != 0:
            sys.exit(f"cost-estimate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        table = proc.stdout
    else:  # --tiny: the estimate's counting in this process, with this process's tokenizer
        from distill.cloud.counting import BOUNDED, DEFAULT_SAMPLE_LINES
        from distill.cloud.sampling import estimate_data
        from distill.config import load_job

        lines = 0 if exact else sample_lines or DEFAULT_SAMPLE_LINES
        c = estimate_data(load_job(job_path), tokenizer, lines)
        counts = {k: getattr(c, k) for k in BOUNDED}
        bounds = {k: c.bound(k) for k in BOUNDED}
        sampled = {k: dataclasses.asdict(v) for k, v in c.sampled.items()}
        out.write_text(json.dumps({"data": {**counts, "bounds": bounds, "sampled": sampled}}))
        table = ""
    seconds = time.perf_counter() - t
    data = json.loads(out.read_text())["data"]
    return {
        "exact": exact,
        "seconds": seconds,
        "fresh_process": fresh,
        "counts": {
            k: data[k]
            for k in ("samples", "tokens", "target_tokens", "padded_tokens", "attention_token_ctx")
        },
        "bounds": data["bounds"],
        "sampled": data["sampled"],
        "bound_lines": [ln.strip() for ln in table.splitlines() if "±" in ln or "95%" in ln],
        "load": [load0, load1()],
    }


def cost_error(sampled: dict[str, Any], exact: dict[str, Any]) -> dict[str, Any]:
    """Per count: the sampled estimate, the exact count, the relative error and whether the
    exact count lies within the estimate's 95% bound."""
    out = {}
    for name, true in exact["counts"].items():
        est, half = sampled["counts"][name], sampled["bounds"][name]
        out[name] = {
            "sampled": est,
            "exact": true,
            "bound": half,
            "error": (est - true) / true if true else 0.0,
            "inside": abs(est - true) <= half,
        }
    return out


# --- the run ----------------------------------------------------------------------------------


def sizes(args: argparse.Namespace, tokenizer: Any) -> dict[str, dict[str, Any]]:
    """The two sizes' line counts (from the mean tokens of the generator's first records)."""
    if args.tiny:
        return {"small": {"lines": TINY_LINES // 10}, "large": {"lines": TINY_LINES}}
    per = tokens_per_line(tokenizer)
    large = math.ceil(args.tokens / per * 1.02)  # a little over: the target is a floor
    return {
        "small": {"lines": math.ceil(large / args.ratio), "tokens_per_line_est": per},
        "large": {"lines": large, "tokens_per_line_est": per},
    }


def run(args: argparse.Namespace, tokenizer: Any = None) -> dict[str, Any]:
    """The whole bench (``tokenizer``: this process's, else loaded here)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fresh = not args.tiny
    work = Path(tempfile.mkdtemp(prefix="bench-data-scale-", dir=args.scratch))
    try:
        tokenizer = tokenizer or tokenizer_of()
        plan = sizes(args, tokenizer)
        for name, s in plan.items():
            t = time.perf_counter()
            s["path"] = work / f"{name}.jsonl"
            s["bytes"] = write_chats(s["path"], s["lines"])
            s["generate_s"] = time.perf_counter() - t
            s["job"] = write_job(work / f"job-{name}.toml", s["path"])
            print(f"{name}: {s['lines']:,} lines, {s['bytes'] / 2**20:,.1f} MiB", file=sys.stderr)
        quiet = (
            wait_quiet(args.quiet_load, 30.0, args.max_wait)
            if args.max_wait > 0
            else {
                "limit": args.quiet_load,
                "load_at_start": load1(),
                "waited_s": 0.0,
                "quiet": load1() < args.quiet_load,
            }
        )
        t_run = time.perf_counter()

        def child(kind: str, **kw: Any) -> dict[str, Any]:
            print(f"  {kind} {kw.get('tasks', '')} ...", file=sys.stderr, flush=True)
            if fresh:
                return spawn(kind, **kw)
            if kind == "tokenise":
                return measure_tokenise(Path(kw["data"]), tokenizer)
            return measure_prepare(Path(kw["job"]), kw["tasks"], Path(kw["scratch"]), tokenizer)

        small, large = plan["small"], plan["large"]
        tok = {name: child("tokenise", data=plan[name]["path"]) for name in args.tokenise}
        prep = {}
        for n in TASKS:
            prep[str(n)] = child("prepare", job=large["job"], tasks=n, scratch=work / f"prep-{n}")
        prep_small = child("prepare", job=small["job"], tasks=1, scratch=work / "prep-small")
        lines = args.sample_lines or (200 if args.tiny else 0)
        cost = measure_cost(large["job"], False, lines, fresh, tokenizer)
        exact = measure_cost(large["job"], True, lines, fresh, tokenizer)
        run_s = time.perf_counter() - t_run
        load_end = load1()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    from distill.data.encode import cores

    workers = cores()
    t_tok = tok.get("large") or next(iter(tok.values()))
    one, sixteen = prep["1"], prep[str(TASKS[-1])]
    mem_small, mem_large = prep_small["peak_kib"], one["peak_kib"]
    errors = cost_error(cost, exact)
    targets = {
        "tokenisation": {
            "want": f">= {TARGET_SPEEDUP}x the one-sample loop's tokens/s, the same ids and masks",
            "got": t_tok["speedup"],
            "met": all(
                t["speedup"] >= TARGET_SPEEDUP and t["same_ids_and_masks"] for t in tok.values()
            ),
        },
        "preparation": {
            "want": f"task 0 of 16 <= {TARGET_PREP_RATIO:.3f} x task 0 of 1",
            "got": sixteen["seconds"] / one["seconds"],
            "met": sixteen["seconds"] <= TARGET_PREP_RATIO * one["seconds"],
        },
        "memory": {
            "want": f"peak RSS, larger size <= {1 + TARGET_MEMORY_GROWTH:.2f} x the smaller's",
            "got": mem_large / mem_small,
            "met": mem_large <= (1 + TARGET_MEMORY_GROWTH) * mem_small,
            "workers_got": one["worker_peak_kib"] / max(prep_small["worker_peak_kib"], 1),
        },
        "cost_estimate": {
            "want": f"< {TARGET_COST_SECONDS:.0f} s, larger size; exact counts inside the bound",
            "got": cost["seconds"],
            "met": cost["seconds"] < TARGET_COST_SECONDS
            and all(e["inside"] for e in errors.values()),
        },
    }
    for s in plan.values():
        for k in ("path", "job"):
            s[k] = s[k].name
    return {
        "machine": machine(),
        "cores": workers,
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "fresh_processes": fresh,
        "python": platform.python_version(),
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "model": MODEL,
        "max_length": MAX_LENGTH,
        "samples_per_shard": SAMPLES_PER_SHARD,
        "seed": SEED,
        "sizes": plan,
        "load_average": {"start": quiet["load_at_start"], "end": load_end, "wait": quiet},
        "run_s": run_s,
        "tokenisation": tok,
        "preparation": {"large": prep, "small_1": prep_small},
        "preparation_model": prep_model(prep, workers),
        "cost_estimate": {"sampled": cost, "exact": exact, "errors": errors},
        "targets": targets,
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def prep_model(prep: dict[str, dict[str, Any]], cores: int) -> dict[str, Any]:
    """A task's preparation as ``records / read rate + its tokens / tokenising rate``: the
    read rate from task 0 of 1's pass over every record (:func:`read_every_record`, one
    process), the tokenising rate from the rest of its time. Also what it predicts at each N
    beside the measured seconds, and the tokenising rate scaled to an 8-vCPU VM (linearly in
    cores: the encoder runs one worker per core), the rate the cost estimate assumes."""
    one = prep["1"]
    read_rate = one["records"] / one["read_every_record_s"]
    tok_rate = one["task_tokens"] / (one["seconds"] - one["read_every_record_s"])
    return {
        "read_records_per_s": read_rate,
        "tokens_per_s": tok_rate,
        "tokens_per_s_8_vcpus": tok_rate * 8 / cores,
        "predicted_s": {
            n: p["records"] / read_rate + p["task_tokens"] / tok_rate for n, p in prep.items()
        },
        "measured_s": {n: p["seconds"] for n, p in prep.items()},
    }


def report(r: dict[str, Any]) -> None:
    mib = 1 / 1024
    print(
        f"machine: {r['machine']} ({r['mode']}; load average {r['load_average']['start']:.2f} "
        f"at the start, {r['load_average']['end']:.2f} at the end)"
    )
    for name, s in r["sizes"].items():
        print(f"  {name}: {s['lines']:,} lines, {s['bytes'] / 2**20:,.1f} MiB")
    for name, t in r["tokenisation"].items():
        print(
            f"tokenisation ({name}, {t['tokens']:,} tokens): "
            f"{t['parallel_tokens_per_s']:,.0f} tok/s on {t['workers']} cores vs "
            f"{t['serial_tokens_per_s']:,.0f} one sample at a time: "
            f"{t['speedup']:.2f}x; ids and masks equal on {t['records_compared']:,} records: "
            f"{'yes' if t['same_ids_and_masks'] else 'NO'}"
        )
    prep = r["preparation"]["large"]
    one = prep["1"]
    for n, p in prep.items():
        print(
            f"task 0 of {n:>2}: {p['seconds']:7.1f} s ({p['task_tokens']:,} tokens, "
            f"{p['seconds'] / one['seconds']:.3f}x N=1), "
            f"peak {p['peak_kib'] * mib:,.0f} MiB, workers {p['worker_peak_kib'] * mib:,.0f} MiB"
        )
    m = r["preparation_model"]
    print(
        f"  model: records / {m['read_records_per_s']:,.0f} per s + task tokens / "
        f"{m['tokens_per_s']:,.0f} per s (8 vCPUs: {m['tokens_per_s_8_vcpus']:,.0f}); predicts "
        + ", ".join(f"N={n}: {v:.1f} s" for n, v in m["predicted_s"].items())
    )
    s = r["preparation"]["small_1"]
    print(
        f"peak memory before the first forward pass: {one['peak_kib'] * mib:,.0f} MiB "
        f"(+{one['peak_above_start_kib'] * mib:,.1f} MiB over its start; "
        f"{one['task_tokens']:,} tokens) vs {s['peak_kib'] * mib:,.0f} MiB "
        f"(+{s['peak_above_start_kib'] * mib:,.1f}; {s['task_tokens']:,} tokens); "
        f"workers {one['worker_peak_kib'] * mib:,.0f} vs {s['worker_peak_kib'] * mib:,.0f} MiB"
    )
    c = r["cost_estimate"]
    print(
        f"cost-estimate: {c['sampled']['seconds']:.1f} s vs --exact {c['exact']['seconds']:.1f} s"
    )
    for name, e in c["errors"].items():
        print(
            f"  {name}: {e['sampled']:,} vs {e['exact']:,} ({e['error']:+.3%}), "
            f"bound ±{e['bound']:,}: {'inside' if e['inside'] else 'OUTSIDE'}"
        )
    for name, t in r["targets"].items():
        print(f"target {name}: {t['want']}: {t['got']:.3f} -> {'met' if t['met'] else 'NOT met'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=float, default=20e6, help="the larger size's tokens")
    ap.add_argument("--ratio", type=float, default=10.0, help="larger / smaller size")
    ap.add_argument("--quick", action="store_true", help="2M and 200k tokens")
    ap.add_argument("--tiny", action="store_true", help="500 and 50 lines, in this process")
    ap.add_argument(
        "--tokenise",
        nargs="+",
        choices=("small", "large"),
        default=["small", "large"],
        help="the sizes tokenisation is timed on",
    )
    ap.add_argument(
        "--sample-lines", type=int, default=0, help="cost-estimate's (0: its default, 20,000)"
    )
    ap.add_argument("--quiet-load", type=float, default=0.8)
    ap.add_argument("--max-wait", type=float, default=2400.0, help="seconds; 0: do not wait")
    ap.add_argument("--scratch", type=Path, default=None, help="where the datasets go")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/data_scale.json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens = 2e6
    if args.tiny:
        args.max_wait = 0
    return args


def main(argv: list[str] | None = None, tokenizer: Any = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    os.environ.setdefault("DISTILL_CACHE", str(ROOT / ".cache" / "distill"))
    if __name__ == "__main__":  # SIGTERM: the datasets are removed on the way out
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return None
    r = run(args, tokenizer)
    report(r)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {args.json}")
    return r


if __name__ == "__main__":
    main()
