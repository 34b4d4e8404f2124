"""The C++ paged decode attention against the torch reference on irregular sizes and shuffled block tables."""
import pytest
import torch

from fastgpt2.kernels import native
from fastgpt2.kernels import reference

pytestmark = pytest.mark.skipif(not native.HAS_EXTENSION, reason="C++ extension not built")


@pytest.mark.isa_variants
@pytest.mark.parametrize("batch_size,block_size,heads", [(1, 16, 2), (3, 16, 12), (7, 32, 3), (64, 16, 4)])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_matches_reference(batch_size, block_size, heads, num_threads):
    g = torch.Generator().manual_seed(batch_size * 100 + block_size)
    head_dim, max_blocks = 64, 6
    num_blocks = batch_size * max_blocks + 5
    k_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, heads, head_dim, generator=g)
    lens = torch.randint(1, max_blocks * block_size + 1, (batch_size,), generator=g)
    lens[0] = 1
    if batch_size > 1:
        lens[1] = block_size - 1
    tables = torch.randperm(num_blocks, generator=g)[: batch_size * max_blocks].view(batch_size, max_blocks)
    tables = tables.to(torch.int32)
    q = torch.randn(batch_size, heads, head_dim, generator=g)
    ref = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens.int(), 0.125)
    out = native.paged_decode_attention(q, k_cache, v_cache, tables, lens.int(), 0.125, num_threads=num_threads)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.isa_variants
def test_never_reads_unowned_slots():
    k_cache = torch.full((4, 16, 2, 64), float("nan"))
    v_cache = torch.full((4, 16, 2, 64), float("nan"))
    k_cache[2, :5] = 1.0
    v_cache[2, :5] = torch.arange(64.0)
    out = native.paged_decode_attention(torch.ones(1, 2, 64), k_cache, v_cache, torch.tensor([[2, 0]], dtype=torch.int32),
                                        torch.tensor([5], dtype=torch.int32), 0.125)
    torch.testing.assert_close(out, torch.arange(64.0).expand(1, 2, 64))


def test_bad_inputs_are_clear_errors():
    cache = torch.zeros(2, 16, 2, 64)
    with pytest.raises(ValueError, match="seq_lens"):
        native.paged_decode_attention(torch.zeros(1, 2, 64), cache, cache, torch.zeros(1, 1, dtype=torch.int32),
                                      torch.tensor([17], dtype=torch.int32), 0.125)
    with pytest.raises(ValueError, match="block id outside the pool"):
        native.paged_decode_attention(torch.zeros(1, 2, 64), cache, cache, torch.tensor([[5]], dtype=torch.int32),
                                      torch.tensor([3], dtype=torch.int32), 0.125)
