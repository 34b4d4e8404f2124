"""The GPT-2 itself, without the serving engine: config, the module (dense forward and the paged seam), checkpoints
and the tokenizer, Gumbel-softmax decoding. Imports kernels/ only (never engine/, train/ or the compiled extension)."""
from fastgpt2.model.config import GPT2Config
from fastgpt2.model.gpt2 import GPT2, GPT2Output
from fastgpt2.model.gumbel import GumbelSoftmaxOutput, gumbel_softmax_decode
from fastgpt2.model.tokenizer import Tokenizer

__all__ = ["GPT2", "GPT2Config", "GPT2Output", "GumbelSoftmaxOutput", "Tokenizer", "gumbel_softmax_decode"]
