"""The default model (issue 10 §3): a MOPD student, its MTP heads distilled on its own greedy outputs, measured,
and written with a model card that states the whole recipe.

    python -m experiments.default_model --student runs/mopd-exp/mopd-a0.5/seed0 --out src/mimo/models/mimo-tiny
        [--distill-steps 400] [--distill-batch-size 16] [--generated 0.5] [--eval-n 300] [--al-n 64]
        [--docs docs/results]

The student run's last checkpoint goes through `mimo.train.distill_mtp.run` (the heads only: trunk, embedding
and lm_head frozen, so the main model's outputs do not change) into OUT.tmp, which is then measured: greedy
held-out and OOD accuracy per task through the engine (`eval_n` prompts per task, seed 0), the code validation
loss of the earlier default model's card (`mimo.train.eval.code_validation`, recipe `tiny`), and acceptance
length per task and on code with every head drafting (experiments/al_entropy.py, whose plot and JSON go to
DOCS). README.md is written from those figures and from the runs that made the model (the student's MOPD run,
`models/sft-start`'s card, the teachers' report DOCS/teachers.json); then OUT.tmp replaces OUT. The figures
are also written to DOCS/default-model.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from experiments import al_entropy

from mimo import tasks as task_lib
from mimo.checkpoint import load_model
from mimo.engine import LLM
from mimo.model.params import count_parameters
from mimo.posttrain import loop
from mimo.train import checkpoint as ckpt_io
from mimo.train import distill_mtp
from mimo.train.data import load_tokenizer
from mimo.train.eval import code_validation
from mimo.train.loop import read_metrics


def measure(model_dir: Path, eval_n: int, al_n: int, docs: Path | None) -> dict[str, Any]:
    """Task accuracy (held-out and OOD), code validation loss and acceptance length per domain of `model_dir`."""
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    llm = LLM(model, tokenizer=tok, max_model_len=128 + task_lib.MAX_NEW_TOKENS, max_num_batched_tokens=2048)
    acc = {split: loop.greedy_accuracy(llm, tok, task_lib.TASKS, eval_n, 0, task_lib.MAX_NEW_TOKENS, split)[0]
           for split in ("heldout", "ood")}
    code = code_validation(model, tok)
    code_only = code_validation(model, tok, task_fraction=0.0)
    al_argv = ["--model", str(model_dir), "--n", str(al_n), "--out", str(docs)] if docs else None
    al = al_entropy.main(al_argv) if al_argv else al_entropy.measure(str(model_dir), al_n, 16)
    by_domain = {}
    for d in dict.fromkeys(p["domain"] for p in al["points"]):
        pts = [p for p in al["points"] if p["domain"] == d]
        by_domain[d] = statistics.fmean(p["al"] for p in pts)
    return {"accuracy": acc, "code_val_loss": code["val_loss"], "code_only_val_loss": code_only["val_loss"],
            "acceptance_length": by_domain, "al_fit": al["fit"]}


def _minutes(rows: list[dict[str, Any]]) -> float:
    """Wall minutes of a run from its first to its last metrics row."""
    return (rows[-1]["time"] - rows[0]["time"]) / 60


# the `student-start` recipe's stages in order: (stage, committed model, what it trains, minutes, its eval JSON)
START_STAGES = (
    ("mix4", "models/student-start", "300 more steps of the last mixed stage from `models/sft-start`, new "
     "conversations", 31, "docs/results/student-start.json"),
    ("mix5", "models/student-mix5", "300 steps more, weighted to reverse", 28, "docs/results/student-mix5.json"),
)


def start_evals(init_from: str, docs: Path) -> list[dict[str, Any]]:
    """The `mimo eval` figures of each student-start stage up to `init_from` (none when the MOPD run starts
    elsewhere, e.g. from models/sft-start)."""
    models = [m for _, m, *_ in START_STAGES]
    if init_from not in models:
        return []
    return [json.loads((docs / Path(js).name).read_text()) for *_, js in START_STAGES[:models.index(init_from) + 1]]


def model_card(student: Path, cfg: dict[str, Any], rows: list[dict[str, Any]], distill: dict[str, Any],
               distill_args: dict[str, Any], figures: dict[str, Any], teachers: dict[str, Any] | None,
               starts: list[dict[str, Any]] | None = None) -> str:
    """The README of the shipped model; `starts`: the `mimo eval` figures of each `student-start` stage up to
    the MOPD run's start (`START_STAGES`), when that is not `models/sft-start`."""
    model_cfg = load_model(student, dtype=torch.float32).config
    params = count_parameters(model_cfg)
    acc, al = figures["accuracy"], figures["acceptance_length"]
    alpha, kl = cfg.get("alpha"), cfg.get("kl")
    teacher_flags = " ".join(f"--teacher {d}={t}" for d, t in cfg["teachers"])
    mopd_cmd = (f"mimo mopd --init-from {cfg['init_from']} {teacher_flags} --alpha {alpha} --kl {kl} "
                f"--lr {cfg['lr']} --warmup-steps {cfg['warmup_steps']} --steps {cfg['steps']} "
                f"--eval-n {cfg['eval_n']} --seed {cfg['seed']} --out runs/mopd --threads 1")
    distill_cmd = (f"mimo distill-mtp --model runs/mopd/checkpoints/step_{cfg['steps']:06d} "
                   f"--out models/mimo-tiny --steps {distill_args['steps']} --generated {distill_args['generated']} "
                   f"--batch-size {distill_args['batch_size']} --threads 1")
    evals = [r for r in rows if "eval_accuracy" in r]
    lines = [
        "# mimo-tiny", "",
        "The default model shipped with `mimo`: the MiMo-V2-Flash architecture at "
        f"{params['total'] / 1e6:.1f}M parameters ({model_cfg.n_layers} layers, hidden {model_cfg.dim}, "
        f"{model_cfg.n_experts} routed experts top-{model_cfg.n_active_experts}, {model_cfg.n_mtp_layers} "
        "MTP heads; the shape and tokenizer of every model under `models/`), float32. It is the student of "
        "multi-teacher on-policy distillation (MOPD) from "
        + ("the SFT start `models/sft-start`" if not starts else
           f"{len(starts)} more SFT stage{'s' * (len(starts) > 1)} on `models/sft-start`")
        + " with the three "
        "domain teachers `models/teachers/{add,reverse,sort}`, its MTP heads then distilled on its own greedy "
        "outputs. It does the three toy chat tasks (`add` and `reverse` with a worked trace in the think "
        "block, `sort` directly) and continues Python code: a demo and test fixture, not a useful assistant.",
        "", "## Results", "",
        f"Measured on these weights by `experiments/default_model.py`: greedy exact match through the engine, "
        f"{figures['eval_n']} prompts per task (seed 0); acceptance length with all {model_cfg.n_mtp_layers} "
        "heads drafting at every step (`experiments/al_entropy.py`, held-out task prompts and 48-token prefixes "
        "of held-out stdlib files continued 64 tokens).", "",
        "| | held-out accuracy | OOD accuracy (longer inputs) | acceptance length |", "|---|---|---|---|"]
    def al_of(d: str) -> str:  # none when every output ended at its first token (no decode step to measure)
        return f"{al[d]:.2f}" if d in al else "-"

    lines += [f"| {t} | {acc['heldout'][t]:.3f} | {acc['ood'][t]:.3f} | {al_of(t)} |" for t in task_lib.TASKS]
    lines += [f"| code | | | {al_of('code')} |", "",
              f"Code validation loss (held-out stdlib code mixed with held-out task documents, the measure of the "
              f"earlier default model's card, which was 3.07 after pretraining): **{figures['code_val_loss']:.3f}** "
              f"(code alone {figures['code_only_val_loss']:.3f}).", "",
              "## Recipe", "",
              "Every stage on one CPU thread (`OMP_NUM_THREADS=1`) of a 2-core machine shared with other jobs, "
              "the MTP-head distillation on two.", "",
              "1. **SFT start** `models/sft-start`: recipe `sft-start` (`mimo.train.recipes.sft_start`: pretrain "
              "on stdlib code and task documents, MTP heads, task SFT, the traces, four reverse-only stages, three "
              "mixed stages with the pretraining-mix replay). Its card lists every stage with its command, steps "
              "and time; docs/results/sft-start.md every intermediate figure.",
              "2. **Teachers** `models/teachers/D`, each from `models/sft-start` (docs/results/teachers.md):"]
    if starts:
        stages = "; then ".join(
            f"`mimo sft --recipe student-start --stage {stage} --threads 1` ({what}; {minutes} min on one thread, "
            f"committed as `{model}`; greedy held-out accuracy at its end, {e['n_per_task']} prompts per task, "
            f"{js}: " + ", ".join(f"{t} {e['accuracy'][t]:.3f}" for t in task_lib.TASKS) + ")"
            for (stage, model, what, minutes, js), e in zip(START_STAGES, starts))
        lines.insert(-1, "   Then the MOPD run's start, recipe `student-start` (`mimo.train.recipes.student_start`): "
                     + stages + ".")
    for d, t in (teachers or {}).items():
        sft_h = t["sft_curve"]["hours"][-1] if t.get("sft_curve") else 0.0
        rl_h = t["rl_curve"]["hours"][-1] if t.get("rl_curve") else 0.0
        sft = f"`mimo sft --recipe teacher-sft --stage {d}`, then " if t.get("sft_run") else ""
        lines.append(f"   - {d}: {sft}`{t['command']}` ({(sft_h + rl_h) * 60:.0f} min; held-out "
                     f"{t['accuracy']['heldout'][d]:.2f})")
    lines += [
        f"3. **MOPD** (`mimo.posttrain.mopd`; alpha {alpha}, teacher term `{kl}`), {cfg['steps']} steps of "
        f"{cfg['prompts_per_step']} prompts x {cfg['group_size']} samples at T = {cfg['temperature']}, "
        f"{rows[-1]['flops']:.3g} FLOPs by the ledger, {_minutes(rows):.0f} min ("
        + (f"run `{cfg['out']}` of experiments/mopd.py, docs/results/mopd.md" if not starts else
           "the settings of experiments/mopd.py's mopd-a0.5 arm, seed 0, docs/results/mopd.md")
        + "):", "", "   ```bash", f"   {mopd_cmd}", "   ```", "",
        "   Held-out greedy accuracy at its evaluations (" + f"{cfg['eval_n']} prompts per task, seed "
        f"{cfg['seed']}): " + "; ".join(f"step {r['step']}: " + ", ".join(f"{d} {a:.2f}" for d, a in
                                                                         r["eval_accuracy"].items())
                                        for r in evals) + ".",
        f"4. **MTP heads** distilled on the student's own outputs ({distill['seconds'] / 60:.0f} min; trunk, "
        "embedding and lm_head frozen, so the main model's logits do not change; half of each batch its greedy "
        "continuations of training-split code):", "", "   ```bash", f"   {distill_cmd}", "   ```", "",
        "   Agreement of each head's argmax with the main model's on held-out code and task text: "
        f"{' / '.join(f'{a:.3f}' for a in distill['val_agreement_before'])} before, "
        f"{' / '.join(f'{a:.3f}' for a in distill['val_agreement_after'])} after; on greedy continuations of "
        f"held-out files {' / '.join(f'{a:.3f}' for a in distill['val_generated_agreement_before'])} -> "
        f"{' / '.join(f'{a:.3f}' for a in distill['val_generated_agreement_after'])}."
        if "val_generated_agreement_after" in distill else "",
        "", "Written by `experiments/default_model.py` from the runs above; the figures are also in "
        "docs/results/default-model.json."]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="the MOPD run directory whose last checkpoint ships")
    p.add_argument("--out", required=True, help="the model directory written (e.g. src/mimo/models/mimo-tiny)")
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--distill-batch-size", type=int, default=16, help="rows of each distillation batch "
                   "(and of its 4 validation batches)")
    p.add_argument("--generated", type=float, default=0.5, help="share of each distillation batch that is the "
                   "student's own greedy code continuations")
    p.add_argument("--eval-n", type=int, default=300)
    p.add_argument("--al-n", type=int, default=64, help="prompts per domain of the acceptance measurement")
    p.add_argument("--docs", default="docs/results", help="al-entropy plot, default-model.json; teachers.json "
                   "is read from here")
    args = p.parse_args(argv)
    run, out, docs = Path(args.student), Path(args.out), Path(args.docs)
    if not ckpt_io.has_checkpoint(run):
        p.error(f"--student {run}: no checkpoint there (a mimo mopd run directory)")
    ckpt = ckpt_io.find_checkpoint(run)
    cfg = json.loads((ckpt / loop.CONFIG_FILE).read_text())
    if "teachers" not in cfg:
        p.error(f"--student {run}: not a MOPD run (its {loop.CONFIG_FILE} names no teachers)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    distill = distill_mtp.run(str(ckpt), str(tmp), args.distill_steps, batch_size=args.distill_batch_size,
                              generated=args.generated)
    distill["seconds"] = round(time.perf_counter() - t0, 1)
    figures = {"student": str(ckpt), "eval_n": args.eval_n, **measure(tmp, args.eval_n, args.al_n, docs),
               "distill": distill}
    teachers_json = docs / "teachers.json"
    teachers = json.loads(teachers_json.read_text())["teachers"] if teachers_json.is_file() else None
    (tmp / "README.md").write_text(model_card(ckpt, cfg, read_metrics(run), distill,
                                              {"steps": args.distill_steps, "generated": args.generated,
                                               "batch_size": args.distill_batch_size},
                                              figures, teachers, start_evals(cfg["init_from"], docs)))
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "default-model.json").write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    al_json = docs / "al-entropy.json"  # measured on OUT.tmp, which is now OUT
    al_json.write_text(json.dumps({**json.loads(al_json.read_text()), "model": str(out)}, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
