"""SUMMARY.md: one page from gpu_check.json, ready to paste into the README.

Every field may be missing (a step that failed, ran out of time or was skipped): the page
says so and shows what there is. Stdlib only (the orchestrator imports it).
"""

from __future__ import annotations

from typing import Any

GiB = 2**30
MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M shape", "llama-1b": "Llama-3.2-1B shape"}
SIDE_NAMES = {"naive": "seeds' loss (full logits)", "ours": "distill (fused)", "liger": "Liger"}


def g(d: Any, *keys: Any, default: Any = None) -> Any:
    """``d[k1][k2]...`` or ``default`` where any level is missing."""
    for k in keys:
        if not isinstance(d, dict | list):
            return default
        try:
            d = d[k]
        except (KeyError, IndexError, TypeError):
            return default
    return default if d is None else d


def num(x: Any, fmt: str = ",.0f", none: str = "-") -> str:
    return none if not isinstance(x, int | float) else format(x, fmt)


def gib(x: Any) -> str:
    return num(x / GiB if isinstance(x, int | float) else None, ",.2f")


def ratio(a: Any, b: Any, fmt: str = ".2f") -> str:
    ok = isinstance(a, int | float) and isinstance(b, int | float) and b
    return f"{a / b:{fmt}}x" if ok else "-"


def step(results: dict[str, Any], name: str) -> dict[str, Any]:
    return g(results, "steps", name, default={})


def status_line(results: dict[str, Any], name: str) -> str | None:
    """None when the step ran fine; else a sentence saying what happened."""
    e = step(results, name)
    st = e.get("status", "not run")
    if st == "ok":
        return None
    why = e.get("why") or e.get("error") or ""
    why = why.strip().splitlines()[-1][:300] if why else ""
    return f"_step `{name}`: **{st}**" + (f" ({why})" if why else "") + "_"


def render(results: dict[str, Any]) -> str:
    env = g(step(results, "env"), "result", default={})
    gpu = g(env, "gpu", "name", default="no GPU (CPU dry run)" if results.get("dry_run") else "?")
    out = [f"# GPU check: {gpu}, {str(results.get('started', ''))[:10]}", ""]
    if results.get("dry_run"):
        out += [
            "**CPU dry run (--tiny): tiny sizes, nominal peak; no number here means anything.**",
            "",
        ]
    versions = g(env, "versions", default={})
    mem = g(env, "gpu", "memory_bytes")
    out.append(
        f"`bench/gpu/check.py` on {gpu}"
        + (f" ({gib(mem)} GiB, sm {g(env, 'gpu', 'capability')})" if mem else "")
        + f"; torch {versions.get('torch', '?')} (CUDA {env.get('torch_cuda') or '-'}), "
        f"transformers {versions.get('transformers', '?')}, Python {env.get('python', '?')}; "
        f"{num(results.get('seconds'))} s of a {num(results.get('budget_s'))} s budget"
        + ("" if results.get("finished") else " (**did not finish**)")
        + "."
    )
    code = results.get("code") or {}
    out.append(
        f"liger-kernel {versions.get('liger-kernel') or 'absent'}, bitsandbytes "
        f"{versions.get('bitsandbytes') or 'absent'}; code: commit "
        f"{str(code.get('commit') or 'unknown')[:12]}, .py sha256 {code.get('py_sha256', '?')}."
    )
    peaks = g(env, "peak_flops")
    if peaks:
        out.append(
            f"Peak: {num(peaks.get('bfloat16', 0) / 1e12, ',.1f')} TFLOP/s bf16, "
            f"{num(peaks.get('float32', 0) / 1e12, ',.1f')} fp32 ({env.get('peak_source', '')})."
        )
    out += ["", "| step | status | seconds | |", "|---|---|---:|---|"]
    for name, e in g(results, "steps", default={}).items():
        note = ""
        if name == "tests":
            c = g(e, "result", "counts", default={})
            note = ", ".join(f"{v} {k}" for k, v in sorted(c.items()))
        elif e.get("status") not in ("ok", "pending", "running"):
            note = (e.get("why") or e.get("error") or "").strip().splitlines()[-1:]
            note = note[0][:120] if note else ""
        out.append(f"| {name} | {e.get('status')} | {num(e.get('seconds'), '.0f')} | {note} |")
    for render_part in (_tests, _student, _teacher, _layered, _calibration):
        out += [""] + render_part(results)
    return "\n".join(out).rstrip() + "\n"


def _tests(results: dict[str, Any]) -> list[str]:
    e = step(results, "tests")
    out = ["## CUDA tests (`pytest -m cuda tests/test_cuda.py`)", ""]
    line = status_line(results, "tests")
    if line:
        out += [line, ""]
    tests = g(e, "result", "tests", default=[])
    for outcome in ("failed", "error", "passed", "skipped"):
        mine = [t for t in tests if t.get("outcome") == outcome]
        if not mine:
            continue
        if outcome == "skipped":
            reasons = sorted({t.get("message", "") for t in mine})
            out.append(f"- skipped ({len(mine)}): " + "; ".join(r for r in reasons if r))
        else:
            out.append(f"- {outcome} ({len(mine)}): " + ", ".join(t["name"] for t in mine))
    records = g(e, "result", "records", default=[])
    if records:
        out += ["", "Measured by the tests (tolerance in brackets):", ""]
        for rec in records:
            rec = dict(rec)
            name = rec.pop("test", "?")
            out.append(f"- {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in rec.items()))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _student(results: dict[str, Any]) -> list[str]:
    e = step(results, "student")
    r = g(e, "result", default={})
    cfg = r.get("config", {})
    head = "## Student KD step (LM head + loss, forward + backward, fp32)"
    if cfg:
        head += f": {num(cfg.get('tokens'))} tokens, vocab {num(cfg.get('vocab'))}"
    out = [head, ""]
    line = status_line(results, "student")
    if line:
        out += [line, ""]
    rows = [v for k, v in r.items() if k.startswith("hidden_")]
    if not rows:
        return out + ["_no measurement_"]
    out += [
        "| hidden | loss | tokens/s | peak GiB | vs seeds: memory | vs seeds: speed | loss value |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        sides = row.get("sides", {})
        naive = sides.get("naive", {})
        for side in ("naive", "ours", "liger"):
            m = sides.get(side, {})
            name = SIDE_NAMES[side]
            if "tokens_per_s" not in m:
                why = m.get("skipped") or m.get("error") or "not measured"
                out.append(f"| {row['hidden']} | {name} | {why[:90]} | | | | |")
                continue
            out.append(
                f"| {row['hidden']} | {name} | {num(m['tokens_per_s'])} | {gib(m['peak_bytes'])}"
                f" | {ratio(m['peak_bytes'], naive.get('peak_bytes'), '.3f')}"
                f" | {ratio(m['tokens_per_s'], naive.get('tokens_per_s'))}"
                f" | {m['loss']:.6f} |"
            )
    checks = [row.get("check", {}) for row in rows]
    diffs = [v["loss_rel_diff"] for c in checks for v in c.values() if isinstance(v, dict) and v]
    ok = all(c.get("ok") for c in checks)
    out += [
        "",
        f"Same loss on the same inputs: {'yes' if ok else '**NO**'} (largest relative difference "
        f"to the seeds' loss {num(max(diffs) if diffs else None, '.1e')}; tolerance 1e-4, "
        "gradient norms 1e-3). Peak = "
        + str(cfg.get("peak_memory", ""))
        + "; "
        + str(cfg.get("tokens_per_s", ""))
        + ".",
        f"Liger: {cfg.get('liger', '-')}.",
    ]
    return out


def _teacher(results: dict[str, Any]) -> list[str]:
    e = step(results, "teacher")
    r = g(e, "result", default={})
    cfg = r.get("config", {})
    out = ["## Teacher pass" + (f" ({cfg['dtype']})" if "dtype" in cfg else ""), ""]
    line = status_line(results, "teacher")
    if line:
        out += [line, ""]
    models = [k for k in MODEL_NAMES if k in r]
    if not models:
        return out + ["_no measurement_"]
    first = r[models[0]]
    out += [
        f"{cfg.get('data', '')}: {num(cfg.get('samples'))} samples, "
        f"{num(first.get('tokens'))} tokens ({num(first.get('target_tokens'))} targets), "
        f"tokenizer: {cfg.get('tokenizer', '?')}.",
        "",
        "| model | pass | tokens/s | MFU | peak GiB | vs seeds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in models:
        m = r[name]
        label = f"{MODEL_NAMES[name]} ({num(m.get('params', 0) / 1e6, ',.0f')}M)"
        naive_tps = g(m, "naive", "tokens_per_s")
        big = next((k for k in m if k.startswith("ours_batch_tokens_")), None)
        demo = g(m, "ours_demo_targets", "targets", default={})
        passes = (
            ("naive", "seeds' loop"),
            ("ours", f"distill, top-{cfg.get('k')}"),
            ("ours_no_write", f"distill, top-{cfg.get('k')}, shards not written"),
            (big, f"distill, not written, batch_tokens {big.rsplit('_', 1)[-1] if big else ''}"),
            ("ours_demo_targets", f"distill, demo job's targets ({demo.get('kind', '?')})"),
        )
        for key, what in passes:
            x = m.get(key) if key else None
            if not isinstance(x, dict):
                continue
            out.append(
                f"| {label} | {what} | {num(x.get('tokens_per_s'))} | "
                f"{num(x.get('mfu'), '.1%')} | {gib(x.get('peak_bytes'))} | "
                f"{ratio(x.get('tokens_per_s'), naive_tps)} |"
            )
            label = ""
    out.append("")
    for name in models:
        a = g(r, name, "agreement", default={})
        if a:
            out.append(
                f"- {MODEL_NAMES[name]}: distill's and the seeds' top-k agree on "
                f"{num(a.get('agree_tie_tolerant'), '.2%')} of {num(a.get('rows'))} rows "
                f"(up to near-ties), log-probs within {a.get('tol')} on "
                f"{num(a.get('logprob_within_tol'), '.2%')} -> {'OK' if a.get('ok') else 'FAILED'}"
            )
        for note in g(r, name, "notes", default=[]):
            out.append(f"- {MODEL_NAMES[name]}: {note}")
    out.append(f"- MFU: {cfg.get('mfu', '')}; tokens/s: {cfg.get('tokens_per_s', '')}.")
    return out


def _layered(results: dict[str, Any]) -> list[str]:
    e = step(results, "layered")
    r = g(e, "result", default={})
    cfg = r.get("config", {})
    head = "## Layered pass: a teacher bigger than the memory it gets"
    if cfg:
        head += (
            f" ({MODEL_NAMES.get(cfg.get('model', ''), '?')}, {gib(cfg.get('checkpoint_bytes'))}"
            f" GiB checkpoint, memory capped at {gib(r.get('cap_bytes'))} GiB)"
        )
    out = [head, ""]
    line = status_line(results, "layered")
    if line:
        out += [line, ""]
    if not cfg:
        return out + ["_no measurement_"]
    out += [
        f"Resident under the cap: {r.get('resident_under_cap', '-')}.",
        "",
        "| pass | tokens/s | vs resident | peak GiB | chunks | waiting on weights "
        "| reading weights (overlapped) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    res = r.get("resident", {})
    for k, v in r.items():
        if k.startswith("layered_") and isinstance(v, dict) and "error" in v:
            out.append(f"| layered, chunk_tokens {k[8:]} | {v['error'][:120]} | | | | | |")
        elif k.startswith("layered_") and isinstance(v, dict):
            tps = v.get("tokens_per_s")
            out.append(
                f"| layered, chunk_tokens {num(v.get('chunk_tokens'))} | "
                f"{num(tps)} | {ratio(tps, res.get('tokens_per_s'))}"
                f" | {gib(v.get('peak_bytes'))} | {v.get('chunks')} | "
                f"{num(v.get('wait_share'), '.1%')} | {num(v.get('read_share'), '.1%')} |"
            )
    if res.get("error"):
        out.append(f"| resident, no cap | {res['error'][:120]} | | | | | |")
    elif res:
        out.append(
            f"| resident, no cap (load {num(res.get('load_seconds'), '.1f')} s incl.) | "
            f"{num(res.get('tokens_per_s'))} | 1.00x | {gib(res.get('peak_bytes'))} | | | |"
        )
    a = r.get("agreement")
    out.append("")
    if a:
        out.append(
            f"Targets, layered vs resident: ids equal {num(a.get('ids_equal'), '.4%')}, "
            f"max |log-prob diff| {num(a.get('max_logprob_diff'), '.2g')}."
        )
    out.append(
        f"{num(cfg.get('tokens'))} tokens; {cfg.get('tokens_per_s', '')}; {cfg.get('weights', '')}."
    )
    out += [f"- {n}" for n in r.get("notes", [])]
    return out


def _calibration(results: dict[str, Any]) -> list[str]:
    e = step(results, "calibration")
    r = g(e, "result", default={})
    out = ["## Calibration for `distill-ctl cost-estimate --calibration`", ""]
    line = status_line(results, "calibration")
    if line:
        out += [line, ""]
    files = r.get("written", [])
    teacher = g(step(results, "teacher"), "result", default={})
    gpu = g(results, "steps", "env", "result", "gpu", "name", default="the CPU")
    for f, name in (("calibration.json", "smollm2-135m"), ("calibration-1b.json", "llama-1b")):
        if f in files:
            m = teacher.get(name, {})
            x = m.get("ours_demo_targets") or m.get("ours") or {}
            out.append(
                f"- `{f}`: {MODEL_NAMES[name]} at {num(x.get('tokens_per_s'))} tokens/s, "
                f"MFU {num(x.get('mfu'), '.1%')} on {gpu}"
            )
    est = r.get("demo_job_estimate")
    if est:
        out += [
            "",
            f"Priced with it, {est['job']} on an L4: {num(est['l4_tokens_per_s'])} tokens/s at "
            f"MFU {num(est['mfu'], '.1%')} (uncalibrated: "
            f"{num(est['uncalibrated_l4_tokens_per_s'])} at {num(est['uncalibrated_mfu'], '.0%')}"
            f"), {num(est['compute_hours'] * 3600, ',.0f')} s of compute, "
            f"${num(est['spot_usd'], ',.3f')} on spot. The estimate says: "
            f'"{est["mfu_row"]}".',
        ]
    out += [f"- {n}" for n in r.get("notes", [])]
    return out
