"""fastgpt2: a fast GPT-2 engine (paged KV cache, continuous batching, Triton kernels, C++ sampling)."""
from fastgpt2.engine.config import GPT2Config
from fastgpt2.engine.model import GPT2

__all__ = ["GPT2", "GPT2Config"]
