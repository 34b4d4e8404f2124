"""OpenAI's original release format: the tiny fixture written by real TensorFlow (tests/fixtures/write_openai_tiny.py)
read without TensorFlow, compared with the same numbers loaded through the Hugging Face route; corrupt, truncated and
mismatched checkpoints refused in one sentence naming the tensor; `fastgpt2 convert`."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgpt2 import GPT2, GPT2Config, Tokenizer
from fastgpt2.cli import main
from fastgpt2.model.checkpoint import CheckpointError
from fastgpt2.model.tf_reader import TFCheckpoint, crc32c, masked_crc32c

FIXTURES = Path(__file__).parent / "fixtures"
OPENAI_TINY = FIXTURES / "openai-tiny"
DATA_FILE = "model.ckpt.data-00000-of-00001"
TEXTS = ["Hello world", " The quick brown fox, 1234!", "naïve café 😀 <|endoftext|> über\n\n  spaces"]


def _writer():
    """The fixture script as a module: only its numpy part (make_weights) is used, tensorflow is never imported."""
    spec = importlib.util.spec_from_file_location("write_openai_tiny", FIXTURES / "write_openai_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WRITER = _writer()
HPARAMS = json.loads((OPENAI_TINY / "hparams.json").read_text())
IDS = torch.randint(0, HPARAMS["n_vocab"], (3, HPARAMS["n_ctx"]), generator=torch.Generator().manual_seed(0))


def _hf_directory(directory: Path) -> Path:
    """The fixture's numbers, rebuilt by the script's numpy code, saved by transformers (Conv1D weights (in, out))."""
    import transformers

    config = transformers.GPT2Config(vocab_size=HPARAMS["n_vocab"], n_positions=HPARAMS["n_ctx"],
                                     n_embd=HPARAMS["n_embd"], n_layer=HPARAMS["n_layer"], n_head=HPARAMS["n_head"])
    model = transformers.GPT2LMHeadModel(config).eval()
    state = {"transformer.wte.weight": "model/wte", "transformer.wpe.weight": "model/wpe",
             "transformer.ln_f.weight": "model/ln_f/g", "transformer.ln_f.bias": "model/ln_f/b"}
    for i in range(HPARAMS["n_layer"]):
        for layer in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            theirs = f"model/h{i}/{layer.replace('.', '/')}"
            weight, bias = ("g", "b") if layer.startswith("ln") else ("w", "b")
            state[f"transformer.h.{i}.{layer}.weight"] = f"{theirs}/{weight}"
            state[f"transformer.h.{i}.{layer}.bias"] = f"{theirs}/{bias}"
    weights = WRITER.make_weights(HPARAMS, WRITER.SEED)
    assert len(state) == len(weights)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for ours, theirs in state.items():
            value = torch.from_numpy(weights[theirs].astype(np.float32))
            params[ours].copy_(value[0] if value.dim() == 3 else value)  # OpenAI's (1, in, out) is Conv1D's (in, out)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_route(tmp_path_factory):
    return _hf_directory(tmp_path_factory.mktemp("openai-tiny-hf"))


@pytest.fixture
def fixture_copy(tmp_path):
    return Path(shutil.copytree(OPENAI_TINY, tmp_path / "openai-tiny"))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _error(directory) -> str:
    with pytest.raises(CheckpointError) as info:
        GPT2.from_pretrained(directory, device="cpu")
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0, message  # one sentence
    return message


# --- the reader ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 9, 4095, 4096, 4099, 1823 * 781, (1 << 18) + 5])
def test_crc32c_matches_a_bytewise_reference(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    crc = 0xFFFFFFFF
    for byte in data:  # the textbook bit-by-bit reflected CRC32C
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    assert crc32c(data) == crc ^ 0xFFFFFFFF


def test_crc32c_check_value_and_mask():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) % 2**32


def test_reader_gives_every_tensor_exactly():
    ckpt = TFCheckpoint(OPENAI_TINY / "model.ckpt")
    weights = WRITER.make_weights(HPARAMS, WRITER.SEED)
    assert sorted(ckpt.entries) == sorted(weights)
    for name, expected in weights.items():
        got = ckpt.read(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name  # wte is DT_HALF, the rest DT_FLOAT
        np.testing.assert_array_equal(got, expected, err_msg=name)


# --- loading ----------------------------------------------------------------------------------------------------

def test_logits_equal_the_hugging_face_route(hf_route):
    import transformers

    model = GPT2.from_pretrained(str(OPENAI_TINY), device="cpu")
    assert model.config == GPT2Config(vocab_size=50257, n_positions=32, n_embd=8, n_layer=2, n_head=2)
    logits = _logits(model)
    assert logits.std() > 1.0  # varied logits: a wrong transpose or a swapped tensor shows
    assert torch.equal(logits, _logits(GPT2.from_pretrained(hf_route, device="cpu")))
    reference = transformers.GPT2LMHeadModel.from_pretrained(hf_route).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)  # float32, other kernels


def test_tokenizer_from_the_directory_encodes_like_the_shipped_one():
    assert not (OPENAI_TINY / "vocab.json").exists()  # so encoder.json + vocab.bpe are the ones read
    loaded, shipped = Tokenizer.from_pretrained(OPENAI_TINY), Tokenizer.from_pretrained()
    assert loaded.vocab_size == shipped.vocab_size == HPARAMS["n_vocab"]
    for text in TEXTS:
        assert loaded.encode(text, allow_special=True) == shipped.encode(text, allow_special=True)


def test_llm_serves_the_directory_with_its_vocabulary():
    from fastgpt2 import LLM, SamplingParams

    llm = LLM(str(OPENAI_TINY), device="cpu", seed=0)
    assert llm.model.checkpoint_dir == str(OPENAI_TINY)
    prompt = llm.tokenizer.encode(TEXTS[0])
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0].outputs[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):  # greedy by hand on the dense forward
            ids.append(int(llm.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert list(out.token_ids) == ids[len(prompt):]


def test_cli_info_reads_hparams():
    assert main(["info", "--model", str(OPENAI_TINY)]) == 0


# --- refusals ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model/h0/attn/c_attn/b", "model/h1/mlp/c_fc/w", "model/wte"])
def test_flipped_byte_fails_the_crc_naming_the_tensor(fixture_copy, name):
    entry = TFCheckpoint(fixture_copy / "model.ckpt").entries[name]
    path = fixture_copy / DATA_FILE
    data = bytearray(path.read_bytes())
    data[entry.offset + entry.size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    message = _error(fixture_copy)
    assert repr(name) in message and "CRC32C" in message and "corrupt" in message


@pytest.mark.parametrize("name", ["model/h0/attn/c_attn/b", "model/h1/mlp/c_fc/w", "model/wte"])
def test_truncated_data_file_names_the_tensor_it_cuts(fixture_copy, name):
    entry = TFCheckpoint(fixture_copy / "model.ckpt").entries[name]
    path = fixture_copy / DATA_FILE
    path.write_bytes(path.read_bytes()[:entry.offset + 1])
    message = _error(fixture_copy)
    assert repr(name) in message and "truncated" in message


def _edit_index(directory: Path, old: bytes, new: bytes, block_type: int = 0) -> None:
    """Replace bytes inside the index's data block (and its compression type) and store the block's CRC anew, so
    only the content changes."""
    path = directory / "model.ckpt.index"
    data = bytearray(path.read_bytes())
    stored = lambda end: int.from_bytes(data[end + 1:end + 5], "little")  # noqa: E731
    end = next(n for n in range(len(data) - 5) if masked_crc32c(bytes(data[:n + 1])) == stored(n))
    assert data.count(old) == 1 and data.index(old) < end
    data[data.index(old):data.index(old) + len(old)] = new
    data[end] = block_type
    data[end + 1:end + 5] = masked_crc32c(bytes(data[:end + 1])).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_missing_tensor_is_named(fixture_copy):
    _edit_index(fixture_copy, b"wpe", b"wpd")  # the key model/wpe becomes model/wpd
    assert "model/wpe" not in TFCheckpoint(fixture_copy / "model.ckpt").entries
    assert "'model/wpe' is missing" in _error(fixture_copy)


def test_more_layers_in_hparams_than_in_the_weights(fixture_copy):
    (fixture_copy / "hparams.json").write_text(json.dumps({**HPARAMS, "n_layer": 3}))
    message = _error(fixture_copy)
    assert "'model/h2/ln_1/g' is missing" in message and "n_layer=3" in message


def test_fewer_layers_in_hparams_than_in_the_weights(fixture_copy):
    (fixture_copy / "hparams.json").write_text(json.dumps({**HPARAMS, "n_layer": 1}))
    message = _error(fixture_copy)
    assert "unexpected tensor(s) model/h1/attn/c_attn/b" in message and "n_layer=1" in message


@pytest.mark.parametrize("field, value, name, shapes", [
    ("n_ctx", 64, "model/wpe", "(32, 8) but hparams.json asks for (64, 8)"),
    ("n_vocab", 50304, "model/wte", "(50257, 8) but hparams.json asks for (50304, 8)"),
])
def test_wrong_shape_names_the_tensor_and_both_shapes(fixture_copy, field, value, name, shapes):
    (fixture_copy / "hparams.json").write_text(json.dumps({**HPARAMS, field: value}))
    message = _error(fixture_copy)
    assert repr(name) in message and shapes in message


def test_corrupt_index_names_the_file(fixture_copy):
    path = fixture_copy / "model.ckpt.index"
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01
    path.write_bytes(bytes(data))
    message = _error(fixture_copy)
    assert str(path) in message and "CRC32C" in message


def test_snappy_compressed_index_is_refused(fixture_copy):
    _edit_index(fixture_copy, b"wpe", b"wpe", block_type=1)
    message = _error(fixture_copy)
    assert "model.ckpt.index" in message and "snappy-compressed" in message


@pytest.mark.parametrize("hparams, expected", [
    ({"n_vocab": 50257, "n_ctx": 32, "n_embd": 8, "n_head": 2}, "field 'n_layer' is missing"),
    ({**HPARAMS, "n_embd": "8"}, "field 'n_embd' must be an integer"),
    ({**HPARAMS, "n_head": 3}, "must be divisible by n_head"),
])
def test_bad_hparams_name_the_file_and_field(fixture_copy, hparams, expected):
    (fixture_copy / "hparams.json").write_text(json.dumps(hparams))
    message = _error(fixture_copy)
    assert "hparams.json" in message and expected in message


def test_missing_data_file_and_checkpoint_state_file(fixture_copy):
    (fixture_copy / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/model.ckpt"\n')
    assert torch.equal(_logits(GPT2.from_pretrained(fixture_copy, device="cpu")), _logits(GPT2.from_pretrained(
        OPENAI_TINY, device="cpu")))  # only the file name of the recorded path counts
    (fixture_copy / DATA_FILE).unlink()
    assert DATA_FILE in _error(fixture_copy)


# --- convert -----------------------------------------------------------------------------------------------------

def test_convert_round_trip(tmp_path, capsys):
    import transformers

    out = tmp_path / "hf"
    assert main(["convert", str(OPENAI_TINY), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    expected = _logits(GPT2.from_pretrained(OPENAI_TINY, device="cpu"))
    assert torch.equal(_logits(GPT2.from_pretrained(out, device="cpu")), expected)
    with torch.no_grad():
        reference = transformers.GPT2LMHeadModel.from_pretrained(out).eval()(IDS).logits
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    for text in TEXTS:
        assert Tokenizer.from_pretrained(out).encode(text) == Tokenizer.from_pretrained(OPENAI_TINY).encode(text)
    capsys.readouterr()
    assert main(["convert", str(OPENAI_TINY), str(out)]) == 2  # never overwrites
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("fastgpt2: error: ") for line in lines)
