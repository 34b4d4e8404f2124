"""TrainConfig: every setting of a fine-tuning run in one dataclass, validated on construction and logged with the run
(config.json in the output directory). Optimiser defaults are nanoGPT's (train.py) unless a comment says otherwise."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16")


@dataclass(slots=True)
class TrainConfig:
    # Model and data
    model: str = "gpt2"  # hub id, local Hugging Face directory or preset (124M, gpt2-medium, ...)
    train: str = ""  # text / JSONL file, directory of .bin shards, or a Texar data directory (train.txt)
    valid: str | None = None  # same forms (dev.txt of a Texar directory); None: no evaluation
    output_dir: str = "out"  # metrics.jsonl, loss.png, config.json, checkpoints/, best/, final/
    whole_file: bool = False  # a text file is one document (default: one document per line)
    # Length of the run: max_steps when set, else epochs over the training blocks
    max_steps: int | None = None
    epochs: float = 1.0
    # Batch: sequences of seq_len tokens, micro_batch_size per forward, global_batch_tokens per optimizer step
    seq_len: int | None = None  # default: the model's context (1024 for GPT-2)
    micro_batch_size: int = 8  # sequences per forward/backward on each rank
    global_batch_tokens: int | None = None  # default: one micro-batch per rank (no gradient accumulation)
    # AdamW with linear warmup and cosine decay
    lr: float = 6e-4  # peak learning rate (nanoGPT's default; its GPT-2 XL fine-tuning example uses 3e-5)
    min_lr: float | None = None  # end of the cosine; default lr / 10
    warmup_steps: int | None = None  # default min(2000, 10% of the run): nanoGPT's 2000 assume 600,000 steps
    weight_decay: float = 0.1  # on matrices and embeddings only, never on biases and LayerNorm
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dropout: float | None = 0.0  # embd/attn/resid dropout while training; None keeps the checkpoint's (0.1)
    # Evaluation, logging and checkpoints (steps are optimizer steps)
    eval_every: int = 100  # validation loss every N steps, at step 0 and at the end; 0: only at the end
    eval_tokens: int | None = None  # cap on validation tokens per evaluation; None: the whole validation set
    log_every: int = 1  # a metrics.jsonl line every N steps
    save_every: int = 500  # sharded checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest checkpoint in output_dir/checkpoints
    seed: int = 1337  # data order (shuffled each epoch), dropout, initial RNG state
    # Execution
    device: str | None = None  # cpu or cuda; default cuda when available
    dtype: str = "auto"  # compute dtype: bfloat16 on GPUs that support it, else float32 (parameters stay float32)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each transformer block
    progress: bool = True  # tqdm bar on rank 0
    sample_prompt: str | None = None  # text generated from this prompt at each evaluation (CLI: by the engine)
    sample_tokens: int = 48  # tokens per sample
    # Launch: torchrun is started when nproc_per_node * nnodes > 1 and the process is not already inside a launch
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of node 0 when nnodes > 1

    def __post_init__(self):
        for name in ("model", "train", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"TrainConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        positive = ("micro_batch_size", "nproc_per_node", "nnodes", "log_every", "keep_checkpoints", "sample_tokens")
        optional_positive = ("max_steps", "seq_len", "global_batch_tokens", "eval_tokens")
        non_negative = ("eval_every", "save_every", "node_rank", "seed")
        for name in positive + optional_positive + non_negative:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            low = 0 if name in non_negative else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "a non-negative" if low == 0 else "a positive"
                none = " or None" if name in optional_positive else ""
                raise ValueError(f"TrainConfig.{name} must be {kind} integer{none}, got {value!r}")
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool)
                                              or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ValueError("TrainConfig.warmup_steps must be a non-negative integer or None, got "
                             f"{self.warmup_steps!r}")
        _check_number("epochs", self.epochs, low=0.0, open_low=True)
        _check_number("lr", self.lr, low=0.0, open_low=True)
        if self.min_lr is not None:
            _check_number("min_lr", self.min_lr, low=0.0, high=self.lr)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_number("beta1", self.beta1, low=0.0, high=1.0, open_high=True)
        _check_number("beta2", self.beta2, low=0.0, high=1.0, open_high=True)
        _check_number("grad_clip", self.grad_clip, low=0.0)
        if self.dropout is not None:
            _check_number("dropout", self.dropout, low=0.0, high=1.0, open_high=True)
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r} (float16 "
                             "would need loss scaling; use bfloat16)")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be 'cpu', 'cuda' or None, got {self.device!r}")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"TrainConfig.node_rank must be in [0, nnodes - 1] = [0, {self.nnodes - 1}], "
                             f"got {self.node_rank}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("TrainConfig.rdzv_endpoint must be host:port of node 0 when nnodes > 1")

    @property
    def world_size_requested(self) -> int:
        return self.nproc_per_node * self.nnodes

    def batch_plan(self, world_size: int, n_positions: int) -> tuple[int, int, int]:
        """(seq_len, global batch in sequences, micro-batches per rank and step) for `world_size` ranks and a model
        of `n_positions` context; raises ValueError naming the field when they do not fit together."""
        seq_len = self.seq_len or n_positions
        if seq_len > n_positions:
            raise ValueError(f"TrainConfig.seq_len ({seq_len}) exceeds the model's context of {n_positions} tokens; "
                             f"use --seq-len {n_positions} or less")
        per_step = seq_len * self.micro_batch_size * world_size  # tokens of one micro-batch on every rank
        global_tokens = self.global_batch_tokens or per_step
        if global_tokens % per_step:
            lower = max(per_step, global_tokens // per_step * per_step)
            raise ValueError(f"TrainConfig.global_batch_tokens ({global_tokens}) must be a multiple of seq_len x "
                             f"micro_batch_size x world size = {seq_len} x {self.micro_batch_size} x {world_size} = "
                             f"{per_step}; use {lower} or {lower + per_step}, or change the world size")
        return seq_len, global_tokens // seq_len, global_tokens // per_step

    def total_steps(self, num_blocks: int, global_batch_seqs: int) -> int:
        """max_steps, or enough steps for `epochs` passes over `num_blocks` training sequences."""
        return self.max_steps or max(1, math.ceil(self.epochs * num_blocks / global_batch_seqs))

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(2000, total_steps // 10)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown training setting {unknown[0]!r}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """From a JSON file (as written to the output directory) or, when PyYAML is installed, a .yaml file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of training settings")
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _check_number(name, value, low=None, high=None, open_low=False, open_high=False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        lo = "" if low is None else ("(" if open_low else "[") + f"{low}"
        hi = "inf)" if high is None else f"{high}" + (")" if open_high else "]")
        raise ValueError(f"TrainConfig.{name} must be a number in {lo}, {hi}, got {value!r}")
