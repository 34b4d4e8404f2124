"""CTranslate2 for `fastgpt2 bench --peers`: the benchmark's Hugging Face directory converted with CTranslate2's own
TransformersConverter (float32, int8) and run by `ctranslate2.Generator` with greedy search (sampling_topk=1).

`end_token=[]` makes no token end a sequence, so every call generates exactly the requested number of tokens, as
fastgpt2's `ignore_eos=True` does (an <|endoftext|> the model picks is kept and decoding goes on); the calls check it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

PRECISIONS = ("float32", "int8")  # TransformersConverter quantization values
BYTES_PER_WEIGHT = {"float32": 4.0, "int8": 1.0}  # int8: one byte per weight (per-row float scales not counted)


def available() -> tuple[object | None, str | None]:
    """(the ctranslate2 module, None) or (None, the reason CTranslate2 is skipped)."""
    try:
        import ctranslate2
    except ImportError as exc:
        return None, f"ctranslate2 is not installed ({exc}); pip install ctranslate2"
    return ctranslate2, None


class CT2Model:
    """One converted model: a Generator plus the id -> token string table the Generator takes its prompts in."""

    def __init__(self, ctranslate2, hf_dir: str, out_dir: str, precision: str, threads: int):
        from ctranslate2.converters import TransformersConverter

        path = Path(out_dir) / f"ct2-{precision}"
        TransformersConverter(hf_dir).convert(str(path), quantization=precision, force=True)
        self.vocab = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
        self.generator = ctranslate2.Generator(str(path), device="cpu", intra_threads=threads, inter_threads=1)
        self.precision = precision

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt, exactly max_new_tokens ids each (no end token)."""
        tokens = [[self.vocab[i] for i in p] for p in prompts]
        results = self.generator.generate_batch(tokens, max_length=max_new_tokens, sampling_topk=1, beam_size=1,
                                                include_prompt_in_result=False, end_token=[])
        out = [r.sequences_ids[0] for r in results]
        lengths = {len(o) for o in out}
        if lengths != {max_new_tokens}:
            raise RuntimeError(f"CTranslate2 generated {sorted(lengths)} tokens instead of {max_new_tokens}")
        return out

    def call(self, prompts_fn, batch: int, prompt_len: int, max_new_tokens: int):
        """A callable that generates from `batch` fresh prompts and returns its seconds (as cpu_cases.fastgpt2_call)."""

        def run() -> float:
            prompts = prompts_fn(batch, prompt_len)
            start = time.perf_counter()
            self.greedy(prompts, max_new_tokens)
            return time.perf_counter() - start

        return run
