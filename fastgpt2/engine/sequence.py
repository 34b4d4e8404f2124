"""Sequence: one sample of one request, as the scheduler and block manager see it (plain Python, no tensors)."""
from __future__ import annotations

import enum
import itertools

from fastgpt2.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, index: int = 0):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chain key of each full, computed block of block_table
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.needs_fork = params.n > 1 and index == 0  # the parent forks its siblings after prefill
        # Engine-side state (generator, detokenizer, logprobs) is attached by the engine.
        self.generator = None
        self.detok = None
        self.output_text = ""
        self.cumulative_logprob = 0.0
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.arrival = 0.0
        self.first_token_time = None
        self.num_preemptions = 0  # times its blocks were freed to make room (it is then recomputed)
        self.finish_time = None
        # Prompt logprobs (engine/prompt_logprobs.py): one entry per prompt token, filled as prefill chunks run.
        self.prompt_logprobs: list | None = None
        self.next_prompt_logits: int | None = None  # first prompt position whose logits are still wanted

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_cacheable_tokens(self) -> int:
        """Tokens a prefix-cache hit may cover: the last token, and every prompt position whose logits are still
        wanted, must be computed."""
        last = self.num_tokens - 1
        return last if self.next_prompt_logits is None else min(last, self.next_prompt_logits)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
