"""lm-evaluation-harness backend `fastgpt2`: loglikelihood, loglikelihood_rolling and generate_until on the engine.

Each call's requests are sorted by length (longest first, as lm-eval's HFLM) and submitted together, so the scheduler
batches them under max_num_batched_tokens. Needs the optional extra: `pip install -e '.[eval]'`.
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401 - lm-eval loads its built-in backends only into an empty registry: first
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from fastgpt2.engine.llm import LLM
from fastgpt2.engine.perplexity import document_logprobs, score_windows
from fastgpt2.engine.sampling_params import SamplingParams

_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's priority


@register_model("fastgpt2")
class FastGPT2LM(TemplateLM):
    """lm-eval's LM on a fastgpt2 LLM: `lm_eval --model fastgpt2 --model_args pretrained=gpt2,dtype=float32`.

    Parameters
    ----------
    pretrained : what LLM() loads (hub id, preset, local directory), or an LLM to evaluate as it is.
    dtype, device, seed, **llm_kwargs : passed to LLM (max_num_batched_tokens=..., kv_cache_memory=...).
    max_length : model inputs per request, default and at most n_positions - 1 (the engine's prompt limit; a window
        of max_length inputs also scores its last token). Results equal lm-eval's `hf` backend run with the same
        max_length (1023 for GPT-2); requests within it are unaffected.
    max_gen_toks : generate_until's default new-token limit (256, as HFLM).
    batch_size, max_batch_size : accepted for lm-eval's command line and ignored: the engine batches by tokens.
    """

    def __init__(self, pretrained="gpt2", dtype=None, device=None, batch_size=None, max_batch_size=None,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0, **llm_kwargs):
        super().__init__()
        if isinstance(pretrained, LLM):
            self.llm = pretrained
        else:
            self.llm = LLM(pretrained, device=device, dtype=None if dtype == "auto" else dtype, seed=seed,
                           **llm_kwargs)
        limit = self.llm.config.n_positions - 1
        self._max_length = limit if max_length is None else max_length
        if isinstance(self._max_length, bool) or not isinstance(self._max_length, int) or not (
                1 <= self._max_length <= limit):
            raise ValueError(f"max_length must be an integer in [1, {limit}] (n_positions - 1), got {max_length!r}")
        self._max_gen_toks = max_gen_toks
        self._device = self.llm.model.wte.weight.device

    # -- what TemplateLM needs -----------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.llm.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.llm.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.llm.tokenizer.decode(tokens)

    # -- the three request types -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """((context, continuation), context ids, continuation ids) -> (logprob, is_greedy), as HFLM: the last
        max_length + 1 tokens of context + continuation are kept and the continuation's logprobs summed."""
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        windows = []
        for i in order:
            _, context, continuation = requests[i]
            if not 1 <= len(continuation) <= self.max_length:
                raise ValueError(f"a continuation has {len(continuation)} tokens; it must have 1 to max_length "
                                 f"({self.max_length})")
            ids = ((context or [self.eot_token_id]) + continuation)[-(self.max_length + 1):]
            windows.append((ids, len(ids) - len(continuation)))
        scores = score_windows(self.llm.engine, windows, want_greedy=True, use_tqdm=not disable_tqdm,
                               desc="loglikelihood")
        results: list = [None] * len(requests)
        for i, score in zip(order, scores):
            results[i] = (score.logprob, bool(score.is_greedy))
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed logprob of each whole string in lm-eval's rolling windows (<|endoftext|> first, disjoint windows of
        max_length inputs, the last one reaching back a whole window); all windows of all strings at once."""
        strings = [req.args[0] for req in requests]
        documents = [self.tok_encode(s) for s in strings]
        scored = document_logprobs(self.llm.engine, documents, stride=self.max_length, prepend_eos=True,
                                   window_len=self.max_length + 1, use_tqdm=not disable_tqdm)
        for string, (logprob, _) in zip(strings, scored):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), logprob)
        return [logprob for logprob, _ in scored]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations cut at the first `until` string or <|endoftext|>; the
        context keeps its last max_length - max_gen_toks tokens, as HFLM."""
        eos = self.tok_decode([self.eot_token_id])
        prompts, params = [], []
        for req in requests:
            context, gen_kwargs = req.args
            p = self._sampling_params(gen_kwargs, eos)
            room = self.max_length - p.max_tokens
            if room < 1:
                raise ValueError(f"max_gen_toks ({p.max_tokens}) must be below max_length ({self.max_length})")
            prompts.append(self.tok_encode(context)[-room:])
            params.append(p)
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        outs = self.llm.generate([prompts[i] for i in order], [params[i] for i in order], use_tqdm=not disable_tqdm)
        results: list = [None] * len(requests)
        for i, out in zip(order, outs):
            text = out.outputs[0].text
            for stop in params[i].stop:  # the engine already stopped at the first; as lm-eval post-processes
                text = text.split(stop)[0]
            results[i] = text
            self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _sampling_params(self, gen_kwargs: dict, eos: str) -> SamplingParams:
        """lm-eval's generation kwargs (until, max_gen_toks and its aliases, do_sample, temperature, top_p, top_k)."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if eos not in until:
            until.append(eos)
        max_tokens = next((int(kwargs[k]) for k in _MAX_TOKEN_KEYS if kwargs.get(k) is not None), self.max_gen_toks)
        temperature = 0.0 if kwargs.get("do_sample") is False else float(kwargs.get("temperature", 0.0))
        return SamplingParams(temperature=temperature, top_p=float(kwargs.get("top_p") or 1.0),
                              top_k=int(kwargs.get("top_k") or 0), max_tokens=max_tokens,
                              stop=[s for s in until if s])
