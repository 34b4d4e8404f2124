"""finetune(config): the Python entry point. Outside a launch with more than one process requested it checks the
settings and starts torchrun itself; otherwise it runs this process's rank (inside torchrun, or alone)."""
from __future__ import annotations

import json
from pathlib import Path

from fastgpt2.train import launch, parallel
from fastgpt2.train.config import TrainConfig
from fastgpt2.train.trainer import SampleFn, Trainer


def finetune(config: TrainConfig | dict, *, on_sample: SampleFn | None = None) -> dict:
    """Fine-tune GPT-2 as `config` says; returns the summary that is also written to <output_dir>/summary.json
    (steps, best_step, best_val_loss, final_dir).

    on_sample : (step, current weights as a plain GPT2 on the CPU) -> the text after config.sample_prompt, called on
        rank 0 at each evaluation when config.sample_prompt is set (the CLI passes one that generates with the
        serving engine); without it, greedy decoding with the dense forward. A run that starts torchrun itself
        cannot pass it on to the workers."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    path = launch.prepare(config)
    if path is not None:
        launch.run_torchrun(config, ["-m", "fastgpt2.train", str(path)])
        return json.loads((Path(config.output_dir) / "summary.json").read_text())
    return run_rank(config, on_sample)


def run_rank(config: TrainConfig, on_sample: SampleFn | None = None) -> dict:
    """This process's rank of the run (the settings already checked)."""
    ctx = parallel.init_distributed(config.device)
    try:
        summary = Trainer(config, ctx, on_sample).run()
        if ctx.is_main:
            (Path(config.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        parallel.close_distributed(ctx)
