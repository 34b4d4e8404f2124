"""Checkpoints as people have them: sharded Hugging Face directories, hub caches under any name, config.json fields
the model does not implement or of the wrong type, and paths that do not exist."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt2 import GPT2, GPT2Config
from fastgpt2.model.checkpoint import CheckpointError
from tests.conftest import make_hf_model

# Small enough that a shard limit of a few tens of KB splits it into several files.
SHARD_CONFIG = GPT2Config(vocab_size=517, n_positions=64, n_embd=64, n_layer=3, n_head=2)
SHARD_LIMIT = "40KB"
INDEX = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}


def _save_sharded(hf, directory: Path, fmt: str) -> list[str]:
    """hf.save_pretrained with a small max_shard_size; returns the shard file names its index lists.

    transformers 5 writes safetensors even with safe_serialization=False; there the PyTorch layout that transformers 4
    wrote (pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json) comes from the huggingface_hub function
    transformers 4 used for it."""
    hf.save_pretrained(directory, max_shard_size=SHARD_LIMIT, safe_serialization=fmt == "safetensors")
    if fmt == "bin" and not (directory / INDEX["bin"]).is_file():
        from huggingface_hub import save_torch_state_dict

        for f in directory.glob("model*.safetensors*"):
            f.unlink()
        save_torch_state_dict(hf.state_dict(), directory, filename_pattern="pytorch_model{suffix}.bin",
                              max_shard_size=SHARD_LIMIT, safe_serialization=False)
    shards = sorted(set(json.loads((directory / INDEX[fmt]).read_text())["weight_map"].values()))
    assert len(shards) >= 3 and not (directory / "model.safetensors").exists()
    assert not (directory / "pytorch_model.bin").exists()
    return shards


def _assert_same_logits(model, hf, vocab_size):
    ids = torch.randint(0, vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)  # float32; the values reach ~30 (ln_f margin)
    assert not any(p.is_meta for p in model.parameters())


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def sharded(request, tmp_path_factory):
    """(format, transformers reference model, sharded checkpoint directory, its shard names)."""
    hf = make_hf_model(SHARD_CONFIG, seed=4)
    directory = tmp_path_factory.mktemp(f"sharded-{request.param}")
    return request.param, hf, directory, _save_sharded(hf, directory, request.param)


def test_sharded_directory_matches_transformers(sharded):
    fmt, hf, directory, shards = sharded
    assert all(s.endswith(".safetensors" if fmt == "safetensors" else ".bin") for s in shards)
    model = GPT2.from_pretrained(directory, device="cpu", dtype="float32")
    _assert_same_logits(model, hf, SHARD_CONFIG.vocab_size)


def _record_opens(fmt: str, monkeypatch) -> list[str]:
    """The file names the loader opens, in order (safetensors' safe_open or torch.load)."""
    opened = []
    if fmt == "safetensors":
        import safetensors

        module, attr = safetensors, "safe_open"
    else:
        module, attr = torch, "load"
    real = getattr(module, attr)
    monkeypatch.setattr(module, attr, lambda path, *a, **k: opened.append(Path(path).name) or real(path, *a, **k))
    return opened


def test_each_shard_is_opened_once(sharded, monkeypatch):
    fmt, _, directory, shards = sharded
    opened = _record_opens(fmt, monkeypatch)
    GPT2.from_pretrained(directory, device="cpu")
    assert sorted(opened) == shards


def test_missing_shard_is_named(sharded, tmp_path):
    fmt, _, directory, shards = sharded
    d = shutil.copytree(directory, tmp_path / "ckpt")
    (d / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"{re.escape(INDEX[fmt])} names the shard {re.escape(shards[1])}, "
                                              f"which is missing"):
        GPT2.from_pretrained(d)


def test_index_naming_a_file_outside_its_directory(sharded, tmp_path):
    fmt, _, directory, _ = sharded
    d = shutil.copytree(directory, tmp_path / "ckpt")
    index = json.loads((d / INDEX[fmt]).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../elsewhere.safetensors"
    (d / INDEX[fmt]).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'../elsewhere.safetensors', which is not a file name in its directory"):
        GPT2.from_pretrained(d)


def test_index_disagreeing_with_its_shards(sharded, tmp_path):
    fmt, _, directory, shards = sharded
    d = shutil.copytree(directory, tmp_path / "ckpt")
    index = json.loads((d / INDEX[fmt]).read_text())
    key = next(k for k, v in index["weight_map"].items() if k.endswith("ln_f.weight"))
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    (d / INDEX[fmt]).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="is not in this shard.*the index and the shards disagree"):
        GPT2.from_pretrained(d)


def _add_head_shard(directory: Path, fmt: str, head: torch.Tensor) -> str:
    """Store `head` as lm_head.weight in a shard of its own and name it in the index; returns the shard's name."""
    name = "lm_head." + ("safetensors" if fmt == "safetensors" else "bin")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({"lm_head.weight": head.contiguous()}, str(directory / name), metadata={"format": "pt"})
    else:
        torch.save({"lm_head.weight": head}, directory / name)
    index = json.loads((directory / INDEX[fmt]).read_text())
    index["weight_map"]["lm_head.weight"] = name
    (directory / INDEX[fmt]).write_text(json.dumps(index))
    return name


def test_tied_head_in_its_own_shard_is_accepted_and_every_shard_opened_once(sharded, tmp_path, monkeypatch):
    fmt, hf, directory, shards = sharded
    d = shutil.copytree(directory, tmp_path / "ckpt")
    head_shard = _add_head_shard(d, fmt, hf.lm_head.weight.detach().clone())
    opened = _record_opens(fmt, monkeypatch)
    model = GPT2.from_pretrained(d, device="cpu", dtype="float32")
    assert sorted(opened) == sorted(shards + [head_shard])
    _assert_same_logits(model, hf, SHARD_CONFIG.vocab_size)


def test_untied_head_in_a_shard_is_refused_naming_it(sharded, tmp_path):
    fmt, hf, directory, _ = sharded
    d = shutil.copytree(directory, tmp_path / "ckpt")
    head = hf.lm_head.weight.detach().clone()
    head[3, 5] += 1e-3
    head_shard = _add_head_shard(d, fmt, head)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(d / head_shard))}: lm_head.weight differs from "
                                              f"wte.weight.*use transformers"):
        GPT2.from_pretrained(d)


# --- the Hugging Face cache (offline), laid out as huggingface_hub writes it ---

def _fake_hub_cache(cache: Path, repo: str, source: Path, skip=()) -> Path:
    """models--<org>--<name>/snapshots/<rev>/ holding a copy of `source` (minus `skip`), and refs/main -> <rev>."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / rev
    shutil.copytree(source, snapshot, ignore=shutil.ignore_patterns(*skip))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path that huggingface_hub reads with the network off."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("cached_as,name", [("gpt2", "gpt2"), ("gpt2", "124M"), ("gpt2", "openai-community/gpt2"),
                                            ("openai-community/gpt2", "gpt2"), ("gpt2-medium", "345M")])
def test_cache_under_short_or_canonical_name(offline_cache, hf_checkpoint, cached_as, name):
    # from_pretrained("gpt2") in transformers fills models--gpt2; the canonical id fills models--openai-community--gpt2.
    snapshot = _fake_hub_cache(offline_cache, cached_as, hf_checkpoint("tiny"))
    model = GPT2.from_pretrained(name, device="cpu")
    assert Path(model.checkpoint_dir) == snapshot
    local = GPT2.from_pretrained(hf_checkpoint("tiny"), device="cpu")
    for (n, p), (_, q) in zip(model.named_parameters(), local.named_parameters()):
        assert torch.equal(p, q), n


def test_sharded_checkpoint_from_the_hub_cache(offline_cache, sharded):
    _, hf, directory, _ = sharded
    snapshot = _fake_hub_cache(offline_cache, "someone/tiny-sharded", directory)
    model = GPT2.from_pretrained("someone/tiny-sharded", device="cpu", dtype="float32")
    assert Path(model.checkpoint_dir) == snapshot
    _assert_same_logits(model, hf, SHARD_CONFIG.vocab_size)


def test_hub_cache_missing_a_shard_names_it(offline_cache, sharded):
    _, _, directory, shards = sharded
    _fake_hub_cache(offline_cache, "someone/tiny-sharded", directory, skip=[shards[-1]])
    with pytest.raises(CheckpointError) as err:
        GPT2.from_pretrained("someone/tiny-sharded")
    msg = str(err.value)
    assert shards[-1] in msg and "could not be reached" in msg and "\n" not in msg


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A hub that serves the files of local directories (repo id -> directory) into a snapshot folder, recording
    every file asked for; nothing is in the cache."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    repos, asked = {}, []

    def download(repo_id, filename, *, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError(f"{filename} not cached")
        asked.append(filename)
        source = repos[repo_id] / filename
        if not source.is_file():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        target = tmp_path / "snapshot" / repo_id / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return repos, asked


def test_sharded_checkpoint_from_the_hub_fetches_the_index_then_each_shard(fake_hub, sharded):
    fmt, hf, directory, shards = sharded
    repos, asked = fake_hub
    repos["someone/tiny-sharded"] = directory
    model = GPT2.from_pretrained("someone/tiny-sharded", device="cpu", dtype="float32")
    _assert_same_logits(model, hf, SHARD_CONFIG.vocab_size)
    single = ["model.safetensors"] + (["model.safetensors.index.json", "pytorch_model.bin"] if fmt == "bin" else [])
    head = ["config.json", *single, INDEX[fmt]]
    assert asked[:len(head)] == head and asked[-2:] == ["vocab.json", "merges.txt"]
    assert sorted(asked[len(head):-2]) == shards  # each shard once, in the index's order


def test_hub_repository_missing_a_shard_names_it(fake_hub, sharded, tmp_path):
    fmt, _, directory, shards = sharded
    repos, _ = fake_hub
    repos["someone/tiny-sharded"] = shutil.copytree(directory, tmp_path / "repo",
                                                    ignore=shutil.ignore_patterns(shards[0]))
    with pytest.raises(CheckpointError, match=f"someone/tiny-sharded lacks the shard {re.escape(shards[0])} that its "
                                              f"{re.escape(INDEX[fmt])} names"):
        GPT2.from_pretrained("someone/tiny-sharded")


# --- config.json fields ---

def _with_config(tmp_path, hf_checkpoint, **changes) -> Path:
    """A directory whose config.json is the tiny checkpoint's with `changes` (None values written as null)."""
    cfg = json.loads((hf_checkpoint("tiny") / "config.json").read_text())
    cfg.update(changes)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("field,value", [
    ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True),
    ("add_cross_attention", True),
    ("tie_word_embeddings", False),
    ("activation_function", "gelu"),
    ("activation_function", "relu"),
    ("n_inner", 100),
    ("model_type", "gpt_neo"),
])
def test_unimplemented_config_is_refused(tmp_path, hf_checkpoint, field, value):
    d = _with_config(tmp_path, hf_checkpoint, **{field: value})
    with pytest.raises(CheckpointError, match=f"{re.escape(str(d / 'config.json'))}: {field}"):
        GPT2.from_pretrained(d)


@pytest.mark.parametrize("field,value", [
    ("activation_function", "gelu_pytorch_tanh"), ("n_inner", 512), ("n_inner", None), ("scale_attn_weights", True),
])
def test_equivalent_config_is_accepted(tmp_path, hf_checkpoint, field, value):
    d = _with_config(tmp_path, hf_checkpoint, **{field: value})
    shutil.copy(hf_checkpoint("tiny") / "model.safetensors", d)
    GPT2.from_pretrained(d)


def test_reorder_and_upcast_attn_is_accepted(tmp_path):
    # It only computes the attention scores in float32, which every attention path here does anyway.
    hf = make_hf_model(SHARD_CONFIG, seed=5)
    hf.config.reorder_and_upcast_attn = True
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["reorder_and_upcast_attn"] is True
    model = GPT2.from_pretrained(tmp_path, device="cpu", dtype="float32")
    _assert_same_logits(model, hf, SHARD_CONFIG.vocab_size)


@pytest.mark.parametrize("field,value,expected", [
    ("layer_norm_epsilon", None, "a number, got null"),
    ("layer_norm_epsilon", "1e-5", 'a number, got "1e-5"'),
    ("n_layer", "2", 'an integer, got "2"'),
    ("n_embd", 128.0, "an integer, got 128.0"),
    ("vocab_size", True, "an integer, got true"),
    ("n_positions", None, "an integer, got null"),
    ("n_inner", "512", 'an integer or null, got "512"'),
    ("scale_attn_weights", "false", 'true or false, got "false"'),
    ("tie_word_embeddings", None, "true or false, got null"),
    ("activation_function", None, "a string, got null"),
    ("attn_pdrop", "0.1", 'a number, got "0.1"'),
    ("embd_pdrop", None, "a number, got null"),
])
def test_config_field_of_wrong_type_names_file_and_field(tmp_path, hf_checkpoint, field, value, expected):
    d = _with_config(tmp_path, hf_checkpoint, **{field: value})
    with pytest.raises(CheckpointError) as err:
        GPT2.from_pretrained(d)
    assert str(err.value).startswith(f"{d / 'config.json'}: field '{field}' must be {expected}")


def test_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object"):
        GPT2.from_pretrained(tmp_path)


def test_gpt2config_epsilon_of_wrong_type():
    with pytest.raises(ValueError, match=r"GPT2Config.layer_norm_epsilon must be a number in \(0, 1\), got None"):
        GPT2Config(layer_norm_epsilon=None)


# --- paths that do not exist are paths, not hub ids ---

@pytest.fixture
def no_hub(monkeypatch):
    """Records every hub id asked for; the hub itself is never reached (offline, empty cache)."""
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    asked = []

    def fake(repo_id, *args, **kwargs):
        asked.append(repo_id)
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return asked


@pytest.mark.parametrize("name", ["./my-model", "../x", "/tmp/fastgpt2-nothere", "~/fastgpt2-nothere", ".hidden",
                                  "runs/gpt2/final", "org/name/", "C:\\models\\gpt2", "local/model"])
def test_missing_path_says_it_does_not_exist(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()  # 'local/model' is a path because 'local' is a directory here
    with pytest.raises(CheckpointError, match=f"The path {re.escape(repr(name))} does not exist") as err:
        GPT2.from_pretrained(name)
    assert no_hub == [] and "\n" not in str(err.value)


def test_missing_path_object_and_llm(tmp_path, no_hub):
    from fastgpt2 import LLM

    with pytest.raises(CheckpointError, match="does not exist"):
        GPT2.from_pretrained(Path("org/name"))  # a Path object is always a path
    with pytest.raises(CheckpointError, match="The path './my-model' does not exist"):
        LLM("./my-model")
    assert no_hub == []


@pytest.mark.parametrize("name", ["someorg/some-model", "gpt2-xl", "openai-community/gpt2-large"])
def test_hub_ids_still_go_to_the_hub(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="could not be reached"):
        GPT2.from_pretrained(name)
    assert no_hub and set(no_hub) <= {name, "openai-community/gpt2-xl", "openai-community/gpt2-large", "gpt2-large"}


def test_cli_missing_path():
    name = "./fastgpt2-no-such-model"
    r = subprocess.run([sys.executable, "-m", "fastgpt2", "info", "--model", name], capture_output=True, text=True)
    assert r.returncode == 2 and f"The path '{name}' does not exist" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
