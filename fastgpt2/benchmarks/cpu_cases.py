"""The CPU suite's cases. Each alternates fastgpt2 and transformers (A B A B ...) after a warm-up and returns raw
timings plus per-system medians; cpu.py turns them into the report.

Every prompt is fresh random token ids, so fastgpt2's prefix cache never hits and both systems do the same work.
"""
from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from fastgpt2 import LLM, SamplingParams
from fastgpt2.benchmarks.common import alternate, median

EOS = 50256
PROMPT_VOCAB = 50000  # prompt ids are drawn from [0, PROMPT_VOCAB): ordinary tokens, never <|endoftext|>


@dataclass
class Systems:
    """The two systems under test, holding the same weights, and an optional float32 transformers model."""

    llm: LLM
    hf: object  # transformers.GPT2LMHeadModel in the benchmark dtype
    hf_fp32: object | None  # transformers in float32, for the "bf16 fastgpt2 vs fp32 transformers" target
    rng: random.Random

    def prompts(self, num_prompts: int, prompt_len: int) -> list[list[int]]:
        return [[self.rng.randrange(PROMPT_VOCAB) for _ in range(prompt_len)] for _ in range(num_prompts)]


# -- one timed call of each system ----------------------------------------------------------------------------------
def _sampling(top_p: float | None, sampling: dict | None) -> dict:
    """The sampling settings both systems use: none (greedy), or temperature 1 with top_p, updated by `sampling`
    (temperature, repetition_penalty, logprobs: the top-N logprobs and the sampled token's at every step)."""
    return {} if top_p is None else {"temperature": 1.0, "top_p": top_p, **(sampling or {})}


def fastgpt2_call(s: Systems, batch: int, prompt_len: int, max_tokens: int, top_p: float | None = None,
                  sampling: dict | None = None):
    """A callable that submits `batch` fresh prompts at once (greedy, or with top_p: sampling at temperature 1 with
    that top-p, or with the settings of `sampling` (temperature, repetition_penalty); ignore_eos) and returns its
    seconds."""
    mode = _sampling(top_p, sampling)

    def run() -> float:
        prompts = s.prompts(batch, prompt_len)
        params = (SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True) if not mode
                  else SamplingParams(**mode, max_tokens=max_tokens, ignore_eos=True))
        start = time.perf_counter()
        outs = s.llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        assert "logprobs" not in mode or all(len(o.outputs[0].logprobs) == max_tokens for o in outs)
        return elapsed

    return run


def hf_call(s: Systems, model, batch: int, prompt_len: int, max_new_tokens: int, top_p: float | None = None,
            sampling: dict | None = None):
    """A callable that runs transformers' generate on a (batch, prompt_len) batch (greedy, or with top_p: sampling at
    temperature 1 with that top-p and no top-k, or with the settings of `sampling`) and returns its seconds."""
    settings = _sampling(top_p, sampling)
    num_logprobs = settings.pop("logprobs", None)
    mode = dict(do_sample=True, top_k=0, **settings) if settings else dict(do_sample=False)
    if num_logprobs is not None:  # the raw logits of every step, turned into logprobs inside the timed region
        mode.update(output_logits=True, return_dict_in_generate=True)

    def run() -> float:
        ids = torch.tensor(s.prompts(batch, prompt_len), device=model.device)  # (batch, prompt_len), no padding
        cuda = ids.device.type == "cuda"
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, pad_token_id=EOS, **mode)
            if num_logprobs is not None:  # per step: the top-N logprobs and the sampled token's, as fastgpt2 reports
                logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # (batch, new, V)
                top = torch.topk(logprobs, num_logprobs, dim=-1)
                sampled = logprobs.gather(-1, out.sequences[:, prompt_len:, None])[..., 0]  # (batch, new)
                out = out.sequences
                assert top.indices.shape == (batch, max_new_tokens, num_logprobs)
                assert sampled.shape == (batch, max_new_tokens)
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        assert out.shape == (batch, prompt_len + max_new_tokens)
        return elapsed

    return run


def _hf_models(s: Systems, with_fp32: bool) -> dict:
    models = {"transformers": s.hf}
    if with_fp32 and s.hf_fp32 is not None:
        models["transformers-float32"] = s.hf_fp32
    return models


# -- cases ----------------------------------------------------------------------------------------------------------
def decode(s: Systems, batch: int, num_tokens: int, prompt_len: int, repeats: int, with_fp32: bool = False,
           extra: dict | None = None, top_p: float | None = None, sampling: dict | None = None) -> dict:
    """Decode speed with `batch` concurrent requests, prefill excluded; greedy, or with top_p every system samples at
    temperature 1 with that top-p (as vLLM's throughput benchmark samples), or with `sampling`'s temperature and
    repetition_penalty as well.

    extra: more systems, name -> make(max_new_tokens) returning a timed call like fastgpt2_call's (peers.py).
    Per system: time T(1) of generating 1 new token and T(N+1) of N+1 new tokens (both include the same prefill), so
    one decode step costs (median T(N+1) - median T(1)) / N; tokens/s = batch / that.
    """
    makers = {"fastgpt2": lambda m: fastgpt2_call(s, batch, prompt_len, m, top_p, sampling)}
    for name, model in _hf_models(s, with_fp32).items():
        makers[name] = lambda m, model=model: hf_call(s, model, batch, prompt_len, m, top_p, sampling)
    makers.update(extra or {})
    for make in makers.values():  # warm-up: same shapes, fewer tokens
        make(min(num_tokens + 1, 8))()
    fns = {}
    for name, make in makers.items():
        fns[f"{name}|short"] = make(1)
        fns[f"{name}|long"] = make(num_tokens + 1)
    raw = alternate(fns, warmup=0, repeats=repeats)
    systems = {}
    for name in makers:
        step_s = (median(raw[f"{name}|long"]) - median(raw[f"{name}|short"])) / num_tokens
        step_s = max(step_s, 1e-9)  # only a wildly noisy machine makes this <= 0
        # Best case, from the fastest call of each kind: a background-load burst only ever adds time.
        best_s = max((min(raw[f"{name}|long"]) - min(raw[f"{name}|short"])) / num_tokens, 1e-9)
        systems[name] = {"ms_per_step": step_s * 1e3, "tokens_per_s": batch / step_s,
                         "best_ms_per_step": best_s * 1e3, "best_tokens_per_s": batch / best_s}
    return {"batch": batch, "num_tokens": num_tokens, "prompt_len": prompt_len, "repeats": repeats, "top_p": top_p,
            "sampling": dict(sampling or {}),
            "method": "(median T(N+1 new tokens) - median T(1 new token)) / N; prefill excluded",
            "systems": systems, "raw_s": raw}


def prefill(s: Systems, prompt_len: int, repeats: int, extra: dict | None = None) -> dict:
    """Prefill tokens/s of one prompt: fastgpt2 generate(max_tokens=1); transformers one forward that keeps the KV
    cache and computes logits for the last position only (logits_to_keep=1, as its generate does).
    extra: more systems, name -> a callable returning the seconds of one such prefill (peers.py)."""

    def hf_forward() -> float:
        ids = torch.tensor(s.prompts(1, prompt_len))
        with torch.inference_mode():
            start = time.perf_counter()
            s.hf(ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    fns = {"fastgpt2": fastgpt2_call(s, 1, prompt_len, 1), "transformers": hf_forward, **(extra or {})}
    raw = alternate(fns, warmup=1, repeats=repeats)
    systems = {name: {"seconds": median(t), "tokens_per_s": prompt_len / median(t)} for name, t in raw.items()}
    return {"prompt_len": prompt_len, "repeats": repeats, "systems": systems, "raw_s": raw}


def _latency_stats(latencies: list[float]) -> dict:
    p50, p90, p99 = np.percentile(np.asarray(latencies), [50, 90, 99])
    return {"p50_s": float(p50), "p90_s": float(p90), "p99_s": float(p99)}


def workload(s: Systems, num_requests: int, min_len: int, max_len: int, hf_batch: int, seed: int = 0) -> dict:
    """num_requests requests with seeded random prompt and output lengths in [min_len, max_len], all arriving at t0.

    fastgpt2 gets them all in one generate() (continuous batching). transformers runs them in submission order in
    fixed batches of hf_batch, left-padded, each batch generating until its longest output (ignore EOS). Latency of a
    request = its finish time - t0 (fastgpt2: RequestOutput.metrics['finish']; transformers: its batch's end).
    Tokens/s counts the requested output tokens only (not the padding rows transformers also computes).
    """
    rng = random.Random(seed)
    lens = [(rng.randint(min_len, max_len), rng.randint(min_len, max_len)) for _ in range(num_requests)]
    prompts = [[rng.randrange(PROMPT_VOCAB) for _ in range(p)] for p, _ in lens]
    out_lens = [o for _, o in lens]
    num_output_tokens = sum(out_lens)

    def run_fastgpt2(prompts, out_lens) -> dict:
        params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in out_lens]
        t0 = time.perf_counter()
        outs = s.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        assert [len(o.outputs[0].token_ids) for o in outs] == out_lens
        return {"wall_s": wall, "latency_s": [o.metrics["finish"] - t0 for o in outs],
                "ttft_s": [o.metrics["first_token"] - t0 for o in outs]}

    def run_hf(prompts, out_lens) -> dict:
        t0 = time.perf_counter()
        latency = []
        for i in range(0, len(prompts), hf_batch):
            chunk, outs = prompts[i:i + hf_batch], out_lens[i:i + hf_batch]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), EOS, dtype=torch.long)  # (b, width), left-padded
            mask = torch.zeros_like(ids)
            for row, p in enumerate(chunk):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            with torch.inference_mode():
                s.hf.generate(ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs),
                              do_sample=False, pad_token_id=EOS)
            latency += [time.perf_counter() - t0] * len(chunk)
        return {"wall_s": time.perf_counter() - t0, "latency_s": latency}

    run_fastgpt2(prompts[:2], [4, 4])  # warm-up
    run_hf(prompts[:2], [4, 4])
    raw = {"fastgpt2": run_fastgpt2(prompts, out_lens), "transformers": run_hf(prompts, out_lens)}
    systems = {name: {"wall_s": r["wall_s"], "tokens_per_s": num_output_tokens / r["wall_s"],
                      **_latency_stats(r["latency_s"])} for name, r in raw.items()}
    systems["fastgpt2"]["ttft"] = _latency_stats(raw["fastgpt2"]["ttft_s"])
    return {"num_requests": num_requests, "len_range": [min_len, max_len], "hf_batch": hf_batch, "seed": seed,
            "num_prompt_tokens": sum(p for p, _ in lens), "num_output_tokens": num_output_tokens,
            "systems": systems, "raw": raw}


def sampling(batches: tuple[int, ...], repeats: int) -> dict:
    """Top-p 0.9 sampling of float32 logits (B, 50257) on one torch thread: fastgpt2's CPU sampler (C++ when built),
    the torch reference, and transformers' TopPLogitsWarper + softmax + multinomial. Reports microseconds per row."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from fastgpt2.kernels import reference

    try:
        from fastgpt2.kernels import cpu_sampling as cpu_sampler
        has_extension = bool(getattr(cpu_sampler, "HAS_EXTENSION", False))
    except ImportError as exc:
        cpu_sampler, has_extension = None, f"not available ({exc})"
    warper = TopPLogitsWarper(0.9)
    stats = getattr(getattr(cpu_sampler, "_C", None), "_sampler_fast_path_stats", None)
    stats_before = stats() if stats else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            calls = max(1, 16 // batch)  # one timing averages >= 16 rows
            # Every call samples different logits, freshly written, as in decoding, where the LM head has just written
            # them: each is copied into one buffer right before its (separately timed) call. The sampler's passes
            # branch on the data, and one row timed over and over lets the branch predictors learn it (on the Intel
            # Xeon (AVX-512), 64 different rows took 42-44 us per row where 64 copies of one took 38); rows read
            # from memory instead of the cache add ~20 us per row at batch 1.
            # (B, V) float32, a peaked-ish distribution, calls + 1 of them: the untimed call takes the last.
            logits = [torch.randn(batch, 50257, generator=g) * 3.0 for _ in range(calls + 1)]
            work = torch.empty(batch, 50257)
            params = (torch.zeros(batch, dtype=torch.int64), torch.full((batch,), 0.9), torch.zeros(batch),
                      torch.rand(batch, dtype=torch.float64, generator=g))

            # Each timing starts with one untimed call. On a shared (virtualised) host, whatever runs first after tens
            # of milliseconds of other work pays a one-off delay that grows with that work, whatever it does (measured
            # on a 2-core Intel Xeon VM: numpy's sum of 4,096 floats takes 5 us warm, a median of 149 us after 10 ms
            # of a Python busy loop, 283 us after 30 ms and 1,458 us after 100 ms). Here the system timed after
            # transformers' and the reference's runs (70-90 ms each) would pay it once per timing: about 1 ms on
            # fastgpt2's 16 calls of ~50 us, a few per cent on the others'.
            def timer(fn):
                def run() -> float:
                    work.copy_(logits[calls])
                    fn(work)
                    elapsed = 0.0
                    for i in range(calls):
                        work.copy_(logits[i])
                        start = time.perf_counter()
                        fn(work)
                        elapsed += time.perf_counter() - start
                    return elapsed / calls
                return run

            fns = {"fastgpt2.reference": timer(lambda x: reference.topk_topp_minp_sample(x, *params)),
                   "transformers": timer(lambda x: torch.multinomial(torch.softmax(warper(None, x), dim=-1), 1))}
            if cpu_sampler is not None:
                fns = {"fastgpt2.cpu_sampler": timer(lambda x: cpu_sampler.topk_topp_minp_sample(x, *params)), **fns}
            raw = alternate(fns, warmup=2, repeats=repeats)
            results[batch] = {"us_per_row": {k: median(v) * 1e6 / batch for k, v in raw.items()}, "raw_s": raw}
    finally:
        torch.set_num_threads(threads)
    # Rows the C++ fast top-p path decided / handed to the exact path during this case (warm-up included).
    fast_path = None if stats is None else dict(zip(("decided", "deferred"),
                                                    (a - b for a, b in zip(stats(), stats_before))))
    return {"has_extension": has_extension, "torch_threads": 1, "top_p": 0.9, "batches": results,
            "fast_path_rows": fast_path}


def build_systems(transformers, model, dtype: str, with_fp32: bool, device: str = "cpu"):
    """LLM on random (preset name or GPT2Config) or loaded (directory) weights, and transformers loaded from the
    LLM's own save, both on `device`."""
    from fastgpt2 import LLM, GPT2Config
    from fastgpt2.model.config import canonical_preset

    torch.manual_seed(0)
    if isinstance(model, GPT2Config):
        source = model
    else:
        source = GPT2Config.from_name(model) if canonical_preset(model) is not None else model
    llm = LLM(source, device=device, dtype=dtype)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    with tempfile.TemporaryDirectory() as directory:
        llm.save_pretrained(directory)
        load = lambda dt: transformers.GPT2LMHeadModel.from_pretrained(  # noqa: E731
            directory, **{dtype_kw: dt}).eval()
        hf = load(getattr(torch, dtype)).to(device)
        hf_fp32 = load(torch.float32) if with_fp32 and dtype != "float32" else None
    return Systems(llm, hf, hf_fp32, random.Random(0))
