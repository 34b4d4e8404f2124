"""Pre-tokenised shards: raw little-endian uint16 token ids, no header (nanoGPT's train.bin format), memory-mapped for
training, written by `fastgpt2 prepare-data` with documents each followed by <|endoftext|>."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in 16 bits


def check_shard(path: Path) -> int:
    """The number of tokens in a shard; ValueError for an odd byte count or an empty file."""
    num_bytes = os.path.getsize(path)
    if num_bytes % TOKEN_DTYPE.itemsize:
        raise ValueError(f"shard {path} has {num_bytes} bytes, an odd count: a .bin shard holds 2-byte token ids; "
                         "it is truncated or not a token file (write it again with `fastgpt2 prepare-data`)")
    if num_bytes == 0:
        raise ValueError(f"shard {path} is empty; delete it or write it again with `fastgpt2 prepare-data`")
    return num_bytes // TOKEN_DTYPE.itemsize


def open_shard(path: Path) -> np.ndarray:
    """A read-only memory map of a checked shard: (num_tokens,) uint16."""
    check_shard(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


class ShardWriter:
    """Writes a token stream into `<directory>/<prefix>_000000.bin`, ... of at most `shard_tokens` tokens each. Each
    shard is written under a temporary name and renamed when complete, so a crash never leaves a short shard."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int):
        if shard_tokens < 2:
            raise ValueError(f"shard_tokens must be at least 2, got {shard_tokens}")
        self.directory, self.prefix, self.shard_tokens = Path(directory), prefix, shard_tokens
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self.num_tokens = 0
        self._buffer = np.empty(shard_tokens, TOKEN_DTYPE)
        self._filled = 0

    def write(self, ids) -> None:
        ids = np.asarray(ids, dtype=TOKEN_DTYPE)
        while len(ids):
            n = min(len(ids), self.shard_tokens - self._filled)
            self._buffer[self._filled:self._filled + n] = ids[:n]
            self._filled += n
            ids = ids[n:]
            if self._filled == self.shard_tokens:
                self._flush()

    def close(self) -> list[Path]:
        if self._filled:
            self._flush()
        return self.paths

    def _flush(self) -> None:
        path = self.directory / f"{self.prefix}_{len(self.paths):06d}.bin"
        tmp = path.with_name(f".{path.name}.tmp")
        self._buffer[:self._filled].tofile(tmp)
        os.replace(tmp, path)
        self.paths.append(path)
        self.num_tokens += self._filled
        self._filled = 0
