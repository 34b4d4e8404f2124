"""`fastgpt2 finetune`: fine-tune GPT-2 with FSDP2. With --nproc-per-node N > 1 (or --nnodes > 1) outside a launch it
checks the settings, then starts torchrun, whose workers run this same command; inside torchrun it runs its rank.
Samples at each evaluation come from the serving engine loaded with the current weights."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess

# flag -> (type, help); the dest of each flag is the TrainConfig field of the same name
_FLAGS = {
    "--model": (str, "hub id, local Hugging Face directory or preset (default gpt2)"),
    "--train": (str, "training data: text file (a document per line), .jsonl (text, or prompt/completion), "
                     ".bin shard, a directory of .bin shards, or a Texar directory with train.txt"),
    "--valid": (str, "validation data, same forms (default: dev.txt / val*.bin beside a --train directory)"),
    "--output-dir": (str, "metrics.jsonl, loss.png, config.json, checkpoints/, final/ (default out)"),
    "--max-steps": (int, "optimizer steps (default: --epochs over the training data)"),
    "--epochs": (float, "passes over the training data when --max-steps is not given (default 1)"),
    "--seq-len": (int, "tokens per training sequence (default: the model's context)"),
    "--micro-batch-size": (int, "sequences per forward/backward on each rank (default 8)"),
    "--global-batch-tokens": (int, "tokens per optimizer step over all ranks; gradients are accumulated to it "
                                   "(default: one micro-batch per rank)"),
    "--lr": (float, "peak learning rate (default 6e-4, nanoGPT's)"),
    "--min-lr": (float, "learning rate at the end of the cosine (default lr / 10)"),
    "--warmup-steps": (int, "linear warmup steps (default min(2000, 10%% of the run))"),
    "--weight-decay": (float, "AdamW weight decay on matrices and embeddings (default 0.1)"),
    "--beta1": (float, "AdamW beta1 (default 0.9)"),
    "--beta2": (float, "AdamW beta2 (default 0.95)"),
    "--grad-clip": (float, "max global gradient norm, 0 to disable (default 1.0)"),
    "--dropout": (float, "dropout while training (default 0.0)"),
    "--eval-every": (int, "validation loss every N steps, 0 for only at the end (default 100)"),
    "--eval-tokens": (int, "cap on validation tokens per evaluation (default: all)"),
    "--log-every": (int, "a metrics.jsonl line every N steps (default 1)"),
    "--save-every": (int, "sharded checkpoint every N steps, 0 for only at the end (default 500)"),
    "--keep-checkpoints": (int, "newest checkpoints kept (default 2)"),
    "--seed": (int, "seed of the data order and dropout (default 1337)"),
    "--device": (str, "cpu or cuda (default: cuda when available)"),
    "--sample-prompt": (str, "generate from this prompt at each evaluation (with the serving engine)"),
    "--sample-tokens": (int, "tokens per sample (default 48)"),
    "--nproc-per-node": (int, "processes on this node; > 1 starts torchrun (default 1)"),
    "--nnodes": (int, "nodes of a multi-node run (default 1)"),
    "--node-rank": (int, "this node's rank in [0, nnodes) (default 0)"),
    "--rdzv-endpoint": (str, "host:port of node 0 for a multi-node run"),
}
_SWITCHES = {
    "--whole-file": "a text file is one document instead of one per line",
    "--resume": "continue from the newest checkpoint in --output-dir",
    "--activation-checkpointing": "recompute each block's activations in backward (less memory)",
    "--compile": "torch.compile each transformer block",
}


def add_parser(sub):
    p = sub.add_parser("finetune", help="fine-tune GPT-2 on text, JSONL or token shards (FSDP2, torchrun)",
                       description="Fine-tune GPT-2 with FSDP2 (gloo on CPU, NCCL on GPUs); writes metrics.jsonl, "
                                   "loss.png, checkpoints/ and final/ (Hugging Face format) to --output-dir.")
    p.add_argument("--config", help="a config.json (as a run writes it) or .yaml of settings; flags override it")
    for flag, (kind, text) in _FLAGS.items():
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)
    for flag, text in _SWITCHES.items():
        p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=argparse.SUPPRESS,
                   help="compute dtype (default auto: bfloat16 on GPUs that support it, else float32)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")
    p.set_defaults(func=run)


def build_config(args):
    from fastgpt2.train import TrainConfig

    values = TrainConfig.load(args.config).to_dict() if args.config else {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in fields})
    if not values.get("train"):
        raise ValueError("--train is required: a text, .jsonl or .bin file, or a directory")
    return TrainConfig(**values)


def run(args) -> int:
    from fastgpt2.train import launch
    from fastgpt2.train.run import run_rank

    config = build_config(args)
    path = launch.prepare(config)
    if path is not None:
        command = launch.torchrun_command(config, ["-m", "fastgpt2", "finetune", "--config", str(path)])
        return 1 if subprocess.run(command).returncode else 0
    summary = run_rank(config, on_sample=EngineSampler(config) if config.sample_prompt is not None else None)
    return 0 if summary else 1


class EngineSampler:
    """Generates the sample of each evaluation with the serving engine on the CPU (so that it takes no GPU memory
    from training): the engine is built once and gets the new weights through load_weights."""

    def __init__(self, config):
        self.config = config
        self.llm = None

    def __call__(self, step: int, model) -> str:
        from fastgpt2 import LLM, SamplingParams

        if self.llm is None:
            kv_bytes = 2 * model.config.n_layer * model.config.n_positions * model.config.n_embd * 4 * 2
            self.llm = LLM(model, device="cpu", dtype="float32", seed=self.config.seed, kv_cache_memory=kv_bytes,
                           max_num_seqs=1)
        else:
            self.llm.load_weights(model)
        params = SamplingParams(max_tokens=self.config.sample_tokens, temperature=0.8, top_k=40, seed=self.config.seed)
        return self.llm.generate(self.config.sample_prompt, params, use_tqdm=False)[0].outputs[0].text
