"""Decode steps captured in CUDA graphs for a ladder of batch sizes and replayed: a 124M model's decode step is ~150
small kernels, so without graphs it is bound by launch overhead, not by the GPU.

A batch of B decode tokens runs on the smallest rung S >= B: its inputs are copied into static buffers, rows B..S-1
are padding (slot -1, so they write no K/V; one context token; their logits are dropped), and the graph captured
for S is replayed. With capture=False the same static-buffer step runs eagerly, which is how CPU tests check the
padding logic without a GPU.
"""
from __future__ import annotations

import torch

from fastgpt2.model.attention import AttentionMetadata


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, ... below max_num_seqs, then max_num_seqs itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes, s = [], 1
    while s < max_num_seqs:
        sizes.append(s)
        s *= 2
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Static-buffer decode steps for every rung of batch_size_ladder(max_num_seqs), captured when capture=True.

    model : GPT2 on its device; kv_caches : per-layer (k_cache, v_cache) views of the pool; block_size : tokens per
    block. Block tables are always max_blocks = ceil(n_positions / block_size) wide, so one graph serves any context.
    """

    def __init__(self, model, kv_caches, block_size: int, max_num_seqs: int, scale: float, capture: bool = True):
        c = model.config
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = batch_size_ladder(max_num_seqs)
        self.max_batch_size = self.sizes[-1]
        self.max_blocks = -(-c.n_positions // block_size)
        self.scale = scale
        dev = model.wte.weight.device
        m = self.max_batch_size
        self.token_ids = torch.zeros(m, dtype=torch.long, device=dev)  # (M,)
        self.positions = torch.zeros(m, dtype=torch.long, device=dev)  # (M,)
        self.slots = torch.full((m,), -1, dtype=torch.long, device=dev)  # (M,) -1: padding writes nothing
        self.block_tables = torch.zeros(m, self.max_blocks, dtype=torch.int32, device=dev)  # (M, max_blocks)
        self.seq_lens = torch.ones(m, dtype=torch.int32, device=dev)  # (M,) padding attends to one token
        self.cu_seqlens = torch.zeros(1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def rung(self, batch_size: int) -> int:
        """The smallest captured size >= batch_size."""
        for s in self.sizes:
            if s >= batch_size:
                return s
        raise ValueError(f"a decode batch of {batch_size} exceeds the largest graph ({self.max_batch_size})")

    @torch.inference_mode()
    def _forward(self, size: int) -> torch.Tensor:
        """The model over the first `size` static rows; returns (size, vocab) logits in the model's dtype."""
        tables = self.block_tables[:size]
        meta = AttentionMetadata(
            slot_mapping=self.slots[:size], num_decode_tokens=size, decode_block_tables=tables,
            decode_seq_lens=self.seq_lens[:size], prefill_cu_seqlens_q=self.cu_seqlens,
            prefill_seq_lens=self.seq_lens[:0], prefill_block_tables=tables[:0], num_prefills=0,
            prefill_max_query_len=0, scale=self.scale,
        )
        return self.model.forward_paged(self.token_ids[:size], self.positions[:size], meta, self.kv_caches)

    def _capture_all(self) -> None:
        # Largest first, so that the smaller graphs reuse its memory pool. Each size runs once eagerly first so that
        # every Triton kernel is compiled (and any lazy init done) outside the capture.
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    @torch.inference_mode()
    def __call__(self, token_ids, positions, slots, block_tables, seq_lens) -> torch.Tensor:
        """token_ids, positions, slots : (B,) int64; block_tables : (B, w) int32 with w <= max_blocks; seq_lens :
        (B,) int32. Writes the new K/V into the pool; returns (B, vocab) logits (a view of a static buffer, valid
        until the next run)."""
        b, width = block_tables.shape
        if width > self.max_blocks:
            raise ValueError(f"block tables are {width} blocks wide, more than the model's context ({self.max_blocks})")
        size = self.rung(b)
        # 1. This step's rows; 2. padding rows up to the rung (stale rows from a larger earlier step are reset).
        self.token_ids[:b].copy_(token_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slots[:b].copy_(slots, non_blocking=True)
        self.seq_lens[:b].copy_(seq_lens, non_blocking=True)
        self.block_tables[:b, :width].copy_(block_tables, non_blocking=True)
        self.block_tables[:b, width:].zero_()
        if size > b:
            self.token_ids[b:size].zero_()
            self.positions[b:size].zero_()
            self.slots[b:size].fill_(-1)
            self.seq_lens[b:size].fill_(1)
            self.block_tables[b:size].zero_()
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:b]
        return self._forward(size)[:b]
