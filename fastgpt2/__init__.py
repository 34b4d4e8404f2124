"""fastgpt2: a fast GPT-2 engine (paged KV cache, continuous batching, Triton kernels, C++ CPU kernels).

The public names load lazily, so that `import fastgpt2.model` (fine-tuning, evaluation) pulls in neither the serving
engine nor the compiled extension.
"""
from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "LLM": "fastgpt2.engine.llm",
    "SamplingParams": "fastgpt2.engine.sampling_params",
    "RequestOutput": "fastgpt2.engine.outputs",
    "CompletionOutput": "fastgpt2.engine.outputs",
    "GPT2": "fastgpt2.model.gpt2",
    "GPT2Config": "fastgpt2.model.config",
    "Tokenizer": "fastgpt2.model.tokenizer",
    "gumbel_softmax_decode": "fastgpt2.model.gumbel",
}

__all__ = ["LLM", "SamplingParams", "GPT2", "GPT2Config", "Tokenizer", "RequestOutput", "CompletionOutput",
           "gumbel_softmax_decode"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastgpt2' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
