"""SamplingParams: one request's decoding parameters, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

# (generated_ids, logits (vocab,) float32 tensor) -> logits
GREEDY_TEMPERATURE = 1e-5  # temperatures below this mean greedy decoding, as vLLM's _SAMPLING_EPS
LogitsProcessor = Callable[[list, "object"], "object"]


def _number(name, value, lo=None, hi=None, lo_open=False, hi_open=False, allowed=""):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _int(name, value, lo, allowed):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass(slots=True)
class SamplingParams:
    """Decoding parameters of one request (vLLM's names and meanings).

    Logits are transformed in this fixed order: logits processors -> logit_bias -> min_tokens EOS ban ->
    repetition/presence/frequency penalties -> temperature (0 = greedy) -> top-k -> top-p -> min-p -> draw.
    """

    n: int = 1  # samples per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 (or below 1e-5) means greedy (argmax, ties to the lowest id)
    top_k: int = 0  # 0 (or -1) disables
    top_p: float = 1.0  # in (0, 1]; 1 disables
    min_p: float = 0.0  # in [0, 1]; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # > 0; HF/CTRL style over prompt and output tokens
    presence_penalty: float = 0.0  # in [-2, 2]; OpenAI style over output tokens
    frequency_penalty: float = 0.0  # in [-2, 2]; OpenAI style over output tokens
    logit_bias: dict | None = None  # token id -> additive bias
    seed: int | None = None  # per-request seed: same seed, same output, whatever else is batched
    max_tokens: int = 16  # new tokens at most (also stopped by the model's context)
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens exist
    stop: Sequence[str] | str | None = None  # stop strings, not included in the output text
    stop_token_ids: Sequence[int] | None = None  # extra ids that end the request (included in token_ids)
    ignore_eos: bool = False  # keep going past <|endoftext|>
    logprobs: int | None = None  # top-N logprobs per generated token (from the model's raw distribution)
    logits_processors: list = field(default_factory=list)  # callables (generated_ids, logits) -> logits
    prompt_logprobs: int | None = None  # logprob of each prompt token and the top-N there (raw distribution)

    def __post_init__(self):
        _int("n", self.n, 1, "an integer >= 1")
        _number("temperature", self.temperature, lo=0.0, allowed="a number >= 0 (0 means greedy)")
        if self.top_k == -1:
            self.top_k = 0
        _int("top_k", self.top_k, 0, "an integer >= 0 (0 or -1 disables top-k)")
        _number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True, allowed="in (0, 1]")
        _number("min_p", self.min_p, lo=0.0, hi=1.0, allowed="in [0, 1]")
        _number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True, allowed="a number > 0")
        _number("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0, allowed="in [-2, 2]")
        _number("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0, allowed="in [-2, 2]")
        _int("max_tokens", self.max_tokens, 1, "an integer >= 1")
        _int("min_tokens", self.min_tokens, 0, "an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.seed is not None:
            _int("seed", self.seed, 0, "an integer in [0, 2**64 - 1]")
            if self.seed >= 2**64:
                raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, "an integer >= 0")
        if self.prompt_logprobs is not None:
            _int("prompt_logprobs", self.prompt_logprobs, 0, "an integer >= 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, 0, "a list of non-negative token ids")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            for k, v in self.logit_bias.items():
                _int("logit_bias key", int(k) if isinstance(k, str) and k.isdigit() else k, 0, "a token id >= 0")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"logit_bias value must be a finite number, got {v!r} for token {k!r}; ban a "
                                     f"token with a large negative bias such as -100")
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if not all(callable(p) for p in self.logits_processors):
            raise ValueError("logits_processors must be callables (generated_ids, logits) -> logits")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
