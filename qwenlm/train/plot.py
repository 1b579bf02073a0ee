"""The loss curve of a run as a PNG, drawn from its JSONL log (needs matplotlib)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    return records


def plot_losses(log_path: Path, png_path: Path, *, title: str = "") -> bool:
    """Train and eval loss against step; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return True
