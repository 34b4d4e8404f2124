"""Run records on rank 0: metrics.jsonl (one JSON object per logged step, appended and flushed at once) and loss.png
(training and validation loss against tokens seen, redrawn at each evaluation when matplotlib is installed)."""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """metrics.jsonl in `output_dir`. On resume the lines past the checkpoint's step (written by the interrupted run
    after its last checkpoint) are dropped, from samples.jsonl too, so the files read as one uninterrupted run."""

    def __init__(self, output_dir: str | Path, resume_step: int | None):
        self.path = Path(output_dir) / "metrics.jsonl"
        for path in (self.path, Path(output_dir) / "samples.jsonl"):
            if resume_step is None:
                path.unlink(missing_ok=True)
            elif path.exists():
                kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash: the rest is gone too
    return records


_warned = False


def plot_losses(output_dir: str | Path) -> bool:
    """Draw loss.png from metrics.jsonl; False (and a note, once) when matplotlib is not installed."""
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            print("note: loss.png needs matplotlib (pip install 'fastgpt2[train]'); skipping the plot")
            _warned = True
        return False
    records = read_metrics(Path(output_dir) / "metrics.jsonl")
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1, alpha=0.8)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / "loss.png"
    tmp = path.with_name(".loss.png.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True
