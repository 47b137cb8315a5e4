"""Planner accuracy: distill's estimated peak memory of a training step against the measured one.

Each configuration runs in a fresh subprocess: CUDA max_memory_allocated on a GPU; on a CPU the
peak RSS (VmHWM) above the RSS measured before the student is created. Prints estimate,
measurement and their ratio (target: within 15%).

    python bench/plan_check.py [--layers 12] [--seq 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = [  # (micro_batch, checkpointing, loss_chunk)
    (1, False, 1024),
    (4, False, 1024),
    (8, False, 1024),
    (8, True, 1024),
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def side(args: argparse.Namespace) -> dict:
    """One measured step (run in its own process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill import models
    from distill.config import LossWeights
    from distill.student.losses import chunked_distill_loss
    from distill.student.planner import count_params, estimate

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = AutoConfig.from_pretrained(models.resolve_model("builtin:smollm2-135m-instruct"))
    cfg.num_hidden_layers = args.layers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    base = torch.cuda.memory_allocated() if device == "cuda" else _status("VmRSS")
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    if args.ckpt:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t, k = args.seq, 16
    ids = torch.randint(0, cfg.vocab_size, (args.mb, t), device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    n = args.mb * t
    w = model.get_output_embeddings().weight
    t_ids = torch.randint(0, cfg.vocab_size, (n, k), device=device)
    t_lp = torch.log_softmax(torch.randn(n, k + 1, device=device), -1)[:, :k]
    for _ in range(2):  # two steps: the optimizer state exists from the first
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        loss, _ = chunked_distill_loss(
            hidden[mask], w, t_ids, t_lp, ids.flatten(), LossWeights(), args.chunk
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else _status("VmHWM") - base
    est = estimate(
        cfg,
        count_params(cfg),
        args.mb,
        t,
        checkpointing=args.ckpt,
        loss_chunk=args.chunk,
        math_attention=device == "cpu",
    )
    return {
        "micro_batch": args.mb,
        "checkpointing": args.ckpt,
        "seq": t,
        "device": device,
        "estimated_bytes": est.total,
        "measured_bytes": peak,
        "parts": est.parts,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mb", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(side(args)))
        return 0
    rows = []
    print(f"student: SmolLM2 config with {args.layers} layers, seq {args.seq}, AdamW fp32")
    print(f"{'micro-batch':>11} {'ckpt':>5} {'estimate MiB':>13} {'measured MiB':>13} {'ratio':>6}")
    for mb, ckpt, chunk in CONFIGS:
        cmd = [
            sys.executable,
            __file__,
            "--side",
            "--mb",
            str(mb),
            "--chunk",
            str(chunk),
            "--layers",
            str(args.layers),
            "--seq",
            str(args.seq),
            "--threads",
            str(args.threads),
        ]
        if ckpt:
            cmd.append("--ckpt")
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["ratio"] = r["estimated_bytes"] / r["measured_bytes"]
        rows.append(r)
        print(
            f"{mb:>11} {str(ckpt):>5} {r['estimated_bytes'] / 2**20:>13,.0f} "
            f"{r['measured_bytes'] / 2**20:>13,.0f} {r['ratio']:>6.2f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
