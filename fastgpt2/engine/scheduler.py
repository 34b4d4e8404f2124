"""Scheduler: continuous batching under a token budget, chunked prefill, and preemption by recomputation.

Each step mixes decodes (one token per running sequence) and prompt chunks under max_num_seqs and
max_num_batched_tokens. When the block pool runs out, the newest running sequences are preempted: their blocks are
freed and they go back to the front of the waiting queue, to be recomputed later (prefix caching makes that cheap).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fastgpt2.engine.block_manager import BlockManager
from fastgpt2.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    """What to run this step: decodes first (one token each), then prefill chunks; and block copies to do first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_decodes: int = 0
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """1. Running sequences, oldest first, each get their next token(s), preempting the newest when blocks run
        out. 2. If nothing was preempted, waiting sequences are admitted (prefix-cache hits first) while the token
        budget, max_num_seqs and free blocks allow; a long prompt is admitted in budget-sized chunks."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        decodes, prefills = [], []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.block_copies += bm.allocate(seq, num_new)
                (decodes if num_new == 1 else prefills).append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # seq itself was preempted: everything after it already was too
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.num_preempted:
            seq = self.waiting[0]
            cached_blocks, cached_hashes = bm.find_cached_prefix(seq)
            num_cached = len(cached_blocks) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.can_allocate(seq, num_new, cached_blocks):
                break
            self.waiting.popleft()
            out.block_copies += bm.allocate(seq, num_new, cached_blocks, cached_hashes)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            (decodes if num_new == 1 else prefills).append((seq, num_new))
            budget -= num_new
        for seq, n in decodes + prefills:
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
        out.num_decodes = len(decodes)
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        seq.num_preemptions += 1

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins the running batch right behind its parent's position (it shares its blocks)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """seq leaves the scheduler wherever it is (running, or still waiting when aborted) and its blocks are freed."""
        if seq.status == SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
