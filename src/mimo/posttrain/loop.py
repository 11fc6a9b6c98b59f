"""`mimo rl` and `mimo mopd`: GRPO / MOPD on the toy tasks, strictly on-policy, with the engine as the rollout
worker. One loop for every method: a `Method` (from the config) says which engine samples each domain, which
rows the update trains on and with which objective; GRPO uses the outcome advantage alone, MOPD (mopd.py) adds
each domain's teacher, teacher-SFT (mopd.py, the SFT-on-teacher-samples baseline) samples from the teachers
and trains on their correct samples by cross-entropy.

One step (grpo.py has the objective):
1. the step's prompts (`rewards.step_examples`: a pure function of seed and step, domains shuffled
   together); rank r of W takes its contiguous 1/W of them;
2. G samples of each through the engine (MTP speculation on, per-sample seeds, processed log-probs and
   routed experts returned), scored by the exact-match verifiers; the student's engine, or for teacher-SFT
   the domain's teacher's;
3. group-normalised advantages; a batch the method cannot learn from is skipped (logged, no update): for
   GRPO one where no group has reward variance, for teacher-SFT one without a correct sample; the method
   scores the rollouts (MOPD: each teacher's forward over its domain's rows; teacher-SFT keeps the correct
   samples' rows);
4. one forward/backward over the rows with routing replay (the rollout's experts; not for teacher-SFT,
   whose samples carry the teacher's) and the MTP heads trained on them with the trunk detached, then one
   optimizer step (one update per rollout batch);
5. the new weights go into the engine (`LLM.update_weights`).
Every model call's FLOPs go into the ledger (flops.py). Greedy held-out accuracy every `eval_every` steps.
Checkpoints are atomic and `--resume` continues exactly: the prompts and the rollout seeds are functions of
the step, and the engine is rebuilt from the checkpoint's weights.

Under torchrun (FSDP2, gloo) every rank rolls out its own prompts with its own engine on the full weights;
groups never straddle ranks, so advantages need no communication; the objective's denominators and all
logged metrics are global.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimo import tasks as task_lib
from mimo.checkpoint import CheckpointError, load_model, save_model
from mimo.engine import LLM, SamplingParams
from mimo.engine.config import DEFAULT_MODEL
from mimo.model.config import ConfigError, ModelConfig
from mimo.model.moe import MoE
from mimo.train import checkpoint as ckpt_io
from mimo.train import parallel
from mimo.train.data import Batch, DataError, load_tokenizer
from mimo.train.loop import TrainError, read_metrics, stopped
from mimo.train.optim import param_groups
from mimo.train.step import LossFn, TrainingDiverged, forward_backward, optimizer_step

from . import flops as flop_lib
from . import grpo
from .rewards import DOMAINS, parse_domains, step_examples
from .rollout import Rollout, RolloutBatch, build_batch, generate_rollouts

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
CONFIG_FILE = "rl_config.json"


class RLConfigError(ValueError):
    """An RLConfig field has an invalid value; the message names the field."""


@dataclass(frozen=True)
class Method:
    """What a post-training method adds to the shared loop."""

    name: str  # the progress bar's label
    # (this rank's rollouts, their training rows with the outcome advantages [B]) -> (the rows the objective
    # trains on, model FLOPs spent scoring them on this rank)
    score: Callable[[RolloutBatch, Batch], tuple[Batch, int]]
    # (config, global rows, global response tokens, global MTP targets per head, MoE layer ids) -> the loss
    # function of the update (mimo.train.step.forward_backward)
    objective: Callable[[RLConfig, int, int, list[int], list[int]], LossFn]
    # global sums of the objective's metrics -> what the step logs beyond the common ones
    summarise: Callable[[dict[str, float]], dict[str, Any]]
    # (global groups without reward variance, groups, correct samples) -> why the step has nothing to learn
    # from (logged, no update), or None to update
    skip: Callable[[int, int, int], str | None]
    # the engine that samples each domain's prompts; None: the student's own (on-policy)
    samplers: Mapping[str, LLM] | None = None


def policy_gradient(advantage: grpo.TokenAdvantage, extra: grpo.ExtraTerm | None = None) -> Callable[..., LossFn]:
    """A Method's objective: grpo.py's policy-gradient loss with the per-token `advantage` (and `extra`)."""

    def objective(cfg: RLConfig, n_seqs: int, n_tokens: int, n_mtp_targets: list[int], moe_layers: list[int]
                  ) -> LossFn:
        return grpo.grpo_objective(n_seqs, n_mtp_targets, moe_layers, cfg.eps_low, cfg.eps_high, cfg.temperature,
                                   cfg.mtp_weight, cfg.routing_replay, advantage, extra)

    return objective


def without_reward_variance(n_flat: int, n_groups: int, n_correct: int) -> str | None:
    """GRPO's skip: it learns only from reward differences within a group."""
    return f"zero reward variance: all {n_groups} groups have equal rewards, no update" if n_flat == n_groups else None


GRPO = Method("rl", lambda rb, batch: (batch, 0), policy_gradient(grpo.outcome_advantage), lambda sums: {},
              without_reward_variance)


@dataclass(frozen=True)
class RLConfig:
    init_from: str = str(DEFAULT_MODEL)  # model directory (with tokenizer.json), run or checkpoint directory
    out: str = "runs/rl"
    domains: tuple[str, ...] = DOMAINS
    steps: int = 50
    prompts_per_step: int = 16  # global, over all ranks
    group_size: int = 8
    max_new_tokens: int = 40  # a reverse trace and answer take up to 29 tokens
    temperature: float = 1.0  # top-k / top-p stay off: the trainer's log-probs must be the sampler's
    # docs/results/rl-probes.md: on models/sft-start lr 1e-4 without warmup collapsed sort at the first update
    # (AdamW's first step moves every weight by about the LR); 1e-5 (no warmup) and 2e-5 (10 warmup steps)
    # did no damage
    lr: float = 2e-5
    warmup_steps: int = 10  # linear warmup, then constant
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eps_low: float = 0.5  # the IS mask band on pi_theta / mu (posttraining-notes §9.3)
    eps_high: float = 2.0
    mtp_weight: float = 0.1  # MTP heads trained on the rollouts, trunk detached (verl's default scale)
    num_speculative_tokens: int | None = None  # drafts per step at rollout; None = every MTP head
    routing_replay: bool = True
    eval_every: int = 10
    eval_n: int = 32  # held-out prompts per domain, greedy
    ckpt_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "domains", parse_domains(self.domains))
        except ValueError as e:
            raise RLConfigError(f"RLConfig.domains: {e}") from None
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "eval_every", "eval_n",
                     "ckpt_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RLConfigError(f"RLConfig.{name} must be a positive integer, got {v!r}")
        if self.group_size < 2:
            raise RLConfigError(f"RLConfig.group_size must be >= 2 (advantages compare samples), got "
                                f"{self.group_size}")
        for name in ("temperature", "lr", "grad_clip", "eps_high"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise RLConfigError(f"RLConfig.{name} must be a positive number, got {v!r}")
        if not 0 <= self.eps_low < 1 < self.eps_high:
            raise RLConfigError(f"RLConfig.eps_low / eps_high must satisfy 0 <= eps_low < 1 < eps_high, got "
                                f"{self.eps_low} / {self.eps_high}")
        if self.mtp_weight < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise RLConfigError("RLConfig.mtp_weight, weight_decay and warmup_steps must be >= 0")

    def replace(self, **kw: Any) -> RLConfig:
        return dataclasses.replace(self, **kw)

    def method(self, init: Path, tokenizer, student: ModelConfig) -> Method:
        """The method this config trains with, built at start-up (before anything is written) from the
        starting weights' directory, its tokenizer and model config."""
        return GRPO

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# named starting points; `debug` is the end-to-end smoke run (seconds on a CPU)
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "debug": dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8, eval_every=2, eval_n=2,
                  ckpt_every=1),
}


def preset(name: str, kind: type[RLConfig] = RLConfig, **overrides: Any) -> RLConfig:
    """A `kind` (RLConfig, or mopd.MOPDConfig) from a named preset and field overrides."""
    if name not in PRESETS:
        raise RLConfigError(f"unknown RL preset {name!r}; known presets: {', '.join(PRESETS)}")
    return kind(**{**PRESETS[name], **overrides})


# ---- pieces of a step ---------------------------------------------------------------------------------------

def sample_seed(seed: int, step: int, prompt_index: int) -> int:
    """Seed of a prompt's first sample (sample j uses it + j): a function of the run seed, the step and the
    prompt's index in the global batch, so neither the world size nor the batch composition changes it."""
    digest = hashlib.sha256(f"mimo.rl/{seed}/{step}/{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def moe_layer_ids(model: torch.nn.Module) -> list[int]:
    return sorted(m.layer_id for m in model.modules() if isinstance(m, MoE))


def rollout_engine(model: torch.nn.Module, tokenizer, cfg: RLConfig, world_size: int = 1) -> LLM:
    """The engine that samples a run's rollouts from `model` (the student's copy, or a teacher's)."""
    try:
        return LLM(model, tokenizer=tokenizer, num_speculative_tokens=cfg.num_speculative_tokens,
                   max_num_seqs=max(64, cfg.prompts_per_step // world_size * cfg.group_size),
                   max_model_len=128 + cfg.max_new_tokens, max_num_batched_tokens=2048, seed=cfg.seed)
    except ValueError as e:  # e.g. more drafts than the model has MTP heads
        raise TrainError(f"rollout engine: {e}") from None


def routed_rollouts(samplers: Mapping[str, LLM], tokenizer, examples: list[task_lib.Example], group_size: int,
                    seeds: list[int], max_tokens: int, temperature: float) -> tuple[RolloutBatch, int]:
    """`generate_rollouts` with each example sampled by its domain's engine (one call per engine, the rollouts
    back in the examples' order), and their FLOPs by the model that sampled them. A seeded sample depends on
    its own seed only, so how the examples split over engines does not change it."""
    by_engine: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_engine.setdefault(id(samplers[ex.task]), []).append(i)
    G = group_size
    groups: dict[int, list[Rollout]] = {}
    seconds, engine, spent = 0.0, {}, 0
    for idx in by_engine.values():
        llm = samplers[examples[idx[0]].task]
        rb = generate_rollouts(llm, tokenizer, [examples[i] for i in idx], G, [seeds[i] for i in idx], max_tokens,
                               temperature)
        for j, i in enumerate(idx):
            groups[i] = rb.rollouts[j * G:(j + 1) * G]
        seconds += rb.seconds
        engine = {k: engine.get(k, 0) + v for k, v in rb.engine.items()}
        spent += sum(flop_lib.rollout_flops(llm.model.config, len(r.prompt_ids), len(r.token_ids), r.num_drafted,
                                            r.num_accepted) for r in rb.rollouts)
    return RolloutBatch([r for i in range(len(examples)) for r in groups[i]], G, seconds, engine), spent


def update_on_rollouts(model, opt, sched, rb: RolloutBatch, cfg: RLConfig, step: int, pad_id: int,
                       world_size: int = 1, method: Method = GRPO) -> tuple[dict[str, Any], dict[str, float] | None]:
    """Steps 3-4 of the module docstring on this rank's rollouts. Returns (global metrics, the global FLOPs
    of scoring and update by ledger entry), or (metrics with "skipped" naming the reason, None) when there
    was no update. Raises TrainingDiverged before stepping on a NaN."""
    G = cfg.group_size
    rewards = rb.rewards
    adv = grpo.group_advantages(rewards, G)
    flat = parallel.all_reduce_sum(torch.tensor([int(grpo.zero_variance_groups(rewards, G).sum()),
                                                 rewards.numel() // G, int((rewards >= 1).sum())],
                                                dtype=torch.float64))
    n_flat, n_groups, n_correct = (int(x) for x in flat)
    m: dict[str, Any] = {"zero_variance_groups": n_flat}
    reason = method.skip(n_flat, n_groups, n_correct)
    if reason is not None:
        m["skipped"] = reason
        return m, None
    batch, teacher_flops = method.score(rb, build_batch(rb.rollouts, adv, pad_id))
    n_heads = model.n_mtp if cfg.mtp_weight > 0 else 0
    counts = torch.tensor([batch.input_ids.shape[0], int(batch.mask.sum())]
                          + [int(batch.mask[:, k + 1:].sum()) for k in range(n_heads)], dtype=torch.float64)
    counts = parallel.all_reduce_sum(counts)
    loss_fn = method.objective(cfg, int(counts[0]), int(counts[1]), [int(c) for c in counts[2:]],
                               moe_layer_ids(model))
    out = forward_backward(model, batch, loss_fn, world_size)
    keys = list(out.metrics)
    sums = parallel.all_reduce_sum(torch.stack([out.metrics[k] for k in keys]))
    s = dict(zip(keys, (float(x) for x in sums)))
    res = optimizer_step(model, opt, sched, s["objective"], cfg.grad_clip, step)
    tokens = max(s["tokens"], 1.0)
    m.update(loss=s["objective"], pg_loss=s["pg"], grad_norm=res["grad_norm"], lr=res["lr"],
             entropy=s["entropy"] / tokens, masked_fraction=1.0 - s["kept"] / tokens,
             kl_sampler_trainer=s["logp_diff"] / tokens, **method.summarise(s))
    if n_heads:
        m["mtp_loss"] = [s[f"mtp{k}"] / max(float(counts[2 + k]), 1.0) for k in range(n_heads)]
        m["mtp_acc"] = [s[f"mtp{k}_correct"] / max(float(counts[2 + k]), 1.0) for k in range(n_heads)]
    B, T = batch.input_ids.shape
    fwd, bwd = flop_lib.training_flops(model.config, B, T, n_heads)
    spent = parallel.all_reduce_sum(torch.tensor([fwd, bwd, teacher_flops], dtype=torch.float64)).tolist()
    return m, dict(zip(("logprob", "backward", "teacher"), spent))


def greedy_accuracy(llm: LLM, tokenizer, domains, n: int, seed: int, max_tokens: int, split: str = "heldout"
                    ) -> tuple[dict, int]:
    """Exact-match accuracy per domain on `split` (greedy, engine) and the FLOPs it took.

    No MTP drafts: greedy tokens do not depend on them, but how many drafts a greedy request makes follows the
    engine's acceptance calibration over its whole history, so with drafts the eval FLOPs after a `--resume`
    (a new engine) would differ from the uninterrupted run's."""
    examples = [ex for d in domains for ex in task_lib.generate_examples(d, n, split, seed)]
    outs = llm.generate([task_lib.prompt_ids(tokenizer, ex) for ex in examples],
                        SamplingParams(max_tokens=max_tokens, temperature=0), num_speculative_tokens=0)
    correct = dict.fromkeys(domains, 0)
    spent = 0
    for ex, o in zip(examples, outs):
        correct[ex.task] += task_lib.check(ex.task, task_lib.completion_text(tokenizer, o.token_ids), ex.answer)
        spent += flop_lib.rollout_flops(llm.model.config, len(o.prompt_token_ids), len(o.token_ids),
                                        o.metrics.num_drafted, o.metrics.num_accepted)
    return {d: correct[d] / n for d in domains}, spent


def _full_state_everywhere(model) -> dict[str, torch.Tensor]:
    """Unsharded weights on every rank (each rank's engine needs them)."""
    if not parallel.is_distributed():
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


# ---- logging ------------------------------------------------------------------------------------------------

def plot_curves(run_dir: str | Path) -> Path | None:
    rows = read_metrics(run_dir)
    train = [r for r in rows if "reward" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 6))
    steps = [r["step"] for r in train]
    axes[0, 0].plot(steps, [r["reward"] for r in train], label="mean reward (samples)")
    ev = [r for r in rows if "eval_accuracy" in r]
    for d in (ev[0]["eval_accuracy"] if ev else {}):
        axes[0, 0].plot([r["step"] for r in ev], [r["eval_accuracy"][d] for r in ev], "o-", label=f"greedy {d}")
    axes[0, 0].set_title("reward / held-out accuracy")
    upd = [r for r in train if "entropy" in r]
    axes[0, 1].plot([r["step"] for r in upd], [r["entropy"] for r in upd])
    axes[0, 1].set_title("entropy (nats/token)")
    axes[1, 0].plot([r["step"] for r in upd], [r["masked_fraction"] for r in upd])
    axes[1, 0].set_title("IS-masked token fraction")
    axes[1, 1].plot([r["flops"] for r in train], [r["reward"] for r in train])
    axes[1, 1].set_xscale("log")
    axes[1, 1].set_title("reward vs FLOPs")
    axes[0, 2].plot([r["step"] for r in upd], [r["grad_norm"] for r in upd])
    axes[0, 2].set_title("grad norm")
    axes[1, 2].plot([r["step"] for r in upd], [r["kl_sampler_trainer"] for r in upd], label="sampler || trainer")
    for d in (upd[0].get("reverse_kl_by_domain", {}) if upd else {}):  # MOPD: KL(student || routed teacher)
        axes[1, 2].plot([r["step"] for r in upd], [r["reverse_kl_by_domain"].get(d, math.nan) for r in upd],
                        label=f"student || teacher, {d}")
    axes[1, 2].set_title("k1 KL estimates (nats/token)")
    axes[1, 2].legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.set_xlabel("step" if ax is not axes[1, 1] else "FLOPs")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(Path(run_dir).name)
    # fixed margins: tight_layout was half of the ~1 s a plot took, and runs plot at every save
    fig.subplots_adjust(left=0.05, right=0.985, bottom=0.09, top=0.9, wspace=0.22, hspace=0.42)
    out = Path(run_dir) / PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---- the run ------------------------------------------------------------------------------------------------

def tokenizer_digest(d: Path) -> str:
    return hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest()


def model_dir(path: str | Path, flag: str) -> Path:
    """A model directory with tokenizer.json from a model, run or checkpoint directory (a run's latest
    checkpoint); TrainError naming `flag` (e.g. "--init-from") otherwise."""
    d = Path(path)
    if not d.is_dir():
        raise TrainError(f"{flag} {path}: no such directory")
    if ckpt_io.has_checkpoint(d):
        d = ckpt_io.find_checkpoint(d)
    if not (d / "tokenizer.json").is_file():
        raise TrainError(f"{flag} {d} has no tokenizer.json")
    return d


def run(cfg: RLConfig, resume: str | Path | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Train; returns a summary (final step, last metrics, checkpoint). `stop_after` ends early after that
    step with a checkpoint, as if killed there."""
    dist_info = parallel.init_distributed()
    W = dist_info.world_size
    if cfg.prompts_per_step % W:
        raise TrainError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the world size ({W})")
    out = Path(cfg.out)
    resume_dir = ckpt_io.find_checkpoint(resume) if resume is not None else None
    state = ckpt_io.load_train_state(resume_dir) if resume_dir is not None else None
    if resume_dir is None and ckpt_io.has_checkpoint(out):
        raise TrainError(f"{out} already holds checkpoints; pass --resume {out} to continue, or another --out")
    init = model_dir(cfg.init_from, "--init-from")
    try:
        tokenizer = load_tokenizer(init)
    except DataError as e:
        raise TrainError(str(e)) from None
    src = init
    if resume_dir is not None:
        if not (resume_dir / "tokenizer.json").is_file() or tokenizer_digest(resume_dir) != tokenizer_digest(init):
            raise ckpt_io.TrainCheckpointError(f"checkpoint {resume_dir} was written with a different tokenizer "
                                               f"than --init-from {cfg.init_from}")
        src = resume_dir
    try:
        model = load_model(src, dtype=torch.float32)
    except (CheckpointError, ConfigError, FileNotFoundError, OSError, RuntimeError) as e:
        raise ckpt_io.TrainCheckpointError(f"cannot load {src}: {str(e).splitlines()[0]}") from None
    if model.config.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"{src}: model vocab_size {model.config.vocab_size} is smaller than its tokenizer's "
                         f"{tokenizer.vocab_size} ids (a checkpoint of another tokenizer)")
    method = cfg.method(init, tokenizer, model.config)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    engine_model = copy.deepcopy(model)
    llm = rollout_engine(engine_model, tokenizer, cfg, W)
    samplers = method.samplers or dict.fromkeys(cfg.domains, llm)
    model = parallel.apply_parallelism(model, W)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
                                              if cfg.warmup_steps else 1.0)
    ledger = flop_lib.FlopLedger()
    start, totals = 0, {"rollout_tokens": 0, "rollout_seconds": 0.0}
    if state is not None:
        try:
            parallel.load_full_optimizer_state(model, opt, state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            ledger.load_state_dict(state["ledger"])
            totals = dict(state["totals"])
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ckpt_io.TrainCheckpointError(f"checkpoint {resume_dir} does not match this run: "
                                               f"{str(e).splitlines()[0]}") from None
        start = int(state["step"])
        if start > cfg.steps:
            raise TrainError(f"checkpoint is at step {start}, beyond --steps {cfg.steps}")
    out.mkdir(parents=True, exist_ok=True)
    if dist_info.is_main and state is not None:
        rows = [r for r in read_metrics(out) if r.get("step", 0) <= start]
        (out / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def save(step: int) -> Path | None:
        optim = parallel.full_optimizer_state(model, opt)
        path = None
        if dist_info.is_main:
            def write_model(d: Path) -> None:
                # the engine's copy holds the full weights after every update (also under FSDP)
                save_model(engine_model, d)
                tokenizer.save(d, model_max_length=model.config.max_position_embeddings)

            st = {"step": step, "optimizer": optim, "scheduler": sched.state_dict(), "ledger": ledger.state_dict(),
                  "totals": totals, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
            path = ckpt_io.save_checkpoint(out, step, write_model, st, {CONFIG_FILE: cfg.to_json_dict()},
                                           keep=cfg.keep_checkpoints)
            plot_curves(out)
        if parallel.is_distributed():
            torch.distributed.barrier()
        return path

    log = (out / METRICS_FILE).open("a") if dist_info.is_main else None
    bar = None
    if dist_info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=method.name, dynamic_ncols=True)
    per_rank = cfg.prompts_per_step // W
    last: dict[str, Any] = {}
    last_ckpt: Path | None = None
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    try:
        for step in range(start, end):
            examples = step_examples(cfg.domains, cfg.prompts_per_step, cfg.seed, step)
            lo = dist_info.rank * per_rank
            seeds = [sample_seed(cfg.seed, step, lo + i) for i in range(per_rank)]
            rb, spent = routed_rollouts(samplers, tokenizer, examples[lo:lo + per_rank], cfg.group_size, seeds,
                                        cfg.max_new_tokens, cfg.temperature)
            e = rb.engine
            glob = parallel.all_reduce_sum(torch.tensor(
                [spent, rb.rewards.sum(), float((rb.rewards >= 1).sum()), rb.rewards.numel(), rb.num_tokens,
                 e["accepted_tokens"], e["verify_steps"]], dtype=torch.float64)).tolist()
            ledger.add("rollout", glob[0])
            totals["rollout_tokens"] += int(glob[4])
            totals["rollout_seconds"] += rb.seconds
            m, spent_by_kind = update_on_rollouts(model, opt, sched, rb, cfg, step, tokenizer.pad_id, W, method)
            if spent_by_kind is not None:
                for kind, f in spent_by_kind.items():
                    ledger.add(kind, f)
                llm.update_weights(_full_state_everywhere(model) if W > 1 else model)
            done = step + 1
            row = {"step": done, "reward": glob[1] / glob[3], "accuracy": glob[2] / glob[3],
                   "response_tokens": glob[4] / glob[3], **m,
                   "rollout_tok_per_s": round(glob[4] / max(rb.seconds, 1e-9), 1),
                   "acceptance_length": 1.0 + glob[5] / glob[6] if glob[6] else 1.0}
            per_domain = torch.zeros(len(cfg.domains), 3, dtype=torch.float64)  # [reward sum, correct, samples]
            for r in rb.rollouts:
                per_domain[cfg.domains.index(r.example.task)] += torch.tensor([r.reward, float(r.reward >= 1), 1.0],
                                                                              dtype=torch.float64)
            per_domain = parallel.all_reduce_sum(per_domain)
            seen = [(i, d) for i, d in enumerate(cfg.domains) if per_domain[i, 2] > 0]
            row["reward_by_domain"] = {d: float(per_domain[i, 0] / per_domain[i, 2]) for i, d in seen}
            row["accuracy_by_domain"] = {d: float(per_domain[i, 1] / per_domain[i, 2]) for i, d in seen}
            if done % cfg.eval_every == 0 or done == cfg.steps:
                acc, spent = greedy_accuracy(llm, tokenizer, cfg.domains, cfg.eval_n, cfg.seed, cfg.max_new_tokens)
                ledger.add("eval", spent)
                row["eval_accuracy"] = acc
            row["flops"] = ledger.total
            row["flops_by_kind"] = dict(ledger.flops)
            row["time"] = round(time.time(), 2)
            last = row
            if log is not None:
                if "skipped" in row and bar is not None:
                    bar.write(f"step {done}: skipped ({row['skipped']})")
                log.write(json.dumps(row) + "\n")
                log.flush()
            if bar is not None:
                post = {"reward": f"{row['reward']:.2f}", "AL": f"{row['acceptance_length']:.2f}"}
                if "masked_fraction" in row:
                    post["masked"] = f"{row['masked_fraction']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if done % cfg.ckpt_every == 0 or done == end:
                last_ckpt = save(done)
    except TrainingDiverged as e:
        raise stopped(e, out) from None
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    # the curves were drawn by the last save (every run saves at its end step, after logging it)
    return {"step": end, "checkpoint": str(last_ckpt) if last_ckpt else None, "last": last,
            "flops": ledger.total, "model": model, "tokenizer": tokenizer}
