"""Packing token streams into fixed-length training sequences, and the deterministic order in which every rank reads
them: a pure function of (seed, step), so that a resumed run reads exactly what the interrupted one would have."""
from __future__ import annotations

import math

import numpy as np
import torch

from fastgpt2.train.data import TokenStreams

IGNORE_INDEX = -100  # a target position that takes no part in the loss


class PackedBlocks:
    """Consecutive windows of seq_len + 1 tokens over each stream (documents joined by <|endoftext|>): inputs are the
    first seq_len tokens, targets the last seq_len. Windows never cross a .bin shard's end; the tail is dropped."""

    def __init__(self, streams: TokenStreams, seq_len: int):
        self.streams, self.seq_len = streams, seq_len
        counts = [max(0, (len(t) - 1) // seq_len) for t in streams.tokens]
        self._starts = np.cumsum([0] + counts)  # first block index of each stream
        if self._starts[-1] == 0:
            raise ValueError(f"{streams.source} holds {streams.num_tokens} tokens, fewer than one sequence of "
                             f"seq_len + 1 = {seq_len + 1}; use a smaller --seq-len or more data")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def batch(self, indices: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, targets: (len(indices), seq_len) int64. A None index is padding: zeros with every target
        ignored (it lets every rank run the same number of forwards in an evaluation)."""
        T = self.seq_len
        input_ids = np.zeros((len(indices), T), np.int64)
        targets = np.full((len(indices), T), IGNORE_INDEX, np.int64)
        for row, index in enumerate(indices):
            if index is None:
                continue
            s = int(np.searchsorted(self._starts, index, side="right")) - 1  # the stream holding this block
            start = (index - int(self._starts[s])) * T
            window = np.asarray(self.streams.tokens[s][start:start + T + 1], dtype=np.int64)  # (T + 1,)
            input_ids[row] = window[:-1]
            targets[row] = window[1:]
            if self.streams.masks is not None:
                keep = np.asarray(self.streams.masks[s][start + 1:start + T + 1])  # (T,) True = a target
                targets[row][~keep] = IGNORE_INDEX
        return torch.from_numpy(input_ids), torch.from_numpy(targets)


class DataOrder:
    """The training order: each epoch a permutation of all blocks seeded by (seed, epoch), read as one endless
    stream, global_batch sequences per step; rank r reads the r-th contiguous slice of each global batch, so ranks
    read disjoint shares and the union over ranks does not depend on the world size."""

    def __init__(self, num_blocks: int, global_batch: int, rank: int, world_size: int, seed: int):
        assert global_batch % world_size == 0, "batch_plan checks that the world size divides the batch"
        self.num_blocks, self.global_batch, self.seed = num_blocks, global_batch, seed
        self.rank_batch = global_batch // world_size
        self.rank = rank
        self._epoch, self._perm = -1, None

    def rank_indices(self, step: int) -> list[int]:
        """Block ids this rank reads at optimizer step `step` (0-based): rank_batch of them."""
        first = step * self.global_batch + self.rank * self.rank_batch  # position in the endless stream
        return [self._block_at(first + i) for i in range(self.rank_batch)]

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch / self.num_blocks

    def state_dict(self) -> dict:
        return {"num_blocks": self.num_blocks, "global_batch": self.global_batch, "seed": self.seed}

    def _block_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_blocks)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.num_blocks, generator=generator).numpy(), epoch
        return int(self._perm[offset])


def eval_batches(num_blocks: int, micro_batch_size: int, rank: int, world_size: int,
                 max_blocks: int | None = None) -> list[list[int | None]]:
    """This rank's validation micro-batches: blocks rank, rank + world_size, ... of the first max_blocks, padded with
    None so that every rank runs the same number of forwards (FSDP gathers parameters collectively)."""
    n = num_blocks if max_blocks is None else min(num_blocks, max_blocks)
    mine: list[int | None] = list(range(rank, n, world_size))
    per_rank = math.ceil(n / world_size)
    num_batches = math.ceil(per_rank / micro_batch_size)
    mine += [None] * (num_batches * micro_batch_size - len(mine))
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
