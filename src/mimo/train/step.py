"""One optimizer step of any objective: `forward_backward(model, batch, loss_fn)` per micro-batch, then
`optimizer_step(...)`. Every stage builds its objective as a loss function on this: the LM / MTP / SFT
objective (`loop.lm_objective`), MTP self-distillation (`distill_mtp`), GRPO (`mimo.posttrain.grpo`).

    for b in micro_batches:                       # this rank's share of the global batch
        out = forward_backward(model, b, loss_fn, world_size)
        sums += out.metrics                       # the caller reduces them over ranks
    optimizer_step(model, opt, sched, objective, grad_clip=1.0, step=step)

A loss function returns this micro-batch's share of the *global* objective: sums divided by counts taken over
the whole global batch (all micro-batches, all ranks; losses.py explains why). Gradients then add up to the
global objective's gradient under any split of the batch over micro-batches, and, because FSDP averages
gradients over ranks, `forward_backward` scales each rank's loss by the world size so the average is the sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import losses, parallel


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the run stopped and kept its last good checkpoint."""


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar with grad: this micro-batch's share of the global objective
    metrics: dict[str, torch.Tensor]  # scalar sums (no grad), summed over micro-batches and ranks by the caller
    expert_ids: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> chosen experts [N, K]


LossFn = Callable[[nn.Module, Any], LossOutput]


def forward_backward(model: nn.Module, batch: Any, loss_fn: LossFn, world_size: int = 1) -> LossOutput:
    """Run `loss_fn(model, batch)` in training mode and backpropagate it (gradients accumulate)."""
    model.train()
    out = loss_fn(model, batch)
    (out.loss * world_size).backward()
    metrics = {k: torch.as_tensor(v).detach().to(torch.float64) for k, v in out.metrics.items()}
    return LossOutput(out.loss.detach(), metrics, {k: v.detach() for k, v in out.expert_ids.items()})


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, sched, objective: float, grad_clip: float,
                   step: int, routers: dict[int, nn.Module] | None = None,
                   loads: dict[int, torch.Tensor] | None = None, bias_update_rate: float = 0.0) -> dict[str, float]:
    """Clip, step the optimizer and the LR schedule, zero the gradients; returns {"grad_norm", "lr"}.

    `objective` is the global objective (already reduced over ranks): a non-finite one, or a non-finite
    gradient norm, raises TrainingDiverged before anything is updated (`step` is the 0-based step index, for
    the message). With `routers`, each MoE layer's selection bias then moves towards balance by
    `bias_update_rate` from `loads` (tokens per expert this step on this rank; summed over ranks here)."""
    if not math.isfinite(objective):
        raise TrainingDiverged(f"non-finite loss ({objective}) at step {step + 1}")
    params = [p for p in model.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    if not math.isfinite(gnorm):
        raise TrainingDiverged(f"non-finite gradient norm ({gnorm}) at step {step + 1}")
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if routers and loads:
        for layer in loads:
            loads[layer] = parallel.all_reduce_sum(loads[layer])
        losses.update_router_bias(routers, loads, bias_update_rate)
    return {"grad_norm": gnorm, "lr": lr}
