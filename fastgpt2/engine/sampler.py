"""Sampler: one batched step that applies every request's own parameters and draws the next tokens.

Steps, in order, per row:
  0. logits of padding ids past the tokenizer's vocabulary (a checkpoint padded 50257 -> 50304) are dropped;
  1. user logits processors, then logit_bias;
  2. min_tokens: EOS and stop_token_ids are banned until min_tokens tokens exist;
  3. repetition penalty (prompt + output tokens), presence and frequency penalties (output tokens);
  4. temperature 0: argmax (ties to the lowest id); otherwise logits / temperature, then
  5. top-k -> top-p -> min-p truncation and one inverse-CDF draw with a uniform from the request's own generator
     (picked by fastgpt2.kernels.dispatch: C++ on CPU, Triton on CUDA; both equal the torch reference).
Logprobs are those of the model's raw distribution (before any of the steps), as in vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgpt2.engine.sequence import Sequence
from fastgpt2.engine.torch_threads import OneTorchThread
from fastgpt2.kernels import dispatch


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list  # per row: None, or (sampled token logprob, {token_id: logprob} of the top-N)


class Sampler:
    def __init__(self, eos_token_id: int, generator: torch.Generator, vocab_size: int | None = None):
        self.eos_token_id = eos_token_id
        self.generator = generator  # for requests without a seed
        self.vocab_size = vocab_size  # ids at or past it are the embedding's padding and are never drawn

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: (B, V) float32, one row per sequence in seqs; modified in place (processors, penalties and
        temperature)."""
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        greedy = [s.params.greedy for s in seqs]
        # Of the rows that want logprobs, those the steps below change in place are copied first (the logprobs are the
        # raw distribution's); the others are read where they are after the draw (a temperature of 1 divides a row by
        # 1, which leaves it bitwise as it was). A fresh (rows, V) copy costs ~1.4 ms at 64 rows on the Intel Xeon.
        copied = [i for i in wanted if self._changes_row(seqs[i], greedy[i])]
        with OneTorchThread(logits.device):
            if self.vocab_size is not None and logits.shape[1] > self.vocab_size:
                logits = logits[:, :self.vocab_size].contiguous()  # (B, vocab_size)
            raw = logits[copied] if copied else None  # (len(copied), V)
            logits = self._apply_processors_and_penalties(logits, seqs)
        if all(greedy):
            next_ids = dispatch.argmax(logits)
        else:
            next_ids = self._draw(logits, seqs, greedy)
        token_ids = next_ids.tolist()
        out = [None] * len(seqs)
        if wanted:
            # The sampled tokens' logprobs and each row's top-N, without a (B, V) log_softmax (C++ on the CPU).
            top_n = max(seqs[i].params.logprobs for i in wanted)
            copied_set = set(copied)
            in_place = [i for i in wanted if i not in copied_set]
            for rows, source, index in ((copied, raw, None), (in_place, logits, in_place)):
                if not rows:
                    continue
                sampled, top_ids, top_values = dispatch.row_logprobs(source, [token_ids[i] for i in rows], top_n,
                                                                     rows=index)
                for j, i in enumerate(rows):
                    n = seqs[i].params.logprobs
                    out[i] = (sampled[j], dict(zip(top_ids[j][:n], top_values[j][:n])))
        return SampleResult(token_ids, out)

    def _changes_row(self, s: Sequence, greedy: bool) -> bool:
        """Whether the steps before the draw change this row's logits in place (processors, logit bias, an active
        min_tokens ban, penalties, a temperature other than 1)."""
        p = s.params
        return bool(p.logits_processors or p.logit_bias or s.num_output_tokens < p.min_tokens or p.needs_penalties
                    or (not greedy and p.temperature != 1.0))

    def _apply_processors_and_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        vocab = logits.shape[1]
        for i, s in enumerate(seqs):
            p = s.params
            for proc in p.logits_processors:
                result = proc(s.output_token_ids, logits[i])
                if not isinstance(result, torch.Tensor) or result.shape != logits[i].shape:
                    raise ValueError("a logits processor must return a tensor shaped like the logits row it was given")
                logits[i] = result
            if p.logit_bias:
                ids = [t for t in p.logit_bias if t < vocab]
                logits[i, ids] += torch.tensor([p.logit_bias[t] for t in ids], dtype=logits.dtype, device=logits.device)
            if s.num_output_tokens < p.min_tokens:
                banned = [t for t in [self.eos_token_id, *p.stop_token_ids] if t < vocab]
                logits[i, banned] = float("-inf")
            if p.needs_penalties:
                self._penalise(logits, i, s)
        return logits

    @staticmethod
    def _penalise(logits: torch.Tensor, i: int, s: Sequence) -> None:
        p, row, vocab = s.params, logits[i], logits.shape[1]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(s.token_ids)), dtype=torch.long, device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and s.num_output_tokens:
            out_ids = torch.tensor(s.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        row.clamp_(max=torch.finfo(row.dtype).max)  # a tiny repetition penalty must not make +inf (-inf stays banned)

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        # Few torch calls on the common path (every row unseeded, temperature 1): each costs tens of microseconds
        # here, right after a model step has flushed the caches (measured on a 2-core Intel Xeon: the draw's work
        # outside the C++ sampler call 6.8 -> 1.9 ms per step at 64 rows, 1.4 -> 0.9 ms at one).
        device = logits.device
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if len(unseeded) == len(seqs):  # the same draws as filling the unseeded rows in order
            uniform = torch.rand(len(seqs), dtype=torch.float64, generator=self.generator)
        else:
            uniform = torch.empty(len(seqs), dtype=torch.float64)
            if unseeded:
                uniform[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, generator=self.generator)
            for i, s in enumerate(seqs):
                if s.generator is not None:
                    uniform[i] = torch.rand((), dtype=torch.float64, generator=s.generator)
        # Greedy rows (temperature below 1e-5 included) are sampled at 1.0 and replaced by the argmax below: a tiny
        # temperature must not turn the logits into infinities.
        temps = [1.0 if g else s.params.temperature for s, g in zip(seqs, greedy)]
        # top_k past the vocabulary means no top-k (and must fit int64); a top_p below float32's range keeps only the
        # top token, as it would in exact arithmetic.
        vocab = logits.shape[1]
        top_k = torch.tensor([min(s.params.top_k, vocab) for s in seqs], dtype=torch.int64, device=device)
        top_p = torch.tensor([max(s.params.top_p, 1e-30) for s in seqs], dtype=torch.float32, device=device)
        min_p = torch.tensor([s.params.min_p for s in seqs], dtype=torch.float32, device=device)
        if all(t == 1.0 for t in temps):  # x / 1 == x: no (B, V) division
            scaled = logits.contiguous()
        else:
            # In place, as the penalties above: a new (B, V) tensor each step cost ~0.7 ms more at 16 rows in the engine
            # (not in isolation; the cause is not established). Greedy rows are divided by 1, which leaves them as
            # they were for the argmax below.
            with OneTorchThread(device):
                scaled = logits.div_(torch.tensor(temps, dtype=logits.dtype, device=device)[:, None]).contiguous()
        sampled = dispatch.get("topk_topp_minp_sample", device)(scaled, top_k, top_p, min_p, uniform.to(device))
        if any(greedy):
            is_greedy = torch.tensor(greedy, device=device)
            sampled = torch.where(is_greedy, dispatch.argmax(logits), sampled)
        return sampled
