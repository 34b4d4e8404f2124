"""Serving only: sequences, block manager, scheduler, model runner, CUDA graphs, the C++ step's wrapper, sampler,
LLMEngine and the LLM API. The model comes from fastgpt2.model, kernels from fastgpt2.kernels."""
