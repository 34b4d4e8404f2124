"""fastgpt2: a fast GPT-2 engine (paged KV cache, continuous batching, Triton kernels, C++ sampling)."""
from fastgpt2.engine.config import GPT2Config
from fastgpt2.engine.llm import LLM
from fastgpt2.engine.model import GPT2
from fastgpt2.engine.outputs import CompletionOutput, RequestOutput
from fastgpt2.engine.sampling_params import SamplingParams
from fastgpt2.engine.tokenizer import Tokenizer

__all__ = ["LLM", "SamplingParams", "GPT2", "GPT2Config", "Tokenizer", "RequestOutput", "CompletionOutput"]
