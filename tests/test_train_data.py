"""Fine-tuning data: sources (text, JSONL, prompt/completion, .bin shards, Texar directories), packing into
sequences, each rank's share of every step, and the conditional loss mask."""
import json

import numpy as np
import pytest
import torch

from fastgpt2.model.tokenizer import Tokenizer
from fastgpt2.train import data, prepare_data, shards
from fastgpt2.train.modeling import token_loss_sum
from fastgpt2.train.packing import IGNORE_INDEX, DataOrder, PackedBlocks, eval_batches

EOS = 50256


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained()


def test_text_documents_are_joined_with_endoftext(tmp_path, tok):
    (tmp_path / "a.txt").write_text("Hello world\n\n  \nA second line<|endoftext|>x\n")
    streams = data.load_tokens(str(tmp_path / "a.txt"), "train", tok)
    expected = tok.encode("Hello world") + [EOS] + tok.encode("A second line<|endoftext|>x", allow_special=True) + [EOS]
    assert streams.tokens[0].tolist() == expected and streams.masks is None
    whole = data.load_tokens(str(tmp_path / "a.txt"), "train", tok, whole_file=True)
    assert whole.tokens[0].tolist() == tok.encode((tmp_path / "a.txt").read_text(), allow_special=True) + [EOS]


def test_packed_blocks_are_shifted_windows_that_never_cross_a_shard(tmp_path):
    stream = data.TokenStreams([np.arange(23, dtype=np.uint16), np.arange(100, 111, dtype=np.uint16)], None, "x")
    blocks = PackedBlocks(stream, seq_len=5)
    assert len(blocks) == 4 + 2  # (23 - 1) // 5 and (11 - 1) // 5
    x, y = blocks.batch([0, 3, 4, None])
    assert x.tolist()[:3] == [[0, 1, 2, 3, 4], [15, 16, 17, 18, 19], [100, 101, 102, 103, 104]]
    assert y.tolist()[:3] == [[1, 2, 3, 4, 5], [16, 17, 18, 19, 20], [101, 102, 103, 104, 105]]
    assert x[3].tolist() == [0] * 5 and y[3].tolist() == [IGNORE_INDEX] * 5  # padding takes no part in the loss
    with pytest.raises(ValueError, match="fewer than one sequence of seq_len \\+ 1 = 24"):
        PackedBlocks(data.TokenStreams([np.arange(23, dtype=np.uint16)], None, "small.txt"), seq_len=23)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_read_disjoint_shares_whose_union_does_not_depend_on_the_world_size(world_size):
    num_blocks, global_batch = 37, 8  # batches straddle epochs
    orders = [DataOrder(num_blocks, global_batch, r, world_size, seed=5) for r in range(world_size)]
    single = DataOrder(num_blocks, global_batch, 0, 1, seed=5)
    for step in range(12):
        shares = [o.rank_indices(step) for o in orders]
        assert sum(shares, []) == single.rank_indices(step)  # the same sequences, rank r the r-th slice
    epoch0 = [i for step in range(5) for i in single.rank_indices(step)][:num_blocks]
    assert sorted(epoch0) == list(range(num_blocks))  # an epoch visits every block once
    assert DataOrder(num_blocks, global_batch, 0, 1, seed=6).rank_indices(0) != single.rank_indices(0)


def test_eval_batches_cover_every_block_once_with_equal_counts_per_rank():
    shares = [eval_batches(11, 2, r, 3) for r in range(3)]
    assert len({len(s) for s in shares}) == 1  # every rank runs the same number of forwards
    flat = [i for s in shares for batch in s for i in batch if i is not None]
    assert sorted(flat) == list(range(11))
    assert sorted(i for s in [eval_batches(11, 2, r, 3, max_blocks=5) for r in range(3)]
                  for b in s for i in b if i is not None) == list(range(5))


def test_conditional_loss_ignores_prompt_tokens(tmp_path, tok):
    records = [{"prompt": "Question: what is red?\nAnswer:", "completion": " The sun at dusk."},
               {"text": "A plain document."}, {"prompt": "Q: two?", "completion": " Yes."}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    streams = data.load_tokens(str(path), "train", tok)
    tokens, mask = streams.tokens[0].tolist(), streams.masks[0].tolist()
    p0, c0 = tok.encode(records[0]["prompt"]), tok.encode(records[0]["completion"])
    t1 = tok.encode(records[1]["text"])
    p2, c2 = tok.encode(records[2]["prompt"]), tok.encode(records[2]["completion"])
    assert tokens == p0 + c0 + [EOS] + t1 + [EOS] + p2 + c2 + [EOS]
    assert mask == ([False] * len(p0) + [True] * (len(c0) + 1) + [True] * (len(t1) + 1)
                    + [False] * len(p2) + [True] * (len(c2) + 1))
    blocks = PackedBlocks(streams, seq_len=len(tokens) - 1)
    _, targets = blocks.batch([0])
    assert (targets[0] == IGNORE_INDEX).tolist() == [not m for m in mask[1:]]
    # Changing only prompt tokens among the targets leaves the mask and the loss unchanged.
    changed = torch.tensor(tokens[1:])
    prompt_positions = torch.tensor([not m for m in mask[1:]])
    changed[prompt_positions] = (changed[prompt_positions] + 17) % 50257
    masked = torch.where(prompt_positions, IGNORE_INDEX, changed)[None]
    assert torch.equal(masked == IGNORE_INDEX, targets == IGNORE_INDEX) and torch.equal(masked, targets)
    logits = torch.randn(1, len(tokens) - 1, 50257, generator=torch.Generator().manual_seed(0))
    loss, count = token_loss_sum(logits, targets)
    assert count == sum(mask[1:])
    other = json.loads(json.dumps(records))
    other[0]["prompt"] = "Question: what is blue?\nAnswer:"  # another prompt of the same length in tokens
    assert len(tok.encode(other[0]["prompt"])) == len(p0)
    path.write_text("".join(json.dumps(r) + "\n" for r in other))
    other_streams = data.load_tokens(str(path), "train", tok)
    assert other_streams.masks[0].tolist() == mask
    _, other_targets = PackedBlocks(other_streams, seq_len=len(tokens) - 1).batch([0])
    assert torch.equal(other_targets, targets)  # the changed prompt token is never a target
    assert torch.equal(token_loss_sum(logits, other_targets)[0], loss)


def test_jsonl_errors_name_the_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected an object"):
        data.load_tokens(str(path), "train", tok)


def test_prepare_data_shards_round_trip_and_texar_directories(tmp_path, tok):
    texar = tmp_path / "toy"
    texar.mkdir()
    lines = [f"Line number {i} of the toy corpus." for i in range(40)]
    (texar / "train.txt").write_text("\n".join(lines) + "\n")
    (texar / "dev.txt").write_text("A dev line.\nAnother one.\n")
    (texar / "test.txt").write_text("A test line.\n")
    assert data.find_files(str(texar), "train")[1] == [texar / "train.txt"]
    assert data.default_valid(str(texar)) == str(texar)
    out = tmp_path / "bin"
    paths = prepare_data(str(texar), str(out), shard_tokens=100, progress=False, tokenizer=tok)
    assert [p.name for p in paths] == [f"train_{i:06d}.bin" for i in range(len(paths) - 1)] + ["val_000000.bin"]
    assert [shards.check_shard(p) for p in paths[:-2]] == [100] * (len(paths) - 2)  # full shards but the last
    in_memory = data.load_tokens(str(texar), "train", tok).tokens[0]
    sharded = data.load_tokens(str(out), "train", tok)
    assert isinstance(sharded.tokens[0], np.memmap)
    assert np.concatenate(sharded.tokens).tolist() == in_memory.tolist()
    assert data.load_tokens(str(out), "valid", tok).tokens[0].tolist() == \
        data.load_tokens(str(texar / "dev.txt"), "valid", tok).tokens[0].tolist()
    assert data.default_valid(str(out)) == str(out)


def test_odd_and_empty_shards_are_refused(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="3 bytes, an odd count"):
        data.check_source(str(tmp_path / "odd.bin"), "train", False)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        shards.check_shard(tmp_path / "empty.bin")


def test_missing_and_empty_sources_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.check_source(str(tmp_path / "missing.txt"), "train", False)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="holds no documents"):
        data.check_source(str(tmp_path / "blank.txt"), "train", False)
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .bin shards"):
        data.check_source(str(tmp_path / "d"), "valid", False)
