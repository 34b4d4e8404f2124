"""Training data sources: plain text (one document per line, or the whole file), JSONL with `text` or with
`prompt`/`completion` (loss on the completion only), pre-tokenised uint16 `.bin` shards, and Texar's data directories
(train.txt / dev.txt / test.txt). Every source becomes token streams: documents each followed by <|endoftext|>."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastgpt2.train import shards

# split -> file names looked for in a directory, in order (Texar: train.txt, dev.txt, test.txt; nanoGPT: train.bin,
# val.bin).
SPLIT_FILES = {
    "train": ("train.txt", "train.jsonl", "train.bin"),
    "valid": ("dev.txt", "valid.txt", "val.txt", "dev.jsonl", "valid.jsonl", "val.jsonl", "val.bin", "valid.bin"),
}
_SPLIT_PREFIXES = {"train": ("train",), "valid": ("val", "dev")}
_ENCODE_CHUNK = 1024  # documents per tokenizer batch


@dataclass(slots=True)
class TokenStreams:
    """One split's tokens: a list of uint16 streams (one per .bin shard, or one for text), and for prompt/completion
    data a parallel bool mask per stream, True where the token is a training target."""

    tokens: list[np.ndarray]  # (n_i,) uint16 each; np.memmap for .bin shards
    masks: list[np.ndarray] | None  # (n_i,) bool each, or None: every token is a target
    source: str

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def find_files(path: str, split: str) -> tuple[str, list[Path]]:
    """(kind, files) of a data path: kind 'bin', 'jsonl' or 'text'. A directory means its .bin shards (those named
    after the split when some are), else its Texar / nanoGPT file for `split`. Raises FileNotFoundError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{split} data {path} does not exist; pass a text, .jsonl or .bin file or a directory")
    if p.is_dir():
        bins = sorted(f for f in p.glob("*.bin") if f.is_file())
        named = [f for f in bins if f.name.startswith(_SPLIT_PREFIXES[split])]
        for name in SPLIT_FILES[split]:
            if (p / name).is_file():
                return _kind(p / name), [p / name]
        if named or (bins and not any(f.name.startswith(sum(_SPLIT_PREFIXES.values(), ())) for f in bins)):
            return "bin", named or bins
        raise FileNotFoundError(f"{split} data directory {path} holds no .bin shards and none of "
                                f"{', '.join(SPLIT_FILES[split])}")
    return _kind(p), [p]


def default_valid(train_path: str) -> str | None:
    """The validation split beside a training directory (Texar's dev.txt, nanoGPT's val.bin, val_*.bin), or None."""
    p = Path(train_path).expanduser()
    if not p.is_dir():
        return None
    if any((p / name).is_file() for name in SPLIT_FILES["valid"]):
        return train_path
    if any(f.name.startswith(_SPLIT_PREFIXES["valid"]) for f in p.glob("*.bin")):
        return train_path
    return None


def _kind(path: Path) -> str:
    return {".bin": "bin", ".jsonl": "jsonl"}.get(path.suffix, "text")


def iter_documents(path: Path, kind: str, whole_file: bool) -> Iterator[str | tuple[str, str]]:
    """The documents of a text or JSONL file: str, or (prompt, completion) for conditional records. Empty documents
    are skipped; a malformed JSONL line raises ValueError naming the file and line."""
    if kind == "text":
        if whole_file:
            text = path.read_text(encoding="utf-8")
            if text.strip():
                yield text
            return
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
        return
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one object") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                if record["text"]:
                    yield record["text"]
            elif (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                  and isinstance(record.get("completion"), str)):
                if record["completion"]:
                    yield record["prompt"], record["completion"]
            else:
                raise ValueError(f"{path}:{number}: expected an object with a string 'text', or string 'prompt' and "
                                 "'completion' fields")


def check_source(path: str, split: str, whole_file: bool) -> None:
    """Cheap checks before any worker starts: the files exist, .bin shards hold whole uint16 ids, and a text or JSONL
    source has at least one document (reading no further than the first). Raises ValueError / FileNotFoundError."""
    kind, files = find_files(path, split)
    if kind == "bin":
        for f in files:
            shards.check_shard(f)
        return
    for f in files:
        for _ in iter_documents(f, kind, whole_file):
            return
    raise ValueError(f"{split} data {path} holds no documents (every line is empty); add text or check the path")


def load_tokens(path: str, split: str, tokenizer, whole_file: bool = False) -> TokenStreams:
    """Every token of a split. Text and JSONL are tokenised in memory (<|endoftext|> inside the text is the special
    token); .bin shards are memory-mapped, so corpora bigger than memory are never read whole."""
    kind, files = find_files(path, split)
    if kind == "bin":
        streams = [shards.open_shard(f) for f in files]
        if sum(len(s) for s in streams) == 0:
            raise ValueError(f"{split} data {path} holds no tokens")
        return TokenStreams(streams, None, path)
    eos = tokenizer.eos_token_id
    chunks: list[tuple[np.ndarray, np.ndarray | None]] = []
    for f in files:
        batch: list = []
        for doc in iter_documents(f, kind, whole_file):
            batch.append(doc)
            if len(batch) == _ENCODE_CHUNK:
                chunks.append(_encode(batch, tokenizer, eos))
                batch = []
        if batch:
            chunks.append(_encode(batch, tokenizer, eos))
    if not chunks:
        raise ValueError(f"{split} data {path} holds no documents (every line is empty); add text or check the path")
    stream = np.concatenate([c[0] for c in chunks])
    if all(c[1] is None for c in chunks):
        return TokenStreams([stream], None, path)
    mask = np.concatenate([np.ones(len(c[0]), np.bool_) if c[1] is None else c[1] for c in chunks])
    return TokenStreams([stream], [mask], path)


def _encode(batch: list, tokenizer, eos: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The documents' ids, each followed by <|endoftext|>, as one uint16 array; and a target mask when a document is
    a prompt/completion pair (its prompt tokens are no targets; its completion and <|endoftext|> are), else None."""
    texts = [d if isinstance(d, str) else d[0] for d in batch]
    completions = [d[1] for d in batch if not isinstance(d, str)]
    encoded = tokenizer.encode_batch(texts, allow_special=True)
    completion_ids = iter(tokenizer.encode_batch(completions, allow_special=True))
    ids: list[int] = []
    prompt_spans: list[tuple[int, int]] = []  # (start, length) of each prompt in ids
    for doc, first in zip(batch, encoded):
        if not isinstance(doc, str):
            prompt_spans.append((len(ids), len(first)))
            first = first + next(completion_ids)
        ids += first
        ids.append(eos)
    tokens = np.asarray(ids, dtype=np.uint16)
    if not completions:
        return tokens, None
    mask = np.ones(len(tokens), np.bool_)
    for start, length in prompt_spans:
        mask[start:start + length] = False
    return tokens, mask
