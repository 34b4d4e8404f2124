"""Decode graphs: the batch-size ladder, the static-buffer step with padding rows (checked eagerly on CPU: same
logits as the unpadded model, padding writes no K/V, stale rows of a larger earlier step are reset), and on CUDA
the captured graphs and the engine against eager mode."""
import pytest
import torch

from fastgpt2 import GPT2, GPT2Config, LLM, SamplingParams
from fastgpt2.model.attention import AttentionMetadata
from fastgpt2.engine.cuda_graphs import DecodeGraphs, batch_size_ladder

CONFIG = GPT2Config(vocab_size=101, n_positions=96, n_embd=32, n_layer=2, n_head=2)
BLOCK_SIZE = 16


@pytest.mark.parametrize("max_num_seqs,expected", [(1, [1]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8]),
                                                   (256, [1, 2, 4, 8, 16, 32, 64, 128, 256])])
def test_ladder(max_num_seqs, expected):
    assert batch_size_ladder(max_num_seqs) == expected


def test_ladder_rejects_zero():
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        batch_size_ladder(0)


def _setup(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = GPT2(CONFIG).to(device, dtype).eval()
    num_blocks = 20
    kv = torch.randn(CONFIG.n_layer, 2, num_blocks, BLOCK_SIZE, CONFIG.n_head, CONFIG.head_dim, device=device).to(dtype)
    return model, kv, [(kv[i, 0], kv[i, 1]) for i in range(CONFIG.n_layer)]


def _step(batch_size, seed, device="cpu"):
    """A decode batch whose tables are only as wide as its longest sequence needs (narrower than the graphs')."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 40, (batch_size,), generator=g)
    width = int((lens.max() + BLOCK_SIZE - 1) // BLOCK_SIZE)
    tables = torch.randperm(20, generator=g)[: batch_size * width].view(batch_size, width).int()
    pos = lens - 1
    slots = tables.long().gather(1, (pos // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE + pos % BLOCK_SIZE
    ids = torch.randint(0, CONFIG.vocab_size, (batch_size,), generator=g)
    return [t.to(device) for t in (ids, pos, slots, tables, lens.int())]


def _direct(model, kv_caches, ids, pos, slots, tables, lens):
    meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=len(ids), decode_block_tables=tables,
                             decode_seq_lens=lens, prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32,
                                                                                    device=ids.device),
                             prefill_seq_lens=lens[:0], prefill_block_tables=tables[:0], num_prefills=0,
                             prefill_max_query_len=0, scale=CONFIG.head_dim ** -0.5)
    with torch.inference_mode():
        return model.forward_paged(ids, pos, meta, kv_caches)


@pytest.mark.parametrize("sequence", [[3, 1, 5], [7, 2, 2, 4]])
def test_static_step_matches_the_model(sequence):
    model, kv, caches = _setup()
    kv_ref = kv.clone()
    caches_ref = [(kv_ref[i, 0], kv_ref[i, 1]) for i in range(CONFIG.n_layer)]
    graphs = DecodeGraphs(model, caches, BLOCK_SIZE, max_num_seqs=7, scale=CONFIG.head_dim ** -0.5, capture=False)
    assert graphs.sizes == [1, 2, 4, 7] and graphs.max_blocks == 6
    for i, batch_size in enumerate(sequence):
        batch = _step(batch_size, seed=i)
        logits = graphs(*batch)
        expected = _direct(model, caches_ref, *batch)
        assert logits.shape == (batch_size, CONFIG.vocab_size)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv, kv_ref, atol=1e-6, rtol=1e-6)  # padding rows wrote nothing
        rung = graphs.rung(batch_size)
        assert torch.equal(graphs.slots[batch_size:rung], torch.full((rung - batch_size,), -1))
        assert torch.equal(graphs.seq_lens[batch_size:rung], torch.ones(rung - batch_size, dtype=torch.int32))


def test_too_large_batch_is_a_clear_error():
    model, _, caches = _setup()
    graphs = DecodeGraphs(model, caches, BLOCK_SIZE, max_num_seqs=2, scale=0.25, capture=False)
    with pytest.raises(ValueError, match="a decode batch of 3 exceeds the largest graph \\(2\\)"):
        graphs(*_step(3, seed=0))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
def test_captured_graphs_match_eager():
    model, kv, caches = _setup("cuda", torch.float16)
    kv_ref = kv.clone()
    caches_ref = [(kv_ref[i, 0], kv_ref[i, 1]) for i in range(CONFIG.n_layer)]
    graphs = DecodeGraphs(model, caches, BLOCK_SIZE, max_num_seqs=8, scale=CONFIG.head_dim ** -0.5, capture=True)
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    for i, batch_size in enumerate([5, 1, 8, 3]):
        batch = _step(batch_size, seed=i, device="cuda")
        logits = graphs(*batch).float()
        expected = _direct(model, caches_ref, *batch).float()
        torch.testing.assert_close(logits, expected, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(kv, kv_ref, atol=2e-2, rtol=2e-2)


@cuda
def test_engine_greedy_with_graphs_equals_eager():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2)).cuda().half().eval()
    prompts = [[5, 6, 7], [100, 200], [42] * 20, [1]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with_graphs = LLM(model, max_num_seqs=8).generate(prompts, params)
    eager = LLM(model, max_num_seqs=8, enforce_eager=True).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in with_graphs] == [o.outputs[0].token_ids for o in eager]
