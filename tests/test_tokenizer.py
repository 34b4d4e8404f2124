"""Tokenizer tests: exact ids against an independent tiktoken encoding and against transformers, streaming, errors."""
import hashlib
import json
import os
import shutil

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgpt2.model.tokenizer import SHIPPED_RANKS_PATH, Tokenizer

GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SHIPPED_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

HARD_STRINGS = [
    "",
    "I'm, you'll, they've, it's, we'd; I'M YOU'LL THEY'VE",
    "a  b   c\n\n\n d \t\t e  ",
    "   leading spaces and trailing   \n",
    "\n\n\n\n",
    "\r\n\u00a0\u2003\u3000 odd whitespace",
    "family 👨‍👩‍👧‍👦, shrug 🤷🏽‍♀️, flag 🏳️‍🌈, 😀🤗",
    "中文分词测试，日本語のテキスト、한국어 텍스트",
    "e\u0301 vs \u00e9, Zalgo: Z\u0351\u036b\u0343a\u0352\u036c\u030bl\u0300\u0308g\u0344o\u0310",
    "before<|endoftext|>after <|endoftext|> <|endoftext",
    "<|endoftext|>",
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 20,
    "x" * 5000,
    "3.14159 1,000,000 2024-01-01 0x1F 1e-9 ٣٤٥ ⅷ",
    "def f(x):\n    return x**2  # comment\n",
    "ÿ\x00\x01\x7f control \x1b[0m",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def reference():
    """tiktoken encoding built here from the shipped file, independent of fastgpt2's loader."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(SHIPPED_RANKS_PATH))
    return tiktoken.Encoding(name="gpt2-ref", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_gpt2")
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(str(hf_dir), local_files_only=True)


# --- vocabulary -----------------------------------------------------------------------------------------------

def test_shipped_file_checksum():
    assert hashlib.sha256(SHIPPED_RANKS_PATH.read_bytes()).hexdigest() == SHIPPED_SHA256


def test_vocab_constants(tok):
    assert tok.eos_token_id == 50256
    assert tok.eos_token == "<|endoftext|>"
    assert tok.vocab_size == 50257
    assert tok.decode([50256]) == "<|endoftext|>"
    assert tok.encode("Hello world") == [15496, 995]


# --- identical ids to independent tiktoken --------------------------------------------------------------------

@pytest.mark.parametrize("text", HARD_STRINGS)
def test_matches_tiktoken(tok, reference, text):
    assert tok.encode(text) == reference.encode(text, disallowed_special=())
    assert tok.encode(text, allow_special=True) == reference.encode(text, allowed_special={"<|endoftext|>"})
    assert tok.decode(tok.encode(text)) == text


def test_special_text_is_ordinary_by_default(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"
    assert tok.encode("a<|endoftext|>b", allow_special=True) == tok.encode("a") + [50256] + tok.encode("b")


def test_encode_batch(tok):
    assert tok.encode_batch(HARD_STRINGS) == [tok.encode(s) for s in HARD_STRINGS]
    assert tok.encode_batch(HARD_STRINGS, allow_special=True) == [tok.encode(s, True) for s in HARD_STRINGS]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_property_matches_tiktoken_and_roundtrips(tok, reference, text):
    ids = tok.encode(text)
    assert ids == reference.encode(text, disallowed_special=())
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<|endoftext|>", " ", "'s", "'ll", "\n", "a", "1", "é", "😀", "\t"]), max_size=30)
       .map("".join))
def test_property_tricky_alphabet(tok, reference, text):
    assert tok.encode(text) == reference.encode(text, disallowed_special=())
    assert tok.encode(text, allow_special=True) == reference.encode(text, allowed_special="all")


# --- Hugging Face format --------------------------------------------------------------------------------------

def test_saved_files_format(hf_dir):
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (hf_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256
    assert vocab["Ġthe"] == 262 and vocab["!"] == 0
    assert merges[0] == "#version: 0.2" and merges[1] == "Ġ t"
    assert len(merges) == 1 + 50000


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_matches_transformers(tok, hf_tok, text):
    # Hugging Face always treats added special tokens as special, so compare with allow_special.
    assert hf_tok.encode(text) == tok.encode(text, allow_special=True)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_property_matches_transformers(tok, hf_tok, text):
    assert hf_tok.encode(text) == tok.encode(text, allow_special=True)


def test_roundtrip_hf_directory(tok, hf_dir):
    loaded = Tokenizer.from_pretrained(hf_dir)
    assert loaded.eos_token_id == 50256 and loaded.vocab_size == 50257
    for text in HARD_STRINGS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_openai_release_directory(tok, hf_dir, tmp_path):
    shutil.copy(hf_dir / "vocab.json", tmp_path / "encoder.json")
    shutil.copy(hf_dir / "merges.txt", tmp_path / "vocab.bpe")
    loaded = Tokenizer.from_pretrained(tmp_path)
    for text in HARD_STRINGS:
        assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_tiktoken_file_and_weights_only_directory(tok, tmp_path):
    assert Tokenizer.from_pretrained(SHIPPED_RANKS_PATH).encode(HARD_STRINGS[1]) == tok.encode(HARD_STRINGS[1])
    (tmp_path / "model.safetensors").write_bytes(b"")
    fallback = Tokenizer.from_pretrained(tmp_path)  # no vocabulary files: the shared GPT-2 vocabulary
    assert fallback.encode(HARD_STRINGS[6]) == tok.encode(HARD_STRINGS[6])


# --- streaming ------------------------------------------------------------------------------------------------

def stream(tok, ids):
    decoder = tok.incremental_decoder()
    deltas = [decoder.push(i) for i in ids]
    return deltas, decoder.flush()


@pytest.mark.parametrize("text", [s for s in HARD_STRINGS if s] + ["😀🤗你好👨‍👩‍👧‍👦 mixed ascii 中文"])
def test_streaming_reassembles_text(tok, text):
    deltas, tail = stream(tok, tok.encode(text))
    assert "".join(deltas) + tail == text
    assert tail == ""
    assert not any("\ufffd" in d for d in deltas)


def test_split_character_emitted_once_on_second_push(tok):
    ids = tok.encode("😀")
    assert len(ids) == 2 and len(tok.decode_bytes(ids[:1])) < 4  # the 4 UTF-8 bytes straddle the two tokens
    decoder = tok.incremental_decoder()
    assert decoder.push(ids[0]) == ""
    assert decoder.push(ids[1]) == "😀"
    assert decoder.flush() == ""


def test_three_token_character(tok):
    ids = tok.encode("🤗!")
    deltas, tail = stream(tok, ids)
    assert deltas[:3] == ["", "", "🤗"] and "".join(deltas) + tail == "🤗!"


def test_flush_emits_incomplete_leftover_as_replacement(tok):
    decoder = tok.incremental_decoder()
    assert decoder.push(tok.encode("😀")[0]) == ""
    assert decoder.flush() == "\ufffd"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50256), max_size=40))
def test_property_streaming_equals_decode(tok, ids):
    deltas, tail = stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids)


# --- bad input ------------------------------------------------------------------------------------------------

def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("content", ["{not json", '["a", "b"]', '{"a": "zero"}', '{"!": 0, "\\"": 5}'])
def test_malformed_vocab_json(hf_dir, tmp_path, content):
    shutil.copy(hf_dir / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_vocab_and_merges_out_of_order(hf_dir, tmp_path):
    shutil.copy(hf_dir / "vocab.json", tmp_path / "vocab.json")
    lines = (hf_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt line 3"):
        Tokenizer.from_pretrained(tmp_path)


def test_missing_half_of_pair(hf_dir, tmp_path):
    shutil.copy(hf_dir / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_pretrained(tmp_path)


def test_malformed_tiktoken_file(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        Tokenizer.from_pretrained(bad)


def test_other_file_rejected(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .tiktoken"):
        Tokenizer.from_pretrained(tmp_path / "model.bin")


@pytest.mark.parametrize("bad_id", [50257, -1, 10**9])
def test_decode_out_of_range(tok, bad_id):
    with pytest.raises(ValueError, match=rf"{bad_id}.*50257"):
        tok.decode([1, bad_id])
    with pytest.raises(ValueError, match=str(bad_id)):
        tok.incremental_decoder().push(bad_id)


def test_decode_accepts_tuple(tok):
    assert tok.decode((15496, 995)) == "Hello world"
    assert tok.decode([]) == ""
