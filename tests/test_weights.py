"""Loading errors: every bad checkpoint names its problem in one sentence; presets and the CLI's info need no weights."""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastgpt2 import GPT2, GPT2Config
from fastgpt2.model.checkpoint import CheckpointError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'gpt3'.*124M.*gpt2-xl"):
        GPT2Config.from_name("gpt3")


@pytest.mark.parametrize("name,layers", [("117M", 12), ("gpt2", 12), ("345M", 24), ("gpt2-medium", 24),
                                         ("774M", 36), ("gpt2-large", 36), ("1.5B", 48), ("gpt2-xl", 48)])
def test_presets(name, layers):
    assert GPT2Config.from_name(name).n_layer == layers


@pytest.mark.parametrize("field,value", [("n_layer", 0), ("n_head", -1), ("vocab_size", 1.5), ("embd_pdrop", 1.0),
                                         ("attn_pdrop", -0.01), ("resid_pdrop", True), ("resid_pdrop", "0.1")])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"GPT2Config.{field}"):
        GPT2Config(**{field: value})


def test_dropout_defaults_are_gpt2s():
    c = GPT2Config()
    assert (c.embd_pdrop, c.attn_pdrop, c.resid_pdrop) == (0.1, 0.1, 0.1)
    assert GPT2Config(embd_pdrop=0, attn_pdrop=0.0, resid_pdrop=0.999).resid_pdrop == 0.999


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=100, n_head=3)


def test_directory_without_weights(tmp_path, hf_checkpoint):
    shutil.copy(hf_checkpoint("tiny") / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        GPT2.from_pretrained(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        GPT2.from_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("tiny"), tmp_path / "ckpt")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        GPT2.from_pretrained(d)


def test_garbage_safetensors(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("tiny"), tmp_path / "ckpt")
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        GPT2.from_pretrained(d)


def _rewrite(d, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    edit(state)
    save_file(state, d / "model.safetensors")


def test_wrong_shape_names_tensor(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("tiny"), tmp_path / "ckpt")
    _rewrite(d, lambda s: s.__setitem__("transformer.h.1.mlp.c_fc.weight", torch.zeros(128, 100)))
    with pytest.raises(CheckpointError, match=r"'h.1.mlp.c_fc.weight' has shape \(100, 128\)"):
        GPT2.from_pretrained(d)


def test_missing_and_extra_tensor(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("tiny"), tmp_path / "ckpt")
    _rewrite(d, lambda s: s.pop("transformer.h.0.ln_2.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) h.0.ln_2.bias"):
        GPT2.from_pretrained(d)
    d2 = _copy(hf_checkpoint("tiny"), tmp_path / "ckpt2")
    _rewrite(d2, lambda s: s.__setitem__("transformer.h.9.foo", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) h.9.foo"):
        GPT2.from_pretrained(d2)


def _with_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_dropout_fields_are_read_and_written_back(tmp_path, hf_checkpoint):
    import transformers

    d = _with_config(_copy(hf_checkpoint("tiny"), tmp_path / "ckpt"), embd_pdrop=0.25, attn_pdrop=0, resid_pdrop=0.5)
    model = GPT2.from_pretrained(d)
    c = model.config
    assert (c.embd_pdrop, c.attn_pdrop, c.resid_pdrop) == (0.25, 0, 0.5)
    assert model.drop.p == 0.25 and model.h[1].attn.attn_pdrop == 0 and model.h[0].mlp.dropout.p == 0.5
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["embd_pdrop"], saved["attn_pdrop"], saved["resid_pdrop"]) == (0.25, 0, 0.5)
    hf_config = transformers.GPT2Config.from_pretrained(tmp_path / "out")
    assert (hf_config.embd_pdrop, hf_config.attn_pdrop, hf_config.resid_pdrop) == (0.25, 0, 0.5)
    # A config.json without them means GPT-2's 0.1, as in transformers.
    bare = {k: v for k, v in saved.items() if not k.endswith("_pdrop")}
    assert GPT2Config.from_hf_dict(bare) == GPT2Config.from_hf_dict(saved).replace(
        embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)


@pytest.mark.parametrize("field,value", [("attn_pdrop", 1.0), ("resid_pdrop", -0.1), ("embd_pdrop", 1.5)])
def test_dropout_out_of_range_names_file_and_field(tmp_path, hf_checkpoint, field, value):
    d = _with_config(_copy(hf_checkpoint("tiny"), tmp_path / "ckpt"), **{field: value})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(d / 'config.json'))}: GPT2Config.{field} must be a "
                                              rf"dropout probability in \[0, 1\), got {value}"):
        GPT2.from_pretrained(d)


def test_untied_lm_head_is_refused_naming_the_file(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("tiny"), tmp_path / "ckpt")

    def untie(state):
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
        state["lm_head.weight"][7] += 0.01

    _rewrite(d, untie)
    with pytest.raises(CheckpointError, match=f"{d / 'model.safetensors'}: lm_head.weight differs from wte.weight"):
        GPT2.from_pretrained(d)


@pytest.mark.parametrize("key", ["lm_head.weight", "transformer.lm_head.weight"])
def test_lm_head_equal_to_wte_is_accepted(tmp_path, hf_checkpoint, key):
    """transformers sometimes saves tied weights twice; such a head is wte's copy and loads as the tied head."""
    d = _copy(hf_checkpoint("tiny"), tmp_path / "ckpt")
    _rewrite(d, lambda s: s.__setitem__(key, s["transformer.wte.weight"].clone()))
    a, b = GPT2.from_pretrained(hf_checkpoint("tiny")), GPT2.from_pretrained(d)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_integer_tensor_rejected(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("tiny"), tmp_path / "ckpt")
    _rewrite(d, lambda s: s.__setitem__("transformer.wpe.weight", torch.zeros(256, 128, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="'wpe.weight' has dtype torch.int32"):
        GPT2.from_pretrained(d)


def test_config_disagrees_with_weights(tmp_path, hf_checkpoint):
    d = _copy(hf_checkpoint("tiny"), tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layer"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) h.2"):
        GPT2.from_pretrained(d)
    cfg["n_layer"], cfg["n_embd"], cfg["n_head"] = 2, 256, 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json and the weights disagree"):
        GPT2.from_pretrained(d)


def test_pytorch_bin_without_prefix(tmp_path, hf_checkpoint):
    from safetensors.torch import load_file

    src = hf_checkpoint("tiny")
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    state = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    torch.save(state, d / "pytorch_model.bin")
    a, b = GPT2.from_pretrained(src), GPT2.from_pretrained(d)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_pickled_code_is_refused(tmp_path, hf_checkpoint):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(hf_checkpoint("tiny") / "config.json", d)
    torch.save({"wte.weight": torch.zeros(1), "f": print}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        GPT2.from_pretrained(d)


def test_hub_name_offline_without_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as err:
        GPT2.from_pretrained("gpt2-medium")
    msg = str(err.value)
    assert "openai-community/gpt2-medium" in msg and "local" in msg and "\n" not in msg


def test_not_a_name_or_dir():
    with pytest.raises(CheckpointError, match="neither a local directory nor a known GPT-2 name"):
        GPT2.from_pretrained("no-such-model")
    with pytest.raises(CheckpointError, match="The path './no/such/dir' does not exist"):
        GPT2.from_pretrained("./no/such/dir")


def test_float16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="float16 is only supported on CUDA"):
        GPT2.from_pretrained(GPT2Config(n_layer=1, n_head=2, n_embd=128, vocab_size=10), dtype="float16")


def test_cli_info_needs_no_weights():
    out = subprocess.run([sys.executable, "-m", "fastgpt2", "info", "--model", "124M"],
                         capture_output=True, text=True, check=True).stdout
    assert "124,439,808" in out and "no weights read" in out
    bad = subprocess.run([sys.executable, "-m", "fastgpt2", "info", "--model", "gpt5"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_meta_loading_does_not_double_memory(hf_checkpoint):
    # The loader builds on the meta device; the loaded model owns exactly one copy of every parameter.
    model = GPT2.from_pretrained(hf_checkpoint("tiny"))
    assert not any(p.is_meta for p in model.parameters())
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert len(ptrs) == len(list(model.parameters()))
