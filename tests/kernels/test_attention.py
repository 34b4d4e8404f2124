"""Paged-attention kernels (cache write, split-K decode, varlen prefill) against the torch references.

Triton runs natively on CUDA and under its CPU interpreter elsewhere (TRITON_INTERPRET=1 must be set before triton is
imported). Every cache is a NaN-filled pool with shuffled blocks: a kernel that reads an unowned slot returns NaN.
The references themselves are checked against `paged_attention_naive`, which walks the block table token by token.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from fastgpt2.kernels import paged_attention, prefill_attention, reference

NUM_HEADS, HEAD_DIM = 2, 64
SCALE = 1.0 / math.sqrt(HEAD_DIM)
# Kernel vs float32 reference on the same (rounded) inputs. fp16/bf16 error is the output rounding plus P rounded to
# the input dtype before P @ V; the CPU interpreter also truncates (not rounds) fp32 -> bf16.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DTYPES = list(TOLERANCES)
NAN = float("nan")


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))


@pytest.fixture(params=["cpu", CUDA])
def device(request, monkeypatch):
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setattr(paged_attention, "POISON_BUFFERS", True)  # scratch buffers start as NaN too
    return torch.device(request.param)


def make_paged_kv(seq_lens: list[int], block_size: int, dtype: torch.dtype, seed: int = 0, spare_blocks: int = 3):
    """A NaN-filled pool holding each sequence's K/V in randomly placed blocks.

    Returns k_cache, v_cache (num_blocks, block_size, H, D); block_tables (B, max_blocks + 1) int32, one column more
    than needed, padded with 0; slot_mapping (sum(seq_lens),) int64 of every written token, sequences back to back.
    """
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(counts) + spare_blocks
    pool_order = torch.randperm(num_blocks, generator=gen).tolist()  # a sequence's blocks are scattered
    block_tables = torch.zeros((len(seq_lens), max(counts) + 1), dtype=torch.int32)
    slots = []
    for b, (length, count) in enumerate(zip(seq_lens, counts)):
        blocks = [pool_order.pop() for _ in range(count)]
        block_tables[b, :count] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[t // block_size] * block_size + t % block_size for t in range(length)]
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    k_cache = torch.full((num_blocks, block_size, NUM_HEADS, HEAD_DIM), NAN, dtype=dtype)
    v_cache = k_cache.clone()
    for cache in (k_cache, v_cache):
        values = torch.randn(len(slots), NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
        cache.view(-1, NUM_HEADS, HEAD_DIM)[slot_mapping] = values
    return k_cache, v_cache, block_tables, slot_mapping


def paged_attention_naive(q, k_cache, v_cache, block_table, context_len, positions, scale):
    """One sequence's queries q (M, H, D) at absolute `positions`, fetching K/V one token at a time (float64)."""
    block_size = k_cache.shape[1]
    keys, values = [], []
    for t in range(context_len):
        block = int(block_table[t // block_size])
        keys.append(k_cache[block, t % block_size].double())  # (H, D)
        values.append(v_cache[block, t % block_size].double())
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, pos in enumerate(positions):
        scores = torch.stack([(q[i].double() * keys[t]).sum(-1) for t in range(pos + 1)], dim=-1) * scale  # (H, pos+1)
        probs = torch.softmax(scores, dim=-1)
        out[i] = sum(probs[:, t, None] * values[t] for t in range(pos + 1))
    return out


def rand(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# (block_size, seq_lens): batch 1/3/7, lengths 1, block_size - 1, exact multiples and ragged tails.
DECODE_CASES = [(16, [1]), (16, [15, 33, 1]), (32, [31, 1, 64, 70, 32, 33, 95])]
# (block_size, seq_lens, q_lens): plain prefill (q_len == seq_len), chunked or prefix hit (q_len < seq_len), 1-token
# chunks.
PREFILL_CASES = [
    (16, [1], [1]),
    (16, [15, 40, 17], [15, 7, 1]),
    (32, [31, 70, 5, 64, 33, 1, 90], [31, 70, 2, 32, 1, 1, 50]),
]


@pytest.mark.parametrize("block_size,seq_lens", DECODE_CASES)
def test_decode_reference_matches_naive(block_size, seq_lens):
    k_cache, v_cache, block_tables, _ = make_paged_kv(seq_lens, block_size, torch.float32)
    q = rand(len(seq_lens), NUM_HEADS, HEAD_DIM)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    got = reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t, SCALE)
    for b, length in enumerate(seq_lens):
        want = paged_attention_naive(q[b : b + 1], k_cache, v_cache, block_tables[b], length, [length - 1], SCALE)
        torch.testing.assert_close(got[b : b + 1].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size,seq_lens,q_lens", PREFILL_CASES)
def test_prefill_reference_matches_naive(block_size, seq_lens, q_lens):
    k_cache, v_cache, block_tables, _ = make_paged_kv(seq_lens, block_size, torch.float32)
    q = rand(sum(q_lens), NUM_HEADS, HEAD_DIM)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    got = reference.prefill_attention(q, k_cache, v_cache, cu, seq_lens_t, block_tables, SCALE)
    for b, (length, q_len) in enumerate(zip(seq_lens, q_lens)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        positions = list(range(length - q_len, length))
        want = paged_attention_naive(q[rows], k_cache, v_cache, block_tables[b], length, positions, SCALE)
        torch.testing.assert_close(got[rows].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache(device, dtype, block_size):
    num_tokens, num_blocks = 23, 4
    gen = torch.Generator().manual_seed(block_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 5, 22]] = -1  # padding tokens: never written
    qkv = rand(num_tokens, 3, NUM_HEADS, HEAD_DIM, dtype=dtype).to(device)
    k, v = qkv[:, 1], qkv[:, 2]  # strided views, as the model's qkv split produces
    shape = (num_blocks, block_size, NUM_HEADS, HEAD_DIM)
    caches = [torch.full(shape, NAN, dtype=dtype, device=device) for _ in range(4)]
    reference.reshape_and_cache(k, v, caches[0], caches[1], slots.to(device))
    paged_attention.reshape_and_cache(k, v, caches[2], caches[3], slots.to(device))
    for want, got in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)  # a copy is exact
        assert (~got.isnan()).sum().item() == (num_tokens - 3) * NUM_HEADS * HEAD_DIM
    kept = slots >= 0
    torch.testing.assert_close(caches[2].view(-1, NUM_HEADS, HEAD_DIM)[slots[kept]].cpu(), k[kept.to(device)].cpu())


def test_split_plan_forces_several_splits():
    assert paged_attention.split_plan(14, 64, torch.device("cpu"), None) == (64, 1)
    assert paged_attention.split_plan(14, 64, torch.device("cpu"), 4) == (16, 4)
    assert paged_attention.split_plan(14, 128, torch.device("cpu"), 5) == (32, 4)
    assert paged_attention.split_plan(14, 1024, torch.device("cpu"), 4) == (256, 4)


@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize("block_size,seq_lens", DECODE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention(device, dtype, block_size, seq_lens, num_splits):
    k_cache, v_cache, block_tables, _ = make_paged_kv(seq_lens, block_size, dtype, seed=len(seq_lens))
    q = rand(len(seq_lens), NUM_HEADS, HEAD_DIM, dtype=dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    want = reference.paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens_t,
                                            SCALE)
    out = torch.full(q.shape, NAN, dtype=dtype, device=device)
    got = paged_attention.paged_decode_attention(
        q.to(device), k_cache.to(device), v_cache.to(device), block_tables.to(device), seq_lens_t.to(device), SCALE,
        out=out, num_splits=num_splits,
    )
    assert got is out
    torch.testing.assert_close(got.cpu().float(), want, **TOLERANCES[dtype])


@pytest.mark.parametrize("tiles", [(16, 32), (64, 64)])
@pytest.mark.parametrize("block_size,seq_lens,q_lens", PREFILL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention(device, dtype, block_size, seq_lens, q_lens, tiles):
    k_cache, v_cache, block_tables, _ = make_paged_kv(seq_lens, block_size, dtype, seed=len(seq_lens))
    q = rand(sum(q_lens), NUM_HEADS, HEAD_DIM, dtype=dtype)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    want = reference.prefill_attention(q.float(), k_cache.float(), v_cache.float(), cu, seq_lens_t, block_tables, SCALE)
    out = torch.full(q.shape, NAN, dtype=dtype, device=device)
    got = prefill_attention.prefill_attention(
        q.to(device), k_cache.to(device), v_cache.to(device), cu.to(device), seq_lens_t.to(device),
        block_tables.to(device), SCALE, max_seqlen_q=max(q_lens), out=out, block_m=tiles[0], block_n=tiles[1],
    )
    torch.testing.assert_close(got.cpu().float(), want, **TOLERANCES[dtype])


def test_cache_write_then_decode_matches_reference(device):
    """End to end: the Triton cache write feeds the Triton decode exactly as the references feed each other."""
    seq_lens, block_size = [5, 18, 1], 16
    k_cache, v_cache, block_tables, slot_mapping = make_paged_kv(seq_lens, block_size, torch.float32)
    k_new = rand(len(slot_mapping), NUM_HEADS, HEAD_DIM, seed=7)
    v_new = rand(len(slot_mapping), NUM_HEADS, HEAD_DIM, seed=8)
    k_dev, v_dev = k_cache.to(device), v_cache.to(device)
    paged_attention.reshape_and_cache(k_new.to(device), v_new.to(device), k_dev, v_dev, slot_mapping.to(device))
    reference.reshape_and_cache(k_new, v_new, k_cache, v_cache, slot_mapping)
    q, seq_lens_t = rand(3, NUM_HEADS, HEAD_DIM, seed=9), torch.tensor(seq_lens, dtype=torch.int32)
    got = paged_attention.paged_decode_attention(q.to(device), k_dev, v_dev, block_tables.to(device),
                                                 seq_lens_t.to(device), SCALE)
    want = reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t, SCALE)
    torch.testing.assert_close(got.cpu(), want, **TOLERANCES[torch.float32])
