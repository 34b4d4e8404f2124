"""Evaluation on the engine: corpora for `fastgpt2 perplexity` (corpus.py) and the lm-evaluation-harness backend
(lm_eval_backend.py, registered as `fastgpt2`; needs the optional `eval` extra). `LLM.perplexity` itself is in
fastgpt2/engine/perplexity.py, beside `LLM.score`."""
