"""init_weights: the one place every parameter of the model gets its initial value.

| parameter                                   | init                                   |
|---------------------------------------------|----------------------------------------|
| embed_tokens, lm_head (untied)              | normal(0, std)                          |
| q/k/v_proj, gate/up_proj, eh_proj, router   | normal(0, std)                          |
| o_proj, down_proj (residual outputs)        | normal(0, std / sqrt(2 * n_layers))    |
| experts gate/up / down                      | as gate/up / down above                 |
| RMSNorm weights                             | 1                                      |
| attention_sink_bias                         | 0                                      |
| e_score_correction_bias (buffer)            | 0                                      |

std defaults to `config.initializer_range`. Residual outputs are scaled down (GPT-2 style) so the residual
stream's variance does not grow with depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import RMSNorm
from .moe import Experts, Router


@torch.no_grad()
def init_weights(model: nn.Module, std: float | None = None, seed: int | None = None) -> None:
    cfg = model.config
    std = cfg.initializer_range if std is None else std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def normal_(p: torch.Tensor, s: float) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(s).to(p.dtype))

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            residual_out = name.endswith(("o_proj", "down_proj"))
            normal_(mod.weight, out_std if residual_out else std)
        elif isinstance(mod, nn.Embedding):
            normal_(mod.weight, std)
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
        elif isinstance(mod, Experts):
            I = mod.down_proj.shape[2]
            normal_(mod.gate_up_proj[:, :I], std)  # gate then up: the draws of two separate [E, I, D] tensors
            normal_(mod.gate_up_proj[:, I:], std)
            normal_(mod.down_proj, out_std)
        elif isinstance(mod, Router):
            normal_(mod.weight, std)
            mod.e_score_correction_bias.zero_()
        if getattr(mod, "attention_sink_bias", None) is not None:
            mod.attention_sink_bias.zero_()
