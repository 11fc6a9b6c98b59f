"""Multi-process training through torch.distributed, applied from outside the model.

- `init_distributed()` joins the process group torchrun describes (gloo: training runs on the CPU) or stays
  single-process; `shutdown()` puts a barrier before destroy_process_group (without it a rank aborts in about
  a third of CPU/gloo runs: platform-notes.md).
- `apply_parallelism(model, world_size)`: FSDP2 (`fully_shard`) on every decoder block and MTP block, then on
  the root (embedding, final norm, lm_head). Gradients are averaged over ranks by FSDP, so the trainer scales
  each rank's loss by the world size to get the sum-over-global-batch gradient it normalises itself.
- Multi-node: rank 0 writes checkpoints (and the tokenizer it trains) under `--out`, and every rank reads
  them back on `--resume`, so `--out` must be on a filesystem all nodes share.
- Full (unsharded) model/optimizer state for checkpoints via torch.distributed.checkpoint.state_dict; the
  same calls work on a plain single-process module, so a checkpoint is independent of the world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        # the trainer keeps model and batches on the CPU, so gloo even where CUDA exists (nccl needs GPU tensors)
        dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def apply_parallelism(model: nn.Module, world_size: int) -> nn.Module:
    if world_size <= 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    for block in model.model.mtp.layers:
        fully_shard(block)
    fully_shard(model)
    return model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers (every rank must call; rank 0 gets the tensors)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Unsharded optimizer state keyed by parameter name (every rank must call)."""
    return get_optimizer_state_dict(model, opt, options=_FULL)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    # strict=False: a parameter that never received a gradient (no state yet) is not an error
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True, strict=False))
