"""The training loop shared by every stage: `train_step()`, `evaluate()`, `run(cfg)`; the step itself is
`step.forward_backward` with the objective below (`lm_objective`) and `step.optimizer_step`.

Objective of one optimizer step (sums over the global batch, divided by global counts; losses.py):

    loss = lm_w * CE_main + w_mtp(step) * mean_k CE_mtp_k + aux_coef * mean_layers L_seq_aux

- lm_w = 1, except with `freeze_trunk` (MTP stage): 0, and the MTP term has weight 1;
- SFT with `code_fraction` c: (1 - c) * [the above on assistant tokens] + c * [the above on one packed code
  micro-batch], so plain code keeps a fixed share of the gradient however few assistant tokens there are;
- after the optimizer step each MoE layer's `e_score_correction_bias` moves by `bias_update_rate` towards
  balance (aux-loss-free balancing) from the expert ids recorded during the step, summed over all ranks.

A non-finite loss or gradient norm stops the run before the optimizer step (`TrainingDiverged`); the last
checkpoint written stays the newest. Everything that is logged is a global quantity, identical on every rank
and for every (world size, grad_accum) split of the same global batch.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from mimo.checkpoint import CheckpointError, load_model, load_weights, save_model
from mimo.model import ModelConfig, Transformer, init_weights
from mimo.model.config import ConfigError
from mimo.model.moe import MoE

from . import checkpoint as ckpt_io
from . import losses, parallel
from .config import TrainConfig
from .data import Batch, DataError, StageData, build_corpus, load_tokenizer, train_tokenizer
from .mtp import copy_mtp_heads, freeze_trunk
from .optim import build_optimizer, build_scheduler
from .step import LossFn, LossOutput, TrainingDiverged, forward_backward, optimizer_step

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


class TrainError(ValueError):
    """Bad input to a training run (paths, configs, checkpoints); the message is one line for the user."""


# ---- model ------------------------------------------------------------------------------------------------

def moe_routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    return {m.layer_id: m.gate for m in model.modules() if isinstance(m, MoE)}


def expected_model_config(cfg: TrainConfig, tokenizer) -> ModelConfig:
    """The architecture this config trains (before any weights are loaded)."""
    try:
        if cfg.init_from is not None:
            mc = ModelConfig.from_pretrained(cfg.init_from)
        elif Path(cfg.model).is_dir():
            mc = ModelConfig.from_pretrained(cfg.model).replace(**cfg.model_overrides)
        else:
            mc = ModelConfig.from_preset(cfg.model).replace(**cfg.model_overrides)
    except (ConfigError, FileNotFoundError, TypeError) as e:
        raise TrainError(f"model config: {e}") from None
    mc = mc.replace(n_mtp_layers=cfg.n_mtp_heads, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                    bos_token_id=None)
    if mc.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"model vocab_size {mc.vocab_size} is smaller than the tokenizer's vocabulary "
                         f"({tokenizer.vocab_size} ids); use a model with vocab_size >= {tokenizer.vocab_size}")
    return mc


def build_model(cfg: TrainConfig, mc: ModelConfig) -> Transformer:
    """Fresh (pretrain) or from `init_from`, with `cfg.n_mtp_heads` heads (head 0 copied if needed)."""
    if cfg.init_from is None:
        model = Transformer(mc)
        init_weights(model, seed=cfg.seed)
        return model
    try:
        model = load_model(cfg.init_from, dtype=torch.float32)
    except (CheckpointError, ConfigError, FileNotFoundError, OSError) as e:
        raise TrainError(f"--init-from {cfg.init_from}: {e}") from None
    if model.n_mtp == cfg.n_mtp_heads:
        pass
    elif cfg.n_mtp_heads == 0:
        trunk = Transformer(model.config.replace(n_mtp_layers=0))
        trunk.load_state_dict({k: v for k, v in model.state_dict().items() if ".mtp." not in k})
        model = trunk
    elif model.n_mtp == 0 or model.n_mtp > cfg.n_mtp_heads:
        raise TrainError(f"--init-from {cfg.init_from} has {model.n_mtp} MTP heads; this stage trains "
                         f"{cfg.n_mtp_heads} (it can only copy head 0 to more heads)")
    else:
        model = copy_mtp_heads(model, cfg.n_mtp_heads)
    model.config = mc
    return model


def _plain_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Transformer:
    """A single-device model holding the full state (for save_model under FSDP)."""
    plain = Transformer(model.config)
    plain.load_state_dict(state, strict=True)
    return plain


# ---- one step ---------------------------------------------------------------------------------------------

class RoutingRecord:
    """Duck-typed `mimo.model.moe.Routing(record=True)`. Not a dataclass on purpose: FSDP2's pre-forward
    hooks rebuild dataclass arguments (to move their tensors), so a real `Routing` passed to a sharded block
    would record into a copy and the trainer would never see the expert ids."""

    def __init__(self) -> None:
        self.record = True
        self.replay = None
        self.ids: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}


def _forward(model, batch: Batch, n_heads: int, routing):
    if n_heads > 0:
        logits, mtp_logits = model(batch.input_ids, return_mtp=True, routing=routing)
        return logits, mtp_logits[:n_heads]
    return model(batch.input_ids, routing=routing), []


def _aux_sum(routing: RoutingRecord | None, B: int, T: int) -> torch.Tensor:
    if routing is None or not routing.ids:
        return torch.zeros(())
    terms = [losses.seq_aux_loss_sum(routing.scores[l], routing.ids[l], B, T) for l in routing.ids]
    return torch.stack(terms).mean()


def lm_objective(n_heads: int, lm_w: float, mtp_w: float, aux_coef: float, counts: torch.Tensor,
                 group_w: float, routers: bool) -> LossFn:
    """The LM objective of the module docstring for one group of micro-batches, as a loss function.

    counts: this group's global denominators [lm targets, mtp targets per head..., sequences]. Pretraining
    (lm_w 1), the MTP stage (lm_w 0, mtp_w 1, frozen trunk) and SFT (masked labels, group_w = 1 - c for the
    conversations and c for the code micro-batch) are all this function with different weights."""

    def loss_fn(model, b: Batch) -> LossOutput:
        routing = RoutingRecord() if routers else None
        logits, mtp_logits = _forward(model, b, n_heads, routing)
        lm = losses.masked_ce_sum(logits, b.labels, b.mask)
        mtp = [losses.masked_ce_sum(mtp_logits[k], *losses.mtp_labels(b.labels, b.mask, k)) for k in range(n_heads)]
        aux = _aux_sum(routing, *b.input_ids.shape)
        obj = lm_w * lm / counts[0] + aux * (aux_coef / counts[-1] if routers else 0.0)
        if n_heads:
            obj = obj + mtp_w * sum(m / counts[1 + k] for k, m in enumerate(mtp)) / n_heads
        obj = obj * group_w
        with torch.no_grad():
            metrics = {"lm": lm, "lm_correct": losses.masked_correct(logits, b.labels, b.mask)}
            for k in range(n_heads):
                metrics[f"mtp{k}"] = mtp[k]
            for k in range(n_heads):
                metrics[f"mtp{k}_correct"] = losses.masked_correct(mtp_logits[k],
                                                                   *losses.mtp_labels(b.labels, b.mask, k))
            metrics.update(aux=aux, objective=obj)
        return LossOutput(obj, metrics, routing.ids if routing is not None else {})

    return loss_fn


def stopped(e: TrainingDiverged, out: Path) -> TrainingDiverged:
    """The error a diverged run ends with: what went wrong and which checkpoint is the last good one."""
    where = ckpt_io.find_checkpoint(out) if ckpt_io.has_checkpoint(out) else None
    kept = f"; last good checkpoint: {where}" if where else "; no checkpoint was written yet"
    return TrainingDiverged(f"{e}: training stopped{kept}")


def train_step(model, opt, sched, micro: list[Batch], cfg: TrainConfig, step: int,
               code: Batch | None = None, world_size: int = 1) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches (and the SFT code micro-batch); returns global
    metrics. Raises TrainingDiverged (before stepping) on a non-finite loss or gradient norm."""
    n_heads = cfg.n_mtp_heads
    routers = {} if cfg.freeze_trunk else moe_routers(model)
    groups = [("main", micro)] + ([("code", [code])] if code is not None else [])
    group_w = {"main": 1.0 - cfg.code_fraction, "code": cfg.code_fraction} if code is not None else {"main": 1.0}
    lm_w = 0.0 if cfg.freeze_trunk else 1.0
    mtp_w = 1.0 if cfg.freeze_trunk else cfg.mtp_weight(step)

    # global denominators: [lm targets, mtp targets per head, sequences] per group, summed over ranks
    counts = torch.tensor([[sum(b.n_targets(0) for b in bs)] + [sum(b.n_targets(k + 1) for b in bs)
                                                                for k in range(n_heads)]
                           + [sum(b.input_ids.shape[0] for b in bs)] for _, bs in groups], dtype=torch.float64)
    counts = parallel.all_reduce_sum(counts).clamp_min(1.0)

    # metric sums per group: [lm CE, lm correct, mtp CE per head, mtp correct per head, aux, objective]
    sums = torch.zeros(len(groups), 2 + 2 * n_heads + 2, dtype=torch.float64)
    loads = {l: torch.zeros(r.weight.shape[0], dtype=torch.float64) for l, r in routers.items()}
    for gi, (gname, bs) in enumerate(groups):
        loss_fn = lm_objective(n_heads, lm_w, mtp_w, cfg.aux_loss_coef, counts[gi], group_w[gname], bool(routers))
        for b in bs:
            out = forward_backward(model, b, loss_fn, world_size)
            sums[gi] += torch.stack(list(out.metrics.values()))
            for l, ids in out.expert_ids.items():
                loads[l] += losses.expert_counts(ids, loads[l].shape[0]).double()
    sums = parallel.all_reduce_sum(sums)
    objective = float(sums[:, -1].sum())
    res = optimizer_step(model, opt, sched, objective, cfg.grad_clip, step, routers, loads, cfg.bias_update_rate)

    m: dict[str, Any] = {"step": step + 1, "loss": objective, "lr": res["lr"], "mtp_weight": mtp_w,
                         "grad_norm": res["grad_norm"]}
    for gi, (gname, _) in enumerate(groups):
        s, c = sums[gi], counts[gi]
        prefix = "" if gname == "main" else "code_"
        m[prefix + "lm_loss"] = float(s[0] / c[0])
        m[prefix + "lm_acc"] = float(s[1] / c[0])
        if n_heads:
            m[prefix + "mtp_loss"] = [float(s[2 + k] / c[1 + k]) for k in range(n_heads)]
            m[prefix + "mtp_acc"] = [float(s[2 + n_heads + k] / c[1 + k]) for k in range(n_heads)]
        if routers:
            m[prefix + "aux_loss"] = float(s[-2] / c[-1])
    if routers:
        m["load_max_mean"] = {str(l): round(v, 4) for l, v in losses.load_imbalance(loads).items()}
    m["tokens"] = int(sum(b.input_ids.numel() for _, bs in groups for b in bs)) * world_size
    return m


@torch.no_grad()
def evaluate(model, batches: list[Batch], n_heads: int) -> dict[str, Any]:
    """Validation loss and top-1 accuracy of the main head and each MTP head (over loss-carrying tokens).
    Every rank evaluates the same batches, so no reduction is needed."""
    was_training = model.training
    model.eval()
    lm = correct = n = 0.0
    mtp = [0.0] * n_heads
    mtp_correct = [0.0] * n_heads
    mtp_n = [0.0] * n_heads
    for b in batches:
        logits, mtp_logits = _forward(model, b, n_heads, None)
        lm += float(losses.masked_ce_sum(logits, b.labels, b.mask))
        correct += float(losses.masked_correct(logits, b.labels, b.mask))
        n += b.n_targets(0)
        for k in range(n_heads):
            lab, mask = losses.mtp_labels(b.labels, b.mask, k)
            mtp[k] += float(losses.masked_ce_sum(mtp_logits[k], lab, mask))
            mtp_correct[k] += float(losses.masked_correct(mtp_logits[k], lab, mask))
            mtp_n[k] += b.n_targets(k + 1)
    model.train(was_training)
    out: dict[str, Any] = {"val_loss": lm / max(n, 1), "val_acc": correct / max(n, 1)}
    if n_heads:
        out["val_mtp_loss"] = [mtp[k] / max(mtp_n[k], 1) for k in range(n_heads)]
        out["val_mtp_acc"] = [mtp_correct[k] / max(mtp_n[k], 1) for k in range(n_heads)]
    return out


# ---- logging ----------------------------------------------------------------------------------------------

def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / METRICS_FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they belong to the interrupted tail)."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_curves(run_dir: str | Path) -> Path | None:
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"], r.get("lm_loss")) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _, _ in train], [x for _, x, _ in train], lw=0.8, label="train objective")
    if any(lm is not None for _, _, lm in train):
        ax.plot([s for s, _, _ in train], [lm for _, _, lm in train], lw=0.8, alpha=0.7, label="train lm loss")
    if val:
        ax.plot([s for s, _ in val], [x for _, x in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(run_dir).name)
    out = Path(run_dir) / PLOT_FILE
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---- the run ----------------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])


def _resolve_tokenizer(cfg: TrainConfig, resume_dir: Path | None, corpus, out: Path, dist_info, vocab: int):
    if resume_dir is not None:
        return load_tokenizer(resume_dir)
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    if cfg.init_from is not None:
        if not (Path(cfg.init_from) / "tokenizer.json").is_file():
            raise TrainError(f"--init-from {cfg.init_from} has no tokenizer.json; give TrainConfig.tokenizer")
        return load_tokenizer(cfg.init_from)
    tok_dir = out / "tokenizer"
    if dist_info.is_main:
        train_tokenizer(corpus, cfg, vocab).save(tok_dir)
    if parallel.is_distributed():
        torch.distributed.barrier()
    return load_tokenizer(tok_dir)


def run(cfg: TrainConfig, resume: str | Path | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Train one stage; returns a summary (final step, validation metrics, checkpoint directory).

    `stop_after` ends the run early after that step, with a checkpoint, as if it had been killed there; the
    LR and MTP-weight schedules still span `cfg.steps`, so `--resume` continues the same run."""
    dist_info = parallel.init_distributed()
    out = Path(cfg.out)
    resume_dir = ckpt_io.find_checkpoint(resume) if resume is not None else None
    state = ckpt_io.load_train_state(resume_dir) if resume_dir is not None else None
    if resume_dir is None and ckpt_io.has_checkpoint(out):
        raise TrainError(f"{out} already holds checkpoints; pass --resume {out} to continue, or another --out")
    if cfg.init_from is not None:
        if not Path(cfg.init_from).is_dir():
            raise TrainError(f"--init-from {cfg.init_from}: no such directory")
        if ckpt_io.has_checkpoint(cfg.init_from):
            # a run directory: start from its latest checkpoint
            cfg = cfg.replace(init_from=str(ckpt_io.find_checkpoint(cfg.init_from)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    try:
        corpus = build_corpus(cfg) if (cfg.stage != "sft" or cfg.code_fraction > 0 or
                                       (cfg.tokenizer is None and cfg.init_from is None and resume is None)) \
            else None
        out.mkdir(parents=True, exist_ok=True)
        vocab_hint = ModelConfig.from_preset(cfg.model).vocab_size if cfg.model in _presets() else 4096
        tokenizer = _resolve_tokenizer(cfg, resume_dir, corpus, out, dist_info, vocab_hint)
    except DataError as e:
        raise TrainError(str(e)) from None
    mc = expected_model_config(cfg, tokenizer)

    if resume_dir is not None:
        try:
            saved = ModelConfig.from_pretrained(resume_dir)
        except (ConfigError, FileNotFoundError) as e:
            raise ckpt_io.TrainCheckpointError(f"corrupt checkpoint {resume_dir}: {e}") from None
        if saved.replace(n_mtp_layers=mc.n_mtp_layers) != mc:
            diff = next(k for k in mc.__dataclass_fields__ if getattr(saved, k) != getattr(mc, k))
            raise ckpt_io.TrainCheckpointError(
                f"checkpoint {resume_dir} does not match this run: {diff} is {getattr(saved, diff)!r} there, "
                f"{getattr(mc, diff)!r} here")
        with torch.device("meta"):
            model = Transformer(mc)
        try:
            load_weights(model, resume_dir, dtype=torch.float32)
        except (CheckpointError, OSError, RuntimeError) as e:
            raise ckpt_io.TrainCheckpointError(f"corrupt checkpoint {resume_dir}: {e}") from None
    else:
        model = build_model(cfg, mc)
    if cfg.freeze_trunk:
        freeze_trunk(model)
    try:
        data = StageData(cfg, tokenizer, corpus, dist_info.rank, dist_info.world_size)
    except DataError as e:
        raise TrainError(str(e)) from None
    model = parallel.apply_parallelism(model, dist_info.world_size)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    start = 0
    if state is not None:
        try:
            parallel.load_full_optimizer_state(model, opt, state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            data.load_state_dict(state["data"])
            _set_rng_state(state["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ckpt_io.TrainCheckpointError(f"checkpoint {resume_dir} does not match this run: "
                                               f"{str(e).splitlines()[0]}") from None
        start = int(state["step"])
        if start > cfg.steps:
            raise TrainError(f"checkpoint is at step {start}, beyond --steps {cfg.steps}")
        if dist_info.is_main:
            _truncate_metrics(out, start)

    corpus_info = data.info.to_dict() if data.info is not None else None
    if corpus_info is None and cfg.init_from and (Path(cfg.init_from) / ckpt_io.CORPUS_FILE).is_file():
        corpus_info = json.loads((Path(cfg.init_from) / ckpt_io.CORPUS_FILE).read_text())

    def save(step: int) -> Path | None:
        full = parallel.full_model_state(model)
        optim = parallel.full_optimizer_state(model, opt)
        path = None
        if dist_info.is_main:
            plain = model if dist_info.world_size == 1 else _plain_copy(model, full)

            def write_model(d: Path) -> None:
                save_model(plain, d)
                tokenizer.save(d, model_max_length=mc.max_position_embeddings)

            st = {"step": step, "optimizer": optim, "scheduler": sched.state_dict(), "data": data.state_dict(),
                  "rng": _rng_state()}
            extra = {ckpt_io.TRAIN_CONFIG_FILE: cfg.to_json_dict()}
            if corpus_info is not None:
                extra[ckpt_io.CORPUS_FILE] = corpus_info
            path = ckpt_io.save_checkpoint(out, step, write_model, st, extra, keep=cfg.keep_checkpoints)
            plot_curves(out)
        if parallel.is_distributed():
            torch.distributed.barrier()
        return path

    log = (out / METRICS_FILE).open("a") if dist_info.is_main else None
    bar = None
    if dist_info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.recipe}/{cfg.stage}", dynamic_ncols=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    last_eval: dict[str, Any] = {}
    last_ckpt: Path | None = None
    t0, tokens = time.perf_counter(), 0
    try:
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        for step in range(start, end):
            micro, code = data.next_micro_batches()
            with autocast:
                m = train_step(model, opt, sched, micro, cfg, step, code, dist_info.world_size)
            tokens += m["tokens"]
            m["tok_per_s"] = round(tokens / (time.perf_counter() - t0), 1)
            m["time"] = round(time.time(), 2)
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                with autocast:
                    last_eval = {"step": done, **evaluate(model, data.val, cfg.n_mtp_heads)}
            if log is not None:
                if done % cfg.log_every == 0 or done == cfg.steps:
                    log.write(json.dumps(m) + "\n")
                if last_eval.get("step") == done:
                    log.write(json.dumps(last_eval) + "\n")
                log.flush()
            if bar is not None:
                post = {"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tok_per_s']:.0f}"}
                if "load_max_mean" in m:
                    lm = m["load_max_mean"]
                    post["load"] = f"{sum(lm.values()) / max(len(lm), 1):.2f}"
                if last_eval:
                    post["val"] = f"{last_eval['val_loss']:.3f}"
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
    if last_ckpt is None and dist_info.is_main and ckpt_io.has_checkpoint(out):
        last_ckpt = ckpt_io.find_checkpoint(out)
    if dist_info.is_main:
        plot_curves(out)
    return {"step": end, "checkpoint": str(last_ckpt) if last_ckpt else None,
            "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9), **last_eval,
            "model": model, "tokenizer": tokenizer}


def _presets() -> set[str]:
    from mimo.model.config import PRESETS

    return set(PRESETS)
