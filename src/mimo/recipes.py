"""Named training recipes as code: each maps a stage name to its TrainConfig.

Stages run in order; each later stage starts from the previous stage's final checkpoint:

| stage    | what                                                                    | command                |
|----------|-------------------------------------------------------------------------|------------------------|
| pretrain | code + chat-formatted task examples, ONE MTP head (weight 0.3 -> 0.1)    | `mimo pretrain`        |
| mtp      | head 0 copied to 3 heads, trained jointly on the same mix, trunk frozen | `mimo pretrain --stage mtp` |
| sft      | task conversations, loss on assistant tokens only, 3 heads kept on      | `mimo sft`             |

- `debug`: seconds on a CPU; the tests use it (small corpus slice, the `debug` model preset).
- `tiny`: the shipped default model `models/mimo-tiny` (the `tiny` preset, ~10M parameters); the whole
  recipe is budgeted for about an hour on a shared 2-core CPU (measured: see models/mimo-tiny/README.md).

Why these numbers (tiny): at ~1,000-1,400 training tokens/s on 2 cores, 40 minutes of pretraining is about
3M tokens, a bit under one epoch of the stdlib + task mix; LR 2e-3 (small models tolerate high LR; warmup
30 steps), cosine to 1e-4. SFT uses a low LR (3e-4 -> 3e-5; 5e-5 in the paper at 309B, scaled up for a 10M
model trained for a few hundred steps) and keeps 10% plain code to limit forgetting.
"""

from __future__ import annotations

from pathlib import Path

from mimo.train.config import TrainConfig

STAGE_ORDER = ("pretrain", "mtp", "sft")


class RecipeError(ValueError):
    pass


def debug(out: str = "runs/debug") -> dict[str, TrainConfig]:
    base = dict(recipe="debug", model="debug", corpus_max_bytes=200_000, seq_len=64, batch_size=4,
                eval_every=10, eval_batches=2, ckpt_every=10, seed=0)
    pre = TrainConfig(stage="pretrain", out=f"{out}/pretrain", steps=20, n_mtp_heads=1, lr=3e-3, min_lr=3e-4,
                      warmup_steps=2, **base)
    mtp = TrainConfig(stage="mtp", out=f"{out}/mtp", steps=10, n_mtp_heads=3, freeze_trunk=True, lr=1e-3,
                      min_lr=1e-4, warmup_steps=1, init_from=f"{out}/pretrain", **base)
    sft = TrainConfig(stage="sft", out=f"{out}/sft", steps=10, n_mtp_heads=3, lr=3e-4, min_lr=3e-5,
                      warmup_steps=1, init_from=f"{out}/mtp", aux_loss_coef=1e-5, bias_update_rate=1e-3,
                      mtp_weights=((0.0, 0.1),), **{**base, "batch_size": 8})
    return {"pretrain": pre, "mtp": mtp, "sft": sft}


def tiny(out: str = "runs/tiny") -> dict[str, TrainConfig]:
    base = dict(recipe="tiny", model="tiny", seq_len=256, eval_batches=4, seed=0, keep_checkpoints=2)
    pre = TrainConfig(stage="pretrain", out=f"{out}/pretrain", steps=420, batch_size=16, n_mtp_heads=1,
                      lr=2e-3, min_lr=1e-4, warmup_steps=20, task_fraction=0.3,
                      mtp_weights=((0.0, 0.3), (0.75, 0.1)), eval_every=50, ckpt_every=25, **base)
    mtp = TrainConfig(stage="mtp", out=f"{out}/mtp", steps=60, batch_size=16, n_mtp_heads=3, freeze_trunk=True,
                      lr=1e-3, min_lr=1e-4, warmup_steps=5, init_from=f"{out}/pretrain", eval_every=30,
                      ckpt_every=30, **base)
    sft = TrainConfig(stage="sft", out=f"{out}/sft", steps=150, batch_size=32, n_mtp_heads=3, lr=3e-4,
                      min_lr=3e-5, warmup_steps=10, init_from=f"{out}/mtp", code_fraction=0.1, sft_code_rows=8,
                      aux_loss_coef=1e-5, bias_update_rate=1e-3, mtp_weights=((0.0, 0.1),), eval_every=50,
                      ckpt_every=50, **{**base, "seq_len": 128})
    return {"pretrain": pre, "mtp": mtp, "sft": sft}


RECIPES = {"debug": debug, "tiny": tiny}


def get_recipe(name: str, out: str | Path | None = None) -> dict[str, TrainConfig]:
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]() if out is None else RECIPES[name](str(out))


def get_stage(name: str, stage: str, out: str | Path | None = None) -> TrainConfig:
    stages = get_recipe(name, out)
    if stage not in stages:
        raise RecipeError(f"recipe {name!r} has no stage {stage!r}; stages: {', '.join(stages)}")
    return stages[stage]
