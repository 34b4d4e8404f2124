"""The serving engine: model, weights, tokenizer, KV cache, scheduler, sampler and the LLM API."""
