"""Finding a checkpoint directory: an existing path, or a preset / hub id looked up in the Hugging Face cache under
every id that may hold it, then fetched from the hub (the weights as one file or the shards their index names)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fastgpt2.model.config import HUB_REPOS, canonical_preset

# (one-file weights, index of the sharded form), in the order transformers prefers them.
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or disagreeing with its config."""


def read_json_config(path: Path, parse):
    """parse(data, source=str(path)) of a JSON file; unreadable JSON and parse's ValueError become CheckpointError."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    try:
        return parse(data, source=str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def read_index(index_path: Path) -> dict[str, str]:
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
    for single, index in WEIGHT_FILES:
        if get(single) is not None:
            break
        index_path = get(index)
        if index_path is None:
            continue
        for shard in dict.fromkeys(read_index(index_path).values()):
            if get(shard) is None:
                raise _MissingShard(f"{repo} lacks the shard {shard} that its {index} names")
        break
    else:
        names = ", ".join(name for pair in WEIGHT_FILES for name in pair)
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


