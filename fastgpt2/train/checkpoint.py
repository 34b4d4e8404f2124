"""Checkpoints and exports. Sharded checkpoints go through torch.distributed.checkpoint (each rank writes its own
shards of the parameters and AdamW state; beside them each rank's RNG state and the trainer's state: step, data
order, best validation loss), into a temporary directory renamed into place only when complete, so a crash during
a save never damages the last good checkpoint. Exports gather the full weights and write the Hugging Face format."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from fastgpt2.model.gpt2 import GPT2
from fastgpt2.train.parallel import DistContext

STATE_FILE = "trainer_state.json"  # written last: a directory without it is not a checkpoint


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def best_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "best" / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint, oldest first."""
    root = checkpoints_root(output_dir)
    found = []
    if root.is_dir():
        for d in root.glob("step_*"):
            if (d / STATE_FILE).is_file() and d.name[5:].isdigit():
                found.append((int(d.name[5:]), d))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(ctx: DistContext, output_dir: str | Path, step: int, model, optimizer, trainer_state: dict,
                    keep: int) -> Path:
    """Collective: every rank writes its shards to checkpoints/.tmp-step_N; rank 0 then adds trainer_state.json,
    renames the directory to checkpoints/step_N and deletes all but the newest `keep` checkpoints."""
    root = checkpoints_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of a save that crashed
        tmp.mkdir(parents=True)
    ctx.barrier()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    rng = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
    torch.save(rng, tmp / f"rng_rank{ctx.rank}.pt")
    ctx.barrier()
    if ctx.is_main:
        _write_json(tmp / STATE_FILE, {**trainer_state, "world_size": ctx.world_size})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def load_checkpoint(ctx: DistContext, directory: Path, model, optimizer) -> dict:
    """Collective: parameters, AdamW state and this rank's RNG state from `directory`; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # AdamW state initialised, so DCP has slots to fill
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = json.loads((directory / STATE_FILE).read_text())
    rng_path = directory / f"rng_rank{ctx.rank}.pt"
    if trainer_state.get("world_size") == ctx.world_size and rng_path.is_file():
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], ctx.device)
    elif ctx.is_main:
        print(f"note: {directory} was written by {trainer_state.get('world_size')} ranks, this run has "
              f"{ctx.world_size}: weights, optimizer and data order resume, dropout draws start afresh")
    return trainer_state


def export_weights(ctx: DistContext, model, directory: str | Path, tokenizer=None) -> None:
    """Collective: gather the full float32 weights on rank 0 and write them in the Hugging Face format (config.json,
    model.safetensors, vocab.json, merges.txt) to `directory`, via a temporary directory renamed into place."""
    full = full_state_dict(model)
    if ctx.is_main:
        write_pretrained(plain_model(model.config, full), directory, tokenizer)
    ctx.barrier()


def full_state_dict(model) -> dict:
    """Collective: the full float32 state dict on rank 0 (CPU tensors), empty on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_model(config, state_dict: dict) -> GPT2:
    """A plain (unsharded) GPT2 on the CPU holding `state_dict`'s tensors, in eval mode."""
    with torch.device("meta"):
        model = GPT2(config)
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


def _replace_dir(directory: str | Path, write) -> None:
    """write(tmp) fills a temporary sibling directory, which is then renamed into place over `directory`."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def write_pretrained(model: GPT2, directory: str | Path, tokenizer=None) -> None:
    _replace_dir(directory, lambda tmp: model.save_pretrained(tmp, tokenizer))


def copy_export(source: Path, directory: str | Path) -> None:
    """Copy an export directory to `directory` via a temporary directory renamed into place (rank 0 only)."""
    _replace_dir(directory, lambda tmp: shutil.copytree(source, tmp))


def prune_best(output_dir: str | Path, keep_steps: set[int]) -> None:
    """Delete the best-weight exports other than those of `keep_steps` (rank 0 only)."""
    root = Path(output_dir) / "best"
    if root.is_dir():
        for d in root.glob("step_*"):
            if d.name[5:].isdigit() and int(d.name[5:]) not in keep_steps:
                shutil.rmtree(d, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
