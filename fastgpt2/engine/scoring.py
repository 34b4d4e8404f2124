"""Scoring, lm-evaluation-harness' `loglikelihood`: the log-probability of each continuation given its context and
whether it is the greedy continuation, computed on the engine by teacher forcing (prompt logprobs)."""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from fastgpt2.engine.block_manager import BlockManager
from fastgpt2.engine.llm_engine import LLMEngine, as_token_ids
from fastgpt2.engine.outputs import RequestOutput
from fastgpt2.engine.sampling_params import SamplingParams

# One greedy token is generated and discarded (a request generates at least one); top-1 tells whether each
# continuation token is the argmax.
_SCORE_PARAMS = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)


class Score(NamedTuple):
    """One pair's result: a (logprob, is_greedy) tuple, as lm-eval's loglikelihood returns."""

    logprob: float  # sum of the continuation tokens' logprobs given the context (natural log, raw distribution)
    is_greedy: bool  # every continuation token is the argmax at its position (a tie counts as greedy)


def score_pairs(engine: LLMEngine, pairs, use_tqdm: bool = True) -> list[Score]:
    """Score (context, continuation) pairs, each side a str or token ids; one Score per pair, in input order.

    1. Every pair is encoded and checked before any request is queued (encode_pair).
    2. Each pair becomes one request, prompt = context + continuation, asking for the logprobs of the continuation
       tokens only, so the context's full blocks may come from the prefix cache.
    3. Pairs sharing a context run in two waves: one of each group first, the rest once its blocks are cached
       (requests scheduled in the same step cannot share blocks that are not computed yet).
    """
    if not isinstance(pairs, (list, tuple)):
        raise ValueError(f"pairs must be a list of (context, continuation) tuples, got {type(pairs).__name__}")
    if engine.max_logprobs < 1:
        raise ValueError("score needs max_logprobs >= 1 (it reads the top token at each position); raise it")
    encoded = [encode_pair(engine, i, pair) for i, pair in enumerate(pairs)]
    for context, continuation in encoded:
        engine.check_request(context + continuation, _SCORE_PARAMS)  # fits the KV cache
    results: list[Score | None] = [None] * len(encoded)
    bar = None
    if use_tqdm and len(encoded) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(encoded), desc="score", unit="pair", dynamic_ncols=True)
    try:
        for wave in _waves(encoded, engine.block_manager):
            for i, out in zip(wave, _run(engine, [encoded[i] for i in wave], bar)):
                context, continuation = encoded[i]
                entries = out.prompt_logprobs[len(context):]
                logprob = sum(entry[t] for entry, t in zip(entries, continuation))
                is_greedy = all(entry[t] >= max(entry.values()) for entry, t in zip(entries, continuation))
                results[i] = Score(logprob, is_greedy)
    finally:
        if bar is not None:
            bar.close()
    return results


def encode_pair(engine: LLMEngine, index: int, pair) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one pair.

    Strings are encoded separately and the ids concatenated; when both are strings, the context's trailing
    whitespace moves to the continuation first, as lm-eval's HFLM does (GPT-2 encodes ' word' as one token). An
    empty context means <|endoftext|>. A pair longer than n_positions - 1 tokens (the engine's prompt limit) keeps
    its continuation whole and the end of its context, as lm-eval truncates."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(f"pair {index} must be a (context, continuation) tuple, got {pair!r:.60}")
    context, continuation = pair
    if isinstance(context, str) and isinstance(continuation, str):
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = _token_ids(engine, index, "context", context) or [engine.tokenizer.eos_token_id]
    continuation_ids = _token_ids(engine, index, "continuation", continuation)
    if not continuation_ids:
        raise ValueError(f"pair {index} has an empty continuation; there is nothing to score")
    room = engine.config.n_positions - 1 - len(continuation_ids)  # context tokens that fit
    if room < 1:
        raise ValueError(f"pair {index}'s continuation has {len(continuation_ids)} tokens but at most "
                         f"{engine.config.n_positions - 2} fit the model's context after one context token")
    return context_ids[-room:], continuation_ids


def _token_ids(engine: LLMEngine, index: int, name: str, value) -> list[int]:
    if isinstance(value, str):
        return engine.tokenizer.encode(value)
    ids = as_token_ids(value)
    if ids is None:
        raise ValueError(f"pair {index}'s {name} must be a str or a 1-D sequence of int token ids, got "
                         f"{type(value).__name__}")
    bad = [t for t in ids if not 0 <= t < engine.vocab_size]
    if bad:
        raise ValueError(f"pair {index}'s {name} has token id {bad[0]}, out of range for a vocabulary of "
                         f"{engine.vocab_size}")
    return ids


def _waves(encoded: list[tuple[list[int], list[int]]], block_manager: BlockManager) -> list[list[int]]:
    """Pair indices in one wave, or two when contexts share cacheable blocks: the first pair of each such group,
    then the rest."""
    if not block_manager.enable_prefix_caching:
        return [list(range(len(encoded)))]
    bs = block_manager.block_size
    keys = [tuple(context[:(len(context) - 1) // bs * bs]) for context, _ in encoded]  # blocks a hit may cover
    counts = Counter(key for key in keys if key)
    first = {}
    for i, key in enumerate(keys):
        if counts[key] > 1:
            first.setdefault(key, i)
    leaders = set(first.values())
    waves = [sorted(leaders), [i for i in range(len(encoded)) if i not in leaders]]
    return [wave for wave in waves if wave]


def _run(engine: LLMEngine, pairs: list[tuple[list[int], list[int]]], bar) -> list[RequestOutput]:
    """Add one request per pair, step until all finish, and return their outputs in order (aborted on any error)."""
    ids = [engine.add_request(context + continuation, _SCORE_PARAMS, prompt_logprobs_start=len(context))
           for context, continuation in pairs]
    wanted, results = set(ids), {}
    try:
        while engine.has_unfinished():
            for out in engine.step():
                results[out.request_id] = out
                if bar is not None and out.request_id in wanted:
                    bar.update(1)
    except BaseException:
        for rid in ids:
            engine.abort(rid)
        raise
    return [results[rid] for rid in ids]
