"""MTP head stages (posttraining-notes.md §6): pre-training trains one head with the main model; the later
stage copies it to three heads (`copy_mtp_heads`) and trains them jointly, optionally with the trunk frozen.

diff: MiMo-7B froze the main model *and* head 0 while tuning the two new heads; with `freeze_trunk` we freeze
the main model (embedding and lm_head included, they are shared with the heads) but keep training head 0 too,
since all three are then tuned to the same, final main model.
"""

from __future__ import annotations

import torch

from mimo.model.transformer import Transformer


def copy_mtp_heads(model: Transformer, n: int) -> Transformer:
    """A new model with `n` MTP heads, each a copy of `model`'s head 0; everything else copied as is."""
    if model.n_mtp < 1:
        raise ValueError("copy_mtp_heads: the model has no MTP head to copy")
    if n < 1:
        raise ValueError(f"copy_mtp_heads: n must be >= 1, got {n}")
    new = Transformer(model.config.replace(n_mtp_layers=n))
    src = model.state_dict()
    head0 = "model.mtp.layers.0."
    state = {k: v for k, v in src.items() if not k.startswith("model.mtp.layers.")}
    for k, v in src.items():
        if k.startswith(head0):
            for i in range(n):
                state[f"model.mtp.layers.{i}." + k[len(head0):]] = v.clone()
    new.load_state_dict(state, strict=True)
    return new.to(next(model.parameters()).device)


def freeze_trunk(model: Transformer) -> None:
    """Only the MTP blocks train; the embedding and lm_head they share stay fixed."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.mtp."))


def mtp_parameters(model: Transformer) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.startswith("model.mtp.")]
