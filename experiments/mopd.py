"""The MOPD experiment (posttraining-notes.md §9.3 stage S3, §9.4): arms trained from one student with the same
prompts, seeds and steps; every run resumable; the results file written by code from the runs' metrics.

Run (sessions 6 and 7) from `models/sft-start` with the three teachers of `models/teachers/`: arms mopd-a0,
mopd-a0.5, mix-rl, teacher-sft and weight-avg, 3 seeds x 40 steps, at LR 2e-5 and 5e-5 (runs/mopd-exp-lr2e-5,
runs/mopd-exp-lr5e-5; docs/results/mopd.md, and their results.json as docs/results/mopd-exp-lr*.json).
Tested on debug checkpoints (tests/posttrain/test_mopd_experiment.py).

    python -m experiments.mopd --student DIR --teacher add=DIR --teacher sort=DIR [--teacher reverse=self]
        --out runs/mopd-exp [--preset default] [--seeds 0,1,2] [--steps N] [--eval-n N] [--lr LR]
        [--arms A,B] [--teacher-costs docs/results/teachers.json] [--docs docs/results [--sweep OUT2,OUT3]]

Arms:
    mopd-a0         MOPD, alpha 0 (distillation alone)
    mopd-a0.5       MOPD, alpha 0.5 (plus the GRPO outcome advantage)
    mopd-full-a0.5  mopd-a0.5 with the teacher term's expectation over the vocabulary (kl="full": the exact
                    per-position reverse KL instead of its one-token estimate; not MiMo's)
    mix-rl          GRPO on the same prompt mixture: "RL from the student" without teachers
    wrong-teacher   MOPD alpha 0 with each domain's teacher moved to the next domain (with >= 2 distinct
                    teachers): does routing matter?
    teacher-sft     SFT on the teachers' correct samples of the same prompts (mopd.TeacherSFTConfig): the
                    ledger charges the teachers' generation, rejected samples included, and the updates
    weight-avg      the teachers' weights averaged parameter by parameter (each distinct teacher once, `self`
                    the student), evaluated once per seed by the runs' evaluation: one point, FLOPs of the
                    evaluation only
Run directories OUT/ARM/seedS; a finished run is skipped, an interrupted one resumed (`--resume`, exact).

Results (OUT/results.json, OUT/results.md), per arm (mean over seeds, and per seed in the JSON):
    accuracy        final greedy held-out accuracy per domain
    recovery        R_d = accuracy_d / teacher accuracy_d (mean and minimum over domains); each teacher is
                    evaluated by the runs' own evaluation on the same held-out prompts (they depend on the
                    seed), once per seed, cached in OUT/teachers.json
    at_budget       accuracy per domain at the last evaluation within the smallest final FLOPs of any trained
                    run (weight-avg trains nothing and sets no budget): the arms compared at equal compute
                    (MOPD pays for its teachers' forwards, teacher-sft for their generation)
    flops_to_95     FLOPs at the first evaluation reaching 95% of every teacher's accuracy (None: never); with
                    --teacher-costs also end to end (the teachers' SFT and GRPO runs added for every arm but
                    mix-rl), and each MOPD arm's ratio to mix-rl's
    ood             the final weights' greedy accuracy on the OOD split (cached in RUN/ood.json)
    flops           total and by ledger entry
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mimo.checkpoint import load_model
from mimo.cli.train import teacher_arg
from mimo.engine import LLM
from mimo.posttrain import flops as flop_lib
from mimo.posttrain import loop
from mimo.posttrain.mopd import SELF, MOPDConfig, TeacherSFTConfig
from mimo.train import checkpoint as ckpt_io
from mimo.train.data import load_tokenizer
from mimo.train.loop import TrainError, read_metrics

RESULTS_JSON, RESULTS_MD, CURVES_PNG = "results.json", "results.md", "curves.png"
TEACHERS_JSON, START_JSON, OOD_JSON = "teachers.json", "start.json", "ood.json"
WEIGHT_AVG = "weight-avg"  # the arm's kind: a merged model evaluated, nothing trained


def arms(teachers: tuple[tuple[str, str], ...]) -> dict[str, dict[str, Any]]:
    """Arm name -> config kind and overrides. Example: teachers (add, A), (sort, S) -> wrong-teacher has
    (add, S), (sort, A)."""
    out = {"mopd-a0": dict(kind=MOPDConfig, teachers=teachers, alpha=0.0),
           "mopd-a0.5": dict(kind=MOPDConfig, teachers=teachers, alpha=0.5),
           "mopd-full-a0.5": dict(kind=MOPDConfig, teachers=teachers, alpha=0.5, kl="full"),
           "mix-rl": dict(kind=loop.RLConfig)}
    sources = [s for _, s in teachers]
    if len(set(sources)) > 1:
        moved = sources[-1:] + sources[:-1]
        out["wrong-teacher"] = dict(kind=MOPDConfig, teachers=tuple((d, s) for (d, _), s in zip(teachers, moved)),
                                    alpha=0.0)
    out["teacher-sft"] = dict(kind=TeacherSFTConfig, teachers=teachers)
    out[WEIGHT_AVG] = dict(kind=WEIGHT_AVG, teachers=teachers)
    return out


def eval_config(base: dict[str, Any]) -> loop.RLConfig:
    """The runs' evaluation settings (eval_n, max_new_tokens) for models evaluated outside a run."""
    return loop.preset(base["preset"], **({"eval_n": base["eval_n"]} if base.get("eval_n") else {}))


def eval_engine(model: torch.nn.Module, tokenizer, cfg: loop.RLConfig) -> LLM:
    return LLM(model, tokenizer=tokenizer, max_model_len=128 + cfg.max_new_tokens, max_num_batched_tokens=2048)


def average_weights(teachers: Sequence[tuple[str, str]], student: str) -> torch.nn.Module:
    """The teachers' models ((domain, directory or `self`: the student's starting weights); each distinct
    source once, however many domains it teaches) averaged parameter by parameter. TrainError for a teacher
    with another tokenizer than the student, or other parameters (names or shapes) than the first teacher."""
    want = loop.tokenizer_digest(loop.model_dir(student, "--student"))
    first_domain: dict[str, str] = {}
    for d, source in teachers:
        first_domain.setdefault(source, d)
    states: list[dict[str, torch.Tensor]] = []
    for source, d in first_domain.items():
        flag = f"--teacher {d}={source}"
        path = loop.model_dir(student if source == SELF else source, flag)
        if loop.tokenizer_digest(path) != want:
            raise TrainError(f"weight-avg: {flag}: its tokenizer differs from the student's")
        model = load_model(path, dtype=torch.float32)
        state = model.state_dict()
        if states and {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in states[0].items()}:
            raise TrainError(f"weight-avg: {flag}: not the parameters of the first teacher (another architecture)")
        states.append(state)
    model.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
    return model


def run_weight_avg(run_dir: Path, teachers: tuple[tuple[str, str], ...], base: dict[str, Any], seed: int) -> Path:
    """The weight-avg arm at one seed: its one metrics row, the merged model's greedy held-out accuracy by the
    runs' evaluation (the seed's prompts) and the evaluation's FLOPs, at step 0; skipped if written."""
    if read_metrics(run_dir):
        return run_dir
    cfg = eval_config(base)
    tok = load_tokenizer(loop.model_dir(base["student"], "--student"))
    llm = eval_engine(average_weights(teachers, base["student"]), tok, cfg)
    acc, spent = loop.greedy_accuracy(llm, tok, base["domains"], cfg.eval_n, seed, cfg.max_new_tokens)
    ledger = flop_lib.FlopLedger()
    ledger.add("eval", spent)
    row = {"step": 0, "eval_accuracy": acc, "flops": ledger.total, "flops_by_kind": dict(ledger.flops),
           "time": round(time.time(), 2)}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (loop.METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(row) + "\n")
    os.replace(tmp, run_dir / loop.METRICS_FILE)  # a half-written row never reads as a finished run
    return run_dir


def run_arm(out: Path, arm: str, seed: int, spec: dict[str, Any], base: dict[str, Any],
            stop_after: int | None = None) -> Path:
    """Train (or finish, or skip) one arm at one seed; returns its run directory."""
    spec = dict(spec)
    kind = spec.pop("kind")
    run_dir = out / arm / f"seed{seed}"
    if kind == WEIGHT_AVG:
        return run_weight_avg(run_dir, spec["teachers"], base, seed)
    for k in ("steps", "eval_n", "lr"):
        if base.get(k):
            spec[k] = base[k]
    cfg = loop.preset(base["preset"], kind, init_from=base["student"], out=str(run_dir), domains=base["domains"],
                      seed=seed, progress=False, **spec)
    if not ckpt_io.has_checkpoint(run_dir):
        loop.run(cfg, stop_after=stop_after)
    elif int(ckpt_io.load_train_state(ckpt_io.find_checkpoint(run_dir))["step"]) < cfg.steps:
        loop.run(cfg, resume=run_dir, stop_after=stop_after)
    return run_dir


def model_accuracy(out: Path, base: dict[str, Any], sources: tuple[tuple[str, str], ...], seeds: list[int],
                   cache_name: str = TEACHERS_JSON) -> dict[str, dict[str, float]]:
    """{seed: {domain: greedy held-out accuracy of that domain's source}} by the runs' evaluation (its
    prompts depend on the seed); a source is a directory or `self` (the student); cached in OUT/cache_name."""
    cache = out / cache_name
    acc = json.loads(cache.read_text()) if cache.is_file() else {}
    cfg = eval_config(base)
    todo = [s for s in seeds if str(s) not in acc]
    for d, source in sources if todo else ():
        path = loop.model_dir(base["student"] if source == SELF else source, f"--teacher {d}={source}")
        tok = load_tokenizer(path)
        llm = eval_engine(load_model(path, dtype=torch.float32), tok, cfg)
        for s in todo:
            acc.setdefault(str(s), {})[d] = loop.greedy_accuracy(llm, tok, (d,), cfg.eval_n, s,
                                                                 cfg.max_new_tokens)[0][d]
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(acc, indent=2) + "\n")
    return {str(s): acc[str(s)] for s in seeds}


def final_ood_accuracy(run_dir: Path, arm_spec: dict[str, Any], base: dict[str, Any], seed: int
                       ) -> dict[str, float]:
    """Greedy accuracy of a run's final weights on the OOD split (longer inputs; the seed's prompts), by the runs'
    evaluation settings; cached in RUN/ood.json (a finished run's weights do not change)."""
    cache = run_dir / OOD_JSON
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = eval_config(base)
    tok = load_tokenizer(loop.model_dir(base["student"], "--student"))
    model = (average_weights(arm_spec["teachers"], base["student"]) if arm_spec["kind"] == WEIGHT_AVG
             else load_model(loop.model_dir(run_dir, "--resume"), dtype=torch.float32))
    acc = loop.greedy_accuracy(eval_engine(model, tok, cfg), tok, base["domains"], cfg.eval_n, seed,
                               cfg.max_new_tokens, split="ood")[0]
    cache.write_text(json.dumps(acc) + "\n")
    return acc


def teacher_building_flops(report: Path, domains: Sequence[str]) -> float | None:
    """What building the teachers cost (their SFT and GRPO runs' final ledger totals), from
    experiments/teachers.py's teachers.json; None if a domain's teacher, its GRPO curve, or the SFT curve of a
    teacher that had an SFT run is missing (a teacher trained by GRPO alone, as sort, has no SFT cost)."""
    teachers = json.loads(report.read_text())["teachers"]
    total = 0.0
    for d in domains:
        t = teachers.get(d) or {}
        curves = [t.get("rl_curve")] + ([t.get("sft_curve")] if t.get("sft_run") else [])
        if not all(c and c["flops"] for c in curves):
            return None
        total += sum(c["flops"][-1] for c in curves)
    return total


def summarise_run(rows: list[dict[str, Any]], teacher_acc: dict[str, float], budget: float) -> dict[str, Any]:
    evals = [r for r in rows if "eval_accuracy" in r]
    final = evals[-1]["eval_accuracy"]
    within = [r for r in evals if r["flops"] <= budget]
    recovery = {d: final[d] / teacher_acc[d] if teacher_acc[d] > 0 else None for d in final}
    known = [v for v in recovery.values() if v is not None]
    reached = [r["flops"] for r in evals if all(r["eval_accuracy"][d] >= 0.95 * teacher_acc[d] for d in final)]
    return {"accuracy": final, "recovery": recovery,
            "recovery_mean": statistics.fmean(known) if known else None, "recovery_min": min(known, default=None),
            "at_budget": within[-1]["eval_accuracy"] if within else None,
            "flops_to_95": reached[0] if reached else None,
            "flops": rows[-1]["flops"], "flops_by_kind": rows[-1]["flops_by_kind"]}


def _mean(values: list[Any]) -> Any:
    """Mean over seeds of numbers, or of dicts of numbers key by key; None if any seed has None."""
    if any(v is None for v in values):
        return None
    if isinstance(values[0], dict):
        return {k: _mean([v[k] for v in values]) for k in values[0]}
    return statistics.fmean(values)


def plot_curves(rows: dict[str, list[list[dict[str, Any]]]], teacher_acc: dict[str, dict[str, float]],
                path: Path) -> None:
    """Held-out accuracy against FLOPs per domain: each arm's mean over seeds at each evaluation (at the seeds'
    mean FLOPs) with the min-max band over seeds; the teachers' mean accuracy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(_mean(list(teacher_acc.values())))
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.8), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for arm, runs in rows.items():
            evals = [[r for r in run if "eval_accuracy" in r] for run in runs]
            n = min(len(e) for e in evals)
            x = [statistics.fmean(e[i]["flops"] for e in evals) for i in range(n)]
            acc = [[e[i]["eval_accuracy"][d] for e in evals] for i in range(n)]
            # an arm that trains nothing (weight-avg: one evaluation at step 0) is a point, not a curve
            style = dict(marker="*", markersize=12, ls="none") if runs[0][-1]["step"] == 0 else dict(marker="o")
            line, = ax.plot(x, [statistics.fmean(a) for a in acc], label=arm, **style)
            ax.fill_between(x, [min(a) for a in acc], [max(a) for a in acc], color=line.get_color(), alpha=0.2)
        ax.axhline(statistics.fmean(t[d] for t in teacher_acc.values()), color="k", ls="--", lw=0.8,
                   label="teacher")
        ax.set_title(d)
        ax.set_xlabel("FLOPs (ledger)")
        ax.set_ylabel("greedy held-out accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compute_ratios(arms_mean: dict[str, dict[str, Any]], key: str) -> list[str]:
    """Lines comparing each MOPD arm's FLOPs to 95% of every teacher (`key`: stage 3 only or end to end) with
    mix-rl's. Example: MOPD 2e12, mix-rl never within its 9e12 -> "mix-rl did not reach it within 4.5x"."""
    rl = arms_mean.get("mix-rl")
    lines = []
    for arm, m in arms_mean.items():
        if not arm.startswith("mopd") or rl is None:
            continue
        ours, theirs = m[key], rl[key]
        if ours is None:
            lines.append(f"- {arm}: did not reach 0.95 of every teacher within its {m['flops']:.3g} FLOPs")
        elif theirs is not None:
            lines.append(f"- {arm}: {ours:.3g} FLOPs, mix-rl {theirs:.3g}: ratio {ours / theirs:.3g}")
        else:
            lines.append(f"- {arm}: {ours:.3g} FLOPs; mix-rl did not reach it within its {rl['flops']:.3g} "
                         f"FLOPs ({rl['flops'] / ours:.3g}x MOPD's)")
    return lines


def write_results(out: Path, run_dirs: dict[str, list[Path]], teacher_acc: dict[str, dict[str, float]],
                  start_acc: dict[str, dict[str, float]] | None = None,
                  ood: dict[str, list[dict[str, float]]] | None = None, teacher_flops: float | None = None
                  ) -> dict[str, Any]:
    """results.json, results.md and curves.png from the runs' metrics (run_dirs[arm][i] is seed
    list(teacher_acc)[i]); ood[arm][i]: that run's final OOD accuracy; teacher_flops: what building the
    teachers cost, added to every arm that uses them for the end-to-end figures."""
    seeds = list(teacher_acc)
    rows = {arm: [read_metrics(d) for d in dirs] for arm, dirs in run_dirs.items()}
    every = [r for runs in rows.values() for r in runs]
    # weight-avg's one row (step 0) costs an evaluation only: a budget no trained run has an evaluation within
    budget = min(r[-1]["flops"] for r in [r for r in every if r[-1]["step"] > 0] or every)
    per_seed = {arm: [summarise_run(r, teacher_acc[s], budget) for r, s in zip(runs, seeds)]
                for arm, runs in rows.items()}
    for arm, runs in per_seed.items():
        for i, r in enumerate(runs):
            r["ood"] = ood[arm][i] if ood else None
            # mix-rl builds no teachers; every other arm needs them first
            extra = 0.0 if arm == "mix-rl" else teacher_flops
            r["flops_to_95_end_to_end"] = (None if r["flops_to_95"] is None or extra is None
                                           else r["flops_to_95"] + extra)
    keys = ("accuracy", "recovery_mean", "recovery_min", "at_budget", "flops_to_95", "flops_to_95_end_to_end",
            "flops", "ood")
    results = {"teacher_accuracy": teacher_acc, "start_accuracy": start_acc, "flop_budget": budget,
               "teacher_building_flops": teacher_flops,
               "arms": {arm: {"mean": {k: _mean([s[k] for s in runs]) for k in keys}, "seeds": runs}
                        for arm, runs in per_seed.items()}}
    trained = [d for dirs in run_dirs.values() for d in dirs if ckpt_io.has_checkpoint(d)]
    if trained:
        first = json.loads((ckpt_io.find_checkpoint(trained[0]) / loop.CONFIG_FILE).read_text())
        results["settings"] = {k: first[k] for k in SETTINGS}
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    plot_curves(rows, teacher_acc, out / CURVES_PNG)
    (out / RESULTS_MD).write_text("\n".join(
        [f"# MOPD experiment (seeds {','.join(seeds)}; generated by experiments/mopd.py)", ""]
        + report_lines(results) + ["", f"![accuracy against FLOPs]({CURVES_PNG})"]) + "\n")
    return results


SETTINGS = ("init_from", "steps", "prompts_per_step", "group_size", "lr", "warmup_steps", "eval_n")


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}"


def report_lines(results: dict[str, Any]) -> list[str]:
    """One experiment's tables (markdown lines) from its results.json."""
    teacher_acc, start_acc = results["teacher_accuracy"], results["start_accuracy"]
    mean_teacher = _mean(list(teacher_acc.values()))
    domains = list(mean_teacher)
    means = {arm: r["mean"] for arm, r in results["arms"].items()}
    teacher_flops = results["teacher_building_flops"]

    def spread(arm: str, d: str) -> str:
        vals = [s["accuracy"][d] for s in results["arms"][arm]["seeds"]]
        return f"{statistics.fmean(vals):.3g} ({min(vals):.3g}-{max(vals):.3g})" if len(vals) > 1 else _fmt(vals[0])

    lines = []
    if "settings" in results:
        lines += ["every run: " + ", ".join(f"{k} {v}" for k, v in results["settings"].items()), ""]
    lines += ["teacher accuracy (mean over seeds): " + ", ".join(f"{d} {mean_teacher[d]:.3f}" for d in domains),
              f"equal-compute budget: {results['flop_budget']:.3g} FLOPs", "",
              "acc: final greedy held-out accuracy, mean over seeds (min-max); R: student / teacher accuracy; "
              "at budget: the last evaluation within the smallest final FLOPs of any trained run (weight-avg: "
              "the merged teachers, evaluated only)", "",
              "| arm | " + " | ".join(f"acc {d}" for d in domains) + " | R mean | R min | "
              + " | ".join(f"acc {d} at budget" for d in domains) + " | FLOPs to 95% | FLOPs |",
              "|" + "---|" * (2 * len(domains) + 5)]
    if start_acc:
        lines.append("| start (the student before training) | " + " | ".join(
            f"{statistics.fmean(a[d] for a in start_acc.values()):.3g} ({min(a[d] for a in start_acc.values()):.3g}"
            f"-{max(a[d] for a in start_acc.values()):.3g})" for d in domains) + " |" + " |" * (len(domains) + 4))
    for arm, m in means.items():
        at = m["at_budget"] or {}
        lines.append(f"| {arm} | " + " | ".join(spread(arm, d) for d in domains)
                     + f" | {_fmt(m['recovery_mean'])} | {_fmt(m['recovery_min'])} | "
                     + " | ".join(_fmt(at.get(d)) for d in domains)
                     + f" | {_fmt(m['flops_to_95'])} | {_fmt(m['flops'])} |")
    if all(m["ood"] is not None for m in means.values()):
        lines += ["", "OOD split (longer inputs), final weights, mean over seeds:", "",
                  "| arm | " + " | ".join(f"OOD {d}" for d in domains) + " |", "|" + "---|" * (len(domains) + 1)]
        lines += [f"| {arm} | " + " | ".join(_fmt(m["ood"][d]) for d in domains) + " |" for arm, m in means.items()]
    lines += ["", "FLOPs to 0.95 of every teacher, MOPD against mix-rl (mean over seeds; None if a seed never got "
              "there), stage 3 only:", ""] + compute_ratios(means, "flops_to_95")
    lines += ["", "end to end (building the teachers included: "
              + (f"{teacher_flops:.3g} FLOPs" if teacher_flops is not None else "cost unknown") + "):", ""]
    lines += compute_ratios(means, "flops_to_95_end_to_end")
    # the means above are None as soon as one seed never got there; each seed's crossing, and MOPD's ratio to
    # mix-rl on the seeds where both got there, say what the runs did show
    seeds = list(teacher_acc)
    per_seed = {arm: [r["flops_to_95"] for r in res["seeds"]] for arm, res in results["arms"].items()}
    lines += ["", "FLOPs to 0.95 of every teacher per seed, stage 3 (-: not within the run):", ""]
    for arm, fs in per_seed.items():
        both = [f"seed {s} {f / g:.3g}" for s, f, g in zip(seeds, fs, per_seed.get("mix-rl", [None] * len(fs)))
                if arm.startswith("mopd") and f is not None and g is not None]
        lines.append(f"- {arm}: " + ", ".join(f"seed {s} {_fmt(f)}" for s, f in zip(seeds, fs))
                     + (f"; against mix-rl on the same seed: {', '.join(both)}" if both else ""))
    return lines


def write_docs(docs: Path, outs: Sequence[Path]) -> None:
    """DOCS/mopd.md and its curves from finished experiments (each OUT as write_results leaves it), e.g. one per
    LR of a sweep: with several, a summary of every arm at every experiment's settings first (and which reached
    0.95 of every teacher), then each experiment's tables and curves (DOCS/mopd-curves-NAME.png, NAME = OUT's
    directory name)."""
    docs.mkdir(parents=True, exist_ok=True)
    exps = [(out, json.loads((out / RESULTS_JSON).read_text())) for out in outs]
    seeds = [",".join(res["teacher_accuracy"]) for _, res in exps]
    same = len(set(seeds)) == 1  # else each experiment's section names its seeds
    lines = [f"# MOPD experiment ({'seeds ' + seeds[0] if same else 'seeds per experiment'}; generated by "
             "experiments/mopd.py)", ""]
    if len(exps) > 1:
        domains = list(_mean(list(exps[0][1]["teacher_accuracy"].values())))
        lines += [f"Summary over {len(exps)} experiments (final accuracy, mean over seeds; R: student / teacher):",
                  "", "| arm | experiment | lr | " + " | ".join(f"acc {d}" for d in domains)
                  + " | R min | FLOPs to 95% |", "|" + "---|" * (len(domains) + 5)]
        reached = []
        for arm in dict.fromkeys(a for _, res in exps for a in res["arms"]):
            for out, res in exps:
                if arm in res["arms"]:
                    m = res["arms"][arm]["mean"]
                    lr = res.get("settings", {}).get("lr")
                    lines.append(f"| {arm} | {out.name} | {_fmt(lr)} | "
                                 + " | ".join(_fmt(m["accuracy"][d]) for d in domains)
                                 + f" | {_fmt(m['recovery_min'])} | {_fmt(m['flops_to_95'])} |")
                    if m["flops_to_95"] is not None:
                        reached.append(f"{arm} ({out.name})")
        lines += ["", "Reached 0.95 of every teacher on every seed: " + (", ".join(reached) or "none") + ".", ""]
    for (out, res), seed in zip(exps, seeds):
        png = "mopd-curves.png" if len(exps) == 1 else f"mopd-curves-{out.name}.png"
        shutil.copyfile(out / CURVES_PNG, docs / png)
        head = [] if len(exps) == 1 else [f"## {out.name}" + ("" if same else f" (seeds {seed})"), ""]
        lines += head + report_lines(res) + ["", f"![accuracy against FLOPs]({png})", ""]
    (docs / "mopd.md").write_text("\n".join(lines).rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="the student's starting weights (model or run directory)")
    p.add_argument("--teacher", type=teacher_arg, action="append", required=True, metavar="DOMAIN=DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="default", help="loop.PRESETS name (debug for a smoke run)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated")
    p.add_argument("--steps", type=int, help="steps per run (default: the preset's)")
    p.add_argument("--lr", type=float, help="learning rate of every arm (default: the preset's); one --out per LR "
                   "of a sweep")
    p.add_argument("--arms", help="comma-separated subset of the arms (default: all)")
    p.add_argument("--docs", help="also write DOCS/mopd.md and its curves (e.g. docs/results)")
    p.add_argument("--sweep", metavar="OUT,...", help="with --docs: other finished experiments (e.g. the other LRs "
                   "of a sweep) summarised and listed in DOCS/mopd.md after this one")
    p.add_argument("--eval-n", type=int, help="held-out prompts per domain of every evaluation (default: the "
                   "preset's)")
    p.add_argument("--teacher-costs", help="experiments/teachers.py's teachers.json: what building the teachers "
                   "cost, for the end-to-end figures (e.g. docs/results/teachers.json)")
    args = p.parse_args(argv)
    teachers = tuple(args.teacher)
    base = {"student": args.student, "preset": args.preset, "steps": args.steps, "eval_n": args.eval_n, "lr": args.lr,
            "domains": tuple(d for d, _ in teachers)}
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = arms(teachers)
    if args.arms:
        unknown = set(args.arms.split(",")) - set(chosen)
        if unknown:
            p.error(f"unknown arm(s) {sorted(unknown)}; arms: {', '.join(chosen)}")
        chosen = {a: spec for a, spec in chosen.items() if a in args.arms.split(",")}
    sweep = [Path(o) for o in (args.sweep or "").split(",") if o]
    if sweep and not args.docs:
        p.error("--sweep lists experiments for DOCS/mopd.md: give --docs too")
    for o in sweep:
        if not (o / RESULTS_JSON).is_file():
            p.error(f"--sweep {o}: no {RESULTS_JSON} there (not a finished experiment)")
    teacher_acc = model_accuracy(out, base, teachers, seeds)
    start_acc = model_accuracy(out, base, tuple((d, SELF) for d, _ in teachers), seeds, START_JSON)
    run_dirs = {arm: [run_arm(out, arm, s, spec, base) for s in seeds] for arm, spec in chosen.items()}
    ood = {arm: [final_ood_accuracy(d, chosen[arm], base, s) for d, s in zip(dirs, seeds)]
           for arm, dirs in run_dirs.items()}
    teacher_flops = teacher_building_flops(Path(args.teacher_costs), base["domains"]) if args.teacher_costs else None
    results = write_results(out, run_dirs, teacher_acc, start_acc, ood, teacher_flops)
    if args.docs:
        write_docs(Path(args.docs), [out, *sweep])
    return results


if __name__ == "__main__":
    main()
