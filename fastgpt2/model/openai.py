"""OpenAI's original GPT-2 release directory (hparams.json, encoder.json, vocab.bpe, checkpoint, model.ckpt.*): its
config, and its TensorFlow checkpoint copied into a GPT2 tensor by tensor under OpenAI's variable names."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from fastgpt2.model.config import GPT2Config
from fastgpt2.model.hub import CheckpointError, read_json_config
from fastgpt2.model.tf_reader import TFCheckpoint

__all__ = ["is_openai_checkpoint", "load_openai_weights_into", "openai_names", "read_hparams"]

HPARAMS_FILE = "hparams.json"
DEFAULT_PREFIX = "model.ckpt"
# Block parameter (model name suffix) -> OpenAI's variable suffix under model/h{i}/.
_BLOCK_NAMES = {
    "ln_1.weight": "ln_1/g", "ln_1.bias": "ln_1/b",
    "attn.c_attn.weight": "attn/c_attn/w", "attn.c_attn.bias": "attn/c_attn/b",
    "attn.c_proj.weight": "attn/c_proj/w", "attn.c_proj.bias": "attn/c_proj/b",
    "ln_2.weight": "ln_2/g", "ln_2.bias": "ln_2/b",
    "mlp.c_fc.weight": "mlp/c_fc/w", "mlp.c_fc.bias": "mlp/c_fc/b",
    "mlp.c_proj.weight": "mlp/c_proj/w", "mlp.c_proj.bias": "mlp/c_proj/b",
}
_TOP_NAMES = {"wte.weight": "model/wte", "wpe.weight": "model/wpe", "ln_f.weight": "model/ln_f/g",
              "ln_f.bias": "model/ln_f/b"}
# Training state some GPT-2 fine-tuning scripts save next to the weights (Adam's moments): not part of the model.
_OPTIMIZER_SLOTS = re.compile(r".*/Adam(_\d+)?$")


def is_openai_checkpoint(directory: Path) -> bool:
    """A directory without config.json that holds hparams.json or a TensorFlow checkpoint (its `checkpoint` file or
    model.ckpt.index) is in OpenAI's release format; with config.json, it is a Hugging Face directory."""
    if (directory / "config.json").is_file():
        return False
    return any((directory / name).is_file() for name in (HPARAMS_FILE, "checkpoint", DEFAULT_PREFIX + ".index"))


def read_hparams(directory: Path) -> GPT2Config:
    """GPT2Config from OpenAI's hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
    path = directory / HPARAMS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} holds a TensorFlow checkpoint but no {HPARAMS_FILE}; copy the one "
                              f"released with these weights next to it")
    return read_json_config(path, GPT2Config.from_openai_hparams)


def checkpoint_prefix(directory: Path) -> Path:
    """The checkpoint that the `checkpoint` file names (model_checkpoint_path), else model.ckpt, inside `directory`.

    Only the file name of the recorded path counts: a release directory copied elsewhere still finds its weights."""
    state = directory / "checkpoint"
    if state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', state.read_text(errors="replace"), re.M)
        if match is None:
            raise CheckpointError(f"{state} has no model_checkpoint_path line; write one such as "
                                  f'model_checkpoint_path: "model.ckpt"')
        return directory / Path(match.group(1).replace("\\\\", "\\")).name
    return directory / DEFAULT_PREFIX


def openai_names(config: GPT2Config) -> dict[str, str]:
    """fastgpt2 parameter name -> OpenAI variable name, for every parameter of a GPT2 of this config."""
    names = dict(_TOP_NAMES)
    for i in range(config.n_layer):
        names.update({f"h.{i}.{ours}": f"model/h{i}/{theirs}" for ours, theirs in _BLOCK_NAMES.items()})
    return names


def _is_conv_weight(name: str) -> bool:
    """OpenAI's conv1d weights: (1, in, out), stored here as nn.Linear (out, in)."""
    return name.endswith("/w")


@torch.no_grad()
def load_openai_weights_into(model, directory: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Checked copy of OpenAI's TensorFlow checkpoint in `directory` into `model` (which may live on the meta device).

    Steps: 1. read the index and check that every variable the config needs is there with its shape, and nothing
    else under model/; 2. check every tensor's dtype and byte range (a truncated file fails before anything is read);
    3. read each tensor (bounds and CRC32C checked), drop the conv1d weights' leading 1 and
    transpose them to (out, in), and swap it in for the meta parameter at once."""
    ckpt = TFCheckpoint(checkpoint_prefix(directory))
    index = ckpt.index_path
    names = openai_names(model.config)
    params = dict(model.named_parameters())
    assert set(names) == set(params), "openai_names must cover exactly the model's parameters"
    expected = {}
    for ours, theirs in names.items():
        shape = tuple(params[ours].shape)
        expected[theirs] = (1, shape[1], shape[0]) if _is_conv_weight(theirs) else shape
    missing = [theirs for theirs in expected if theirs not in ckpt.entries]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{index}: tensor {missing[0]!r} is missing{more}, but {HPARAMS_FILE} "
                              f"(n_layer={model.config.n_layer}) needs it; the checkpoint is incomplete or "
                              f"{HPARAMS_FILE} belongs to other weights")
    extra = sorted(name for name in ckpt.entries
                   if name.startswith("model/") and name not in expected and not _OPTIMIZER_SLOTS.match(name))
    if extra:
        more = " ..." if len(extra) > 5 else ""
        raise CheckpointError(f"{index}: unexpected tensor(s) {', '.join(extra[:5])}{more}, which {HPARAMS_FILE} "
                              f"(n_layer={model.config.n_layer}) does not describe; is it the one of these weights?")
    for theirs, shape in expected.items():
        if ckpt.entries[theirs].shape != shape:
            raise CheckpointError(f"{index}: tensor {theirs!r} has shape {ckpt.entries[theirs].shape} but "
                                  f"{HPARAMS_FILE} asks for {shape}; {HPARAMS_FILE} and the weights disagree")
    ckpt.check(expected)
    for ours, theirs in names.items():
        tensor = torch.from_numpy(ckpt.read(theirs))
        if _is_conv_weight(theirs):
            tensor = tensor[0].t()  # (1, in, out) -> (out, in)
        param = torch.nn.Parameter(tensor.to(device=device, dtype=dtype).contiguous())
        del tensor
        module_name, _, attr = ours.rpartition(".")
        setattr(model.get_submodule(module_name), attr, param)
