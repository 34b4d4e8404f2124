"""GPT-2's byte-level BPE tokenizer on tiktoken, loaded from local files only (never downloads).

Reads the shipped ranks file, a Hugging Face ``vocab.json`` + ``merges.txt`` directory, OpenAI's original
``encoder.json`` + ``vocab.bpe`` release, or any ``.tiktoken`` ranks file; writes the Hugging Face format.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import operator
from functools import lru_cache
from pathlib import Path

import tiktoken

# GPT-2's pre-tokenizer split (identical to tiktoken's r50k_base pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS_TOKEN = "<|endoftext|>"
SHIPPED_RANKS_PATH = Path(__file__).parent / "data" / "gpt2.tiktoken"
# (vocabulary file, merges file) pairs in the order they are looked for inside a directory.
VOCAB_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by vocab.json and merges.txt."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:  # bytes that would be whitespace/control characters are shifted past U+00FF
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``<base64 token> <rank>`` per line."""
    ranks = {}
    for line_number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path} line {line_number} is not '<base64 token> <rank>'; pass an intact .tiktoken ranks file."
            ) from None
    return ranks


def load_vocab_and_merges(vocab_path: Path, merges_path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Convert a GPT-2 style vocab (token string -> id) plus merges into tiktoken ranks (rank = id).

    Returns ``(mergeable_ranks, special_tokens)``. Rank-based BPE only equals the merges-based BPE of the file
    when each merge's result has a larger id than every earlier merge's result, so that is checked.
    """
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merge_lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{vocab_path.parent} holds an unreadable {vocab_path.name}/{merges_path.name} ({exc}); "
                         "pass an intact GPT-2 tokenizer directory.") from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
        raise ValueError(f"{vocab_path} must be a JSON object mapping token strings to non-negative integer ids.")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{vocab_path} ids must be exactly 0..{len(vocab) - 1} with no duplicates or gaps.")
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks, special_tokens = {}, {}
    for token, token_id in vocab.items():
        if token == EOS_TOKEN:
            special_tokens[token] = token_id
        elif token and all(char in byte_of for char in token):
            ranks[bytes(byte_of[char] for char in token)] = token_id
        else:
            raise ValueError(f"{vocab_path} token {token!r} is not in GPT-2's byte-level alphabet; "
                             "only byte-level BPE vocabularies are supported.")
    if len({bytes([b]) for b in range(256)} & ranks.keys()) != 256:
        raise ValueError(f"{vocab_path} must contain all 256 single-byte tokens for byte-level BPE.")
    previous_id = -1
    for line_number, line in enumerate(merge_lines, start=1):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split()
        merged_id = vocab.get("".join(parts), -1) if len(parts) == 2 and all(p in vocab for p in parts) else -1
        if merged_id <= previous_id:
            raise ValueError(f"{merges_path} line {line_number} ({line!r}) is not a merge of two vocabulary tokens "
                             "into a token with a larger id than the previous merge's; pass matching files.")
        previous_id = merged_id
    return ranks, special_tokens


def bpe_split(mergeable_ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-level BPE of ``token`` using only merges of rank < ``max_rank`` (lowest rank merged first)."""
    parts = [bytes([b]) for b in token]
    while True:
        best_index, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = mergeable_ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index is None:
            return parts
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]


class Tokenizer:
    """GPT-2 tokenizer: text <-> token ids with tiktoken, bit-identical to OpenAI's and Hugging Face's."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None):
        self._mergeable_ranks = mergeable_ranks
        # A ranks file carries no special tokens, so <|endoftext|> goes right after the last mergeable rank.
        special_tokens = special_tokens or {EOS_TOKEN: max(mergeable_ranks.values()) + 1}
        self._encoding = tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.eos_token = EOS_TOKEN
        self.eos_token_id: int = special_tokens[EOS_TOKEN]
        self.vocab_size: int = self._encoding.n_vocab

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> Tokenizer:
        """Load from local files; nothing is ever downloaded.

        Parameters
        ----------
        path : str, Path or None
            None: the shipped GPT-2 ranks file. A ``.tiktoken`` ranks file. A directory with ``vocab.json`` +
            ``merges.txt`` (Hugging Face) or ``encoder.json`` + ``vocab.bpe`` (OpenAI's release). A directory
            with neither (e.g. a checkpoint holding only weights) gets the shipped vocabulary, because every
            GPT-2 size (124M to 1.5B) shares one vocabulary.

        Raises
        ------
        FileNotFoundError
            ``path`` does not exist, or a directory holds only half of a vocabulary/merges pair.
        ValueError
            A file is malformed, or the vocabulary's ids disagree with its merge order.
        """
        if path is None:
            return cls(load_tiktoken_ranks(SHIPPED_RANKS_PATH))
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist; pass an existing directory or "
                                    ".tiktoken file, or None for the shipped GPT-2 vocabulary.")
        if path.is_file():
            if path.suffix != ".tiktoken":
                raise ValueError(f"tokenizer file {path} is not a .tiktoken ranks file; pass its directory instead.")
            return cls(load_tiktoken_ranks(path))
        for vocab_name, merges_name in VOCAB_FILE_PAIRS:
            vocab_path, merges_path = path / vocab_name, path / merges_name
            if vocab_path.is_file() and merges_path.is_file():
                return cls(*load_vocab_and_merges(vocab_path, merges_path))
            if vocab_path.is_file() or merges_path.is_file():
                raise FileNotFoundError(f"{path} has only one of {vocab_name} and {merges_name}; add the other.")
        return cls(load_tiktoken_ranks(SHIPPED_RANKS_PATH))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``<|endoftext|>`` in it is ordinary text unless ``allow_special``."""
        allowed = {EOS_TOKEN} if allow_special else set()
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """``encode`` for each text, in parallel threads."""
        allowed = {EOS_TOKEN} if allow_special else set()
        return self._encoding.encode_batch(list(texts), allowed_special=allowed, disallowed_special=())

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes of ``ids`` (a sequence of ints); raises ValueError for an id outside the vocabulary."""
        ids = [operator.index(token_id) for token_id in ids]
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} ids; "
                                 f"pass ids in 0..{self.vocab_size - 1}.")
        return self._encoding.decode_bytes(ids)

    def decode(self, ids) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> IncrementalDecoder:
        """A fresh streaming decoder for one sequence."""
        return IncrementalDecoder(self)

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The BPE merges in rank order, reconstructed from the ranks (ranks hold no explicit merges)."""
        merges = []
        for token, rank in sorted(self._mergeable_ranks.items(), key=lambda item: item[1]):
            if len(token) == 1:
                continue
            parts = bpe_split(self._mergeable_ranks, token, max_rank=rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens, "
                                 "so these ranks cannot be written as BPE merges.")
            merges.append((parts[0], parts[1]))
        return merges

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``vocab.json`` and ``merges.txt`` in the Hugging Face GPT-2 format into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        char_of = bytes_to_unicode()

        def to_str(token: bytes) -> str:
            return "".join(char_of[b] for b in token)

        vocab = {to_str(token): rank for token, rank in self._mergeable_ranks.items()}
        vocab[self.eos_token] = self.eos_token_id
        merge_lines = [f"{to_str(left)} {to_str(right)}" for left, right in self.merges()]
        (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *merge_lines]) + "\n", encoding="utf-8")


class IncrementalDecoder:
    """Streaming decode: push token ids one at a time, get text deltas.

    Never emits a broken UTF-8 character when a character spans two or more tokens: incomplete trailing bytes
    are held back until a later token completes them (or ``flush`` gives up on them as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        # The stdlib incremental decoder holds back exactly an incomplete trailing sequence and replaces invalid
        # bytes the same way bytes.decode(errors="replace") does, so streamed text equals Tokenizer.decode.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ("" while a character is still incomplete)."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """End the sequence: return what is left, with incomplete leftover bytes as U+FFFD."""
        return self._utf8.decode(b"", final=True)
