"""Loading and saving GPT-2 weights: Hugging Face directories, hub ids (through the local cache), or random init.

Loading builds the model on the meta device and copies tensor by tensor from lazily-read files, so a 1558M checkpoint
never needs two full copies of the weights in memory.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from fastgpt2.engine.config import HUB_REPOS, GPT2Config, canonical_preset
from fastgpt2.engine.model import GPT2

# Conv1D layers store their weight as (in, out); this model stores nn.Linear (out, in).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers and tied copies some checkpoints carry that hold no parameters of their own.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# (one-file weights, index of the sharded form), in the order transformers prefers them.
_WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                 ("pytorch_model.bin", "pytorch_model.bin.index.json"))


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


def _hub_error(name: str, repo: str, cause: Exception, missing: str | None = None) -> CheckpointError:
    from huggingface_hub.utils import RepositoryNotFoundError

    if isinstance(cause, RepositoryNotFoundError):  # the hub answered; gated and private repositories included
        return CheckpointError(
            f"{name!r} is not a local directory and the hub has no repository {repo} that this machine may read "
            f"({type(cause).__name__}); check the spelling, or run `huggingface-cli login` for a private or gated one"
        )
    missing = missing or "they are not in the local Hugging Face cache"
    return CheckpointError(
        f"Could not get the weights for {name!r} ({repo}): {missing} and the hub could not be reached "
        f"({type(cause).__name__}). Download them once on a machine with network access "
        f"(e.g. `huggingface-cli download {repo}`) and copy the Hugging Face cache, or pass --model / LLM(...) a local "
        f"directory holding config.json and model.safetensors (or pytorch_model.bin); to run the engine without any "
        f"weights use --random-weights (CLI) or a GPT2Config (Python), which gives meaningless text at real speed."
    )


# One part of a hub id ('org' or 'name' in 'org/name'), as the hub accepts them.
_HUB_ID_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _is_hub_id(text: str) -> bool:
    """'name' or 'org/name' in the hub's alphabet, with no '..' or '--' (which the hub refuses)."""
    parts = text.split("/")
    return (len(parts) <= 2 and all(_HUB_ID_PART.fullmatch(part) for part in parts)
            and ".." not in text and "--" not in text and not text.endswith("."))


def _is_path(name_or_path) -> bool:
    """Whether a name that exists nowhere on disk was meant as a filesystem path rather than a hub id.

    A Path object, anything absolute or starting with '.' or '~', anything with a backslash or more than one '/', and
    'a/b' whose first part 'a' is a local directory are paths; 'name' and 'org/name' are hub ids, as in transformers.
    """
    if not isinstance(name_or_path, str):
        return True
    text = name_or_path
    if text.startswith((".", "~")) or os.path.isabs(text) or not _is_hub_id(text):
        return True
    return "/" in text and Path(text.split("/")[0]).is_dir()


def _hub_candidates(name: str, preset: str | None) -> list[str]:
    """Hub ids whose cache may hold `name`: the name as given, then for the official sizes the canonical id
    ('openai-community/gpt2') and the short one ('gpt2') that older transformers versions filled the cache under."""
    if preset is None:
        return [name]
    canonical = HUB_REPOS[preset]
    given = [name] if _is_hub_id(name) else []
    return list(dict.fromkeys([*given, canonical, canonical.rpartition("/")[2]]))


def _download_checkpoint(repo: str, local_files_only: bool) -> Path:
    """The snapshot directory of `repo` after fetching config.json, its weights (one file, or an index and every shard
    it names) and the tokenizer files when present; `local_files_only` reads the cache and never the network."""
    # huggingface_hub.utils (not .errors) has both names in every version setup.py allows.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    def get(filename: str) -> Path | None:
        """The cached file, or None when the repository (or, with local_files_only, the cache) does not have it."""
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=local_files_only))
        except EntryNotFoundError as exc:
            # Online, a file missing from the cache while the hub is unreachable is not a file the repo lacks.
            if not local_files_only and isinstance(exc, LocalEntryNotFoundError):
                raise
            return None

    config = get("config.json")
    if config is None:
        raise CheckpointError(f"the hub repository {repo} has no config.json; it is not a Hugging Face model")
    for single, index in _WEIGHT_FILES:
        if get(single) is not None:
            break
        index_path = get(index)
        if index_path is None:
            continue
        for shard in dict.fromkeys(_read_index(index_path).values()):
            if get(shard) is None:
                raise _MissingShard(f"{repo} lacks the shard {shard} that its {index} names")
        break
    else:
        names = ", ".join(name for pair in _WEIGHT_FILES for name in pair)
        raise CheckpointError(f"the hub repository {repo} has none of {names}; it holds no weights fastgpt2 can load")
    for filename in ("vocab.json", "merges.txt"):  # optional: without them the shipped GPT-2 vocabulary is used
        get(filename)
    return config.parent


class _MissingShard(CheckpointError):
    """The hub repository, or its copy in the cache, lacks a shard that its index names."""


def resolve_checkpoint_dir(name_or_path) -> Path:
    """A local directory for a path, preset name or hub id (downloading into the Hugging Face cache if needed).

    Steps: 1. an existing directory is used as it is; 2. a name that looks like a path (see `_is_path`) and does not
    exist is an error that says so, without asking the hub; 3. a preset or 'org/name' is looked up in the cache under
    every id that may hold it; 4. then fetched from the hub.
    """
    text = os.fspath(name_or_path)
    path = Path(os.path.expanduser(text))
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as exc:  # a parent directory we may not read, a name too long, ...
        raise CheckpointError(f"cannot access {text!r} ({exc.strerror or exc}); pass a readable checkpoint "
                              f"directory") from None
    if is_dir:
        return path
    if exists:
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and the weights")
    preset = canonical_preset(text) if isinstance(name_or_path, str) else None
    if preset is None and _is_path(name_or_path):
        raise CheckpointError(
            f"The path {text!r} does not exist (no directory {path.absolute()}); pass an existing directory holding "
            f"config.json and the weights, or a hub id such as 'openai-community/gpt2'"
        )
    if preset is None and "/" not in text:
        raise CheckpointError(
            f"{text!r} is neither a local directory nor a known GPT-2 name; use a directory with config.json "
            f"and model.safetensors, a hub id such as 'openai-community/gpt2', or one of: gpt2, gpt2-medium, "
            f"gpt2-large, gpt2-xl (124M, 355M, 774M, 1558M)"
        )
    candidates = _hub_candidates(text, preset)
    missing = None
    for repo in candidates:
        try:
            return _download_checkpoint(repo, local_files_only=True)
        except _MissingShard as exc:  # a partial download: name the shard if the hub cannot be reached either
            missing = f"the local Hugging Face cache is incomplete ({exc})"
        except Exception:  # noqa: BLE001 - not cached under this id: try the next one, then the network
            pass
    repo = candidates[0] if preset is None else HUB_REPOS[preset]
    try:
        return _download_checkpoint(repo, local_files_only=False)
    except CheckpointError:  # the hub answered: the repository itself lacks a file
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, HTTP error: one paragraph, no traceback
        raise _hub_error(text, repo, exc, missing) from None


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


def _read_index(index_path: Path) -> dict[str, str]:
    """Checkpoint key -> shard file name from a sharded checkpoint's index (`weight_map`), checked."""
    try:
        weight_map = json.loads(index_path.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid checkpoint index ({exc}); download it again") from None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise CheckpointError(f"{index_path} has no 'weight_map' of tensor names to shard files; download it again")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in (".", ".."):  # a plain name: never a file outside the directory
            raise CheckpointError(f"{index_path} names the shard {shard!r}, which is not a file name in its directory")
    return weight_map


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
        for single, index in _WEIGHT_FILES:
            if (directory / single).is_file():
                self.path = directory / single
                keys, self._get = _open_file(self.path)
                self._files = dict.fromkeys(keys, self.path)
                self._open_path, self._open_keys = self.path, set(keys)
                return
            if (directory / index).is_file():
                self.path = directory / index
                self._files = {key: directory / shard for key, shard in _read_index(self.path).items()}
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
        more = " ..." if len(missing) > 5 else ""
        raise CheckpointError(f"{source.path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    if extra:
        raise CheckpointError(
            f"{source.path}: unexpected tensor(s) {', '.join(extra[:5])}; is this a GPT-2 checkpoint?"
        )
    loaded = {}
    # Shard by shard (a stable sort keeps the model's order inside each), so that every shard is opened once.
    rank = {path: i for i, path in enumerate(dict.fromkeys(source.file_of(mapping[name]) for name in params))}
    for name in sorted(params, key=lambda n: rank[source.file_of(mapping[n])]):
        param, path = params[name], source.file_of(mapping[name])
        tensor = source.get(mapping[name])
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
