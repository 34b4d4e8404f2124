"""Block manager and scheduler on tiny pools: exact block ids, reference counts, copy-on-write, prefix-cache hits,
LRU eviction, chunked prefill and preemption."""
import pytest

from fastgpt2.engine.block_manager import BlockManager
from fastgpt2.engine.sampling_params import SamplingParams
from fastgpt2.engine.scheduler import Scheduler
from fastgpt2.engine.sequence import Sequence, SequenceStatus


def seq(tokens, n=1):
    return Sequence("r", list(tokens), SamplingParams(n=n))


def prefill(bm, s):
    """Admit s with prefix matching and compute all its tokens, as the engine does."""
    blocks, hashes = bm.find_cached_prefix(s)
    num_cached = len(blocks) * bm.block_size
    copies = bm.allocate(s, s.num_tokens - num_cached, blocks, hashes)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)
    return copies


def test_allocate_and_free_exact_ids():
    bm = BlockManager(num_blocks=11, block_size=4)
    a = seq(range(10))  # 3 blocks
    prefill(bm, a)
    assert a.block_table == [0, 1, 2]
    assert bm.ref_counts[:4] == [1, 1, 1, 0]
    assert bm.num_free_blocks == 8
    b = seq(range(100, 105))
    prefill(bm, b)
    assert b.block_table == [3, 4]
    bm.free(a)
    assert bm.num_free_blocks == 9 and bm.ref_counts[:3] == [0, 0, 0]
    # Freed tail-first: the least recently freed is the oldest never-used block, then 2, 1, 0.
    assert list(bm.free_block_ids)[-3:] == [2, 1, 0]


def test_prefix_cache_hit_shares_full_blocks_and_recomputes_last_token():
    bm = BlockManager(num_blocks=11, block_size=4)
    a = seq(range(12))  # exactly 3 full blocks
    prefill(bm, a)
    b = seq(list(range(8)) + [99, 98, 97, 96, 95])  # shares the first 2 blocks
    blocks, _ = bm.find_cached_prefix(b)
    assert blocks == [0, 1]
    prefill(bm, b)
    assert b.block_table[:2] == [0, 1] and b.block_table[2:] == [3, 4]
    assert bm.ref_counts[:5] == [2, 2, 1, 1, 1]
    assert bm.num_cache_hits == 8
    # A prompt equal to a cached one still recomputes its last token: 12 tokens -> 2 blocks hit, not 3.
    c = seq(range(12))
    assert bm.find_cached_prefix(c)[0] == [0, 1]


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq(range(9))  # blocks 0, 1 full + 2 partial
    prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 6
    b = seq(range(9))
    assert bm.find_cached_prefix(b)[0] == [0, 1]  # still cached after free
    # Consume the free list: 3, 4, 5 were never used, then 2 (freed first), then 1: block 1 is evicted.
    filler = seq(range(500, 520))  # 5 blocks
    prefill(bm, filler)
    assert filler.block_table == [3, 4, 5, 2, 1]
    assert bm.find_cached_prefix(b)[0] == [0]  # block 1's contents are gone; block 0 survives


def test_fork_and_copy_on_write():
    bm = BlockManager(num_blocks=11, block_size=4)
    parent = seq(range(6), n=2)  # block 0 full, block 1 holds 2 tokens
    prefill(bm, parent)
    child = Sequence("r", parent.token_ids, parent.params, index=1)
    bm.fork(parent, child)
    assert child.block_table == [0, 1] and bm.ref_counts[:2] == [2, 2]
    parent.token_ids.append(7)
    child.token_ids.append(8)
    copies = bm.allocate(parent, 1)  # writes into shared block 1 -> copy
    assert copies == [(1, 2)] and parent.block_table == [0, 2]
    assert bm.ref_counts[:3] == [2, 1, 1]
    assert bm.allocate(child, 1) == []  # now the only owner of block 1: writes in place
    assert child.block_table == [0, 1]


def test_block_boundary_append_needs_new_block():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(range(8))
    prefill(bm, a)
    a.token_ids.append(1)
    assert bm.num_blocks_needed(a, 1) == 1
    assert bm.allocate(a, 1) == [] and a.block_table == [0, 1, 2]
    assert not bm.can_allocate(seq(range(3)), 3)


def _step(sched):
    out = sched.schedule()
    for s, n in zip(out.seqs, out.num_new_tokens):
        s.num_computed_tokens += n
        sched.block_manager.commit(s)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(7)  # "sampled" token
    return out


def test_scheduler_chunked_prefill_and_decode_first():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    short, long = seq(range(3)), seq(range(100, 140))
    sched.add(short)
    _step(sched)  # short's prompt
    sched.add(long)
    out = _step(sched)
    assert out.seqs == [short, long] and out.num_new_tokens == [1, 15] and out.num_decodes == 1
    out = _step(sched)
    assert out.num_new_tokens == [1, 15]
    out = _step(sched)
    assert out.num_new_tokens == [1, 10]  # the last 10 prompt tokens
    assert long.num_computed_tokens == 40 and long.num_tokens == 41


def test_scheduler_preempts_newest_and_recomputes():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(range(4)), seq(range(10, 14))
    sched.add(a)
    sched.add(b)
    _step(sched)  # both prefilled: blocks 0 and 1
    _step(sched)  # both decode: 5th token needs blocks 2 and 3
    assert bm.num_free_blocks == 0
    for _ in range(3):
        _step(sched)
    out = _step(sched)  # a needs a third block: b (newest) is preempted
    assert out.num_preempted == 1 and b.status == SequenceStatus.WAITING and b.block_table == []
    assert sched.waiting[0] is b and sched.running == [a]


def test_block_manager_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
