"""The fine-tuning loop on one rank of a torch.distributed group: FSDP2-sharded GPT-2, token-weighted loss over the
whole global batch (so any world size and accumulation split computes the same step), AdamW with warmup and cosine
decay, exact validation loss, metrics, sharded checkpoints, resumption, and the export of the best weights."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastgpt2.model.gpt2 import GPT2
from fastgpt2.model.tokenizer import Tokenizer
from fastgpt2.train import checkpoint, data, metrics, modeling, optim, packing, parallel
from fastgpt2.train.config import TrainConfig

# (step, the current weights as a plain float32 GPT2 on the CPU) -> the text generated after config.sample_prompt;
# called on rank 0 at each evaluation.
SampleFn = Callable[[int, GPT2], str]
# Fields whose change would alter the data order or the meaning of a step: a checkpoint resumes only if they match.
_RESUME_FIELDS = ("train", "whole_file", "seed", "seq_len", "global_batch_tokens")


class Trainer:
    def __init__(self, config: TrainConfig, ctx: parallel.DistContext, on_sample: SampleFn | None = None):
        self.config, self.ctx, self.on_sample = config, ctx, on_sample
        self.output_dir = Path(config.output_dir)

    def run(self) -> dict:
        """1. model, data and batch plan; 2. shard, optimizer, resume; 3. the steps, with evaluations and checkpoints;
        4. the final evaluation, checkpoint and export.
        Returns a summary: steps, best_step, best_val_loss (None without validation data), final_dir."""
        cfg, ctx = self.config, self.ctx
        model = GPT2.from_pretrained(cfg.model, device="cpu", dtype=torch.float32)
        self.tokenizer = Tokenizer.from_pretrained(getattr(model, "checkpoint_dir", None))
        if cfg.dropout is not None:
            modeling.set_dropout(model, cfg.dropout)
        self.flash = modeling.use_flash_attention(model, ctx.device)
        seq_len, global_batch, self.accum = cfg.batch_plan(ctx.world_size, model.config.n_positions)
        self.train_blocks = packing.PackedBlocks(data.load_tokens(cfg.train, "train", self.tokenizer, cfg.whole_file),
                                                 seq_len)
        valid = cfg.valid or data.default_valid(cfg.train)
        self.valid_blocks = None if valid is None else packing.PackedBlocks(
            data.load_tokens(valid, "valid", self.tokenizer, cfg.whole_file), seq_len)
        self.order = packing.DataOrder(len(self.train_blocks), global_batch, ctx.rank, ctx.world_size, cfg.seed)
        self.total_steps = cfg.total_steps(len(self.train_blocks), global_batch)
        self.step_tokens = global_batch * seq_len
        torch.manual_seed(cfg.seed * 1000 + ctx.rank)  # dropout draws differ across ranks, repeat across runs

        self.dtype = parallel.compute_dtype(cfg.dtype, ctx.device)
        model.to(ctx.device).train()
        self.model = parallel.shard_model(model, ctx, self.dtype, cfg.activation_checkpointing, cfg.compile)
        self.optimizer = optim.build_optimizer(self.model, cfg, ctx.device)
        start = self._resume()
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir / "config.json")
            self.log = metrics.MetricsLog(self.output_dir, start if start > 0 else None)
            self._print_plan(seq_len, global_batch, start)
        bar = self._progress_bar(start)
        try:
            if start == 0 and self.valid_blocks is not None:
                self._evaluate(0)
            evaluated = saved = start
            for step in range(start, self.total_steps):
                record = self._train_step(step)
                done = step + 1
                if cfg.eval_every and done % cfg.eval_every == 0 and self.valid_blocks is not None:
                    record.update(self._evaluate(done, log=False))
                    evaluated = done
                if ctx.is_main and (done % cfg.log_every == 0 or "val_loss" in record):
                    self.log.write(record)
                if "val_loss" in record:
                    self._after_evaluation(done, record)
                if cfg.save_every and done % cfg.save_every == 0:
                    self._save(done)
                    saved = done
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            if self.valid_blocks is not None and evaluated != self.total_steps:
                self._evaluate(self.total_steps)
            if saved != self.total_steps:
                self._save(self.total_steps)
            final = self._export_final()
        finally:
            if bar is not None:
                bar.close()
            if ctx.is_main:
                self.log.close()
        found = self.best_step >= 0
        return {"steps": self.total_steps, "best_step": self.best_step if found else None,
                "best_val_loss": self.best_val_loss if found else None, "final_dir": str(final)}

    # ---------------------------------------------------------------------------------------------------------------

    def _train_step(self, step: int) -> dict:
        """One optimizer step over this rank's share of the global batch, in `accum` micro-batches. Each micro-batch's
        summed loss is divided by the number of target tokens in the whole global batch (times the world size, which
        FSDP's mean over ranks divides out again), so the update is that of the token-weighted global mean."""
        cfg, ctx = self.config, self.ctx
        t0 = time.perf_counter()
        indices = self.order.rank_indices(step)
        micro = cfg.micro_batch_size
        batches = [self.train_blocks.batch(indices[i:i + micro]) for i in range(0, len(indices), micro)]
        local_count = sum(int((t != packing.IGNORE_INDEX).sum()) for _, t in batches)
        (count,) = ctx.all_reduce_sum(local_count)
        scale = ctx.world_size / max(count, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for input_ids, targets in batches:
            logits = self.model(input_ids=input_ids.to(ctx.device, non_blocking=True)).logits  # (B, T, V)
            loss, _ = modeling.token_loss_sum(logits, targets)
            (loss * scale).backward()
            loss_sum += loss.detach()
            del logits, loss
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = optim.lr_at(step, cfg, self.total_steps)
        optim.set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        (total,) = ctx.all_reduce_sum(loss_sum)
        seconds = time.perf_counter() - t0
        self.tokens_seen = (step + 1) * self.step_tokens
        return {"step": step + 1, "loss": total / count if count else float("nan"), "lr": lr,
                "tokens_per_s": self.step_tokens / seconds, "tokens": self.tokens_seen,
                "grad_norm": float(grad_norm), "epoch": round(self.order.epoch_at(step + 1), 4)}

    @torch.no_grad()
    def _evaluate(self, step: int, log: bool = True) -> dict:
        """Token-weighted mean cross-entropy over the validation blocks (every rank a disjoint share, the sums
        all-reduced), and its exponential. Logged, plotted and checked for a new best when `log`."""
        ctx = self.ctx
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        count = torch.zeros((), dtype=torch.float64, device=ctx.device)
        cap = self.config.eval_tokens
        max_blocks = None if cap is None else max(1, cap // self.valid_blocks.seq_len)
        for indices in packing.eval_batches(len(self.valid_blocks), self.config.micro_batch_size, ctx.rank,
                                            ctx.world_size, max_blocks):
            input_ids, targets = self.valid_blocks.batch(indices)
            logits = self.model(input_ids=input_ids.to(ctx.device)).logits
            s, c = modeling.token_loss_sum(logits, targets)
            loss_sum += s
            count += c
        self.model.train()
        total, n = ctx.all_reduce_sum(loss_sum, count)
        val_loss = total / n
        record = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
        if log:
            record = {"step": step, "tokens": step * self.step_tokens, **record}
            if ctx.is_main:
                self.log.write(record)
            self._after_evaluation(step, record)
        return record

    def _after_evaluation(self, step: int, record: dict) -> None:
        """Plot, keep the best weights (exported in Hugging Face format under best/), and draw a sample."""
        cfg, ctx = self.config, self.ctx
        if ctx.is_main:
            metrics.plot_losses(self.output_dir)
        if record["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.best_step = record["val_loss"], step
            checkpoint.export_weights(ctx, self.model, checkpoint.best_dir(self.output_dir, step), self.tokenizer)
            if ctx.is_main:  # keep the best that the newest checkpoint knows of, should this run be resumed
                checkpoint.prune_best(self.output_dir, {step, self.checkpoint_best_step})
        if cfg.sample_prompt is not None:
            state = checkpoint.full_state_dict(self.model)
            if ctx.is_main:
                plain = checkpoint.plain_model(self.model.config, state)
                if self.on_sample is not None:
                    text = self.on_sample(step, plain)
                else:
                    text = modeling.greedy_sample(plain, self.tokenizer, cfg.sample_prompt, cfg.sample_tokens)
                self._write(f"step {step} sample: {cfg.sample_prompt}{text}")
                with open(self.output_dir / "samples.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "prompt": cfg.sample_prompt, "text": text}) + "\n")

    def _save(self, step: int) -> None:
        state = {"step": step, "tokens_seen": step * self.step_tokens, "best_val_loss": self.best_val_loss,
                 "best_step": self.best_step, "data_order": self.order.state_dict(),
                 "config": {k: getattr(self.config, k) for k in _RESUME_FIELDS}}
        checkpoint.save_checkpoint(self.ctx, self.output_dir, step, self.model, self.optimizer, state,
                                   self.config.keep_checkpoints)
        self.checkpoint_best_step = self.best_step
        if self.ctx.is_main and self.best_step >= 0:
            checkpoint.prune_best(self.output_dir, {self.best_step})

    def _resume(self) -> int:
        """Load the newest checkpoint when resuming; returns the step to start from."""
        self.best_val_loss, self.best_step, self.checkpoint_best_step = float("inf"), -1, -1
        latest = checkpoint.latest_checkpoint(self.output_dir) if self.config.resume else None
        if latest is None:
            if self.config.resume and self.ctx.is_main:
                self._write(f"no checkpoint under {self.output_dir / 'checkpoints'}: starting from step 0")
            return 0
        state = checkpoint.load_checkpoint(self.ctx, latest, self.model, self.optimizer)
        changed = [k for k in _RESUME_FIELDS if state["config"].get(k) != getattr(self.config, k)]
        if changed or state["data_order"] != self.order.state_dict():
            what = changed[0] if changed else "the training data's size"
            raise ValueError(f"{latest} was written with another {what}; resume with the settings of that run "
                             "or start a new --output-dir")
        self.best_val_loss, self.best_step = state["best_val_loss"], state["best_step"]
        self.checkpoint_best_step = self.best_step
        if self.ctx.is_main:  # best weights found after this checkpoint belong to the lost run: they come again
            checkpoint.prune_best(self.output_dir, {self.best_step})
            self._write(f"resuming from {latest} (step {state['step']})")
        return state["step"]

    def _export_final(self) -> Path:
        """<output_dir>/final: the best weights by validation loss, else (no validation set) the last ones."""
        final = self.output_dir / "final"
        best = checkpoint.best_dir(self.output_dir, self.best_step)
        (found,) = self.ctx.all_reduce_sum(float(self.ctx.is_main and self.best_step >= 0 and best.is_dir()))
        if found:  # rank 0 decides for all: the branches differ in their collectives
            if self.ctx.is_main:
                checkpoint.copy_export(best, final)
            self.ctx.barrier()
        else:
            checkpoint.export_weights(self.ctx, self.model, final, self.tokenizer)
        if self.ctx.is_main:
            self._write(f"final weights (step {self.best_step if self.best_step >= 0 else self.total_steps}"
                        f"{f', val loss {self.best_val_loss:.4f}' if self.best_step >= 0 else ''}) in {final}")
        return final

    def _progress_bar(self, start: int):
        if not (self.ctx.is_main and self.config.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)

    def _write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text)

    def _print_plan(self, seq_len: int, global_batch: int, start: int) -> None:
        cfg, ctx = self.config, self.ctx
        self._write(f"fine-tuning {cfg.model} ({self.model.config.num_parameters():,} parameters) on {ctx.world_size} "
                    f"rank(s), {ctx.device.type}, compute {str(self.dtype).removeprefix('torch.')}"
                    f"{', flash attention' if self.flash else ''}: {len(self.train_blocks):,} training sequences of "
                    f"{seq_len} tokens, {global_batch} per step ({self.accum} micro-batch(es) of "
                    f"{cfg.micro_batch_size} per rank), steps {start}..{self.total_steps}")
