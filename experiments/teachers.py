"""The teachers' report (issue 9 §5), written by code from their runs: a teacher is an optional domain SFT
stage (`mimo sft --recipe teacher-sft --stage D`) followed by GRPO (`mimo rl --domains D`). Each GRPO run's
final model is exported (bf16) to EXPORT/DOMAIN with a model card, and the exported teachers (what MOPD loads)
are evaluated next to the start on every domain, held-out and OOD (greedy, engine), their rollouts timed with
MTP drafts on and off, and their curves plotted over both stages.

    python -m experiments.teachers --start models/sft-start --teacher sort=runs/teach/sort
        [--sft sort=runs/teacher-sft/sort] ... [--export models/teachers] [--out docs/results] [--eval-n 300]

A teacher may also be given as its exported model directory (`--teacher add=models/teachers/add`), for one
whose runs were not kept: it is evaluated and timed again, and what only its runs could tell (curves, costs,
command) is taken from that domain's entry of the previous OUT/teachers.json if that entry describes the same
weights (the digest of model.safetensors), else reported as unknown. So the report can grow a teacher at a
time across sessions without keeping every run directory.

Curves: the own-domain greedy held-out accuracy of the start, of every SFT checkpoint (evaluated here) and at
every GRPO evaluation (the run's own), against cumulative FLOPs (SFT: `flops.training_flops` of each step's
padded batch, evaluations not counted; GRPO: its ledger, evaluations included) and training wall time.

Writes OUT/teachers.md, OUT/teachers.json and OUT/teachers-curves.png. Rollout timing: the teacher's own
domain, one rollout batch as `mimo rl` makes it (the default preset: 16 prompts x 8 samples at temperature 1),
drafts on (every MTP head, adaptive) and off alternately, after one warm-up batch of each; the figure is the
median over rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from mimo.checkpoint import load_model, save_model
from mimo.cli.train import teacher_arg
from mimo.engine import LLM
from mimo.model.config import ModelConfig
from mimo.posttrain import flops as flop_lib
from mimo.posttrain import loop
from mimo.posttrain.rewards import step_examples
from mimo.posttrain.rollout import generate_rollouts
from mimo.tasks import MAX_NEW_TOKENS, TASKS
from mimo.train import checkpoint as ckpt_io
from mimo.train.data import load_tokenizer
from mimo.train.export import MODEL_FILES
from mimo.train.loop import read_metrics

REPORT_MD, REPORT_JSON, CURVES_PNG = "teachers.md", "teachers.json", "teachers-curves.png"


def export_teacher(run_dir: Path, dest: Path, domain: str, sft_dir: Path | None = None) -> Path:
    """The run's last checkpoint as a bf16 model directory with a model card naming its SFT stage (if any)
    and its RL settings."""
    ckpt = ckpt_io.find_checkpoint(run_dir)
    cfg = json.loads((ckpt / loop.CONFIG_FILE).read_text())
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(load_model(ckpt, dtype=torch.float32), tmp, dtype=torch.bfloat16)
    for f in MODEL_FILES[2:]:  # the tokenizer files
        shutil.copyfile(ckpt / f, tmp / f)
    step = int(ckpt_io.load_train_state(ckpt)["step"])
    origin = f"`{cfg['init_from']}`"
    if sft_dir is not None:
        sft = json.loads((ckpt_io.find_checkpoint(sft_dir) / "train_config.json").read_text())
        origin = (f"a domain SFT stage ({sft['recipe']} stage `{domain}`: {sft['steps']} steps on `{domain}` "
                  f"conversations from `{sft['init_from']}`)")
    (tmp / "README.md").write_text(
        f"# {domain} teacher\n\nGRPO (`mimo rl`) on `{domain}` prompts for {step} steps from {origin}, "
        f"stored in bfloat16 (router weights float32). Measured figures: docs/results/teachers.md.\n\n"
        f"RL settings (`{loop.CONFIG_FILE}` of the run):\n\n```json\n{json.dumps(cfg, indent=2)}\n```\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def weights_digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def is_run(path: Path) -> bool:
    try:
        ckpt_io.find_checkpoint(path)
    except ckpt_io.TrainCheckpointError:
        return False
    return True


def evaluate(model_dir: Path, n: int) -> dict[str, dict[str, float]]:
    tok = load_tokenizer(model_dir)
    llm = LLM(load_model(model_dir, dtype=torch.float32), tokenizer=tok, max_model_len=128 + MAX_NEW_TOKENS,
              max_num_batched_tokens=2048)
    return {"heldout": loop.greedy_accuracy(llm, tok, TASKS, n, 0, MAX_NEW_TOKENS)[0],
            "ood": loop.greedy_accuracy(llm, tok, TASKS, n, 0, MAX_NEW_TOKENS, split="ood")[0]}


def rollout_timing(model_dir: Path, domain: str, preset: str = "default", rounds: int = 3) -> dict[str, float]:
    """Tokens/s of one rollout batch of the `preset` with drafts on and off (interleaved; medians)."""
    tok = load_tokenizer(model_dir)
    cfg = loop.preset(preset, init_from=str(model_dir), domains=(domain,))
    llm = LLM(load_model(model_dir, dtype=torch.float32), tokenizer=tok, max_num_seqs=cfg.prompts_per_step *
              cfg.group_size, max_model_len=128 + cfg.max_new_tokens, max_num_batched_tokens=2048, seed=0)
    examples = step_examples(cfg.domains, cfg.prompts_per_step, 0, 0)
    seeds = [loop.sample_seed(0, 0, i) for i in range(len(examples))]
    rate: dict[str, list[float]] = {"on": [], "off": []}
    accepted = []
    for r in range(rounds + 1):
        for mode, drafts in (("on", None), ("off", 0)):
            rb = generate_rollouts(llm, tok, examples, cfg.group_size, seeds, cfg.max_new_tokens, cfg.temperature,
                                   drafts=drafts)
            if r:  # round 0 warms up (and calibrates adaptive drafting)
                rate[mode].append(rb.num_tokens / rb.seconds)
                if mode == "on":
                    accepted.append(1 + rb.engine["accepted_tokens"] / max(rb.engine["verify_steps"], 1))
    on, off = statistics.median(rate["on"]), statistics.median(rate["off"])
    # the machine is shared: the 1-minute load average (2 = both cores of this machine busy) says how much
    return {"tok_per_s_mtp_on": on, "tok_per_s_mtp_off": off, "speedup": on / off,
            "acceptance_length": statistics.median(accepted), "load_average": os.getloadavg()[0]}


def rl_command(cfg: dict[str, Any]) -> str:
    """The `mimo rl` command line of a run's saved config: the flags that differ from the defaults."""
    default = json.loads(json.dumps(loop.RLConfig(init_from=cfg["init_from"]).to_json_dict()))
    flags = {"init_from": "--init-from", "domains": "--domains", "num_speculative_tokens": "--drafts"}
    parts = ["mimo rl"]
    for k, v in cfg.items():
        if k in ("out", "progress") or (v == default.get(k) and k != "init_from"):
            continue
        v = ",".join(v) if k == "domains" else v
        parts.append(f"{flags.get(k, '--' + k.replace('_', '-'))} {v}")
    return " ".join(parts)


def _wall_hours(rows: list[dict[str, Any]]) -> list[float]:
    """Hours at the end of each logged step, from the end of step 1 plus one median step (so a 1-step run is
    not free); resumption gaps removed: a step longer than 10x the median counts as the median."""
    steps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    med = statistics.median(steps) if steps else 0.0
    wall, t = [med / 3600], med
    for dt in steps:
        t += med if dt > 10 * med else dt
        wall.append(t / 3600)
    return wall


def sft_curve(sft_dir: Path, domain: str, n: int) -> dict[str, list[float]]:
    """Own-domain greedy held-out accuracy of each checkpoint of a domain SFT run, with the run's cumulative
    training FLOPs and wall time at that step."""
    rows = [r for r in read_metrics(sft_dir) if "tokens" in r]  # training steps (not validation rows)
    cfg = json.loads((ckpt_io.find_checkpoint(sft_dir) / "train_config.json").read_text())
    mc = ModelConfig.from_pretrained(ckpt_io.find_checkpoint(sft_dir))
    B, flops, total = cfg["batch_size"], [], 0
    for r in rows:  # tokens = the padded [B, T] rows of the step (no code rows in teacher-sft)
        total += sum(flop_lib.training_flops(mc, B, r["tokens"] // B, mc.n_mtp_layers))
        flops.append(total)
    wall = _wall_hours(rows)
    at = {r["step"]: i for i, r in enumerate(rows)}
    out: dict[str, list[float]] = {"step": [], "flops": [], "hours": [], "accuracy": []}
    for ck in sorted((sft_dir / "checkpoints").glob("step_*")):
        step = int(ck.name.split("_")[1])
        tok = load_tokenizer(ck)
        llm = LLM(load_model(ck, dtype=torch.float32), tokenizer=tok, max_model_len=160, max_num_batched_tokens=2048)
        out["step"].append(step)
        out["flops"].append(flops[at[step]])
        out["hours"].append(wall[at[step]])
        out["accuracy"].append(loop.greedy_accuracy(llm, tok, (domain,), n, 0, loop.RLConfig.max_new_tokens)[0][domain])
    return out


def curves(run_dir: Path, domain: str) -> dict[str, list[float]]:
    """Greedy held-out accuracy of the run's own evaluations against its ledger's FLOPs and wall time."""
    rows = read_metrics(run_dir)
    ev = [(r, w) for r, w in zip(rows, _wall_hours(rows)) if "eval_accuracy" in r]
    return {"step": [r["step"] for r, _ in ev], "flops": [r["flops"] for r, _ in ev],
            "hours": [w for _, w in ev], "accuracy": [r["eval_accuracy"][domain] for r, _ in ev]}


def joined(start_acc: float, sft: dict[str, list[float]] | None, rl: dict[str, list[float]]) -> dict[str, list]:
    """The whole teacher's curve: the start at 0, the SFT checkpoints, then GRPO offset by the SFT totals."""
    stage = ["start"]
    out = {"flops": [0.0], "hours": [0.0], "accuracy": [start_acc]}
    f0 = h0 = 0.0
    if sft is not None:
        for k in out:
            out[k] += sft[k]
        stage += ["sft"] * len(sft["step"])
        f0, h0 = sft["flops"][-1], sft["hours"][-1]
    out["flops"] += [f0 + f for f in rl["flops"]]
    out["hours"] += [h0 + h for h in rl["hours"]]
    out["accuracy"] += rl["accuracy"]
    stage += ["rl"] * len(rl["step"])
    return {**out, "stage": stage}


def plot(curve: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for d, c in curve.items():
        for ax, x in zip(axes, ("flops", "hours")):
            line, = ax.plot(c[x], c["accuracy"], "-", label=d)
            for stage, marker in (("start", "s"), ("sft", "o"), ("rl", "^")):
                pts = [(v, a) for v, a, s in zip(c[x], c["accuracy"], c["stage"]) if s == stage]
                ax.plot([v for v, _ in pts], [a for _, a in pts], marker, color=line.get_color())
    for ax, x in zip(axes, ("FLOPs (o domain SFT, ^ GRPO)", "training wall time (hours, 1 thread)")):
        ax.set_xlabel(x)
        ax.set_ylabel("greedy held-out accuracy (own domain)")
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        if curve:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, start: Path, report: dict[str, Any]) -> None:
    def row(name: str, acc: dict[str, dict[str, float]]) -> str:
        return (f"| {name} | " + " | ".join(f"{acc['heldout'][t]:.2f}" for t in TASKS) + " | "
                + " | ".join(f"{acc['ood'][t]:.2f}" for t in TASKS) + " |")

    lines = ["# Teachers (generated by experiments/teachers.py)", "",
             f"One GRPO teacher per domain (`mimo rl --domains D`). Greedy exact-match accuracy through the engine "
             f"on {report['eval_n']} prompts per task (seed 0), held-out and OOD; the teachers as exported (bf16).",
             "Target: held-out greedy accuracy at least 0.9 on the teacher's own domain.", "",
             "| model | " + " | ".join(f"held-out {t}" for t in TASKS) + " | " + " | ".join(f"OOD {t}" for t in TASKS)
             + " |", "|---" * (1 + 2 * len(TASKS)) + "|", row(f"start (`{start}`)", report["start"])]
    for d, t in report["teachers"].items():
        lines.append(row(f"{d} teacher", t["accuracy"]))
    lines += ["", "Commands (`OMP_NUM_THREADS=1`, `--threads 1`; the flags that differ from `mimo rl`'s defaults):", ""]
    for d, t in report["teachers"].items():
        if t["command"] is None:
            lines.append(f"- {d}: its runs were not kept (how it was made: its model card)")
            continue
        if t["sft_curve"]:
            lines.append(f"- {d}: `mimo sft --recipe teacher-sft --stage {d}`, then")
        lines.append(f"- {d}: `{t['command']}`")
    lines += ["", "| teacher | own domain: start -> after SFT -> teacher | target 0.9 | SFT steps / FLOPs / hours | "
              "GRPO steps / FLOPs / hours | rollout tok/s MTP on / off | ratio | acceptance length | load average |",
              "|---" * 9 + "|"]
    for d, t in report["teachers"].items():
        c, r, s_ = t["rl_curve"], t["rollouts"], t["sft_curve"]
        own = t["accuracy"]["heldout"][d]
        after_sft = f"{s_['accuracy'][-1]:.2f}" if s_ else "-"
        sft_cost = f"{s_['step'][-1]} / {s_['flops'][-1]:.3g} / {s_['hours'][-1]:.2f}" if s_ else "-"
        rl_cost = f"{c['step'][-1]} / {c['flops'][-1]:.3g} / {c['hours'][-1]:.2f}" if c else "-"
        lines.append(f"| {d} | {report['start']['heldout'][d]:.2f} -> {after_sft} -> {own:.2f} | "
                     f"{'met' if own >= 0.9 else 'NOT met'} | {sft_cost} | {rl_cost} | "
                     f"{r['tok_per_s_mtp_on']:.0f} / {r['tok_per_s_mtp_off']:.0f} | "
                     f"{r['speedup']:.2f} | {r['acceptance_length']:.2f} | {r['load_average']:.1f} |")
    lines += ["", f"![accuracy against FLOPs and wall time]({CURVES_PNG})", ""]
    (out / REPORT_MD).write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", required=True, help="the model the teachers started from")
    p.add_argument("--teacher", type=teacher_arg, action="append", required=True, metavar="DOMAIN=RUN_DIR",
                   help="the domain's GRPO run")
    p.add_argument("--sft", type=teacher_arg, action="append", default=[], metavar="DOMAIN=RUN_DIR",
                   help="the domain SFT run the GRPO run started from, if any")
    p.add_argument("--export", default="models/teachers")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--eval-n", type=int, default=300)
    p.add_argument("--preset", default="default", help="RL preset whose rollout batch is timed (debug: smoke run)")
    p.add_argument("--rounds", type=int, default=3, help="timed rollout batches per mode")
    args = p.parse_args(argv)
    out, start = Path(args.out), Path(args.start)
    out.mkdir(parents=True, exist_ok=True)
    sfts = dict(args.sft)
    previous = json.loads((out / REPORT_JSON).read_text())["teachers"] if (out / REPORT_JSON).is_file() else {}
    report: dict[str, Any] = {"eval_n": args.eval_n, "start": evaluate(start, args.eval_n), "teachers": {}}
    for d, source in args.teacher:
        if is_run(Path(source)):
            dest = export_teacher(Path(source), Path(args.export) / d, d, Path(sfts[d]) if d in sfts else None)
            cfg = json.loads((ckpt_io.find_checkpoint(source) / loop.CONFIG_FILE).read_text())
            sft = sft_curve(Path(sfts[d]), d, args.eval_n) if d in sfts else None
            runs = {"run": source, "sft_run": sfts.get(d), "command": rl_command(cfg), "sft_curve": sft,
                    "rl_curve": curves(Path(source), d), "weights_digest": weights_digest(dest)}
        else:
            dest = Path(source)
            if not (dest / "model.safetensors").is_file():
                raise SystemExit(f"--teacher {d}={source}: neither a run nor a model directory")
            digest, prior = weights_digest(dest), previous.get(d, {})
            same = prior.get("weights_digest") == digest
            runs = {k: prior.get(k) if same else None for k in ("run", "sft_run", "command", "sft_curve", "rl_curve")}
            runs["weights_digest"] = digest
        t = {**runs, "accuracy": evaluate(dest, args.eval_n),
             "rollouts": rollout_timing(dest, d, args.preset, args.rounds)}
        if t["rl_curve"] is not None:
            t["curve"] = joined(report["start"]["heldout"][d], t["sft_curve"], t["rl_curve"])
        report["teachers"][d] = t
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    plot({d: t["curve"] for d, t in report["teachers"].items() if "curve" in t}, out / CURVES_PNG)
    write_report(out, start, report)
    return report


if __name__ == "__main__":
    main()
