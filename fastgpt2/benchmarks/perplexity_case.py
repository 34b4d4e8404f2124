"""The CPU suite's perplexity case: tokens/s of llm.perplexity against transformers' sliding-window loop (Hugging
Face's "perplexity of fixed-length models": one forward per window, labels masked to the tokens not yet scored), on
the same random weights; each call scores a fresh random text, so fastgpt2's prefix cache never hits."""
from __future__ import annotations

import math
import time

import torch

from fastgpt2.benchmarks.common import alternate, median
from fastgpt2.benchmarks.cpu_cases import PROMPT_VOCAB, Systems
from fastgpt2.engine.perplexity import sliding_windows


def transformers_sliding_window(model, ids: list[int], window_len: int, stride: int) -> tuple[float, int]:
    """(total NLL, tokens scored) of transformers' loop: window k is ids[k * stride : k * stride + window_len], its
    loss taken over the tokens no earlier window scored."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window_len, len(ids))
        input_ids = torch.tensor([ids[begin:end]], device=model.device)  # (1, window)
        target = input_ids.clone()
        target[:, :-(end - prev_end)] = -100
        with torch.inference_mode():
            loss = model(input_ids, labels=target, use_cache=False).loss  # mean over the scored, shifted labels
        scored = int((target[:, 1:] != -100).sum())
        nll, count = nll + loss.item() * scored, count + scored
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def perplexity(s: Systems, num_tokens: int, stride: int, repeats: int) -> dict:
    """Seconds to score a num_tokens random text with windows of n_positions tokens: fastgpt2 submits every window
    at once (batched prefill, prompt logprobs of the new tokens only); transformers runs one window per forward.
    Both score num_tokens - 1 tokens; the warm-up window checks that their perplexities agree."""
    window_len = s.llm.config.n_positions
    stride = min(stride, window_len - 1)

    values = {}  # system -> perplexity of its latest text

    def text(n: int) -> list[int]:
        return [s.rng.randrange(PROMPT_VOCAB) for _ in range(n)]

    def run_fastgpt2(ids=None) -> float:
        ids = ids or text(num_tokens)
        start = time.perf_counter()
        result = s.llm.perplexity(ids, stride=stride, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert result.num_tokens == len(ids) - 1
        values["fastgpt2"] = result.perplexity
        return elapsed

    def run_transformers(ids=None) -> float:
        ids = ids or text(num_tokens)
        start = time.perf_counter()
        nll, count = transformers_sliding_window(s.hf, ids, window_len, stride)
        elapsed = time.perf_counter() - start
        assert count == len(ids) - 1
        values["transformers"] = math.exp(nll / count)
        return elapsed

    warmup = text(window_len)  # one whole window
    run_fastgpt2(warmup)
    run_transformers(warmup)
    agreement = abs(values["fastgpt2"] / values["transformers"] - 1)
    raw = alternate({"fastgpt2": run_fastgpt2, "transformers": run_transformers}, warmup=0, repeats=repeats)
    systems = {name: {"seconds": median(t), "tokens_per_s": (num_tokens - 1) / median(t)} for name, t in raw.items()}
    return {"num_tokens": num_tokens, "window_len": window_len, "stride": stride, "repeats": repeats,
            "num_windows": len(sliding_windows(num_tokens, window_len, stride)),
            "warmup_perplexity_rel_diff": agreement, "systems": systems, "raw_s": raw}
