"""Command-line entry points of the training side: `mimo pretrain`, `mimo sft`, `mimo eval` (dispatched by
`mimo.cli`), and `python -m mimo.train.cli recipe` which runs a whole recipe and exports the model.

Every function takes argv and returns an exit code: 0 on success, 2 for bad input (one `error:` line on
stderr, nothing already written is touched), 1 when training diverged (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mimo.recipes import STAGE_ORDER, RecipeError, get_stage

from .checkpoint import TrainCheckpointError, find_checkpoint, has_checkpoint, load_train_state
from .config import TrainConfigError
from .data import DataError
from .loop import TrainError, TrainingDiverged, run

USER_ERRORS = (TrainError, TrainCheckpointError, TrainConfigError, RecipeError, DataError, FileNotFoundError)


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _train_parser(prog: str, default_stage: str, stages: tuple[str, ...]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=f"{prog}: run one training stage of a recipe")
    p.add_argument("--recipe", default="debug", help="named recipe in mimo.recipes (debug, tiny)")
    p.add_argument("--stage", default=default_stage, choices=stages, help="which stage of the recipe")
    p.add_argument("--out", help="run directory (default: runs/RECIPE/STAGE)")
    p.add_argument("--resume", metavar="DIR", help="continue from a run directory or checkpoint directory")
    p.add_argument("--init-from", metavar="DIR", help="start from these weights (model or run directory)")
    p.add_argument("--steps", type=int, help="total optimizer steps (the LR schedule spans them)")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop (with a checkpoint) after step N")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16 = autocast (slower on CPUs "
                   "without AMX)")
    p.add_argument("--model", help="ModelConfig preset name or checkpoint directory (pretrain only)")
    p.add_argument("--corpus", metavar="DIR", help="directory of *.py files (default: the Python stdlib)")
    p.add_argument("--tokenizer", metavar="DIR", help="use this tokenizer.json instead of training one")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _stage_config(args: argparse.Namespace):
    out_root = None
    cfg = get_stage(args.recipe, args.stage, out_root)
    kw = {}
    if args.out:
        kw["out"] = args.out
    if args.init_from:
        kw["init_from"] = args.init_from
    for name in ("steps", "seed", "dtype", "model", "corpus", "tokenizer"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.steps is not None and cfg.warmup_steps > args.steps:
        kw["warmup_steps"] = max(args.steps // 10, 0)
    if args.no_progress:
        kw["progress"] = False
    return cfg.replace(**kw)


def _train_main(argv: list[str] | None, prog: str, default_stage: str, stages: tuple[str, ...]) -> int:
    args = _train_parser(prog, default_stage, stages).parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        cfg = _stage_config(args)
        if args.corpus is not None and not Path(args.corpus).is_dir():
            return _error(f"corpus directory not found: {args.corpus}")
        summary = run(cfg, resume=args.resume, stop_after=args.stop_after)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        return _error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    finally:
        from . import parallel

        parallel.shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        show = {k: v for k, v in summary.items() if k not in ("model", "tokenizer")}
        print(json.dumps(show))
    return 0


def pretrain_main(argv: list[str] | None = None) -> int:
    """`mimo pretrain`: the pretraining stage, or (`--stage mtp`) the 3-MTP-head stage."""
    return _train_main(argv, "mimo pretrain", "pretrain", ("pretrain", "mtp"))


def sft_main(argv: list[str] | None = None) -> int:
    """`mimo sft`: supervised fine-tuning on chat data, loss on assistant tokens only."""
    return _train_main(argv, "mimo sft", "sft", ("sft",))


def eval_main(argv: list[str] | None = None) -> int:
    """`mimo eval --model DIR --tasks add,reverse,sort`: exact-match accuracy on the held-out split."""
    p = argparse.ArgumentParser(prog="mimo eval", description="task accuracy (greedy, held-out split)")
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--tasks", default="add,reverse,sort")
    p.add_argument("--n", type=int, default=100, help="examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    from mimo import tasks as task_lib

    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in task_lib.TASKS]
    if bad or not tasks:
        return _error(f"unknown task {bad[0] if bad else '(none)'}; known tasks: {','.join(task_lib.TASKS)}")
    if not Path(args.model).is_dir():
        return _error(f"model directory not found: {args.model}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .eval import evaluate_tasks, load_for_eval

    try:
        model, tok = load_for_eval(args.model)
    except (ValueError, FileNotFoundError, OSError) as e:
        return _error(f"cannot load {args.model}: {str(e).splitlines()[0]}")
    t0 = time.perf_counter()
    acc = evaluate_tasks(model, tok, tasks, args.n, args.seed, args.max_new_tokens)
    print(json.dumps({"model": args.model, "n_per_task": args.n, "accuracy": acc,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


# ---- whole recipe -----------------------------------------------------------------------------------------

def _stage_done(out: str, steps: int) -> bool:
    if not has_checkpoint(out):
        return False
    return int(load_train_state(find_checkpoint(out))["step"]) >= steps


def recipe_main(argv: list[str] | None = None) -> int:
    """Run every stage of a recipe in order (resuming a stage that has checkpoints, skipping finished ones),
    then evaluate the tasks and, with --export, write the model directory and its model card."""
    p = argparse.ArgumentParser(prog="python -m mimo.train.cli recipe")
    p.add_argument("--recipe", default="debug")
    p.add_argument("--out", help="root directory; stages go to OUT/pretrain, OUT/mtp, OUT/sft")
    p.add_argument("--export", metavar="DIR", help="write the final model + model card here")
    p.add_argument("--eval-n", type=int, default=100, help="held-out examples per task")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mimo.recipes import get_recipe

    try:
        stages = get_recipe(args.recipe, args.out or f"runs/{args.recipe}")
    except RecipeError as e:
        return _error(str(e))
    timings = {}
    summaries = {}
    for name in STAGE_ORDER:
        cfg = stages[name].replace(progress=not args.no_progress)
        t0 = time.perf_counter()
        try:
            if _stage_done(cfg.out, cfg.steps):
                print(f"[{name}] already finished in {cfg.out}", file=sys.stderr)
            else:
                resume = cfg.out if has_checkpoint(cfg.out) else None
                summaries[name] = {k: v for k, v in run(cfg, resume=resume).items()
                                   if k not in ("model", "tokenizer")}
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except USER_ERRORS as e:
            return _error(str(e))
        timings[name] = round(time.perf_counter() - t0, 1)
        print(json.dumps({"stage": name, "seconds": timings[name], **summaries.get(name, {})}), file=sys.stderr)
    final = find_checkpoint(stages[STAGE_ORDER[-1]].out)
    from .eval import evaluate_tasks, load_for_eval

    t0 = time.perf_counter()
    model, tok = load_for_eval(final)
    acc = evaluate_tasks(model, tok, n_per_task=args.eval_n)
    timings["eval"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"task_accuracy": acc, "seconds": timings}))
    if args.export:
        from .export import export_model

        export_model(args.recipe, stages, final, args.export, acc, timings, args.eval_n)
        print(f"exported {args.export}", file=sys.stderr)
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """Evaluate a finished recipe run and export its final model with a model card."""
    p = argparse.ArgumentParser(prog="python -m mimo.train.cli export")
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--runs", help="root of the recipe's run directories (default runs/RECIPE)")
    p.add_argument("--out", required=True, help="model directory to write (e.g. models/mimo-tiny)")
    p.add_argument("--eval-n", type=int, default=100, help="held-out examples per task")
    p.add_argument("--log", help="a log with '== STAGE done in N s' lines, for the wall times in the card")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    import re

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mimo.recipes import get_recipe

    from .eval import evaluate_tasks, load_for_eval
    from .export import export_model

    try:
        stages = get_recipe(args.recipe, args.runs or f"runs/{args.recipe}")
        final = find_checkpoint(stages[STAGE_ORDER[-1]].out)
    except USER_ERRORS as e:
        return _error(str(e))
    wall: dict[str, float] = {}
    if args.log and Path(args.log).is_file():
        for m in re.finditer(r"^== (\w+) done in (\d+) s", Path(args.log).read_text(), re.M):
            wall[m.group(1)] = float(m.group(2))
    t0 = time.perf_counter()
    model, tok = load_for_eval(final)
    acc = evaluate_tasks(model, tok, n_per_task=args.eval_n)
    wall["eval"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"task_accuracy": acc, "eval_seconds": wall["eval"]}))
    export_model(args.recipe, stages, final, args.out, acc, wall, args.eval_n)
    print(f"exported {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .distill_mtp import main as distill_mtp_main

    cmds = {"pretrain": pretrain_main, "sft": sft_main, "eval": eval_main, "recipe": recipe_main,
            "export": export_main, "distill-mtp": distill_mtp_main}
    if not argv or argv[0] not in cmds:
        print(f"usage: python -m mimo.train.cli {{{','.join(cmds)}}} ...", file=sys.stderr)
        return 2
    return cmds[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
