"""Benchmark: cross-tokenizer distillation (#24 item 5), held-out bits per byte of assistant text.

The demo teacher (SmolLM2-135M-Instruct by default) writes one aligned shard set
(``targets.alignment = true``, top-K targets) over the train split. Two students of the demo's
shape are built from its layers (``--layers``, ``--layer-selection``; built once, so every arm
of a student starts from the same weights):

    A  the teacher's tokenizer
    B  a byte-level BPE of ``--bpe-vocab`` tokens (16k) trained offline on the train split's
       rendered texts (the ``tokenizers`` library), with :data:`BPE_TEMPLATE`; its embeddings
       start from the teacher's averaged pieces (``init_from_teacher_layers(tokenizer_dir=)``).
       The demo's train split (879 records, ~200 KB) saturates it: every word is one token at
       7,803 tokens (measured), so "16k" gives 7,803; the JSON records both numbers

Arms (same data, steps, batch size, lr and seeds; ``--ce-mix`` is the CE weight of every
distilling arm):

    A-ce     loss.ce = 1
    A-kd     loss.forward_kl = 1 - ce_mix, loss.ce = ce_mix
    B-ce     loss.ce = 1                                   (its own tokens, no teacher)
    B-alm    loss.ce = ce_mix, loss.alm = alm_weight       (the chunk-likelihood term)
    B-xkl    loss.ce = ce_mix, loss.xkl = 1 - ce_mix       (the projected KL)
    B-both   loss.ce = ce_mix, loss.alm = alm_weight, loss.xkl = 1 - ce_mix

``--alm-weight`` defaults to 100, ALM's temperature: the term's gradient with respect to a
chunk's log-likelihood is about (LT / LS - 1) / tau (tokenkit's binary KL at tau = 100), so a
weight of tau puts it on CE's scale; at weight 1 it is ~100x weaker than CE.

Each arm trains once per seed (``--seeds``; ``job.seed``: the data order) through
``distill.student.train.train`` on a job built with ``distill.config.job_from_dict``.

Score: held-out **bits per byte of assistant text**, comparable across tokenizers. Each
held-out record is rendered with the student's own chat template and tokenised whole (no
truncation); the scored tokens are the student's tokens whose characters overlap an assistant
turn's content (the content stripped, as :func:`distill.data.align.content_spans` finds it),
from the second token on; bpb = sum over them of -log2 q(token | prefix) / the UTF-8 bytes of
those contents, summed over all records (``distill.student.bits_per_byte``, which
``distill-ctl eval`` uses for such a student too). Template tokens, the
end-of-turn token included, are not scored on either side (the stop decision is not measured);
a byte-level BPE's first content token carries the template's space before it (a byte the
denominator does not count, predictable from the template: a few thousandths of a bit).

Verdict (the issue's "done when"): per seed, gain_A = bpb(A-ce) - bpb(A-kd) and gain_B =
bpb(B-ce) - bpb(B-best) where B-best is the distilling B arm with the lowest mean bpb;
``ratio`` = mean gain_B / mean gain_A (n/a when A's KD does not help); met when there are >= 2
seeds, A's mean gain exceeds the seed spread (the largest max - min over seeds of the four
arms' bpb), gain_B - gain_A / 2 > 0 on every seed and its mean exceeds the seed spread.
Caveats: B-best is picked on the held-out split it is scored on (a small optimistic bias), and
every seed starts from the same student weights (the seed is the data order), so the spread
is data-order noise, not init noise.

Finished arms are kept in ``--workdir`` (``rows.jsonl``, keyed by the arm's job, the held-out
records and what built its student), so an interrupted run resumes at the arm it was in.

    python bench/cross_tokenizer.py --tiny
    python bench/cross_tokenizer.py --json bench/results/cross_tokenizer.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DISTILL_CACHE", str(ROOT / ".cache" / "distill"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from distill import models  # noqa: E402
from distill.config import Job, job_from_dict  # noqa: E402
from distill.student import train as dtrain  # noqa: E402
from distill.student.bits_per_byte import bits_per_byte, split_messages  # noqa: E402
from distill.teacher.run import run_teacher  # noqa: E402

# The BPE student's chat template: renders differently from SmolLM2's outside the contents.
BPE_TEMPLATE = (
    "{% for m in messages %}<s>[{{ m['role'] | upper }}]: {{ m['content'] | trim }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<s>[ASSISTANT]: {% endif %}"
)
SCORE_VERSION = 1  # bump when bits_per_byte changes: finished arms are then scored again
ARMS = ("A-ce", "A-kd", "B-ce", "B-alm", "B-xkl", "B-both")
DEFAULTS = {
    "train_samples": 0,
    "eval_samples": 0,
    "steps": 200,
    "batch_size": 8,
    "warmup": 10,
    "seeds": "0,1",
    "bpe_vocab": 16000,
    "layers": 12,
    "k": 32,
}
TINY = {
    "train_samples": 16,
    "eval_samples": 4,
    "steps": 2,
    "batch_size": 4,
    "warmup": 1,
    "seeds": "0",
    "bpe_vocab": 600,
    "layers": 2,
    "k": 8,
}


# --------------------------------------------------------------------------------------------
# The BPE student tokenizer
# --------------------------------------------------------------------------------------------


def train_bpe(texts: Sequence[str], vocab_size: int, dest: Path) -> Path:
    """A byte-level BPE trained on ``texts`` with :data:`BPE_TEMPLATE`, saved to ``dest``."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = BPE_TEMPLATE
    fast.save_pretrained(dest)
    return dest


def bpe_texts(records: Iterable[list[dict[str, str]]]) -> list[str]:
    """The train split's texts as the BPE student renders them."""
    from jinja2 import Template

    t = Template(BPE_TEMPLATE)
    return [t.render(messages=m, add_generation_prompt=False) for m in records]


# --------------------------------------------------------------------------------------------
# Arms and jobs
# --------------------------------------------------------------------------------------------


def arm_loss(name: str, ce_mix: float, alm: float = 100.0) -> dict[str, float]:
    """The loss table of an arm (module docstring)."""
    kd = 1.0 - ce_mix
    table = {
        "A-ce": {"forward_kl": 0.0, "ce": 1.0},
        "A-kd": {"forward_kl": kd, "ce": ce_mix},
        "B-ce": {"forward_kl": 0.0, "ce": 1.0},
        "B-alm": {"forward_kl": 0.0, "ce": ce_mix, "alm": alm},
        "B-xkl": {"forward_kl": 0.0, "ce": ce_mix, "xkl": kd},
        "B-both": {"forward_kl": 0.0, "ce": ce_mix, "alm": alm, "xkl": kd},
    }
    if name not in table:
        raise ValueError(f"unknown arm {name!r} (arms: {', '.join(ARMS)})")
    return table[name]


def base_job(args: argparse.Namespace) -> dict[str, Any]:
    """The job table every arm shares (seed, student, run_dir and loss are filled in)."""
    raw = {
        "job": {"name": "xtok-bench", "seed": 0},
        "teacher": {
            "model": args.model,
            "dtype": args.teacher_dtype,
            "device": args.device,
            "batch_tokens": args.batch_tokens,
            "samples_per_shard": 128,
        },
        "data": {
            "train": str(args.train_data),
            "max_length": args.max_length,
            "truncation": "right",
            "max_samples": args.train_samples,
        },
        "targets": {"kind": "topk", "k": args.k, "codec": "packed", "alignment": True},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup,
            "checkpoint_every": max(args.steps, 1),
            "device": args.device,
            "cache_dir": str(args.workdir / "cache"),
        },
    }
    tag = hashlib.sha256(
        json.dumps([raw["teacher"], raw["data"], raw["targets"]], sort_keys=True).encode()
    ).hexdigest()[:10]
    raw["job"]["output"] = str(args.workdir / "targets" / f"aligned-topk{args.k}-{tag}")
    return raw


def arm_job(
    base: dict[str, Any], arm: str, seed: int, init_dir: Path, bpe_dir: Path | None, args
) -> Job:
    """The job of one arm and seed: its student, tokenizer, run_dir and loss weights."""
    raw = json.loads(json.dumps(base))
    raw["job"]["seed"] = seed
    raw["student"] = {"init": "pretrained", "model": str(init_dir)}
    if arm.startswith("B-"):
        raw["student"]["tokenizer"] = str(bpe_dir)
    raw["train"]["run_dir"] = str(args.workdir / "runs" / f"{arm}-s{seed}")
    raw["loss"] = arm_loss(arm, args.ce_mix, args.alm_weight)
    return job_from_dict(raw, src=f"cross_tokenizer:{arm}:s{seed}")


def row_key(job: Job, context: dict[str, Any]) -> str:
    """What decides an arm's score: its whole job (teacher, data, targets, student, train,
    loss, seed) less this run's paths, and ``context``: the held-out records, the recipes of
    the student inits and the BPE behind the job's paths, the scorer's version."""
    d = job.to_dict()
    d["train"].pop("run_dir", None)
    d["train"].pop("cache_dir", None)
    return _sha(json.dumps([d, context], sort_keys=True, default=str))[:16]


def built(dest: Path, recipe: dict[str, Any], build: Any) -> Path:
    """``dest`` as ``build(dest)`` makes it from ``recipe``: kept when its ``built-from.json``
    is this recipe, else made again (a changed BPE or teacher never reuses an old folder)."""
    stamp = dest / "built-from.json"
    want = json.dumps(recipe, sort_keys=True, default=str)
    if stamp.is_file() and stamp.read_text() == want:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    build(dest)
    stamp.write_text(want)
    return dest


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per-arm mean / spread of bpb and the issue's verdict (module docstring)."""
    by: dict[str, dict[int, float]] = {}
    for r in rows:
        by.setdefault(r["arm"], {})[r["seed"]] = r["bpb"]
    per_arm = {
        a: {
            "bpb_mean": float(np.mean(list(by[a].values()))),
            "bpb_min": float(min(by[a].values())),
            "bpb_max": float(max(by[a].values())),
            "seeds": len(by[a]),
        }
        for a in arms
        if a in by
    }
    out: dict[str, Any] = {"arms": per_arm}
    need = {"A-ce", "A-kd", "B-ce"}
    b_kd = [a for a in ("B-alm", "B-xkl", "B-both") if a in by]
    if not need <= by.keys() or not b_kd:
        out["verdict"] = None
        return out
    best = min(b_kd, key=lambda a: per_arm[a]["bpb_mean"])
    seeds = sorted(set(by["A-ce"]) & set(by["A-kd"]) & set(by["B-ce"]) & set(by[best]))
    gain_a = [by["A-ce"][s] - by["A-kd"][s] for s in seeds]
    gain_b = [by["B-ce"][s] - by[best][s] for s in seeds]
    margin = [gb - ga / 2 for ga, gb in zip(gain_a, gain_b, strict=True)]
    spread = max(
        per_arm[a]["bpb_max"] - per_arm[a]["bpb_min"] for a in ("A-ce", "A-kd", "B-ce", best)
    )
    mean_a, mean_b = float(np.mean(gain_a)), float(np.mean(gain_b))
    why = []
    if len(seeds) < 2:
        why.append("fewer than 2 seeds")
    if not mean_a > spread:
        why.append("A's KD gain is not beyond the seed spread")
    if not (min(margin) > 0 and float(np.mean(margin)) > spread):
        why.append("B's best gain is not half of A's beyond the seed spread")
    out["verdict"] = {
        "best_b_arm": best,
        "seeds": seeds,
        "gain_a": gain_a,
        "gain_b": gain_b,
        "gain_a_mean": mean_a,
        "gain_b_mean": mean_b,
        "ratio": mean_b / mean_a if mean_a > 0 else float("nan"),
        "margin_mean": float(np.mean(margin)),
        "seed_spread": float(spread),
        "met": not why,
        "not_met_because": why,
    }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher pass, BPE, students, every arm x seed trained and scored; the JSON result."""
    from distill.student.init import init_from_teacher_layers

    device = models.pick_device(args.device)
    teacher_dir = models.resolve_model(args.model)
    t_tok = models.load_tokenizer(teacher_dir)
    scratch = args.workdir / "records"  # where a gs:// split is copied
    train_recs = list(split_messages(str(args.train_data), scratch, args.train_samples))
    eval_recs = list(split_messages(str(args.eval_data), scratch, args.eval_samples))

    t0 = time.perf_counter()
    bpe_dir = args.workdir / f"bpe-{args.bpe_vocab}"
    bpe_recipe = {
        "texts": _sha(json.dumps(bpe_texts(train_recs))),
        "vocab": args.bpe_vocab,
        "template": BPE_TEMPLATE,
    }
    built(bpe_dir, bpe_recipe, lambda d: train_bpe(bpe_texts(train_recs), args.bpe_vocab, d))
    bpe = models.load_tokenizer(bpe_dir)
    log(f"[bpe] {len(bpe)} tokens ({time.perf_counter() - t0:.1f}s) -> {bpe_dir}")

    inits = {
        "A": args.workdir / f"init-A-{args.layers}",
        "B": args.workdir / f"init-B-{args.layers}",
    }
    recipes = {}
    for side, dest in inits.items():
        recipes[side] = {
            "teacher": str(teacher_dir),
            "teacher_config": _sha((teacher_dir / "config.json").read_text()),
            "layers": args.layers,
            "layer_selection": args.layer_selection,
            "tokenizer": bpe_recipe if side == "B" else None,
        }
        built(
            dest,
            recipes[side],
            lambda d, side=side: init_from_teacher_layers(
                teacher_dir,
                args.layers,
                d,
                args.layer_selection,
                tokenizer_dir=bpe_dir if side == "B" else None,
            ),
        )
    # what a finished arm's score depends on beyond its job (which names these by path only)
    held_out = _sha(json.dumps(eval_recs))

    base = base_job(args)
    first = arm_job(base, args.arms[0], args.seeds[0], inits["A"], bpe_dir, args)
    t0 = time.perf_counter()
    m = run_teacher(first)["train"]
    log(
        f"[teacher] {m.samples} samples, {m.target_tokens} positions "
        f"({time.perf_counter() - t0:.0f}s)"
    )

    reference = {}
    for side, tok in (("A", t_tok), ("B", bpe)):
        init = models.load_model(inits[side], "float32", device)
        reference[f"init-{side}"] = bits_per_byte(init, tok, eval_recs)
        del init
    teacher = models.load_model(teacher_dir, "float32", device)
    reference["teacher"] = bits_per_byte(teacher, t_tok, eval_recs)
    del teacher

    rows = []
    done_file = args.workdir / "rows.jsonl"  # finished arms: a re-run with the same settings
    done = {}  # skips them (an interrupted bench resumes at the arm it was in)
    if done_file.is_file():
        for line in done_file.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    for seed in args.seeds:
        for arm in args.arms:
            job = arm_job(base, arm, seed, inits[arm[0]], bpe_dir, args)
            key = row_key(job, {"score": SCORE_VERSION, "held_out": held_out, **recipes[arm[0]]})
            if key in done:
                rows.append(done[key])
                log(f"[done] {arm} seed {seed}: bpb {done[key]['bpb']:.4f} (from {done_file})")
                continue
            shutil.rmtree(dtrain.run_dir(job), ignore_errors=True)  # a fresh run, never a resume
            log(f"[train] {arm} seed {seed}: {arm_loss(arm, args.ce_mix, args.alm_weight)}")
            summary = dtrain.train(job)
            student = models.load_model(Path(summary["student_dir"]), "float32", device)
            score = bits_per_byte(student, bpe if arm.startswith("B-") else t_tok, eval_recs)
            del student
            (dtrain.run_dir(job) / dtrain.CHECKPOINT).unlink(missing_ok=True)
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    **score,
                    "loss": arm_loss(arm, args.ce_mix, args.alm_weight),
                    "train_seconds": summary["seconds"],
                    "step_ms": 1000.0 * summary["seconds"] / max(summary["steps"], 1),
                    "final_train_loss": summary["final_loss"],
                }
            )
            rows[-1]["key"] = key
            with done_file.open("a") as f:
                f.write(json.dumps(_clean(rows[-1])) + "\n")
            log(f"  bpb {score['bpb']:.4f}  ({summary['seconds']:.0f}s)")
    settings = {
        "model": args.model,
        "student_layers": args.layers,
        "layer_selection": args.layer_selection,
        "bpe_vocab": len(bpe),
        "bpe_vocab_asked": args.bpe_vocab,
        "targets": f"topk-{args.k}, aligned",
        "train_samples": int(m.samples),
        "eval_samples": len(eval_recs),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ce_mix": args.ce_mix,
        "alm_weight": args.alm_weight,
        "seeds": list(args.seeds),
        "tiny": bool(args.tiny),
    }
    return {
        "settings": settings,
        "reference": reference,
        "rows": rows,
        **summarize(rows, args.arms),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def table_lines(result: dict[str, Any]) -> list[list[str]]:
    """Header + one row per arm: bpb mean, min, max, gain over its student's CE-only."""
    arms = result["arms"]
    head = ["arm", "loss", "bpb mean", "min", "max", "gain vs CE", "ms/step"]
    out = [head]
    for name, r in result["reference"].items():
        out.append([f"({name})", "untrained" if name != "teacher" else "", f"{r['bpb']:.4f}"])
        out[-1] += ["", "", "", ""]
    for a, s in arms.items():
        ce = arms.get(f"{a[0]}-ce")
        gain = ce["bpb_mean"] - s["bpb_mean"] if ce and not a.endswith("-ce") else float("nan")
        loss = next(r["loss"] for r in result["rows"] if r["arm"] == a)
        ms = np.mean([r["step_ms"] for r in result["rows"] if r["arm"] == a])
        loss_s = ", ".join(f"{k} {v:g}" for k, v in loss.items() if v > 0)
        out.append(
            [
                a,
                loss_s,
                f"{s['bpb_mean']:.4f}",
                f"{s['bpb_min']:.4f}",
                f"{s['bpb_max']:.4f}",
                "" if math.isnan(gain) else f"{gain:+.4f}",
                f"{ms:.0f}",
            ]
        )
    return out


def verdict_line(result: dict[str, Any]) -> str:
    v = result.get("verdict")
    if not v:
        return "verdict: needs A-ce, A-kd, B-ce and a distilling B arm"
    ratio = "n/a" if math.isnan(v["ratio"]) else f"{v['ratio']:.2f}"
    return (
        f"best B arm {v['best_b_arm']}: gain {v['gain_b_mean']:+.4f} bpb vs A-kd's "
        f"{v['gain_a_mean']:+.4f} (ratio {ratio}); margin over half of A's gain "
        f"{v['margin_mean']:+.4f} vs seed spread {v['seed_spread']:.4f} -> "
        f"{'MET' if v['met'] else 'not met: ' + '; '.join(v['not_met_because'])}"
    )


def report(result: dict[str, Any]) -> None:
    s = result["settings"]
    print()
    print(
        f"cross-tokenizer: {s['model']} -> {s['student_layers']}-layer students (A: teacher "
        f"tokenizer, B: BPE {s['bpe_vocab']}); {s['train_samples']} train samples, "
        f"{s['steps']} steps x {s['batch_size']}, lr {s['lr']:g}, seeds {s['seeds']}; "
        f"held-out {s['eval_samples']} samples; targets {s['targets']}"
    )
    for name, r in result["reference"].items():
        print(f"  ({name}) bpb {r['bpb']:.4f}  ({r['bytes_per_token']:.2f} bytes/token)")
    rows = table_lines(result)
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print(
            "".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            print("-" * sum(widths))
    print(verdict_line(result))


def plot(result: dict[str, Any], path: Path) -> Path:
    """The table as a PNG (matplotlib), the verdict as its caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_lines(result)
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 0.6), dpi=120)
    ax.axis("off")
    tab = ax.table(cellText=rows[1:], colLabels=rows[0], loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.auto_set_column_width(list(range(len(rows[0]))))
    tab.scale(1, 1.3)
    s = result["settings"]
    ax.set_title(
        f"held-out bits per byte of assistant text; {s['student_layers']}-layer students, "
        f"{s['steps']} steps x {s['batch_size']}, seeds {s['seeds']}, BPE {s['bpe_vocab']}",
        fontsize=9,
    )
    ax.text(
        0.5,
        -0.02,
        verdict_line(result),
        ha="center",
        va="top",
        fontsize=7,
        wrap=True,
        transform=ax.transAxes,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke run (16/4 samples, 2 steps, 1 seed)")
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--train-data", type=Path, default=ROOT / "data/demo/train.jsonl")
    p.add_argument("--eval-data", type=Path, default=ROOT / "data/demo/eval.jsonl")
    p.add_argument("--train-samples", type=int, help="first N train samples (0 = all) [0]")
    p.add_argument("--eval-samples", type=int, help="first N held-out samples (0 = all) [0]")
    p.add_argument("--steps", type=int, help="optimizer steps per arm [200]")
    p.add_argument("--batch-size", type=int, help="samples per step [8]")
    p.add_argument("--warmup", type=int, help="warmup steps [10]")
    p.add_argument("--seeds", help="comma-separated job seeds (data order) [0,1]")
    p.add_argument("--bpe-vocab", type=int, help="B's BPE vocabulary size [16000]")
    p.add_argument("--layers", type=int, help="student layers taken from the teacher [12]")
    p.add_argument("--k", type=int, help="top-K targets the teacher stores [32]")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--layer-selection", default="ends", choices=("ends", "spaced"))
    p.add_argument("--max-length", type=int, default=384, help="train tokens per sample")
    p.add_argument("--ce-mix", type=float, default=0.1, help="CE weight of the distilling arms")
    p.add_argument("--alm-weight", type=float, default=100.0, help="loss.alm of B-alm, B-both")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--workdir", type=Path, help="shards, tokenizer, students, runs [a temp dir]")
    p.add_argument("--plot", type=Path, default=ROOT / "bench/results/cross_tokenizer.png")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in args.arms:
        if a not in ARMS:
            p.error(f"unknown arm {a!r} (arms: {', '.join(ARMS)})")
    if not args.seeds or args.steps < 1 or args.batch_size < 1:
        p.error("--seeds, --steps and --batch-size must be non-empty / >= 1")
    if not 0.0 < args.ce_mix < 1.0:
        p.error("--ce-mix must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            args.workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xtok-")))
        args.workdir = args.workdir.resolve()
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args)
    result["seconds"] = time.perf_counter() - t0
    report(result)
    print(f"\nplot: {plot(result, args.plot)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_clean(result), indent=1) + "\n")
        print(f"wrote {args.json}")
    print(f"total {result['seconds']:.0f}s")
    return result


def _clean(x: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


if __name__ == "__main__":
    main()
    sys.exit(0)
