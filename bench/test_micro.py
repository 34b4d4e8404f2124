"""Micro-benchmarks (pytest-benchmark): one paged decode attention call and one sampling call on the CPU.

Run: python -m pytest bench/test_micro.py --benchmark-only   (not part of the CI run, which is `pytest tests`).
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from fastgpt2.kernels import reference  # noqa: E402

NUM_HEADS, HEAD_DIM, BLOCK_SIZE, CONTEXT = 12, 64, 16, 512  # one layer of GPT-2 124M at context 512
VOCAB = 50257


def _paged_layer(batch_size: int):
    """Random q (B, H, D) and one layer's KV cache (num_blocks, block_size, H, D) with shuffled block tables."""
    g = torch.Generator().manual_seed(batch_size)
    blocks_per_seq = CONTEXT // BLOCK_SIZE
    num_blocks = batch_size * blocks_per_seq + 1
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, generator=g)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, generator=g)
    tables = torch.randperm(num_blocks - 1, generator=g)[: batch_size * blocks_per_seq] + 1
    block_tables = tables.view(batch_size, blocks_per_seq).to(torch.int32)  # (B, max_blocks)
    seq_lens = torch.full((batch_size,), CONTEXT, dtype=torch.int32)
    q = torch.randn(batch_size, NUM_HEADS, HEAD_DIM, generator=g)
    return q, k_cache, v_cache, block_tables, seq_lens


@pytest.mark.parametrize("batch_size", [1, 16])
def test_paged_decode_attention_reference(benchmark, batch_size):
    q, k_cache, v_cache, block_tables, seq_lens = _paged_layer(batch_size)
    out = benchmark(reference.paged_decode_attention, q, k_cache, v_cache, block_tables, seq_lens, HEAD_DIM ** -0.5)
    assert out.shape == (batch_size, NUM_HEADS, HEAD_DIM) and torch.isfinite(out).all()


def _sampling_args(batch_size: int):
    g = torch.Generator().manual_seed(batch_size)
    logits = torch.randn(batch_size, VOCAB, generator=g) * 3.0  # (B, V) float32
    return (logits, torch.zeros(batch_size, dtype=torch.int64), torch.full((batch_size,), 0.9),
            torch.zeros(batch_size), torch.rand(batch_size, dtype=torch.float64, generator=g))


@pytest.fixture
def one_thread():
    """The sampling target is per row on one thread; restore torch's thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["cpu_sampler", "reference"])
@pytest.mark.parametrize("batch_size", [1, 64])
def test_topp_sample(benchmark, one_thread, impl, batch_size):
    if impl == "cpu_sampler":
        cpu_sampler = pytest.importorskip("fastgpt2.kernels.cpu_sampling")
        fn = cpu_sampler.topk_topp_minp_sample
        benchmark.extra_info["has_extension"] = bool(getattr(cpu_sampler, "HAS_EXTENSION", False))
    else:
        fn = reference.topk_topp_minp_sample
    ids = benchmark(fn, *_sampling_args(batch_size))
    assert ids.shape == (batch_size,) and ((ids >= 0) & (ids < VOCAB)).all()
