"""`mimo pretrain | sft | eval | recipe | export | distill-mtp | rl | mopd`: training stages, whole recipes,
evaluation, GRPO, multi-teacher on-policy distillation.

Bad input leaves anything already written untouched. Under `torchrun ... -m mimo.cli pretrain ...` every rank
runs the same command and rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from mimo.cli import (
    Command,
    UserError,
    api_key_arg,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    positive_int_list,
    progress_bar,
    set_threads,
    text_model_dir,
    unit_fraction,
    user_errors,
)
from mimo.tasks import MAX_NEW_TOKENS

TITLE = "Train and evaluate"


def _train_errors() -> tuple[type[Exception], ...]:
    """The training library's input errors (their messages are for the user). Imports torch."""
    from mimo.train.checkpoint import TrainCheckpointError
    from mimo.train.config import TrainConfigError
    from mimo.train.data import DataError
    from mimo.train.loop import TrainError
    from mimo.train.recipes import RecipeError

    return (TrainError, TrainCheckpointError, TrainConfigError, RecipeError, DataError, FileNotFoundError)


def _diverged(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 1


def _tasks(text: str) -> list[str]:
    from mimo.tasks import TASKS

    tasks = [t for t in text.split(",") if t]
    bad = [t for t in tasks if t not in TASKS] or ([] if tasks else ["(none)"])
    if bad:
        raise argparse.ArgumentTypeError(f"unknown task {bad[0]!r}; known tasks: {','.join(TASKS)}")
    return tasks


def _evaluate(model_dir, tasks, n: int, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS,
              progress: bool = True, split: str = "heldout") -> dict:
    """Greedy task accuracy of a model or checkpoint directory, with a progress bar over the examples."""
    from mimo.train.eval import evaluate_tasks, load_for_eval

    with user_errors(ValueError, OSError):
        model, tok = load_for_eval(model_dir)
    with progress_bar(len(tasks) * n, "eval", progress) as bar:
        return evaluate_tasks(model, tok, tasks, n, seed, max_new_tokens, split=split, progress=bar.update)


# ---- one stage ---------------------------------------------------------------------------------------------

def _stage_args(stages: tuple[str, ...]):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--recipe", default="debug", help="named recipe in mimo.train.recipes (debug, tiny)")
        p.add_argument("--stage", default=stages[0], help=f"which stage of the recipe ({', '.join(stages)}, or "
                       "another of this kind the recipe has)")
        p.set_defaults(stage_kinds=stages)
        p.add_argument("--out", help="run directory (default: runs/RECIPE/STAGE)")
        p.add_argument("--resume", metavar="DIR", help="continue from a run directory or checkpoint directory")
        p.add_argument("--init-from", metavar="DIR", help="start from these weights (model or run directory)")
        p.add_argument("--steps", type=positive_int, help="total optimizer steps (the LR schedule spans them)")
        p.add_argument("--stop-after", type=positive_int, metavar="N", help="stop (with a checkpoint) after step N")
        p.add_argument("--seed", type=int)
        p.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16 = autocast (slower on CPUs "
                       "without AMX)")
        p.add_argument("--model", help="ModelConfig preset name or checkpoint directory (pretrain only)")
        p.add_argument("--corpus", metavar="DIR", help="directory of *.py files (default: the Python stdlib)")
        p.add_argument("--tokenizer", metavar="DIR", help="use this tokenizer.json instead of training one")
        p.add_argument("--threads", type=positive_int, help="torch CPU threads (1 is fastest on a busy machine)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    return add


def _stage_config(args: argparse.Namespace):
    from mimo.train.config import TrainConfigError
    from mimo.train.recipes import RecipeError, get_stage

    with user_errors(RecipeError, TrainConfigError):
        cfg = get_stage(args.recipe, args.stage)
        if cfg.stage not in args.stage_kinds:
            command = "sft" if cfg.stage == "sft" else "pretrain"
            raise UserError(f"stage {args.stage!r} of recipe {args.recipe!r} is a '{cfg.stage}' stage: run it with "
                            f"'mimo {command}'")
        kw = {name: getattr(args, name) for name in ("out", "init_from", "steps", "seed", "dtype", "model",
                                                      "corpus", "tokenizer") if getattr(args, name) is not None}
        if args.steps is not None and cfg.warmup_steps > args.steps:
            kw["warmup_steps"] = args.steps // 10
        if args.no_progress:
            kw["progress"] = False
        return cfg.replace(**kw)


def _run_training(run, cfg, args: argparse.Namespace, stops: tuple[type[Exception], ...] = ()) -> int:
    """Run a training loop (pretrain / sft / rl / mopd) under torchrun or not, print its summary on rank 0;
    a diverged run (or one of `stops`) exits 1 with the last good checkpoint named."""
    from mimo.train import parallel
    from mimo.train.step import TrainingDiverged

    try:
        with user_errors(*_train_errors()):
            summary = run(cfg, resume=args.resume, stop_after=args.stop_after)
    except (TrainingDiverged, *stops) as e:
        return _diverged(e)
    finally:
        parallel.shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("model", "tokenizer")}))
    return 0


def train_stage(args: argparse.Namespace) -> int:
    cfg = _stage_config(args)
    if args.corpus is not None and not Path(args.corpus).is_dir():
        raise UserError(f"corpus directory not found: {args.corpus}")
    set_threads(args.threads)
    from mimo.train.loop import run

    return _run_training(run, cfg, args)


# ---- evaluation --------------------------------------------------------------------------------------------

def _eval_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR",
                        help="model or checkpoint directory (config.json, safetensors, tokenizer)")
    source.add_argument("--url", help="instead, an OpenAI-compatible server (e.g. a running 'mimo serve' at "
                        "http://127.0.0.1:8000): the same prompts as greedy chat completions of its first model")
    api_key_arg(p, "with --url: sent as a bearer token")
    p.add_argument("--tasks", type=_tasks, default="add,reverse,sort", help="comma-separated (default: all)")
    p.add_argument("--n", type=positive_int, default=100, help="held-out examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS)
    p.add_argument("--split", choices=("heldout", "ood"), default="heldout",
                   help="held-out prompts, or out-of-distribution ones (longer inputs than training)")
    p.add_argument("--pass-k", type=positive_int_list, metavar="K,K", help="also pass@k for these k (e.g. 1,8) "
                   "from --samples samples per prompt at --temperature, decoded by the engine")
    p.add_argument("--samples", type=positive_int, default=8, help="samples per prompt for --pass-k")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="sampling temperature for --pass-k")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _evaluate_server(url: str, api_key: str | None, tasks, n: int, seed: int, max_new_tokens: int, progress: bool,
                     split: str) -> tuple[str, dict]:
    """The server's model name and its greedy task accuracy, with a progress bar over the examples."""
    from mimo.train.eval import connect, evaluate_tasks_via_server

    with user_errors(ConnectionError, ValueError, ImportError):
        client, model = connect(url, api_key)
        with progress_bar(len(tasks) * n, "eval", progress) as bar:
            return model, evaluate_tasks_via_server(client, model, tasks, n, seed, max_new_tokens, split, bar.update)


def evaluate(args: argparse.Namespace) -> int:
    if args.url is not None and args.pass_k:
        raise UserError("--pass-k samples in this process: use it with --model, not --url")
    model_dir = None if args.url is not None else text_model_dir(args.model, "mimo eval")
    if args.pass_k and max(args.pass_k) > args.samples:
        raise UserError(f"--pass-k {max(args.pass_k)} needs at least that many --samples, got {args.samples}")
    set_threads(args.threads)
    t0 = time.perf_counter()
    out = {"model": args.model, "split": args.split, "n_per_task": args.n}
    if args.url is not None:
        out["model"], out["accuracy"] = _evaluate_server(args.url, args.api_key, args.tasks, args.n, args.seed,
                                                         args.max_new_tokens, not args.no_progress, args.split)
        out["url"] = args.url
    elif args.pass_k:
        from mimo.train.eval import evaluate_pass_at_k, load_for_eval

        with user_errors(ValueError, OSError):
            model, tok = load_for_eval(model_dir)
        print(f"sampling {args.samples} completions of {len(args.tasks) * args.n} prompts ...", file=sys.stderr)
        out["pass_at_k"] = evaluate_pass_at_k(model, tok, args.tasks, args.n, args.samples, args.pass_k,
                                              args.temperature, args.split, args.seed, args.max_new_tokens)
    else:
        out["accuracy"] = _evaluate(model_dir, args.tasks, args.n, args.seed, args.max_new_tokens,
                                    not args.no_progress, args.split)
    print(json.dumps({**out, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


# ---- whole recipe ------------------------------------------------------------------------------------------

def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="debug")
    p.add_argument("--out", help="root directory; stages go to OUT/pretrain, OUT/mtp, OUT/sft")
    p.add_argument("--export", metavar="DIR", help="write the final model + model card here")
    p.add_argument("--eval-n", type=positive_int, default=100, help="held-out examples per task")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--no-progress", action="store_true")


def _recipe_stages(recipe: str, out: str):
    """(the recipe's stages, the final one); a recipe whose stages are not a chain is a user error."""
    from mimo.train.recipes import RecipeError, final_stage, get_recipe

    with user_errors(RecipeError):
        stages = get_recipe(recipe, out)
        return stages, final_stage(stages)


def recipe(args: argparse.Namespace) -> int:
    """Every stage in order (a stage with checkpoints resumes, a finished one is skipped), then the task
    accuracy and, with --export, the model directory and its model card."""
    stages, last = _recipe_stages(args.recipe, args.out or f"runs/{args.recipe}")
    set_threads(args.threads)
    from mimo.train.checkpoint import find_checkpoint, has_checkpoint, load_train_state
    from mimo.train.loop import TrainingDiverged, run

    timings = {}
    for name, cfg in stages.items():
        cfg = cfg.replace(progress=not args.no_progress)
        t0 = time.perf_counter()
        try:
            with user_errors(*_train_errors()):
                if has_checkpoint(cfg.out) and int(load_train_state(find_checkpoint(cfg.out))["step"]) >= cfg.steps:
                    print(f"[{name}] already finished in {cfg.out}", file=sys.stderr)
                    summary = {}
                else:
                    resume = cfg.out if has_checkpoint(cfg.out) else None
                    summary = {k: v for k, v in run(cfg, resume=resume).items() if k not in ("model", "tokenizer")}
        except TrainingDiverged as e:
            return _diverged(e)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(json.dumps({"stage": name, "seconds": timings[name], **summary}), file=sys.stderr)
    final = find_checkpoint(last.out)
    from mimo.tasks import TASKS

    t0 = time.perf_counter()
    acc = _evaluate(final, TASKS, args.eval_n, progress=not args.no_progress)
    timings["eval"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"task_accuracy": acc, "seconds": timings}))
    if args.export:
        from mimo.train.export import export_model

        export_model(args.recipe, stages, final, args.export, acc, timings, args.eval_n)
        print(f"exported {args.export}", file=sys.stderr)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--runs", help="root of the recipe's run directories (default runs/RECIPE)")
    p.add_argument("--out", required=True, help="model directory to write (e.g. models/mimo-tiny)")
    p.add_argument("--eval-n", type=positive_int, default=100, help="held-out examples per task")
    p.add_argument("--log", help="a log with '== STAGE done in N s' lines, for the wall times in the card")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--no-progress", action="store_true")


def export(args: argparse.Namespace) -> int:
    """Evaluate a finished recipe run and export its final model with a model card."""
    stages, last = _recipe_stages(args.recipe, args.runs or f"runs/{args.recipe}")
    set_threads(args.threads)
    from mimo.train.checkpoint import find_checkpoint
    from mimo.train.export import export_model

    with user_errors(*_train_errors()):
        final = find_checkpoint(last.out)
    wall: dict[str, float] = {}
    if args.log and Path(args.log).is_file():
        for m in re.finditer(r"^== (\w+) done in (\d+) s", Path(args.log).read_text(), re.M):
            wall[m.group(1)] = float(m.group(2))
    from mimo.tasks import TASKS

    t0 = time.perf_counter()
    acc = _evaluate(final, TASKS, args.eval_n, progress=not args.no_progress)
    wall["eval"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"task_accuracy": acc, "eval_seconds": wall["eval"]}))
    export_model(args.recipe, stages, final, args.out, acc, wall, args.eval_n)
    print(f"exported {args.out}", file=sys.stderr)
    return 0


# ---- MTP head distillation ---------------------------------------------------------------------------------

def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", required=True, help="model directory (weights and tokenizer)")
    p.add_argument("--out", metavar="DIR", required=True, help="where to write the model (may be --model)")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--generated", type=unit_fraction, default=0.0,
                   help="fraction of each batch taken from the model's own greedy continuations (0 to 1)")
    p.add_argument("--generated-rows", type=positive_int, default=512,
                   help="how many generated rows to make up front (with --generated)")
    p.add_argument("--generated-tasks", type=unit_fraction, default=0.0,
                   help="share of the generated rows that are the model's own answers to chat task prompts, one "
                   "conversation a row (the rest continue code)")
    p.add_argument("--threads", type=positive_int)


def distill_mtp(args: argparse.Namespace) -> int:
    model_dir = text_model_dir(args.model, "mimo distill-mtp")
    set_threads(args.threads)
    from mimo.train.distill_mtp import GENERATED_PROMPT_LEN, run

    if args.generated and args.seq_len <= GENERATED_PROMPT_LEN:
        raise UserError(f"--seq-len must be above {GENERATED_PROMPT_LEN} (the prompt of a generated row) "
                        "with --generated")
    if args.generated_tasks and not args.generated:
        raise UserError("--generated-tasks is a share of the generated rows: it needs --generated above 0")
    if args.generated_tasks:
        made, per_batch = (round(args.generated_tasks * n) for n in
                           (args.generated_rows, round(args.generated * args.batch_size)))
        if made < 1 or per_batch < 1:
            raise UserError(f"--generated-tasks {args.generated_tasks} makes no task row ({made} of "
                            f"--generated-rows {args.generated_rows}, {per_batch} a batch of --batch-size "
                            f"{args.batch_size} at --generated {args.generated})")
    print(json.dumps(run(model_dir, args.out, args.steps, args.batch_size, args.seq_len, args.lr,
                         generated=args.generated, generated_rows_n=args.generated_rows,
                         generated_tasks=args.generated_tasks)))
    return 0


# ---- RL --------------------------------------------------------------------------------------------------

def _domains(text: str) -> tuple[str, ...]:
    from mimo.posttrain.rewards import parse_domains

    try:
        return parse_domains(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="named RL settings in mimo.posttrain.loop (default, debug)")
    p.add_argument("--init-from", metavar="DIR", help="starting weights with tokenizer.json: a model, run or "
                   "checkpoint directory (default: the bundled model)")
    p.add_argument("--out", help="run directory (default: runs/rl, runs/mopd)")
    p.add_argument("--resume", metavar="DIR", help="continue from a run directory or checkpoint directory")
    p.add_argument("--domains", type=_domains, help="comma-separated prompt mixture (default: add,reverse,sort)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps = rollout batches")
    p.add_argument("--stop-after", type=positive_int, metavar="N", help="stop (with a checkpoint) after step N")
    p.add_argument("--prompts-per-step", type=positive_int, help="prompts per rollout batch (all ranks)")
    p.add_argument("--group-size", type=positive_int, help="samples per prompt (G)")
    p.add_argument("--max-new-tokens", type=positive_int)
    p.add_argument("--temperature", type=positive_float)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--warmup-steps", type=nonnegative_int, help="linear LR warmup (Adam's first steps are "
                   "sign-like: a full-LR first step moves every weight by the LR)")
    p.add_argument("--eps-low", type=unit_fraction, help="IS mask: drop tokens with trainer/sampler ratio below")
    p.add_argument("--eps-high", type=positive_float, help="IS mask: drop tokens with ratio above")
    p.add_argument("--mtp-weight", type=nonnegative_float, help="MTP head loss on the rollouts (0 = heads frozen)")
    p.add_argument("--drafts", type=nonnegative_int, dest="num_speculative_tokens", help="MTP drafts per rollout "
                   "step (default: every head)")
    p.add_argument("--no-routing-replay", action="store_true", help="route afresh in the training forward")
    p.add_argument("--eval-every", type=positive_int)
    p.add_argument("--eval-n", type=positive_int, help="held-out prompts per domain for the greedy eval")
    p.add_argument("--ckpt-every", type=positive_int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--no-progress", action="store_true")


def teacher_arg(text: str) -> tuple[str, str]:
    """"add=runs/add-rl" -> ("add", "runs/add-rl"); "sort=self" -> ("sort", "self")."""
    domain, eq, source = text.partition("=")
    names = _domains(domain)
    if not eq or not source.strip() or len(names) != 1:
        raise argparse.ArgumentTypeError(f"expected DOMAIN=DIR or DOMAIN=self, got {text!r}")
    return names[0], source.strip()


def _mopd_args(p: argparse.ArgumentParser) -> None:
    _rl_args(p)
    p.add_argument("--teacher", type=teacher_arg, action="append", required=True, metavar="DOMAIN=DIR",
                   help="the teacher of a domain: a model, run or checkpoint directory with the student's "
                   "tokenizer, or 'self' (the starting weights); once per domain")
    p.add_argument("--alpha", type=nonnegative_float, help="weight of the GRPO outcome advantage (default 0.5)")
    p.add_argument("--kl", choices=("sampled", "full"), help="the teacher term: at the sampled token (MiMo's, "
                   "the default) or its expectation over the vocabulary (the exact per-position reverse KL)")


def rl(args: argparse.Namespace) -> int:
    from mimo.posttrain.loop import RLConfig

    return _posttrain(args, "mimo rl", RLConfig, {})


def mopd(args: argparse.Namespace) -> int:
    from mimo.posttrain.mopd import MOPDConfig

    kw = {"teachers": tuple(args.teacher)}
    if args.domains is None:  # the teachers' domains are the prompt mixture
        kw["domains"] = tuple(dict.fromkeys(d for d, _ in args.teacher))
    kw |= {k: getattr(args, k) for k in ("alpha", "kl") if getattr(args, k) is not None}
    return _posttrain(args, "mimo mopd", MOPDConfig, kw)


def _posttrain(args: argparse.Namespace, command: str, kind, kw: dict) -> int:
    """`mimo rl` / `mimo mopd`: the config `kind` from the preset, the shared flags and `kw`; then the run."""
    from mimo.posttrain.loop import RLConfigError, preset

    kw |= {name: getattr(args, name) for name in ("init_from", "out", "domains", "steps", "prompts_per_step",
                                                  "group_size", "max_new_tokens", "temperature", "lr", "warmup_steps",
                                                  "eps_low", "eps_high", "mtp_weight", "num_speculative_tokens",
                                                  "eval_every", "eval_n", "ckpt_every", "seed")
           if getattr(args, name) is not None}
    if args.no_routing_replay:
        kw["routing_replay"] = False
    if args.no_progress:
        kw["progress"] = False
    if "init_from" not in kw:  # a run directory is fine too (its latest checkpoint): run() checks what is given
        kw["init_from"] = text_model_dir(None, command)
    with user_errors(RLConfigError):
        cfg = preset(args.preset, kind, **kw)
    set_threads(args.threads)
    from mimo.posttrain.loop import run
    from mimo.posttrain.rewards import RewardError

    return _run_training(run, cfg, args, stops=(RewardError,))


COMMANDS = (
    Command("pretrain", "pretraining stage of a recipe, or --stage mtp (1 MTP head -> 3, trunk frozen)",
            _stage_args(("pretrain", "mtp")), train_stage),
    Command("sft", "supervised fine-tuning on chat data (loss on assistant tokens)", _stage_args(("sft",)),
            train_stage),
    Command("eval", "task accuracy of a model (greedy, held-out split)", _eval_args, evaluate),
    Command("recipe", "every stage of a recipe in order, then eval (and --export)", _recipe_args, recipe),
    Command("export", "evaluate a finished recipe run and write its model + model card", _export_args, export),
    Command("distill-mtp", "train the MTP heads to imitate the main model (faster drafts)", _distill_args,
            distill_mtp),
    Command("rl", "GRPO on the task verifiers, rollouts through the engine (MTP drafts, routing replay)", _rl_args,
            rl),
    Command("mopd", "multi-teacher on-policy distillation: a teacher per domain plus the verifiers, on the rl loop",
            _mopd_args, mopd),
)
