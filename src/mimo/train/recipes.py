"""Named training recipes as code: each maps a stage name to its TrainConfig.

Stages run in the order of the recipe's dict; each later stage starts from the previous stage's final checkpoint:

| stage    | what                                                                    | command                |
|----------|-------------------------------------------------------------------------|------------------------|
| pretrain | code + chat-formatted task examples, ONE MTP head (weight 0.3 -> 0.1)    | `mimo pretrain`        |
| mtp      | head 0 copied to 3 heads, trained jointly on the same mix, trunk frozen | `mimo pretrain --stage mtp` |
| sft      | task conversations, loss on assistant tokens only, 3 heads kept on      | `mimo sft`             |

- `debug`: seconds on a CPU; the tests use it (small corpus slice, the `debug` model preset).
- `tiny`: the shipped default model `models/mimo-tiny` (the `tiny` preset, ~10M parameters); the whole
  recipe is budgeted for about an hour on a shared 2-core CPU (measured: see models/mimo-tiny/README.md).
- `sft-start`: `tiny`'s pretrain and mtp stages, then a longer task SFT that keeps the pretrained code model,
  `think` (the same SFT continued with add and reverse reasoning in the think block, `mimo.tasks.trace`), four
  reverse-only stages (reverse is the slowest to learn), then three mixed stages that bring add and sort back
  with the code replay: its result is `models/sft-start`, the single SFT start that RL and MOPD begin from
  (docs/results/sft-start.md).
- `teacher-sft`: one independent SFT stage per domain from `models/sft-start`, the first half of a teacher.
- `student-start`: one more mixed stage from `models/sft-start` (mix4, the previous default model's MOPD
  start), then mix5 from it, weighted to reverse (the current default model's MOPD start).

Why these numbers (tiny), measured on a 2-core machine shared with four other jobs, 1 thread per process:
- pretrain: ~900 training tokens/s, so 420 steps of 16 x 256 tokens (1.7M tokens, ~0.4 epoch of the stdlib +
  task mix) take ~31 min; LR 2e-3 (small models tolerate high LR), 20 warmup steps, cosine to 1e-4;
- mtp: 60 steps with the trunk frozen (~3.5 min) bring heads 1 and 2 to head 0's validation accuracy;
- sft: LR 1e-3 -> 1e-4 for 400 steps (~19 min). The paper's SFT LR is 0.16x its pretraining peak; that ratio
  here (3e-4, 150 steps) left the tasks unlearned (sort accuracy 0.01 vs 0.24), so SFT runs at half the
  pretraining peak. 10% plain code keeps the code distribution alive.
Whole recipe: ~55 min plus a minute of task evaluation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mimo.train.config import SFTData, TrainConfig


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
    sft = TrainConfig(stage="sft", out=f"{out}/sft", steps=400, batch_size=32, n_mtp_heads=3, lr=1e-3,
                      min_lr=1e-4, warmup_steps=20, init_from=f"{out}/mtp", code_fraction=0.1, sft_code_rows=8,
                      aux_loss_coef=1e-5, bias_update_rate=1e-3, mtp_weights=((0.0, 0.1),), eval_every=100,
                      ckpt_every=50, **{**base, "seq_len": 128})
    return {"pretrain": pre, "mtp": mtp, "sft": sft}


def sft_start(out: str = "runs/sft-start") -> dict[str, TrainConfig]:
    """The `tiny` pretrain and mtp stages as they are (same tokenizer as `models/mimo-tiny`), then an SFT stage
    that learns the three tasks well enough for RL to get reward (`models/sft-start`, measured in
    docs/results/sft-start.md): 2x the conversations per step and 2x the steps of `tiny`'s SFT, add and
    reverse at 40% each, answers spelled one token per character, and a micro-batch of 8 x 256 tokens
    replaying the pretraining mixture (code + 30% task documents) at 20% of the objective to keep the
    pretrained model's validation loss. 256 conversations per step in length-grouped batches (4x fewer
    steps for the same examples) stayed at the untrained plateau for 100 steps (every answer the same)."""
    stages = tiny(out)
    pre = stages["pretrain"].replace(recipe="sft-start", tokenizer="models/mimo-tiny")
    mtp = stages["mtp"].replace(recipe="sft-start")
    sft = stages["sft"].replace(recipe="sft-start", steps=800, batch_size=64, seq_len=256, warmup_steps=20,
                                code_fraction=0.2, sft_code_rows=8, eval_every=100, ckpt_every=50,
                                keep_checkpoints=4, sft_data=SFTData(
                                    task_weights=(("add", 0.4), ("reverse", 0.4), ("sort", 0.2)),
                                    spell_answers=True, replay_task_fraction=0.3))
    # add and reverse answered directly were at 0.00 greedy after 800 steps and 0.00 / 0.07 after 600 more
    # (docs/results/sft-start.md): the same mixture with the thinking tasks' traces, LR re-warmed to 0.6x
    # the first peak, new conversations (seed 1)
    think = sft.replace(out=f"{out}/think", init_from=f"{out}/sft", steps=240, lr=6e-4, min_lr=6e-5, seed=1,
                        eval_every=40, ckpt_every=40,
                        sft_data=dataclasses.replace(sft.sft_data, reasoning=True))
    # 240 mixed think steps left add and reverse at pass@8 0.01 while reverse alone needed ~1,000 steps to reach
    # greedy 0.5 (9.5 s a mixed step, 3 s a domain step): reverse is learned first, alone, in four runs, each
    # re-warming the LR to 6e-4 (as run; reverse4 started from reverse3's bf16 export, the same within 0.02)
    stages = {"pretrain": pre, "mtp": mtp, "sft": sft, "think": think}
    prev = "think"
    for i, steps in enumerate((300, 400, 400, 400), 1):
        name = "reverse" if i == 1 else f"reverse{i}"
        stages[name] = think.replace(out=f"{out}/{name}", init_from=f"{out}/{prev}", tasks=("reverse",),
                                     steps=steps, code_fraction=0.0, seed=2, ckpt_every=50, eval_every=50,
                                     keep_checkpoints=6, sft_data=SFTData(spell_answers=True, reasoning=True))
        prev = name
    # then add and sort come in (add at half the conversations: it starts from nothing here) with reverse kept
    # at a quarter, and the code replay restores the code model that the reverse stages did not train
    mix = think.replace(out=f"{out}/mix", init_from=f"{out}/{prev}", steps=600, seed=3, eval_every=50,
                        ckpt_every=50, sft_data=dataclasses.replace(
                            think.sft_data, task_weights=(("add", 0.5), ("reverse", 0.25), ("sort", 0.25))))
    # step 300 of mix: reverse 0.67, sort 0.55, code validation 3.00, but add still 0.00 greedy (the add-only
    # runs needed ~45k add conversations to reach 0.24; mix gives ~19k): more add, a lower LR peak so that
    # reverse and sort dip less at the re-warm (reverse fell 0.90 -> 0.42 in mix's first 50 steps)
    mix2 = mix.replace(out=f"{out}/mix2", init_from=f"{out}/mix", steps=400, seed=4, lr=4e-4, min_lr=4e-5,
                       sft_data=dataclasses.replace(mix.sft_data, task_weights=(
                           ("add", 0.7), ("reverse", 0.15), ("sort", 0.15))))
    # step 400 of mix2: add pass@8 0.21 / greedy 0.12 and climbing (0.02 at step 250), reverse 0.90, sort 0.97
    mix3 = mix2.replace(out=f"{out}/mix3", init_from=f"{out}/mix2", steps=300, seed=5)
    return {**stages, "mix": mix, "mix2": mix2, "mix3": mix3}


def teacher_sft(out: str = "runs/teacher-sft") -> dict[str, TrainConfig]:
    """One stage per domain, each independent (not a chain): SFT of `models/sft-start` on that domain's
    conversations alone, the first half of a domain teacher before GRPO. A teacher is judged on its own
    domain only, so there is no code replay. LR as the think stage's."""
    think = sft_start()["think"]
    return {d: think.replace(recipe="teacher-sft", out=f"{out}/{d}", init_from="models/sft-start", tasks=(d,),
                             steps=300, code_fraction=0.0, seed=2, ckpt_every=50, eval_every=50,
                             keep_checkpoints=6, sft_data=SFTData(spell_answers=True, reasoning=True))
            for d in ("add", "reverse", "sort")}


def student_start(out: str = "runs/student-start") -> dict[str, TrainConfig]:
    """The start of the default model's MOPD run, in two stages. mix4: `models/sft-start` (mix3's step 300, add
    0.75 greedy and still climbing) trained 300 more steps as mix3, on new conversations (committed as
    models/student-start; 300 held-out prompts per task: add 0.96, reverse 0.84, sort 0.97). mix5: 300 steps
    more, weighted to reverse (committed as models/student-mix5, the MOPD start: add 0.977, reverse 0.910, sort
    0.977). The MOPD experiment and the teachers start from models/sft-start."""
    mix3 = sft_start()["mix3"]
    mix4 = mix3.replace(recipe="student-start", out=f"{out}/mix4", init_from="models/sft-start", seed=6)
    # mix4 (committed as models/student-start) left reverse at 0.84 against its teacher's 0.91, which the
    # teacher reached by 300 reverse-only steps from the same start: reverse gets the largest share, add and
    # sort stay in at the levels they reached, LR peak below mix4's so that they dip less at the re-warm
    mix5 = mix4.replace(out=f"{out}/mix5", init_from="models/student-start", seed=7, lr=3e-4, min_lr=3e-5,
                        sft_data=dataclasses.replace(mix4.sft_data, task_weights=(
                            ("add", 0.35), ("reverse", 0.5), ("sort", 0.15))))
    return {"mix4": mix4, "mix5": mix5}


RECIPES = {"debug": debug, "tiny": tiny, "sft-start": sft_start, "teacher-sft": teacher_sft,
           "student-start": student_start}


def get_recipe(name: str, out: str | Path | None = None) -> dict[str, TrainConfig]:
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]() if out is None else RECIPES[name](str(out))


def final_stage(stages: dict[str, TrainConfig]) -> TrainConfig:
    """The stage whose checkpoint is the recipe's result (the last one run); RecipeError if the stages are not
    a chain (each starting from the previous one's run), as `teacher-sft`'s independent stages are not."""
    names = list(stages)
    for prev, name in zip(names, names[1:]):
        if stages[name].init_from != stages[prev].out:
            raise RecipeError(f"stage {name!r} does not start from stage {prev!r}: this recipe's stages are "
                              f"independent, run one with --stage")
    return stages[names[-1]]


def get_stage(name: str, stage: str, out: str | Path | None = None) -> TrainConfig:
    stages = get_recipe(name, out)
    if stage not in stages:
        raise RecipeError(f"recipe {name!r} has no stage {stage!r}; stages: {', '.join(stages)}")
    return stages[stage]
