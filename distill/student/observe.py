"""Run observability: metrics.jsonl, TensorBoard scalars, a loss-curve PNG and memory readings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def memory_bytes(device: str) -> int:
    """CUDA: peak allocated since the last reset; CPU: the process's resident set size."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class RunLog:
    """Appends step records to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._file = self.path.open("a") if enabled else None
        self._tb: Any = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(rec) + "\n")  # type: ignore[union-attr]
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(f"{rec.get('split', 'train')}/{k}", v, rec["step"])

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()  # type: ignore[union-attr]
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()  # type: ignore[union-attr]
            if self._tb is not None:
                self._tb.close()


def plot_losses(metrics: Path, out: Path) -> Path | None:
    """Loss curves (total and each term; held-out points if logged) from metrics.jsonl."""
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"step", "epoch", "lr", "tokens_per_s", "memory_bytes", "split", "data_wait_share"}
    keys = [k for k in train[-1] if k not in skip and isinstance(train[-1][k], int | float)]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    steps = [r["step"] for r in train]
    for k in keys:
        ax.plot(steps, [r.get(k, float("nan")) for r in train], label=k, lw=1.2)
    held = [r for r in rows if r.get("split") == "eval"]
    if held:
        ax.plot(
            [r["step"] for r in held], [r["kd"] for r in held], "o-", label="held-out forward_kl"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("student training")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
