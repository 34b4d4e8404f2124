"""Before any worker starts: the checks a user's settings can fail (missing or empty data, odd-sized shards, a
sequence longer than the model's context, a world size that does not divide the batch), and the torchrun command
that starts the workers of this node."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastgpt2.train import checkpoint, data
from fastgpt2.train.config import TrainConfig


def launched_world_size(config: TrainConfig, in_launch: bool) -> int:
    return int(os.environ["WORLD_SIZE"]) if in_launch else config.world_size_requested


def model_context(name_or_path: str) -> int:
    """The model's context length from its config.json; the weights are fetched into the cache here, once, so that
    the workers find them there."""
    from fastgpt2.model.checkpoint import read_config, resolve_checkpoint_dir

    return read_config(resolve_checkpoint_dir(name_or_path)).n_positions


def preflight(config: TrainConfig, world_size: int) -> None:
    """Raise ValueError / FileNotFoundError with one sentence for every problem found without training."""
    data.check_source(config.train, "train", config.whole_file)
    valid = config.valid or data.default_valid(config.train)
    if valid is not None:
        data.check_source(valid, "valid", config.whole_file)
    config.batch_plan(world_size, model_context(config.model))
    if not config.resume and checkpoint.list_checkpoints(config.output_dir):
        raise ValueError(f"{config.output_dir} already holds checkpoints of a run; pass --resume to continue it or "
                         "choose another --output-dir")


def prepare(config: TrainConfig) -> Path | None:
    """Check the settings (preflight); when this process must start torchrun itself (more than one process asked
    for, outside a launch), save the config for the workers and return its path; else None (run this rank here)."""
    from fastgpt2.train import parallel

    inside = parallel.in_launch()
    preflight(config, launched_world_size(config, inside))
    if inside or config.world_size_requested <= 1:
        return None
    path = Path(config.output_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    config.save(path)
    return path


def torchrun_command(config: TrainConfig, target: list[str]) -> list[str]:
    """torchrun for this node: --standalone on one node; on several, node ranks fixed by --node-rank and node 0's
    --rdzv-endpoint (torchrun's static rendezvous). `target` is what each worker runs (['-m', module, args...])."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={config.nproc_per_node}"]
    if config.nnodes > 1:
        command += [f"--nnodes={config.nnodes}", f"--node-rank={config.node_rank}",
                    f"--rdzv-endpoint={config.rdzv_endpoint}"]
    else:
        command += ["--standalone", "--nnodes=1"]
    return command + target


def run_torchrun(config: TrainConfig, target: list[str]) -> None:
    status = subprocess.run(torchrun_command(config, target)).returncode
    if status:
        raise RuntimeError(f"torchrun exited with status {status}; the workers' errors are printed above")
