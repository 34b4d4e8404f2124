"""torch.distributed setup, and FSDP2 applied as torchtitan does: activation checkpointing and torch.compile per
transformer block, `fully_shard` on every block and then on the root, bf16 parameters and compute with float32
gradient reduction where the GPU supports bf16. NCCL on GPUs, gloo on CPU."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(slots=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this run created the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, *values: float | torch.Tensor) -> list[float]:
        """Sum float64 scalars over all ranks (one collective)."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values])
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def in_launch() -> bool:
    """True inside torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def init_distributed(device: str | None) -> DistContext:
    """Join the launch this process runs in (torchrun's environment), or make a one-process group; reuse a group
    that the caller already initialised. Each rank takes GPU LOCAL_RANK when it uses CUDA."""
    kind = pick_device(device).type
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if kind == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns and in_launch():
        dist.init_process_group(backend, device_id=dev if kind == "cuda" else None)
    elif owns:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def close_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on a GPU that supports it, else float32."""
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bfloat16; use --dtype float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def shard_model(model: torch.nn.Module, ctx: DistContext, dtype: torch.dtype, activation_checkpointing: bool,
                compile_blocks: bool) -> torch.nn.Module:
    """FSDP2 over all ranks (none for one float32 process): each transformer block (checkpoint-wrapped and compiled
    first when asked) is one shard group, the root (embeddings, ln_f, the tied head) another. Parameters stay float32 (the optimizer's master
    copy); with a bf16 `dtype` they are gathered and computed in bf16 and gradients reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # One process in float32 has nothing to shard and no precision policy to apply: FSDP2 would only add all-gathers
    # and DTensor dispatch (a fine-tuning step of 124M on 2 CPU cores ran at half the speed of a plain loop), so the
    # model stays a plain module there, as torchtitan skips fully_shard when its data-parallel degree is 1.
    shard = ctx.world_size > 1 or dtype != torch.float32
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,)) if shard else None
    if dtype == torch.float32:
        policy = MixedPrecisionPolicy()
    else:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    blocks = model.h
    for i, block in enumerate(blocks):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            block = checkpoint_wrapper(block)  # non-reentrant; the RNG state is preserved, so dropout replays
        if compile_blocks:
            block.compile()
        # The last block's parameters are needed again at once by backward: keeping them saves one all-gather.
        if shard:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
        blocks[i] = block
    if shard:
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
