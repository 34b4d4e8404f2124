"""BlockManager: the KV block pool's bookkeeping (plain Python): free list, block tables, reference counts,
copy-on-write of shared partly-filled blocks, and automatic prefix caching with least-recently-used eviction.

A full block is identified by its chain key, SHA-256 of (the previous block's key, its token ids), so two different
prefixes never share a key in practice (Python's hash() collides by design, and a collision would serve another
prompt's KV; vLLM moved to SHA-256 for the same reason). A freed block keeps its key and stays reusable until the free
list hands it out again, least recently freed first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from fastgpt2.engine.sequence import Sequence


def block_key(parent: bytes | None, tokens: tuple) -> bytes:
    """Chain key of a full block: SHA-256 over the parent block's key and the block's token ids (int64 each)."""
    digest = hashlib.sha256(parent or b"root")
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order
        self.hash_to_block: dict[bytes, int] = {}
        self.block_to_hash: dict[int, bytes] = {}
        self.block_tokens: dict[int, tuple] = {}  # token ids of registered blocks, to rule out hash collisions
        self.num_cache_hits = 0  # tokens served from the prefix cache (for stats and tests)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ---------------------------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks (and their hashes) matching the start of seq's tokens; the last token, and the prompt
        positions whose logits a request still wants (prompt logprobs), are always recomputed."""
        if not self.enable_prefix_caching:
            return [], []
        blocks, hashes, parent = [], [], None
        for i in range(seq.num_cacheable_tokens // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_key(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.block_tokens[block_id] != tokens:
                break
            blocks.append(block_id)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (new weights make their K/V stale). Blocks in use keep their contents."""
        self.hash_to_block.clear()
        self.block_to_hash.clear()
        self.block_tokens.clear()

    # -- allocation -----------------------------------------------------------------------------------------------
    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int, cached_blocks=()) -> int:
        """Free-list blocks that allocate(seq, num_new_tokens, cached_blocks) would consume."""
        have = len(seq.block_table) + len(cached_blocks)
        computed = len(cached_blocks) * self.block_size if cached_blocks else seq.num_computed_tokens
        need = max(0, self.blocks_for(computed + num_new_tokens) - have)
        need += sum(1 for b in cached_blocks if self.ref_counts[b] == 0)  # revived from the free list
        if self._needs_copy_on_write(seq):
            need += 1
        return need

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks=()) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens, cached_blocks) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks=(), cached_hashes=()) -> list[tuple[int, int]]:
        """Give seq the blocks to hold num_new_tokens more tokens. Returns (src, dst) block copies to perform."""
        copies = []
        for block_id in cached_blocks:
            self._take(block_id)
            seq.block_table.append(block_id)
        if cached_blocks:
            seq.block_hashes.extend(cached_hashes)
            seq.num_computed_tokens = len(seq.block_table) * self.block_size
            self.num_cache_hits += seq.num_computed_tokens
        if self._needs_copy_on_write(seq):
            src = seq.block_table[-1]
            dst = self._pop_free()
            self.ref_counts[src] -= 1
            seq.block_table[-1] = dst
            copies.append((src, dst))
        while len(seq.block_table) < self.blocks_for(seq.num_computed_tokens + num_new_tokens):
            seq.block_table.append(self._pop_free())
        return copies

    def _needs_copy_on_write(self, seq: Sequence) -> bool:
        # The next token lands in the last block when it is partly filled; shared, it must be copied first.
        if seq.num_computed_tokens % self.block_size == 0 or not seq.block_table:
            return False
        last = seq.block_table[(seq.num_computed_tokens - 1) // self.block_size]
        return self.ref_counts[last] > 1

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full once seq.num_computed_tokens tokens are in the cache."""
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_key(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block_id = seq.block_table[i]
            if self.enable_prefix_caching and h not in self.hash_to_block and block_id not in self.block_to_hash:
                self.hash_to_block[h] = block_id
                self.block_to_hash[block_id] = h
                self.block_tokens[block_id] = tokens

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks (reference counted)."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        for block_id in child.block_table:
            self.ref_counts[block_id] += 1

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; unreferenced blocks return to the free list, tail blocks first so that the shared
        prompt heads stay cached longest."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_block_ids[block_id]
        self.ref_counts[block_id] += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)  # least recently freed
        h = self.block_to_hash.pop(block_id, None)
        if h is not None:  # evict its cached contents
            del self.hash_to_block[h]
            del self.block_tokens[block_id]
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id
