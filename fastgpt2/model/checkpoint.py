"""Loading and saving GPT-2 weights: Hugging Face directories (one file or shards), hub ids (through hub.py and the
local cache), OpenAI's original TensorFlow release directories (through openai.py), or random init.

Loading builds the model on the meta device and copies tensor by tensor from lazily-read files, so a 1558M checkpoint
never needs two full copies of the weights in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastgpt2.model.config import GPT2Config
from fastgpt2.model.hub import WEIGHT_FILES, CheckpointError, read_index, read_json_config, resolve_checkpoint_dir
from fastgpt2.model.openai import is_openai_checkpoint, load_openai_weights_into, read_hparams

__all__ = ["CheckpointError", "load_model", "load_weights_into", "read_config", "resolve_checkpoint_dir",
           "resolve_device_dtype", "save_pretrained"]

# Conv1D layers store their weight as (in, out); this model stores nn.Linear (out, in).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some checkpoints carry that hold no parameters of their own.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The output head: a copy of wte in checkpoints that store tied weights twice; anything else is an untied head.
_HEAD = "lm_head.weight"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# dtype spellings accepted wherever a dtype is given as a string
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Validate device/dtype; float32 on CPU and float16 on CUDA unless asked otherwise."""
    try:
        device = torch.device(device) if device is not None else default_device()
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; use 'cpu' or 'cuda'")
    if dtype is None or dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16 (CUDA only)")
        dtype = DTYPE_NAMES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16 (CUDA only)")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 is only supported on CUDA; on CPU use float32 or bfloat16")
    return device, dtype


def read_config(directory: Path) -> GPT2Config:
    """The config of a Hugging Face directory (config.json) or of OpenAI's release format (hparams.json)."""
    if is_openai_checkpoint(directory):
        return read_hparams(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; a Hugging Face GPT-2 directory needs one")
    return read_json_config(cfg_path, GPT2Config.from_hf_dict)


def _open_file(path: Path) -> tuple[list[str], object]:
    """(keys, key -> tensor) of one .safetensors or .bin file, read lazily (memory-mapped; .bin only weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            return list(handle.keys()), handle.get_tensor
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike
            raise CheckpointError(f"{path} is corrupt or truncated and cannot be read ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors, unsafe globals, truncation
        raise CheckpointError(f"{path} cannot be loaded safely ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return list(state.keys()), state.__getitem__


class _TensorSource:
    """Lazy key -> tensor access to model.safetensors, pytorch_model.bin, or the shards an index of either names.

    Shards are opened one at a time, when a key in them is first read, and closed when the next one opens; callers
    read keys grouped by `file_of` so that each shard is opened once.
    """

    def __init__(self, directory: Path):
        for single, index in WEIGHT_FILES:
            if (directory / single).is_file():
                self.path = directory / single
                keys, self._get = _open_file(self.path)
                self._files = dict.fromkeys(keys, self.path)
                self._open_path, self._open_keys = self.path, set(keys)
                return
            if (directory / index).is_file():
                self.path = directory / index
                self._files = {key: directory / shard for key, shard in read_index(self.path).items()}
                for shard in dict.fromkeys(self._files.values()):
                    if not shard.is_file():
                        raise CheckpointError(f"{self.path} names the shard {shard.name}, which is missing from "
                                              f"{directory}; download or copy that file")
                self._open_path, self._get, self._open_keys = None, None, set()
                return
        raise CheckpointError(f"{directory} has no model.safetensors or pytorch_model.bin (nor a sharded "
                              f"model.safetensors.index.json or pytorch_model.bin.index.json); no weights to load")

    @property
    def keys(self) -> list[str]:
        return list(self._files)

    def file_of(self, key: str) -> Path:
        return self._files[key]

    def get(self, key: str) -> torch.Tensor:
        path = self._files[key]
        if path != self._open_path:
            self._open_path, self._get = None, None  # drop the previous shard before opening the next
            keys, get = _open_file(path)
            self._open_path, self._get, self._open_keys = path, get, set(keys)
        if key not in self._open_keys:
            raise CheckpointError(f"{path}: tensor {key!r} is not in this shard although {self.path.name} says it is; "
                                  f"the index and the shards disagree, download them again")
        try:
            return self._get(key)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: tensor {key!r} cannot be read; the file is corrupt ({exc})") from None


def _map_keys(keys: list[str], path: Path) -> dict[str, str]:
    """Model parameter name -> checkpoint key, accepting keys with or without the `transformer.` prefix."""
    mapping = {}
    for key in keys:
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name in mapping:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice (with and without 'transformer.')")
        mapping[name] = key
    return mapping


def _check_tied_head(head: torch.Tensor, wte: torch.Tensor, path: Path) -> None:
    """Refuse an lm_head.weight that is not an exact copy of wte.weight (both as read from the checkpoint)."""
    if tuple(head.shape) != tuple(wte.shape) or not torch.equal(head.to(wte.dtype), wte):
        raise CheckpointError(f"{path}: lm_head.weight differs from wte.weight, an output head untied from the "
                              f"embedding, which fastgpt2 does not implement (its head is tied to wte); use "
                              f"transformers for this model")


@torch.no_grad()
def load_weights_into(model, directory: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Checked copy of every tensor in `directory` into `model` (which may live on the meta device); the parameters
    it creates are trainable (requires_grad=True)."""
    source = _TensorSource(directory)
    mapping = _map_keys(source.keys, source.path)
    head_key = mapping.pop(_HEAD, None)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(mapping))
    extra = sorted(set(mapping) - set(params))
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise CheckpointError(f"{source.path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    if extra:
        raise CheckpointError(
            f"{source.path}: unexpected tensor(s) {', '.join(extra[:5])}; is this a GPT-2 checkpoint?"
        )
    loaded = {}
    # A stored head is read in the shard order too, and compared with wte once both are read (held until then).
    names = list(params) + ([_HEAD] if head_key is not None else [])
    keys = {**mapping, _HEAD: head_key}
    tied = {}
    # Shard by shard (a stable sort keeps the model's order inside each), so that every shard is opened once.
    rank = {path: i for i, path in enumerate(dict.fromkeys(source.file_of(keys[name]) for name in names))}
    for name in sorted(names, key=lambda n: rank[source.file_of(keys[n])]):
        path = source.file_of(keys[name])
        tensor = source.get(keys[name])
        if head_key is not None and name in (_HEAD, "wte.weight"):
            tied[name] = tensor
            if len(tied) == 2:
                _check_tied_head(tied.pop(_HEAD), tied.pop("wte.weight"), source.file_of(head_key))
            if name == _HEAD:
                continue
        param = params[name]
        if tensor.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected a float dtype")
        if name.endswith(_TRANSPOSED) and tensor.dim() == 2:
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} but the config expects "
                f"{tuple(param.shape)}; config.json and the weights disagree"
            )
        loaded[name] = tensor.to(device=device, dtype=dtype).contiguous()
        del tensor
        # Swap the meta parameter for the real one at once, so at most one tensor is in flight.
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(loaded.pop(name)))


def load_model(model_cls, name_or_path, device=None, dtype=None):
    """A model_cls (GPT2) in eval mode with trainable parameters, from a GPT2Config (random weights), a local
    directory, a preset or a hub id."""
    device, dtype = resolve_device_dtype(device, dtype)
    if isinstance(name_or_path, GPT2Config):
        model = model_cls(name_or_path).to(device=device, dtype=dtype)
        return model.eval()
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a GPT2Config, a directory or a model name, got {type(name_or_path).__name__}")
    directory = resolve_checkpoint_dir(name_or_path)
    config = read_config(directory)
    with torch.device("meta"):
        model = model_cls(config)
    load = load_openai_weights_into if is_openai_checkpoint(directory) else load_weights_into
    load(model, directory, device, dtype)
    model.checkpoint_dir = str(directory)
    return model.eval()


def save_pretrained(model, directory, tokenizer=None) -> None:
    """Write the Hugging Face GPT-2 format that transformers' GPT2LMHeadModel.from_pretrained loads back."""
    from safetensors.torch import save_file

    from fastgpt2.model.tokenizer import Tokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if name.endswith(_TRANSPOSED):
            tensor = tensor.t()
        state[f"transformer.{name}"] = tensor.to("cpu").contiguous().clone()
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (tokenizer or Tokenizer.from_pretrained()).save_pretrained(out)
