"""Sliding-window perplexity on the engine: each token scored once, with windows of up to n_positions tokens batched
through prefill; and the window scoring behind lm-evaluation-harness' loglikelihood and loglikelihood_rolling."""
from __future__ import annotations

import math
from collections import Counter
from contextlib import closing
from dataclasses import asdict, dataclass

import torch

from fastgpt2.engine.llm_engine import LLMEngine, as_token_ids
from fastgpt2.engine.outputs import RequestOutput
from fastgpt2.engine.scoring import Score
from fastgpt2.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    perplexity: float  # exp(mean_nll)
    mean_nll: float  # total negative log-likelihood / num_tokens, in nats
    num_tokens: int  # tokens scored
    num_bytes: int  # UTF-8 bytes of the text (token ids: of their decoded text)
    bits_per_byte: float  # total NLL / (num_bytes * ln 2), as lm-eval defines it

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(num_tokens: int, window_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Hugging Face's "perplexity of fixed-length models" windows, as (begin, end, first scored) triples: window k
    covers tokens [k * stride, min(k * stride + window_len, num_tokens)) and scores those no earlier window scored.
    Token 0 has no context and is never scored; stride < window_len gives every other token one."""
    windows, prev_end = [], 1
    for begin in range(0, num_tokens, stride):
        end = min(begin + window_len, num_tokens)
        if end > prev_end:
            windows.append((begin, end, prev_end))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def rolling_windows(num_tokens: int, window_len: int, stride: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling windows (utils.get_rolling_token_windows with max_seq_len = window_len - 1 and context_len =
    window_len - stride, then make_disjoint_window) over tokens whose token 0 is the prefix (<|endoftext|>): the
    first window covers [0, window_len); each later one scores the next `stride` tokens (fewer at the end) and
    reaches back a whole window_len, the last one included."""
    if num_tokens < 2:
        return []
    end = min(window_len, num_tokens)
    windows = [(0, end, 1)]
    while end < num_tokens:
        new_end = min(end + stride, num_tokens)
        windows.append((max(0, new_end - window_len), new_end, end))
        end = new_end
    return windows


def text_perplexity(engine: LLMEngine, text, stride: int = 512, prepend_eos: bool = False,
                    use_tqdm: bool = True) -> PerplexityResult:
    """exp of the mean per-token NLL over a whole text: a str or token ids, or a list of them (documents, each with
    its own windows, pooled over all their tokens). Without prepend_eos the first token of each document is not
    scored (HF's sliding windows); with it, it is conditioned on <|endoftext|> (lm-eval's rolling windows)."""
    documents, num_bytes = _encode_documents(engine, text)
    scored = document_logprobs(engine, documents, stride, prepend_eos, use_tqdm=use_tqdm)
    num_tokens = sum(n for _, n in scored)
    if num_tokens == 0:
        if not any(documents):
            raise ValueError("the text is empty (no tokens): there is nothing to score")
        raise ValueError("the text has nothing to score: without prepend_eos the first token is only context; pass a "
                         "longer text or prepend_eos=True (--prepend-eos on the command line)")
    total_nll = -math.fsum(lp for lp, _ in scored)
    mean_nll = total_nll / num_tokens
    return PerplexityResult(perplexity=math.exp(mean_nll) if mean_nll < 709.0 else math.inf, mean_nll=mean_nll,
                            num_tokens=num_tokens, num_bytes=num_bytes,
                            bits_per_byte=total_nll / (num_bytes * math.log(2)) if num_bytes else math.nan)


def document_logprobs(engine: LLMEngine, documents: list[list[int]], stride: int, prepend_eos: bool,
                      window_len: int | None = None, use_tqdm: bool = True) -> list[tuple[float, int]]:
    """(summed logprob, number of tokens scored) per document of token ids. window_len: tokens per window, at most
    and by default n_positions; stride: tokens newly scored per window, in [1, window_len - 1]."""
    window_len = window_len or engine.config.n_positions
    assert 2 <= window_len <= engine.config.n_positions, window_len
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window_len - 1:
        raise ValueError(f"stride must be an integer in [1, {window_len - 1}] (each window keeps at least one token of "
                         f"context; {window_len - 1} means disjoint windows), got {stride!r}")
    windows, owners = [], []
    for i, ids in enumerate(documents):
        ids = [engine.tokenizer.eos_token_id, *ids] if prepend_eos else ids
        make = rolling_windows if prepend_eos else sliding_windows
        for begin, end, first in make(len(ids), window_len, stride):
            windows.append((ids[begin:end], first - begin))
            owners.append(i)
    scores = score_windows(engine, windows, use_tqdm=use_tqdm)
    totals = [[0.0, 0] for _ in documents]
    for i, (ids, first), score in zip(owners, windows, scores):
        totals[i][0] += score.logprob
        totals[i][1] += len(ids) - first
    return [(lp, n) for lp, n in totals]


def score_windows(engine: LLMEngine, windows: list[tuple[list[int], int]], want_greedy: bool = False,
                  use_tqdm: bool = True, desc: str = "perplexity") -> list[Score]:
    """For each (token_ids, first) window of at most n_positions tokens, the summed logprob of token_ids[first:]
    given the tokens before them, and whether each was the argmax there (None unless want_greedy).

    1. A window is one request. Its prompt is every token but the last, with prompt logprobs from `first` on; the last
       token is the request's one generated token, forced by a logits processor, and its logprob read from the raw
       distribution. So a window holds n_positions tokens while a prompt holds at most n_positions - 1.
    2. Every request is checked before any is queued. They are queued as the token budget frees up (_feed), so each
       step prefills whole windows, as many as max_num_batched_tokens holds.
    3. Windows sharing cacheable context blocks (multiple choice) run in two waves so the second hits the cache.
    """
    top = 1 if want_greedy else 0
    requests = []
    for ids, first in windows:
        assert 1 <= first < len(ids) <= engine.config.n_positions, (first, len(ids))
        prompt = ids[:-1]
        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=top, logits_processors=[_Force(ids[-1])],
                                prompt_logprobs=top if first < len(prompt) else None)
        engine.check_request(prompt, params)
        requests.append((prompt, params, first))
    results: list[Score | None] = [None] * len(windows)
    bar = None
    if use_tqdm and len(windows) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), desc=desc, unit="window", dynamic_ncols=True)
    try:
        for wave in _waves(windows, engine.block_manager.block_size, engine.block_manager.enable_prefix_caching):
            with closing(_feed(engine, [(i, *requests[i]) for i in wave])) as outputs:
                for i, out in outputs:
                    results[i] = _window_score(out, windows[i], want_greedy)  # the output and its logprobs dropped
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


class _Force:
    """A logits processor that leaves `token_id` the only candidate (the sampler reports raw logprobs)."""

    __slots__ = ("token_id",)

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, generated_ids: list, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))  # (V,)
        forced[self.token_id] = 0.0
        return forced


def _window_score(out: RequestOutput, window: tuple[list[int], int], want_greedy: bool) -> Score:
    ids, first = window
    completion = out.outputs[0]
    assert completion.token_ids == [ids[-1]], "the forced token was not generated"
    entries = [out.prompt_logprobs[p] for p in range(first, len(ids) - 1)] + [completion.logprobs[0]]
    logprob = sum(entry[t] for entry, t in zip(entries, ids[first:]))
    is_greedy = all(entry[t] >= max(entry.values()) for entry, t in zip(entries, ids[first:])) if want_greedy else None
    return Score(logprob, is_greedy)


def _waves(windows: list[tuple[list[int], int]], block_size: int, prefix_caching: bool) -> list[list[int]]:
    """Window indices in one wave, or two when windows share cacheable blocks: the first of each group, then the rest
    (requests scheduled in the same step cannot share blocks not computed yet)."""
    if not prefix_caching:
        return [list(range(len(windows)))]
    keys = [tuple(ids[:(first - 1) // block_size * block_size]) for ids, first in windows]
    counts = Counter(key for key in keys if key)
    leaders = {}
    for i, key in enumerate(keys):
        if counts[key] > 1:
            leaders.setdefault(key, i)
    first_wave = set(leaders.values())
    waves = [sorted(first_wave), [i for i in range(len(windows)) if i not in first_wave]]
    return [wave for wave in waves if wave]


def _feed(engine: LLMEngine, requests: list[tuple[int, list[int], SamplingParams, int]]):
    """Yield (index, output) of (index, prompt, params, prompt_logprobs_start) requests as they finish.

    Requests are queued while their prompts fit max_num_batched_tokens together (at least one at a time) and topped
    up after every step: a window split across two steps would prefill its second part over the cache, which on CPU
    takes a masked attention path that is slower than a whole window's causal one. All are aborted on any error.
    """
    budget = engine.scheduler.max_num_batched_tokens
    queued: dict[str, tuple[int, int]] = {}  # request id -> (index, prompt tokens)
    pending_tokens, next_request = 0, 0
    try:
        while next_request < len(requests) or queued:
            while next_request < len(requests) and (
                    not queued or pending_tokens + len(requests[next_request][1]) <= budget):
                index, prompt, params, first = requests[next_request]
                queued[engine.add_request(prompt, params, prompt_logprobs_start=first)] = (index, len(prompt))
                pending_tokens += len(prompt)
                next_request += 1
            for out in engine.step():
                if out.request_id in queued:
                    index, num_tokens = queued.pop(out.request_id)
                    pending_tokens -= num_tokens
                    yield index, out
    except BaseException:
        for rid in queued:
            engine.abort(rid)
        raise


def _encode_documents(engine: LLMEngine, text) -> tuple[list[list[int]], int]:
    """(token ids per document, UTF-8 bytes of all documents) of a str, token ids, or a list of them."""
    if isinstance(text, str) or as_token_ids(text) is not None:
        items = [text]
    elif isinstance(text, (list, tuple)) and text:
        items = list(text)
    else:
        raise TypeError(f"text must be a str, token ids, or a non-empty list of them, got {type(text).__name__}")
    documents, num_bytes = [], 0
    for i, item in enumerate(items):
        if isinstance(item, str):
            documents.append(engine.tokenizer.encode(item))
            num_bytes += len(item.encode("utf-8"))
            continue
        ids = as_token_ids(item)
        if ids is None:
            raise TypeError(f"document {i} must be a str or a 1-D sequence of int token ids, got {type(item).__name__}")
        bad = [t for t in ids if not 0 <= t < engine.vocab_size]
        if bad:
            raise ValueError(f"document {i} has token id {bad[0]}, out of range for a vocabulary of "
                             f"{engine.vocab_size}")
        documents.append(ids)
        num_bytes += len(engine.tokenizer.decode(ids).encode("utf-8"))
    return documents, num_bytes
