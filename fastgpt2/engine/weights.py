"""Loading and saving GPT-2 weights: Hugging Face directories, hub ids (through the local cache), or random init.

Loading builds the model on the meta device and copies tensor by tensor from lazily-read files, so a 1558M checkpoint
never needs two full copies of the weights in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastgpt2.engine.config import HUB_REPOS, GPT2Config, canonical_preset
from fastgpt2.engine.model import GPT2

# Conv1D layers store their weight as (in, out); this model stores nn.Linear (out, in).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers and tied copies some checkpoints carry that hold no parameters of their own.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or disagreeing with its config."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype is None or dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16 (CUDA only)")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16 (CUDA only)")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 is only supported on CUDA; on CPU use float32 or bfloat16")
    return device, dtype


def _hub_error(name: str, repo: str, cause: Exception) -> CheckpointError:
    return CheckpointError(
        f"Could not get the weights for {name!r} ({repo}): they are not in the local Hugging Face cache and the hub "
        f"could not be reached ({type(cause).__name__}). Download them once on a machine with network access "
        f"(e.g. `huggingface-cli download {repo}`) and copy the Hugging Face cache, or pass --model / LLM(...) a local "
        f"directory holding config.json and model.safetensors (or pytorch_model.bin); to run the engine without any "
        f"weights use --random-weights (CLI) or a GPT2Config (Python), which gives meaningless text at real speed."
    )


def resolve_checkpoint_dir(name_or_path) -> Path:
    """A local directory for a path, preset name or hub id (downloading into the Hugging Face cache if needed)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and the weights")
    preset = canonical_preset(str(name_or_path))
    repo = HUB_REPOS[preset] if preset else str(name_or_path)
    if preset is None and (str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~"))):
        raise CheckpointError(
            f"{name_or_path!r} is neither a local directory nor a known GPT-2 name; use a directory with config.json "
            f"and model.safetensors, a hub id such as 'openai-community/gpt2', or one of: gpt2, gpt2-medium, "
            f"gpt2-large, gpt2-xl (124M, 355M, 774M, 1558M)"
        )
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "vocab.json", "merges.txt"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network next
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, HTTP error: one paragraph, no traceback
        raise _hub_error(str(name_or_path), repo, exc) from None


def read_config(directory: Path) -> GPT2Config:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; a Hugging Face GPT-2 directory needs one")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from None
    try:
        return GPT2Config.from_hf_dict(data, source=str(cfg_path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


class _TensorSource:
    """Lazy name -> tensor access to model.safetensors or pytorch_model.bin (memory-mapped, weights_only)."""

    def __init__(self, directory: Path):
        st, pt = directory / "model.safetensors", directory / "pytorch_model.bin"
        if st.is_file():
            from safetensors import safe_open

            self.path = st
            try:
                self._handle = safe_open(str(st), framework="pt", device="cpu")
                self.keys = list(self._handle.keys())
            except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike
                raise CheckpointError(f"{st} is corrupt or truncated and cannot be read ({exc})") from None
            self._get = self._handle.get_tensor
        elif pt.is_file():
            self.path = pt
            try:
                state = torch.load(str(pt), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - pickle errors, unsafe globals, truncation
                raise CheckpointError(f"{pt} cannot be loaded safely ({str(exc).splitlines()[0]})") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{pt} does not hold a state dict")
            self.keys = list(state.keys())
            self._get = state.__getitem__
        else:
            raise CheckpointError(f"{directory} has no model.safetensors or pytorch_model.bin; no weights to load")

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._get(key)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: tensor {key!r} cannot be read; the file is corrupt ({exc})") from None


def _map_keys(keys: list[str], path: Path) -> dict[str, str]:
    """Model parameter name -> checkpoint key, accepting keys with or without the `transformer.` prefix."""
    mapping = {}
    for key in keys:
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name == "lm_head.weight" or name.endswith(_IGNORED_SUFFIXES):
            continue
        if name in mapping:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice (with and without 'transformer.')")
        mapping[name] = key
    return mapping


@torch.no_grad()
def load_weights_into(model: GPT2, directory: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Checked copy of every tensor in `directory` into `model` (which may live on the meta device)."""
    source = _TensorSource(directory)
    mapping = _map_keys(source.keys, source.path)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(mapping))
    extra = sorted(set(mapping) - set(params))
    if missing:
        raise CheckpointError(f"{source.path}: missing tensor(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if extra:
        raise CheckpointError(f"{source.path}: unexpected tensor(s) {', '.join(extra[:5])}; is this a GPT-2 checkpoint?")
    loaded = {}
    for name, param in params.items():
        tensor = source.get(mapping[name])
        if tensor.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{source.path}: tensor {name!r} has dtype {tensor.dtype}, expected a float dtype")
        if name.endswith(_TRANSPOSED) and tensor.dim() == 2:
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source.path}: tensor {name!r} has shape {tuple(tensor.shape)} but the config expects "
                f"{tuple(param.shape)}; config.json and the weights disagree"
            )
        loaded[name] = tensor.to(device=device, dtype=dtype).contiguous()
        del tensor
        # Swap the meta parameter for the real one at once, so at most one tensor is in flight.
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(loaded.pop(name), requires_grad=False))


def load_model(name_or_path, device=None, dtype=None) -> GPT2:
    """A GPT2 in eval mode from a GPT2Config (random weights), a local directory, a preset or a hub id."""
    device, dtype = resolve_device_dtype(device, dtype)
    if isinstance(name_or_path, GPT2Config):
        model = GPT2(name_or_path).to(device=device, dtype=dtype)
        return model.eval().requires_grad_(False)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a GPT2Config, a directory or a model name, got {type(name_or_path).__name__}")
    directory = resolve_checkpoint_dir(name_or_path)
    config = read_config(directory)
    with torch.device("meta"):
        model = GPT2(config)
    load_weights_into(model, directory, device, dtype)
    model.checkpoint_dir = str(directory)
    return model.eval()


def save_pretrained(model: GPT2, directory, tokenizer=None) -> None:
    """Write the Hugging Face GPT-2 format that transformers' GPT2LMHeadModel.from_pretrained loads back."""
    from safetensors.torch import save_file

    from fastgpt2.engine.tokenizer import Tokenizer

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
