"""LLM: the Python API. `generate` for batches, `stream` for low-latency text deltas of one prompt."""
from __future__ import annotations

import os
import warnings
from typing import Iterator

import torch

from fastgpt2.model.config import GPT2Config
from fastgpt2.engine.cpu_step import CpuStep
from fastgpt2.engine.llm_engine import MAX_LOGPROBS, LLMEngine, as_token_ids
from fastgpt2.model.checkpoint import DTYPE_NAMES
from fastgpt2.model.gpt2 import GPT2
from fastgpt2.engine.outputs import RequestOutput
from fastgpt2.engine.sampling_params import SamplingParams
from fastgpt2.engine.perplexity import PerplexityResult, text_perplexity
from fastgpt2.engine.scoring import Score, score_pairs
from fastgpt2.model.tokenizer import Tokenizer


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them, bfloat16 matmuls on CPU are emulated and far slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _effective_dtype(device, dtype):
    """(dtype to load the model in, whether to keep its weights in bfloat16 for the C++ step).

    bfloat16 on a CPU (said once) means bfloat16 weights with float32 arithmetic: the model's weights are rounded to
    bfloat16, the C++ step reads them as bfloat16 (half the bytes per token), widens them in registers and keeps its
    batch invariance, and the KV cache stays float32. So it is wherever the C++ step serves the model, and on any CPU
    without AVX512-BF16/AMX, where torch would emulate bf16 matmuls far slower than float32. Only a CPU with native
    bf16 and without the C++ step (not built, or FASTGPT2_NATIVE_DECODE=0) runs the torch model in bfloat16.
    """
    cpu = device is None and not torch.cuda.is_available() or device is not None and str(device).startswith("cpu")
    if cpu and dtype in ("bfloat16", "bf16", torch.bfloat16):
        if CpuStep.enabled():
            warnings.warn("on the CPU, bfloat16 means bfloat16 weights with float32 arithmetic in the C++ step and a "
                          "float32 KV cache", stacklevel=3)
            return torch.float32, True
        if not cpu_has_native_bf16():
            warnings.warn("this CPU has no AVX512-BF16/AMX, so bfloat16 means bfloat16 weights with float32 "
                          "arithmetic and a float32 KV cache", stacklevel=3)
            return torch.float32, True
    return dtype, False


class LLM:
    """A GPT-2 served by the paged-KV engine.

    Parameters
    ----------
    model : hub id ('gpt2', 'openai-community/gpt2-xl'), preset name ('124M'; official weights), local Hugging Face
        directory, a GPT2Config (random weights) or a GPT2 module.
    device, dtype : 'cpu'/'cuda' and 'float32'/'bfloat16'/'float16' (CUDA); chosen automatically when None. On a CPU,
        'bfloat16' keeps the weights in bfloat16 and computes in float32 (the C++ step; see _effective_dtype).
    seed : seed of the generator used by requests that have no seed of their own.
    kv_cache_memory : bytes of KV cache (default: enough for max_num_seqs full contexts, at most 2 GiB on CPU or
        80% of free GPU memory).
    block_size : tokens per KV block. max_num_seqs, max_num_batched_tokens : the per-step batch limits.
    enforce_eager : on CUDA, run decode steps eagerly instead of replaying CUDA graphs (captured at start-up for
        batch sizes 1, 2, 4, ... max_num_seqs; as vLLM's flag).
    max_logprobs : the largest `logprobs` a request may ask for (20, as in vLLM).
    quantization : None, or 'int8' (CPU): int8 as llama.cpp's q8_0 computes it (blocks of 32 inputs per scale,
        float32 scales) for every weight matrix and the tied LM head, each token's activations quantised the same
        way, integer dot products per block in the C++ step; the model's own parameters are replaced by the
        dequantised values and its layers quantise their inputs, so that every path computes the same function.
    """

    def __init__(self, model="gpt2", *, device=None, dtype=None, seed: int = 0, kv_cache_memory: int | None = None,
                 block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, tokenizer: Tokenizer | str | None = None,
                 enforce_eager: bool = False, max_logprobs: int = MAX_LOGPROBS, quantization: str | None = None):
        _check_quantization(quantization, device, dtype)
        if isinstance(model, GPT2):
            _check_instance_matches(model, device, dtype)
            if quantization == "int8" and model.decode_weight_dtype != "int8":
                raise ValueError("quantization='int8' with a GPT2 module: call model.quantize_weights_int8() first "
                                 "(it replaces the module's weights by their int8 values in place)")
            self.model = model.eval()
        else:
            load_dtype, bf16_weights = _effective_dtype(device, dtype)
            self.model = GPT2.from_pretrained(model, device=device, dtype=load_dtype)
            if bf16_weights:
                self.model.round_weights_to_bfloat16()
            if quantization == "int8":
                self.model.quantize_weights_int8()
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer or getattr(self.model, "checkpoint_dir", None)
            tokenizer = Tokenizer.from_pretrained(source)
        self.tokenizer = tokenizer
        self.engine = LLMEngine(self.model, tokenizer, seed=seed, kv_cache_memory=kv_cache_memory,
                                block_size=block_size, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
                                max_logprobs=max_logprobs)

    @property
    def config(self) -> GPT2Config:
        return self.model.config

    def save_pretrained(self, directory) -> None:
        self.model.save_pretrained(directory, self.tokenizer)

    def load_weights(self, weights) -> None:
        """Serve new weights (after fine-tuning, say) without rebuilding the engine.

        weights : a GPT2 of the same architecture, its state_dict(), or anything GPT2.from_pretrained loads (a
            checkpoint directory, a hub id). Every copy derived from the old weights is refreshed and the prefix cache
            is dropped, so no later request sees stale weights. No request may be in flight.
        """
        if isinstance(weights, GPT2):
            state_dict = weights.state_dict()
        elif isinstance(weights, dict):
            state_dict = weights
        elif isinstance(weights, (str, os.PathLike)):
            if self.engine.has_unfinished():  # before reading gigabytes from disk
                raise ValueError("load_weights needs an idle engine: finish or abort the requests in flight first")
            loaded = GPT2.from_pretrained(weights, device=self.model.wte.weight.device, dtype=self.model.wte.weight.dtype)
            fields = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon")
            if any(getattr(loaded.config, f) != getattr(self.model.config, f) for f in fields):
                raise ValueError(f"{os.fspath(weights)} holds a different architecture ({loaded.config}) than the "
                                 f"served model ({self.model.config})")
            state_dict = loaded.state_dict()
        else:
            raise TypeError(f"weights must be a GPT2, a state_dict or a checkpoint path, got {type(weights).__name__}")
        self.engine.load_weights(state_dict)

    @staticmethod
    def _normalise_prompts(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, torch.Tensor) or type(prompts).__module__ == "numpy":
            if getattr(prompts, "ndim", None) == 2:  # (num_prompts, num_tokens) token ids
                return [row for row in prompts]
        ids = as_token_ids(prompts)
        if ids is not None and (ids or not isinstance(prompts, (list, tuple))):
            return [ids]  # one prompt of token ids
        if isinstance(prompts, (list, tuple)):
            return list(prompts)
        raise TypeError(f"prompts must be a str, a list of str, or (lists of) token ids, got {type(prompts).__name__}")

    def generate(self, prompts, sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order. sampling_params: one for all prompts, or one per prompt."""
        prompts = self._normalise_prompts(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts; pass one "
                                 f"SamplingParams or exactly one per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        # Validate every prompt before any is queued, so a bad one leaves the engine untouched.
        for p, sp in zip(prompts, params):
            self.engine.check_request(p, sp)
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(prompts) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc="generate", unit="req", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]

    def score(self, pairs, use_tqdm: bool = True) -> list[Score]:
        """lm-eval's loglikelihood: for (context, continuation) pairs (str or token ids), one Score(logprob,
        is_greedy) tuple per pair, in input order; details in fastgpt2/engine/scoring.py."""
        return score_pairs(self.engine, pairs, use_tqdm)

    def perplexity(self, text, stride: int = 512, prepend_eos: bool = False,
                   use_tqdm: bool = True) -> PerplexityResult:
        """Sliding-window perplexity of a text (str or token ids; a list of them: documents pooled over tokens): each
        token scored once, past the first window with n_positions - stride or more tokens of context; a
        PerplexityResult (perplexity, mean_nll, num_tokens, num_bytes, bits_per_byte); see engine/perplexity.py."""
        return text_perplexity(self.engine, text, stride, prepend_eos, use_tqdm)

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as tokens arrive; UTF-8 safe, stop strings never shown. The joined
        deltas always equal the final text, also when another caller's step (a second stream, a generate() call)
        finished this request. Closing the generator early aborts the request and frees its blocks."""
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams) or params.n != 1:
            self.engine.check_request(prompt, params)  # a TypeError for anything but SamplingParams
            raise ValueError("stream() yields one completion; use n=1 (or generate() for several samples)")
        self.engine.check_request(prompt, params)  # bad input fails here, not at the first next()
        return self._stream(prompt, params)

    def _stream(self, prompt, params: SamplingParams) -> Iterator[str]:
        rid = self.engine.add_request(prompt, params)
        seq = self.engine.requests[rid][1][0]
        # Text that could still turn out to be the start of a stop string is held back.
        hold = max((len(s) for s in params.stop), default=1) - 1
        sent = 0
        try:
            finished = False
            while not finished:
                if not seq.is_finished:
                    self.engine.step()
                # Read once: while suspended at the yield, another caller's step may finish the sequence, and the
                # next pass must still send what that step added.
                finished = seq.is_finished
                end = len(seq.output_text) if finished else max(sent, len(seq.output_text) - hold)
                if end > sent:
                    yield seq.output_text[sent:end]
                    sent = end
        finally:
            if not seq.is_finished:
                self.engine.abort(rid)
            else:
                self.engine.requests.pop(rid, None)

    def beam_search(self, prompts, beam_width: int = 4, max_tokens: int = 16, length_penalty: float = 1.0,
                    early_stopping: bool | str = False, ignore_eos: bool = False, n: int = 1) -> list[RequestOutput]:
        """transformers' beam search (num_beams=beam_width) on the paged KV cache, all prompts batched: one
        RequestOutput per prompt with its n best finished sequences, best first, each with cumulative_logprob and
        score; details in fastgpt2/engine/beam_search.py. Needs an idle engine."""
        from fastgpt2.engine.beam_search import BeamSearchParams, beam_search

        params = BeamSearchParams(beam_width, max_tokens, length_penalty, early_stopping, ignore_eos, n)
        return beam_search(self.engine, self._normalise_prompts(prompts), params)


def _check_quantization(quantization, device, dtype) -> None:
    """quantization=None or 'int8'; int8 is a CPU format over float32 arithmetic."""
    if quantization is None:
        return
    if quantization != "int8":
        raise ValueError(f"quantization must be None or 'int8', got {quantization!r}")
    if device is not None and not str(device).startswith("cpu") or device is None and torch.cuda.is_available():
        raise ValueError("quantization='int8' runs on the CPU only; pass device='cpu'")
    if dtype not in (None, "float32", torch.float32):
        raise ValueError(f"quantization='int8' computes in float32; leave dtype unset or 'float32', got {dtype!r}")


def _check_instance_matches(model: GPT2, device, dtype) -> None:
    """LLM(a GPT2 instance) serves the module where it is, as it is; device= or dtype= that differ are refused."""
    weight = model.wte.weight
    if device is not None and torch.device(device).type != weight.device.type:
        raise ValueError(f"device={device!r} does not match the given GPT2 module, which is on {weight.device}; "
                         f"move it first (model.to({str(device)!r})) or leave device unset")
    if dtype is not None:
        if DTYPE_NAMES.get(dtype, dtype) != weight.dtype:
            raise ValueError(f"dtype={dtype!r} does not match the given GPT2 module, whose weights are "
                             f"{weight.dtype}; convert it first or leave dtype unset")
