"""The CPU path's contract: a token's K/V, attention, logits, logprobs and seeded draw are bitwise the same whatever
else is in its step. Checked at three levels, always with torch.equal / ==, never a tolerance:

  1. attention: the multi-query path of a prefill chunk (attend_queries) against the one-query path of a decode
     (attend_one_head), per (query, head);
  2. the C++ step: a sequence's logits rows and K/V computed token by token alone, against the same tokens in
     prefill chunks of many sizes and packed with other sequences into steps whose token counts and logits-row counts
     cross every kernel switch point (the GEMV kernels' 3/2/1-token blocks, the former GEMM switch at 12, the
     attention's 16-query tiles, K/V blocks);
  3. the engine: seeded requests over flat distributions (tail draws happen) give the same tokens and logprobs alone,
     in batches of 1..64, chunked, after a prefix-cache hit, after preemption, with prompt logprobs.

And the sampler's per-row purity (log_softmax, the C++ draw), which the engine-level equality relies on. The torch
path (FASTGPT2_NATIVE_DECODE=0) is held to float32 rounding only: last test.
"""
import pytest
import torch

from fastgpt2 import GPT2, LLM, GPT2Config, SamplingParams
from fastgpt2.engine.cpu_step import CpuStep
from fastgpt2.kernels import dispatch, native, reference
from tests.conftest import make_hf_model

pytestmark = pytest.mark.skipif(not native.HAS_EXTENSION, reason="C++ extension not built")

# Token counts per step that cross every switch point: 1..5 (the 3/2/1-token GEMV blocks), 11/12/13 (the former GEMM
# switch), 16/17 (a query tile), 33, 64.
STEP_SIZES = [1, 2, 3, 4, 5, 11, 12, 13, 16, 17, 33, 64]
# And the AVX-512 GEMM's split of a step's tokens over the threads (from 48 per thread; the engine's pool has
# torch.get_num_threads() threads): 100 and 130 tokens on two.
STEP_TOKENS = STEP_SIZES + [100, 130]


# -- 1. attention ----------------------------------------------------------------------------------------------------

@pytest.mark.isa_variants
@pytest.mark.parametrize("num_heads,head_dim,block_size",
                         [(2, 64, 16), (2, 64, 7), (1, 64, 20), (3, 16, 7), (2, 12, 8)])
def test_multi_query_attention_is_bitwise_the_one_query_path(num_heads, head_dim, block_size):
    """Packed queries of several sequences (chunks longer than a 16-query tile, a chunk after a cached prefix, lone
    decodes) against each query alone through paged_decode_attention (attend_one_head). With head_dim 64 and AVX-512,
    groups of 12-16 queries take the query-lanes scores (the 29-token chunk's second group has 13, the others' last
    groups 5 and 8 take the pairs); blocks of 7 and 20 keys cut its 16-key tiles. head_dim 12 takes the portable dot
    product."""
    g = torch.Generator().manual_seed(head_dim + block_size)
    max_blocks, num_blocks = 12, 50
    kv = torch.randn(2, num_blocks, block_size, num_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[:4 * max_blocks].view(4, max_blocks).int()
    # (sequence, first position, count): sequence 0 a 37-token prompt, 1 a decode, 2 a chunk after 19 cached tokens,
    # 3 a 29-token chunk after 7.
    chunks = [(0, 0, 37), (1, 50, 1), (2, 19, 40), (1, 51, 1), (3, 7, 29)]
    index = torch.tensor([s for s, _, n in chunks for _ in range(n)], dtype=torch.int32)
    lens = torch.tensor([p + 1 for _, first, n in chunks for p in range(first, first + n)], dtype=torch.int32)
    q = torch.randn(len(index), num_heads, head_dim, generator=g)
    scale = head_dim ** -0.5
    packed = torch.empty_like(q)
    native._C.paged_packed_attention(q.numpy(), kv[0].numpy(), kv[1].numpy(), tables.numpy(), index.numpy(),
                                     lens.numpy(), packed.numpy(), scale, 2)
    alone = torch.empty_like(q)
    native._C.paged_decode_attention(q.numpy(), kv[0].numpy(), kv[1].numpy(), tables[index.long()].contiguous().numpy(),
                                     lens.numpy(), alone.numpy(), scale, 1)
    assert torch.equal(packed, alone)
    # and the values are attention's (float32 rounding against the float64 reference)
    ref = reference.paged_decode_attention(q.double(), kv[0].double(), kv[1].double(), tables[index.long()], lens,
                                           scale)
    torch.testing.assert_close(packed.double(), ref, atol=1e-5, rtol=1e-5)


def test_packed_attention_errors_are_clear():
    q = torch.zeros(2, 1, 8)
    kv = torch.zeros(4, 4, 1, 8)
    tables = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seq_index\[1\] = 1 is outside \[0, 1\)"):
        native._C.paged_packed_attention(q.numpy(), kv.numpy(), kv.numpy(), tables.numpy(),
                                         torch.tensor([0, 1], dtype=torch.int32).numpy(),
                                         torch.tensor([1, 2], dtype=torch.int32).numpy(), q.clone().numpy(), 1.0, 1)


# -- 2. the C++ step -------------------------------------------------------------------------------------------------

STEP_CONFIGS = {
    # vocab 50257: the LM head's 4-row blocks leave a tail; head_dim 32
    "tiny": GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=2),
    # K = 768 and 3072 for the kernels' blocking over K; heads of 64
    "124M-width": GPT2Config(vocab_size=1031, n_positions=128, n_embd=768, n_layer=1, n_head=12),
}


class _Pool:
    """A KV pool with random content (the 'cached' K/V of other sequences) and block tables: row 0 is the target
    sequence's, rows 1.. other sequences'."""

    def __init__(self, model, num_seqs, block_size=16, seed=0):
        c = model.config
        g = torch.Generator().manual_seed(seed)
        self.block_size, self.max_blocks = block_size, -(-c.n_positions // block_size)
        self.kv = torch.randn(c.n_layer, 2, num_seqs * self.max_blocks + 1, block_size, c.n_head, c.head_dim,
                              generator=g)
        self.tables = torch.randperm(num_seqs * self.max_blocks + 1, generator=g)[:num_seqs * self.max_blocks]
        self.tables = self.tables.view(num_seqs, self.max_blocks).int()
        self.g = g
        self.vocab, self.n_positions = c.vocab_size, c.n_positions

    def target_kv(self, length):
        """The target's K/V for positions < length, in position order."""
        slots = self.tables[0].long()[torch.arange(length) // self.block_size] * self.block_size + \
            torch.arange(length) % self.block_size
        flat = self.kv.flatten(2, 3)  # (L, 2, slots, H, D)
        return flat[:, :, slots]


def _run(step, pool, parts):
    """One call: parts is a list of (row, positions, token ids); returns logits of every token, packed order."""
    ids = torch.tensor([t for _, ps, ts in parts for t in ts])
    pos = torch.tensor([p for _, ps, _ in parts for p in ps])
    index = torch.tensor([r for r, ps, _ in parts for _ in ps], dtype=torch.int32)
    slots = pool.tables.long()[index.long(), pos // pool.block_size] * pool.block_size + pos % pool.block_size
    return step(ids, pos, slots, index, pool.tables, torch.arange(len(ids)))


def _filler(pool, rows, num_tokens):
    """num_tokens tokens of other sequences: decodes at random positions, and prefill chunks."""
    parts, r = [], 0
    while num_tokens > 0:
        n = 1 if r % 2 == 0 else min(num_tokens, int(torch.randint(1, 20, (1,), generator=pool.g)))
        first = int(torch.randint(0, pool.n_positions - n, (1,), generator=pool.g))
        ids = torch.randint(0, pool.vocab, (n,), generator=pool.g).tolist()
        parts.append((rows[r % len(rows)], list(range(first, first + n)), ids))
        num_tokens -= n
        r += 1
    return parts


@pytest.mark.isa_variants
@pytest.mark.parametrize("name", list(STEP_CONFIGS))
def test_step_logits_and_kv_do_not_depend_on_the_rest_of_the_step(name):
    torch.manual_seed(0)
    model = GPT2(STEP_CONFIGS[name]).eval()
    g = torch.Generator().manual_seed(1)
    length = 40  # 2.5 blocks of 16, 2.5 query tiles
    prompt = torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist()

    # Reference: token by token, each alone in its step (the decode path: N = 1, one attend_one_head per head).
    pool = _Pool(model, 8)
    step = CpuStep(model, pool.kv)
    ref = torch.cat([_run(step, pool, [(0, [p], [prompt[p]])]) for p in range(length)])
    ref_kv = pool.target_kv(length).clone()

    def check(pool, logits):
        assert torch.equal(logits, ref[:len(logits)]) if logits is not None else True
        assert torch.equal(pool.target_kv(length), ref_kv)

    # The whole prompt in one step, and in chunks of several sizes (each chunk after the cached ones).
    for chunk in (length, 3, 7, 12, 13, 16, 17, 33):
        pool = _Pool(model, 8)
        step = CpuStep(model, pool.kv)
        out = [_run(step, pool, [(0, list(range(s, min(s + chunk, length))), prompt[s:s + chunk])])
               for s in range(0, length, chunk)]
        check(pool, torch.cat(out))

    # Packed with other sequences' decodes and chunks, the step holding STEP_TOKENS tokens in all; the target's tokens
    # first, last or in the middle.
    for i, size in enumerate(STEP_TOKENS):
        pool = _Pool(model, 8, seed=0)
        step = CpuStep(model, pool.kv)
        out, s = [], 0
        while s < length:
            n = min(length - s, max(1, size // 3) if size > 1 else 1)  # the target's share of the step
            others = _filler(pool, list(range(1, 8)), size - n)
            at = [0, len(others), len(others) // 2][(i + s) % 3]
            parts = others[:at] + [(0, list(range(s, s + n)), prompt[s:s + n])] + others[at:]
            logits = _run(step, pool, parts)
            first = sum(len(p[1]) for p in parts[:at])
            out.append(logits[first:first + n])
            s += n
        check(pool, torch.cat(out))

    # Logits rows: the target's last token among R = 1..64 wanted rows (the LM head's token blocks).
    pool = _Pool(model, 8)
    step = CpuStep(model, pool.kv)
    _run(step, pool, [(0, list(range(length - 1)), prompt[:-1])])
    parts = _filler(pool, list(range(1, 8)), 63) + [(0, [length - 1], prompt[-1:])]
    ids = torch.tensor([t for _, _, ts in parts for t in ts])
    pos = torch.tensor([p for _, ps, _ in parts for p in ps])
    index = torch.tensor([r for r, ps, _ in parts for _ in ps], dtype=torch.int32)
    slots = pool.tables.long()[index.long(), pos // pool.block_size] * pool.block_size + pos % pool.block_size
    kv0 = pool.kv.clone()
    for r in STEP_SIZES:
        pool.kv.copy_(kv0)
        rows = torch.cat([torch.randperm(63, generator=g)[:r - 1], torch.tensor([63])])[torch.randperm(r, generator=g)]
        logits = step(ids, pos, slots, index, pool.tables, rows)
        assert torch.equal(logits[(rows == 63).nonzero()[0, 0]], ref[length - 1])


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_step_matches_transformers_in_mixed_steps(weights, tmp_path):
    """The C++ step's logits against transformers' on the same contexts, in mixed steps: step 1 prefills A; step 2
    decodes A and prefills a chunk of B and all of C; step 3 decodes A and C and prefills the rest of B. Tolerance:
    float32 rounding (atol 2e-4 on logits of magnitude ~10)."""
    config = STEP_CONFIGS["tiny"]
    hf = make_hf_model(config, seed=3, margin=3.0)
    if weights == "bfloat16":
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    hf.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(str(tmp_path)).eval()
    if weights == "bfloat16":
        model.round_weights_to_bfloat16()
    pool = _Pool(model, 3)
    pool.kv.zero_()
    step = CpuStep(model, pool.kv)
    assert step.weight_dtype == weights
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (30, 45, 9)]
    plan = [[(0, 0, 20)], [(0, 20, 1), (1, 0, 17), (2, 0, 8)], [(0, 21, 1), (2, 8, 1), (1, 17, 28)]]
    with torch.no_grad():
        want = [hf(torch.tensor([s])).logits[0] for s in seqs]
    for parts in plan:
        logits = _run(step, pool, [(r, list(range(a, a + n)), seqs[r][a:a + n]) for r, a, n in parts])
        expected = torch.cat([want[r][a:a + n] for r, a, n in parts])
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-5)


# -- sampler ---------------------------------------------------------------------------------------------------------

def test_sampler_math_is_per_row():
    """log_softmax (logprobs, prompt logprobs) and the C++ top-k/top-p/min-p draw give a row the same result in a
    batch of any size as alone: flat rows, uniforms everywhere in [0, 1)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 50257, generator=g) * 0.5  # flat: many near-equal probabilities
    alone = torch.cat([torch.log_softmax(rows[i:i + 1], dim=-1) for i in range(64)])
    for b in STEP_SIZES:
        assert torch.equal(torch.log_softmax(rows[:b], dim=-1), alone[:b])
        assert torch.equal(torch.log_softmax(rows[:, :50000][:b], dim=-1),
                           torch.cat([torch.log_softmax(rows[i:i + 1, :50000], dim=-1) for i in range(b)]))
    sample = dispatch.get("topk_topp_minp_sample", torch.device("cpu"))
    top_k = torch.tensor([0, 50, 50257, 7] * 16)
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0] * 16)
    min_p = torch.tensor([0.0, 0.0, 0.01, 0.05] * 16)
    for trial in range(3):
        u = torch.rand(64, dtype=torch.float64, generator=g)
        alone = torch.cat([sample(rows[i:i + 1], top_k[i:i + 1], top_p[i:i + 1], min_p[i:i + 1], u[i:i + 1])
                           for i in range(64)])
        for b in STEP_SIZES:
            assert torch.equal(sample(rows[:b], top_k[:b], top_p[:b], min_p[:b], u[:b]), alone[:b])


# -- 3. the engine ---------------------------------------------------------------------------------------------------

ENGINE_CONFIG = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory):
    """A tiny checkpoint whose next-token distributions are flat (ln_f scaled down): at temperature 1.8 a draw lands
    anywhere in the vocabulary, so any rounding difference in the logits could move it."""
    d = tmp_path_factory.mktemp("flat")
    make_hf_model(ENGINE_CONFIG, seed=4, margin=0.5).save_pretrained(d)
    return d


TARGET = list(range(1000, 1037))  # 37 tokens: 2 full blocks of 16 and a partial one
SEEDED = [SamplingParams(temperature=1.8, seed=77, max_tokens=12, logprobs=5, ignore_eos=True),
          SamplingParams(temperature=1.5, top_k=200, top_p=0.9, seed=5, max_tokens=12, logprobs=3, ignore_eos=True)]


def _others(n, seed, max_tokens=(4, 14)):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 50256, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    params = [SamplingParams(temperature=1.0, seed=int(s), max_tokens=int(m), ignore_eos=True)
              for s, m in zip(torch.randint(0, 1000, (n,), generator=g), torch.randint(*max_tokens, (n,), generator=g))]
    return prompts, params


def _result(out):
    o = out.outputs[0]
    return o.token_ids, o.logprobs, o.cumulative_logprob


def _alone(llm):
    return [_result(llm.generate(TARGET, p, use_tqdm=False)[0]) for p in SEEDED]


@pytest.mark.isa_variants
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_seeded_requests_alone_in_batches_and_chunked(flat_dir, quantization):
    llm = LLM(str(flat_dir), device="cpu", enable_prefix_caching=False, quantization=quantization)
    assert llm.engine.runner.cpu_step is not None
    assert llm.engine.runner.cpu_step.weight_dtype == (quantization or "float32")
    want = _alone(llm)
    # Tail draws happen: some sampled token is outside its step's top-5.
    tokens, logprobs, _ = want[0]
    assert any(sum(v > lp[t] for v in lp.values()) >= 5 for t, lp in zip(tokens, logprobs))
    for size in STEP_SIZES[1:]:
        prompts, params = _others(size - 2, seed=size)
        at = (size - 2) // 2
        outs = llm.generate(prompts[:at] + [TARGET, TARGET] + prompts[at:],
                            params[:at] + SEEDED + params[at:], use_tqdm=False)
        assert [_result(outs[at]), _result(outs[at + 1])] == want, f"batch of {size}"
    # Chunked prefill: the target's prompt split at several chunk sizes, next to other requests.
    for budget in (5, 16, 33):
        chunked = LLM(str(flat_dir), device="cpu", max_num_batched_tokens=budget, enable_prefix_caching=False,
                      quantization=quantization)
        prompts, params = _others(6, seed=budget)
        outs = chunked.generate(prompts[:3] + [TARGET, TARGET] + prompts[3:], params[:3] + SEEDED + params[3:],
                                use_tqdm=False)
        assert [_result(outs[3]), _result(outs[4])] == want, f"max_num_batched_tokens={budget}"


@pytest.mark.isa_variants
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_seeded_requests_after_prefix_hits_and_preemption(flat_dir, quantization):
    want = _alone(LLM(str(flat_dir), device="cpu", enable_prefix_caching=False, quantization=quantization))
    llm = LLM(str(flat_dir), device="cpu", quantization=quantization)
    assert _alone(llm) == want
    hits = llm.engine.block_manager.num_cache_hits
    assert _alone(llm) == want  # the prompt's full blocks come from the prefix cache
    assert llm.engine.block_manager.num_cache_hits - hits == 2 * 32
    # 10 blocks of 16 tokens for requests of up to ~90 tokens: constant preemption and recomputation, the targets
    # included.
    block_bytes = 2 * ENGINE_CONFIG.n_layer * 16 * ENGINE_CONFIG.n_embd * 4
    small = LLM(str(flat_dir), device="cpu", kv_cache_memory=10 * block_bytes, seed=3, quantization=quantization)
    prompts, params = _others(12, seed=99, max_tokens=(30, 60))
    outs = small.generate(prompts[:4] + [TARGET, TARGET] + prompts[4:], params[:4] + SEEDED + params[4:],
                          use_tqdm=False)
    assert small.engine.scheduler.num_preemptions >= 3
    assert outs[4].metrics["num_preemptions"] >= 1 and outs[5].metrics["num_preemptions"] >= 1
    assert [_result(outs[4]), _result(outs[5])] == want


def test_prompt_logprobs_alone_batched_and_chunked(flat_dir):
    p = SamplingParams(temperature=1.8, seed=1, max_tokens=3, prompt_logprobs=4, logprobs=2, ignore_eos=True)
    alone = LLM(str(flat_dir), device="cpu").generate(TARGET, p, use_tqdm=False)[0]
    assert len(alone.prompt_logprobs) == len(TARGET) and alone.prompt_logprobs[0] is None
    prompts, params = _others(12, seed=5)
    for llm in (LLM(str(flat_dir), device="cpu"), LLM(str(flat_dir), device="cpu", max_num_batched_tokens=11)):
        out = llm.generate(prompts[:5] + [TARGET] + prompts[5:], params[:5] + [p] + params[5:], use_tqdm=False)[5]
        assert out.prompt_logprobs == alone.prompt_logprobs
        assert _result(out) == _result(alone)


def test_torch_path_agrees_to_rounding(tmp_path, monkeypatch):
    """FASTGPT2_NATIVE_DECODE=0 runs the torch model (MKL): greedy tokens equal (wide margins) and logprobs equal to
    float32 rounding; bitwise equality is promised for the C++ path only."""
    wide_dir = tmp_path
    make_hf_model(ENGINE_CONFIG, seed=4, margin=30.0).save_pretrained(wide_dir)
    p = SamplingParams(temperature=0, max_tokens=15, logprobs=3, ignore_eos=True)
    prompts = [TARGET, TARGET[:5], list(range(300, 350))]
    native_out = LLM(str(wide_dir), device="cpu").generate(prompts, p, use_tqdm=False)
    monkeypatch.setenv("FASTGPT2_NATIVE_DECODE", "0")
    llm = LLM(str(wide_dir), device="cpu")
    assert llm.engine.runner.cpu_step is None
    torch_out = llm.generate(prompts, p, use_tqdm=False)
    for a, b in zip(native_out, torch_out):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-3 for k in x)


@pytest.mark.isa_variants
def test_seeded_requests_do_not_depend_on_the_thread_count(flat_dir):
    """The C++ step's task split follows the thread count; no output element's operations do (packed GEMM chains,
    per-row LayerNorm, per (query, head) attention, full-width GELU vectors)."""
    llm = LLM(str(flat_dir), device="cpu", enable_prefix_caching=False)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_alone(llm))
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2]
