"""LLMEngine: requests in, tokens out; owns the scheduler, the block manager, the model runner and the sampler."""
from __future__ import annotations

import itertools
import numbers
import time

import torch

from fastgpt2.engine.block_manager import BlockManager
from fastgpt2.model.gpt2 import GPT2
from fastgpt2.engine.model_runner import ModelRunner, kv_bytes_per_block
from fastgpt2.engine.outputs import CompletionOutput, RequestOutput
from fastgpt2.engine.prompt_logprobs import prompt_logits_rows, record_prompt_logprobs, want_prompt_logprobs
from fastgpt2.engine.sampler import SampleResult, Sampler
from fastgpt2.engine.sampling_params import SamplingParams
from fastgpt2.engine.scheduler import Scheduler
from fastgpt2.engine.sequence import Sequence
from fastgpt2.model.tokenizer import Tokenizer

_DEFAULT_CPU_KV_BYTES = 2 << 30
MAX_LOGPROBS = 20  # top-N logprobs per token at most by default, as vLLM's max_logprobs
_VOCAB_PAD_MULTIPLE = 128  # a checkpoint's embedding may be padded up to the next multiple (nanoGPT: 50257 -> 50304)


def sampling_vocab_size(model_vocab_size: int, tokenizer_vocab_size: int) -> int:
    """Token ids the engine may emit: the tokenizer's, when the model's embedding is only padded past it."""
    padded = -(-tokenizer_vocab_size // _VOCAB_PAD_MULTIPLE) * _VOCAB_PAD_MULTIPLE
    if not tokenizer_vocab_size <= model_vocab_size <= padded:
        raise ValueError(f"the model's vocabulary has {model_vocab_size} tokens but its tokenizer has "
                         f"{tokenizer_vocab_size}; load the tokenizer that belongs to this checkpoint (only padding "
                         f"the embedding up to {padded} rows is allowed)")
    return tokenizer_vocab_size


def as_token_ids(prompt) -> list[int] | None:
    """A 1-D integer list, tuple, numpy array or tensor as a list of Python ints; None for anything else."""
    if isinstance(prompt, torch.Tensor) or type(prompt).__module__ == "numpy":
        if getattr(prompt, "ndim", None) != 1:
            return None
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)) and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    return None


class LLMEngine:
    def __init__(self, model: GPT2, tokenizer: Tokenizer, *, seed: int = 0, kv_cache_memory: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, max_logprobs: int = MAX_LOGPROBS):
        for name, value, lo in (("block_size", block_size, 1), ("max_num_seqs", max_num_seqs, 1),
                                ("max_num_batched_tokens", max_num_batched_tokens, 1), ("max_logprobs", max_logprobs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.vocab_size = sampling_vocab_size(model.config.vocab_size, tokenizer.vocab_size)
        self.max_logprobs = max_logprobs
        self.block_size = block_size
        bytes_per_block = kv_bytes_per_block(model, block_size)
        if kv_cache_memory is None:
            kv_cache_memory = self._default_kv_bytes(max_num_seqs, bytes_per_block)
        if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int) or kv_cache_memory < bytes_per_block:
            raise ValueError(f"kv_cache_memory must be an integer number of bytes >= {bytes_per_block:,} (one block of "
                             f"{block_size} tokens for this model), got {kv_cache_memory!r}")
        num_blocks = kv_cache_memory // bytes_per_block
        self.bytes_per_block = bytes_per_block
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, block_size, max_num_seqs, use_cuda_graphs=not enforce_eager)
        self.sampler = Sampler(tokenizer.eos_token_id, torch.Generator().manual_seed(seed), self.vocab_size)
        self.requests: dict[str, tuple[RequestOutput, list[Sequence]]] = {}
        self._ids = itertools.count()

    def _default_kv_bytes(self, max_num_seqs: int, bytes_per_block: int) -> int:
        # Enough for every sequence at full context, capped by 2 GiB on CPU / 80% of free memory on CUDA.
        want = max_num_seqs * -(-self.config.n_positions // self.block_size) * bytes_per_block
        device = self.model.wte.weight.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return min(want, int(free * 0.8))
        return min(want, _DEFAULT_CPU_KV_BYTES)

    # -- requests -------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            ids, text = as_token_ids(prompt), None
            if ids is None:
                raise TypeError(f"a prompt must be a str or a 1-D sequence of int token ids (list, numpy array or "
                                f"tensor), got {type(prompt).__name__}")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is out of range for a vocabulary of {self.vocab_size}")
        if not ids:  # unconditional generation starts from <|endoftext|>, as in GPT-2's paper
            ids = [self.tokenizer.eos_token_id]
        n_ctx = self.config.n_positions
        if len(ids) >= n_ctx:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is {n_ctx} tokens, which leaves "
                             f"no room for new tokens; shorten the prompt to at most {n_ctx - 1} tokens")
        return text, ids

    def check_request(self, prompt, params: SamplingParams | None) -> tuple[str | None, list[int], SamplingParams]:
        """Everything about one request that can be wrong, checked before anything is queued, so that one bad
        request never fails a batch of good ones. Returns (prompt text or None, prompt token ids, params)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.encode_prompt(prompt)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.max_logprobs:
                raise ValueError(f"{name} must be at most {self.max_logprobs} (this engine's max_logprobs), "
                                 f"got {value}")
        for name, token_ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in token_ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"{name} names token id {bad[0]}, out of range for a vocabulary of {self.vocab_size}")
        self._check_fits(len(ids), params)
        return text, ids, params

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None, *,
                    prompt_logprobs_start: int = 1) -> str:
        """Queue one request. With params.prompt_logprobs, prompt tokens from prompt_logprobs_start on get logprobs
        (the earlier ones None; scoring asks only for a continuation's)."""
        text, ids, params = self.check_request(prompt, params)
        if request_id is None:
            request_id = str(next(self._ids))
            while request_id in self.requests:
                request_id = str(next(self._ids))
        elif request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request; pick another")
        seq = Sequence(request_id, ids, params, index=0)
        self._attach(seq)
        if params.prompt_logprobs is not None:
            want_prompt_logprobs(seq, prompt_logprobs_start)
        out = RequestOutput(request_id, text, ids, metrics={"arrival": time.perf_counter()})
        self.requests[request_id] = (out, [seq])
        self.scheduler.add(seq)
        return request_id

    def _check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        num_tokens = min(num_prompt_tokens + params.max_tokens, self.config.n_positions)
        needed = self.block_manager.blocks_for(num_tokens)
        have = self.block_manager.num_blocks
        if needed > have:
            raise ValueError(
                f"this request needs {needed} KV blocks ({needed * self.bytes_per_block:,} bytes) for "
                f"{num_tokens} tokens but the KV cache holds only {have} blocks ({have * self.bytes_per_block:,} "
                f"bytes); raise kv_cache_memory or lower max_tokens")

    def _attach(self, seq: Sequence) -> None:
        if seq.params.seed is not None:
            seq.generator = torch.Generator().manual_seed((seq.params.seed + seq.index) % 2**64)
        seq.detok = self.tokenizer.incremental_decoder()
        seq.arrival = time.perf_counter()

    @torch.no_grad()
    def load_weights(self, state_dict: dict) -> None:
        """Copy new weights into the served model in place (every name and shape checked first, nothing copied on a
        mismatch), then refresh what was derived from the old ones: the C++ step's copies, the model's
        inference caches, and the prefix cache, whose K/V the old weights computed. No request may be in flight."""
        if self.has_unfinished():
            raise ValueError("load_weights needs an idle engine: finish or abort the requests in flight first")
        params = dict(self.model.named_parameters())
        if set(state_dict) != set(params):
            missing = sorted(set(params) - set(state_dict))
            extra = sorted(set(state_dict) - set(params))
            raise ValueError(f"the new weights do not match the served model's parameters (missing: {missing[:3]}, "
                             f"unexpected: {extra[:3]}); pass a GPT2 state_dict of the same architecture")
        for name, param in params.items():
            new = state_dict[name]
            if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(param.shape):
                shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"new weight {name} has shape {shape}, the served model's is {tuple(param.shape)}")
            if not new.is_floating_point():
                raise ValueError(f"new weight {name} has dtype {new.dtype}; weights must be floating point")
        for name, param in params.items():
            param.copy_(state_dict[name])
        if self.model.decode_weight_dtype == torch.bfloat16:
            self.model.round_weights_to_bfloat16()  # bf16 weights with float32 arithmetic: round the new ones too
        elif self.model.decode_weight_dtype == "int8":
            self.model.quantize_weights_int8()  # int8 weights: quantise the new ones too
        self.runner.refresh_weights()
        self.block_manager.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step -------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, and update sequences. Returns the requests that finished this step.

        Atomic for the engine: if anything raises inside the step (the model, a logits processor, the sampler, a
        KeyboardInterrupt), every request scheduled in it is aborted (its blocks freed), the unseeded generator is
        rewound, and the exception propagates; the engine then serves later requests as a fresh one would."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        generator_state = self.sampler.generator.get_state()
        try:
            return self._run_step(sched)
        except BaseException:
            for request_id in dict.fromkeys(seq.request_id for seq in sched.seqs):
                self.abort(request_id)
            self.sampler.generator.set_state(generator_state)
            raise

    def _plain_greedy(self, sched, sample_mask: list[bool], prompt_rows) -> bool:
        """Whether every row this step samples takes the raw logits' argmax and nothing else reads them (no logprobs,
        prompt logprobs, logits processors, logit bias, min_tokens ban, penalties or fork): the C++ step then picks
        the tokens in its LM head's epilogue (the sampler's argmax on the same logits, bitwise) without writing them."""
        if not self.runner.fuses_greedy or prompt_rows is not None:
            return False
        for seq, sample in zip(sched.seqs, sample_mask):
            p = seq.params
            if sample and not (p.greedy and p.logprobs is None and not p.logits_processors and not p.logit_bias
                               and seq.num_output_tokens >= p.min_tokens and not p.needs_penalties
                               and not seq.needs_fork):
                return False
        return True

    def _run_step(self, sched) -> list[RequestOutput]:
        sample_mask = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in zip(sched.seqs, sched.num_new_tokens)]
        prompt_rows = prompt_logits_rows(sched)
        if self._plain_greedy(sched, sample_mask, prompt_rows):
            return self._finish_step(sched, sample_mask, None, self.runner.run(sched, sample_mask, None,
                                                                                greedy_limit=self.vocab_size))
        logits = self.runner.run(sched, sample_mask, prompt_rows)
        if prompt_rows is not None:
            num_sampled = sum(sample_mask)
            record_prompt_logprobs(sched, prompt_rows, logits[num_sampled:], self.vocab_size)
            logits = logits[:num_sampled]
        return self._finish_step(sched, sample_mask, logits, None)

    def _finish_step(self, sched, sample_mask: list[bool], logits, greedy_tokens) -> list[RequestOutput]:
        """Commits the step's tokens, samples the rows in sample_mask from logits (or takes greedy_tokens, the
        step's own picks) and appends them."""
        rows = []
        for seq, n, sample in zip(sched.seqs, sched.num_new_tokens, sample_mask):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
            if sample:
                rows.append(seq)
        if not rows:
            return []
        if greedy_tokens is not None:
            result = SampleResult(greedy_tokens.tolist(), [None] * len(rows))
        else:
            rows, logits = self._fork(rows, logits)
            result = self.sampler(logits, rows)
        finished = []
        now = time.perf_counter()
        for seq, token, lp in zip(rows, result.token_ids, result.logprobs):
            if self._append(seq, token, lp, now):
                done = self._maybe_finish_request(seq.request_id)
                if done is not None:
                    finished.append(done)
        return finished

    def _fork(self, rows: list[Sequence], logits: torch.Tensor):
        """A parent whose prompt was just prefilled gets n-1 siblings sharing its blocks; each samples its own token."""
        if not any(s.needs_fork for s in rows):
            return rows, logits
        new_rows, index = [], []
        for i, seq in enumerate(rows):
            new_rows.append(seq)
            index.append(i)
            if seq.needs_fork:
                seq.needs_fork = False
                out, seqs = self.requests[seq.request_id]
                for k in range(1, seq.params.n):
                    child = Sequence(seq.request_id, seq.token_ids, seq.params, index=k)
                    self._attach(child)
                    self.block_manager.fork(seq, child)
                    self.scheduler.add_running(child)
                    seqs.append(child)
                    new_rows.append(child)
                    index.append(i)
        return new_rows, logits[index]

    def _append(self, seq: Sequence, token: int, lp, now: float) -> bool:
        """Add a sampled token; finish the sequence on EOS, a stop token or string, max_tokens or the context end."""
        p = seq.params
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if lp is not None:
            seq.cumulative_logprob += lp[0]
            seq.logprobs.append({token: lp[0], **lp[1]})
        reason, stopped_by_string = None, False
        if (token == self.tokenizer.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"  # the token ends the text and is not part of it
        else:
            before = len(seq.output_text)
            seq.output_text += seq.detok.push(token)
            # Stop strings count only from min_tokens on, as in vLLM.
            if p.stop and seq.num_output_tokens >= p.min_tokens and self._truncate_at_stop(seq, before):
                reason, stopped_by_string = "stop", True
        if reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.n_positions):
            reason = "length"
        if reason is None:
            return False
        if not stopped_by_string:
            seq.output_text += seq.detok.flush()  # bytes of an unfinished character, as U+FFFD
        seq.finish_time = now
        self.scheduler.finish(seq, reason)
        return True

    @staticmethod
    def _truncate_at_stop(seq: Sequence, before: int) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, before - longest + 1)
        hits = [i for i in (seq.output_text.find(s, start) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.output_text = seq.output_text[:min(hits)]
        return True

    def _maybe_finish_request(self, request_id: str) -> RequestOutput | None:
        out, seqs = self.requests[request_id]
        if len(seqs) < seqs[0].params.n or not all(s.is_finished for s in seqs):
            return None
        del self.requests[request_id]
        out.outputs = [
            CompletionOutput(s.index, s.output_text, s.output_token_ids, s.finish_reason,
                             s.cumulative_logprob if s.logprobs is not None else None, s.logprobs)
            for s in sorted(seqs, key=lambda s: s.index)
        ]
        out.finished = True
        out.prompt_logprobs = seqs[0].prompt_logprobs
        out.metrics.update(first_token=min(s.first_token_time for s in seqs), finish=max(s.finish_time for s in seqs),
                           num_preemptions=sum(s.num_preemptions for s in seqs))
        return out

    def abort(self, request_id: str) -> None:
        out, seqs = self.requests.pop(request_id, (None, []))
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
