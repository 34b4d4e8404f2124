"""What `LLM.generate` returns: one RequestOutput per prompt with one CompletionOutput per sample."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str  # generated text, stop string and EOS excluded
    token_ids: list[int]  # generated ids (a final EOS / stop token id included, as in vLLM)
    finish_reason: str | None  # 'stop' (EOS, stop string or stop token) | 'length' (max_tokens or context)
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs, when logprobs were requested
    logprobs: list | None = None  # per token: {token_id: logprob} of the sampled token and the top-N


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: dict = field(default_factory=dict)  # arrival, first_token, finish (time.perf_counter); num_preemptions
    prompt_logprobs: list | None = None  # per prompt token: None (the first), else {token_id: logprob} of it + top-N
