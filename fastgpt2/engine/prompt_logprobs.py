"""Prompt logprobs: which prompt positions of a scheduled batch need logits, and their logprobs once computed.

A request that asks gets the logits of its prompt positions chunk by chunk as its prompt is prefilled; a batch in
which no request asks costs one pass over the scheduled sequences and nothing on the device.
"""
from __future__ import annotations

import torch

from fastgpt2.engine.scheduler import SchedulerOutput
from fastgpt2.engine.sequence import Sequence
from fastgpt2.kernels import dispatch


def want_prompt_logprobs(seq: Sequence, first_token: int = 1) -> None:
    """Ask for the logprobs of seq's prompt tokens from first_token on (token 0 has no context: always None).

    The logits at position p give token p + 1's logprob, so positions first_token - 1 .. num_prompt_tokens - 2 are
    wanted; the prefix cache serves only blocks before the first of them (Sequence.num_cacheable_tokens)."""
    seq.prompt_logprobs = [None] * seq.num_prompt_tokens
    first_position = max(first_token, 1) - 1
    seq.next_prompt_logits = first_position if first_position < seq.num_prompt_tokens - 1 else None


def prompt_logits_rows(sched: SchedulerOutput) -> list[range] | None:
    """Per scheduled sequence, the positions of its chunk whose logits are wanted for prompt logprobs (an empty
    range for most); None when no sequence of the batch wants any."""
    if all(seq.next_prompt_logits is None for seq in sched.seqs):
        return None
    rows = []
    for seq, n in zip(sched.seqs, sched.num_new_tokens):
        start, first = seq.num_computed_tokens, seq.next_prompt_logits
        if first is None:
            rows.append(range(0))
            continue
        assert start <= first, "a prefix-cache hit covered a position whose logits are still wanted"
        rows.append(range(first, max(first, min(start + n, seq.num_prompt_tokens - 1))))
    return rows if any(rows) else None


@torch.inference_mode()
def record_prompt_logprobs(sched: SchedulerOutput, rows: list[range], logits: torch.Tensor, vocab_size: int) -> None:
    """Fill prompt_logprobs from the wanted rows' logits.

    Parameters
    ----------
    rows : from prompt_logits_rows(sched), before the step advanced num_computed_tokens.
    logits : (sum of len(rows), V) float32, the rows in that order. Columns past vocab_size (embedding padding) are
        dropped, as the sampler drops them; logprobs are those of the raw distribution (log_softmax of the logits).
    """
    wanted = [(seq, r) for seq, r in zip(sched.seqs, rows) if r]
    targets = [seq.token_ids[p + 1] for seq, r in wanted for p in r]
    k = max(seq.params.prompt_logprobs or 0 for seq, _ in wanted)
    # (R,) and (R, k) lists, without a (R, vocab_size) log_softmax (C++ on the CPU)
    actual, top_ids, top_values = dispatch.row_logprobs(logits[:, :vocab_size], targets, k)
    i = 0
    for seq, r in wanted:
        num_top = seq.params.prompt_logprobs or 0
        for p in r:
            entry = {seq.token_ids[p + 1]: actual[i]}
            entry.update(zip(top_ids[i][:num_top], top_values[i][:num_top]))
            seq.prompt_logprobs[p + 1] = entry
            i += 1
        seq.next_prompt_logits = r.stop if r.stop < seq.num_prompt_tokens - 1 else None
