"""The C++ step (csrc/decode.cpp) against the torch model over the same paged cache: logits, the K/V it writes,
decode batches of irregular sizes, mixed prefill + decode steps, shuffled block tables, bfloat16 weight matrices, steps
split into several calls, and clear errors for bad batches. (Bitwise batch invariance: test_batch_invariance.py.)"""
import copy

import pytest
import torch

from fastgpt2 import GPT2, GPT2Config
from fastgpt2.engine.cpu_step import CpuStep
from fastgpt2.kernels import native
from fastgpt2.model.attention import AttentionMetadata

pytestmark = pytest.mark.skipif(not native.HAS_EXTENSION, reason="C++ extension not built")

CONFIGS = {
    # vocab 101 and 3C = 96 leave row tails the 4-row kernel does not cover
    "tiny": GPT2Config(vocab_size=101, n_positions=96, n_embd=32, n_layer=2, n_head=2),
    "124M-geometry": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=2, n_head=12),
    # 40 channels, not a multiple of 16: the K/V are copied from the QKV output instead of stored by its epilogue
    "odd-channels": GPT2Config(vocab_size=67, n_positions=96, n_embd=40, n_layer=2, n_head=2),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = GPT2(CONFIGS[name]).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and biases
        for n, p in model.named_parameters():
            if n.endswith("bias") or ".ln_" in n or n.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _batch(model, batch_size, block_size, seed):
    """A pool filled with random K/V, shuffled block tables and a decode token per sequence at irregular lengths."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    max_blocks = (c.n_positions + block_size - 1) // block_size
    num_blocks = batch_size * max_blocks + 3
    kv = torch.randn(c.n_layer, 2, num_blocks, block_size, c.n_head, c.head_dim, generator=g)
    lens = torch.randint(1, c.n_positions + 1, (batch_size,), generator=g)
    lens[0] = 1
    if batch_size > 1:
        lens[1] = block_size - 1
    if batch_size > 2:
        lens[2] = c.n_positions
    tables = torch.randperm(num_blocks, generator=g)[: batch_size * max_blocks].view(batch_size, max_blocks).int()
    pos = (lens - 1).long()
    slots = (tables.long().gather(1, (pos // block_size)[:, None])[:, 0] * block_size + pos % block_size)
    ids = torch.randint(0, c.vocab_size, (batch_size,), generator=g)
    return kv, ids, pos, slots, tables, lens.int()


def _decode(step, ids, pos, slots, tables):
    """A decode batch through the C++ step: token b is sequence b's, every row's logits."""
    index = torch.arange(len(ids), dtype=torch.int32)
    return step(ids, pos, slots, index, tables, torch.arange(len(ids)))


def _torch_step(model, kv, ids, pos, slots, tables, lens, monkeypatch):
    monkeypatch.setenv("FASTGPT2_FORCE_REFERENCE", "1")  # the torch model on the reference kernels
    meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=len(ids), decode_block_tables=tables,
                             decode_seq_lens=lens, prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                             prefill_seq_lens=lens[:0], prefill_block_tables=tables[:0], num_prefills=0,
                             prefill_max_query_len=0, scale=model.config.head_dim ** -0.5)
    with torch.inference_mode():
        kv_caches = [(kv[i, 0], kv[i, 1]) for i in range(len(kv))]
        return model.forward_paged(ids, pos, meta, kv_caches, torch.arange(len(ids)))


@pytest.mark.isa_variants
@pytest.mark.parametrize("name", list(CONFIGS))
# The GEMV kernels' token blocks are 3, 2 and 1 (7 = 3 + 3 + 1, 8 = 3 + 3 + 2, 13, 23, 64); their 4-row blocks leave
# row tails for vocab 101 and 50257 (the packed-panel GEMM, switched off for batch invariance, took 12 and more).
@pytest.mark.parametrize("batch_size,block_size", [(1, 16), (2, 32), (3, 16), (7, 32), (8, 16), (13, 16), (23, 32),
                                                   (64, 16)])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_matches_torch_model(name, batch_size, block_size, num_threads, monkeypatch):
    model = _model(name)
    kv, ids, pos, slots, tables, lens = _batch(model, batch_size, block_size, seed=batch_size * 7 + block_size)
    kv_native = kv.clone()
    expected = _torch_step(model, kv, ids, pos, slots, tables, lens, monkeypatch)
    step = CpuStep(model, kv_native)
    monkeypatch.setattr(torch, "get_num_threads", lambda: num_threads)
    logits = _decode(step, ids, pos, slots, tables)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(kv_native, kv, atol=1e-5, rtol=1e-5)  # the same K/V written at the same slots
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.isa_variants
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch_size", [1, 3, 8, 17])
def test_bfloat16_weights_match_the_rounded_torch_model(name, batch_size, monkeypatch):
    """With decode_weight_dtype = bfloat16 the C++ step reads its own bf16 copies of the weight matrices: built from
    an unrounded float32 model, it matches the torch model whose weights were rounded by torch (same rounding), and
    differs from the unrounded one."""
    model = _model(name, seed=11)
    rounded = copy.deepcopy(model).round_weights_to_bfloat16()
    kv, ids, pos, slots, tables, lens = _batch(model, batch_size, 16, seed=batch_size)
    kv_native = kv.clone()
    expected = _torch_step(rounded, kv.clone(), ids, pos, slots, tables, lens, monkeypatch)
    unrounded = _torch_step(model, kv.clone(), ids, pos, slots, tables, lens, monkeypatch)
    model.decode_weight_dtype = torch.bfloat16
    step = CpuStep(model, kv_native)
    assert step.weight_dtype == "bfloat16"
    logits = _decode(step, ids, pos, slots, tables)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    assert (logits - unrounded).abs().max() > 10 * (logits - expected).abs().max()


@pytest.mark.isa_variants
def test_steps_chain_like_the_torch_model(monkeypatch):
    """Ten decode steps in a row: each step's K/V is what the next attends to."""
    model = _model("tiny", seed=3)
    c, bs = model.config, 16
    kv = torch.zeros(c.n_layer, 2, 8, bs, c.n_head, c.head_dim)
    kv_native = kv.clone()
    step = CpuStep(model, kv_native)
    tables = torch.tensor([[5, 2, 7], [1, 6, 0]], dtype=torch.int32)
    tok_t = tok_n = torch.tensor([3, 77])
    for t in range(20):
        pos = torch.tensor([t, t])
        slots = tables.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
        lens = (pos + 1).int()
        expected = _torch_step(model, kv, tok_t, pos, slots, tables, lens, monkeypatch)
        logits = _decode(step, tok_n, pos, slots, tables)
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
        tok_t, tok_n = expected.argmax(-1), logits.argmax(-1)
        assert torch.equal(tok_t, tok_n)


def _mixed(model, block_size, chunks, seed):
    """A pool with random K/V and one mixed step: per sequence (cached, new) tokens, decodes (new == 1) first as the
    scheduler orders them. Returns kv, the step's arguments for CpuStep and the metadata for forward_paged."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    max_blocks = (c.n_positions + block_size - 1) // block_size
    num_blocks = len(chunks) * max_blocks + 2
    kv = torch.randn(c.n_layer, 2, num_blocks, block_size, c.n_head, c.head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(chunks) * max_blocks].view(len(chunks), max_blocks).int()
    ids, pos, index = [], [], []
    for s, (cached, new) in enumerate(chunks):
        ids += torch.randint(0, c.vocab_size, (new,), generator=g).tolist()
        pos += range(cached, cached + new)
        index += [s] * new
    ids, pos, index = torch.tensor(ids), torch.tensor(pos), torch.tensor(index, dtype=torch.int32)
    slots = tables.long()[index.long(), pos // block_size] * block_size + pos % block_size
    lens = torch.tensor([cached + new for cached, new in chunks], dtype=torch.int32)
    nd = sum(new == 1 for _, new in chunks)
    assert all(new == 1 for _, new in chunks[:nd])
    q_lens = [new for _, new in chunks[nd:]]
    meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=nd, decode_block_tables=tables[:nd],
                             decode_seq_lens=lens[:nd],
                             prefill_cu_seqlens_q=torch.tensor([0] + q_lens).cumsum(0).int(),
                             prefill_seq_lens=lens[nd:], prefill_block_tables=tables[nd:], num_prefills=len(q_lens),
                             prefill_max_query_len=max(q_lens, default=0), scale=c.head_dim ** -0.5)
    return kv, (ids, pos, slots, index, tables), meta


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunks,block_size", [
    ([(0, 5)], 16),  # one fresh prompt
    ([(4, 1), (0, 1), (0, 37)], 16),  # decodes, then a prompt longer than two query tiles
    ([(20, 1), (33, 1), (7, 1), (0, 13), (16, 20), (3, 2)], 8),  # prefix-cache hits and chunk continuations
    ([(90, 1), (40, 50)], 32),  # a chunk ending at the context's end
])
def test_mixed_steps_match_torch_model(name, chunks, block_size, monkeypatch):
    """Prefill chunks (after a cached prefix or not) and decodes in one step: every row's logits and every K/V
    written equal the torch model's forward_paged to float32 rounding."""
    model = _model(name, seed=5)
    kv, args, meta = _mixed(model, block_size, chunks, seed=len(chunks))
    kv_native = kv.clone()
    n = len(args[0])
    monkeypatch.setenv("FASTGPT2_FORCE_REFERENCE", "1")
    with torch.inference_mode():
        expected = model.forward_paged(args[0], args[1], meta, [(kv[i, 0], kv[i, 1]) for i in range(len(kv))],
                                       torch.arange(n))
    monkeypatch.delenv("FASTGPT2_FORCE_REFERENCE")
    logits = CpuStep(model, kv_native)(*args, torch.arange(n))
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(kv_native, kv, atol=1e-5, rtol=1e-5)
    # Only the rows asked for, in the order asked for: the same values bitwise (the last layer then runs past its
    # QKV on those rows alone), and the same K/V written, none of the rows asked for included.
    rows = torch.tensor([n - 1, 0, n // 2])
    kv_again = kv.clone()
    assert torch.equal(CpuStep(model, kv_again)(*args, rows), logits[rows])
    assert torch.equal(kv_again, kv_native)
    kv_none = kv.clone()
    assert CpuStep(model, kv_none)(*args, rows[:0]).shape == (0, model.config.vocab_size)
    assert torch.equal(kv_none, kv_native)
    # Greedy tokens picked in the LM head's epilogue: torch.argmax of those logits over the first `limit` ids.
    for limit in (model.config.vocab_size, model.config.vocab_size - 7):
        kv_greedy = kv.clone()
        tokens = CpuStep(model, kv_greedy)(*args, rows, greedy_limit=limit)
        assert torch.equal(tokens, torch.argmax(logits[rows, :limit], dim=-1))
        assert torch.equal(kv_greedy, kv_native)


def test_a_step_split_into_calls_is_the_same_step(monkeypatch):
    """max_tokens_per_call splits a long step in packed order (a chunk's later tokens attend to the K/V the earlier
    call wrote): the same logits and K/V bitwise."""
    model = _model("tiny", seed=8)
    kv, args, _ = _mixed(model, 8, [(5, 1), (0, 30), (12, 9)], seed=3)
    kv_split = kv.clone()
    n = len(args[0])
    rows = torch.tensor([0, 30, 39, 3, 17])
    whole = CpuStep(model, kv)(*args, rows)
    step = CpuStep(model, kv_split)
    monkeypatch.setattr(step, "max_tokens_per_call", 7)
    assert n > 7 and torch.equal(step(*args, rows), whole)
    assert torch.equal(kv_split, kv)
    assert torch.equal(step(*args, rows, greedy_limit=50), torch.argmax(whole[:, :50], dim=-1))


@pytest.mark.parametrize("field,value,message", [
    ("ids", 101, r"token_ids\[0\] = 101 is outside \[0, 101\)"),
    ("pos", 96, r"positions\[0\] = 96 is outside"),
    ("slots", -1, r"slots\[0\] = -1 is outside"),
    ("slots", 3, r"slots\[0\] = 3 is not the slot of positions\[0\]"),
    ("tables", 10_000, r"block_tables\[0\] = 10000 is outside"),
    ("index", 1, r"seq_index\[0\] = 1 is outside \[0, 1\)"),
    ("rows", 1, r"logits_indices\[0\] = 1 is outside \[0, 1\)"),
])
def test_bad_batches_are_clear_errors(field, value, message):
    model = _model("tiny")
    kv, ids, pos, slots, tables, lens = _batch(model, 1, 16, seed=0)
    before = kv.clone()
    step = CpuStep(model, kv)
    args = dict(ids=ids, pos=pos, slots=slots, index=torch.zeros(1, dtype=torch.int32), tables=tables,
                rows=torch.zeros(1, dtype=torch.long))
    args[field] = args[field].clone()
    args[field].view(-1)[0] = value
    with pytest.raises(ValueError, match=message):
        step(*args.values())
    with pytest.raises(ValueError, match=message):
        step(*args.values(), greedy_limit=10)
    assert torch.equal(kv, before)  # nothing written


def test_bad_greedy_limit_is_a_clear_error():
    model = _model("tiny")
    kv, ids, pos, slots, tables, lens = _batch(model, 1, 16, seed=0)
    before = kv.clone()
    for limit in (0, 102):
        with pytest.raises(ValueError, match=rf"limit must be in \[1, 101\], got {limit}"):
            CpuStep(model, kv)(ids, pos, slots, torch.zeros(1, dtype=torch.int32), tables,
                               torch.zeros(1, dtype=torch.long), greedy_limit=limit)
    assert torch.equal(kv, before)


def test_positions_past_the_block_table_are_a_clear_error():
    model = _model("tiny")
    kv, ids, pos, slots, tables, lens = _batch(model, 1, 16, seed=0)
    with pytest.raises(ValueError, match=r"positions\[0\] = 40 is outside \[0, 32\), the block table's span"):
        CpuStep(model, kv)(ids, torch.tensor([40]), slots, torch.zeros(1, dtype=torch.int32), tables[:, :2],
                           torch.zeros(1, dtype=torch.long))


def test_wrong_cache_shape_is_a_clear_error():
    model = _model("tiny")
    with pytest.raises(ValueError, match=r"kv_cache must have shape \(2, 2, \*, \*, 2, 16\)"):
        CpuStep(model, torch.zeros(2, 2, 4, 16, 4, 8))(
            torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), torch.zeros(1, dtype=torch.int32),
            torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0]))
