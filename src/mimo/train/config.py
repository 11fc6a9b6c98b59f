"""TrainConfig: every knob of one training stage (pretrain, MTP-head stage, SFT), validated on construction.

A run directory holds `train_config.json` (this dataclass), the ModelConfig (`config.json`, written with the
weights) and the corpus info next to every checkpoint, so a checkpoint says exactly how it was made.

Batch arithmetic: `batch_size` is the *global* micro-batch (sequences over all ranks; each of W ranks gets
batch_size / W contiguous rows), and one optimizer step sees `batch_size * grad_accum` sequences of `seq_len`
tokens. The same config therefore trains on the same data, with the same losses (up to float summation
order), on one process or under torchrun with any world size that divides `batch_size`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "mtp", "sft")
DTYPES = ("float32", "bfloat16")


class TrainConfigError(ValueError):
    """A TrainConfig field has an invalid value; the message names the field."""


@dataclass(frozen=True)
class SFTData:
    """How an SFT stage draws and encodes its task conversations (TrainConfig.sft_data).

    - task_weights: (task, share) pairs, the shares of the training conversations; None = equal shares.
    - spell_answers: assistant answers (and reasoning) tokenized one character per token rather than by BPE
      (prompts and the chat markup are unchanged), so writing a reversed string needs no knowledge of how
      BPE merges it.
    - reasoning: the thinking tasks' conversations carry their worked trace (`mimo.tasks.trace`) in the
      think block, as evaluation and rollouts pose them with thinking on.
    - group_by_length: batches of similar-length conversations (`SFTLoader(group_by_length=True)`).
    - replay_task_fraction: the packed code micro-batch replays the pretraining mixture, chat-rendered task
      examples (prompts included, full loss) making up this share of its characters, rather than code
      alone. Loss on assistant tokens only lets the rest of a conversation drift: the shipped model's
      pretrain validation loss (code + task documents) went 3.07 -> 4.04 in SFT while held-out code alone
      went 4.53 -> 4.67.
    """

    task_weights: tuple[tuple[str, float], ...] | None = None
    spell_answers: bool = False
    reasoning: bool = False
    group_by_length: bool = False
    replay_task_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.task_weights is not None:  # lists from JSON
            object.__setattr__(self, "task_weights", tuple((str(t), float(w)) for t, w in self.task_weights))
        if not 0 <= self.replay_task_fraction <= 1:
            raise TrainConfigError(f"SFTData.replay_task_fraction: must be in [0, 1] "
                                   f"(got {self.replay_task_fraction!r})")


@dataclass(frozen=True)
class TrainConfig:
    # ---- what is trained
    recipe: str = "debug"
    stage: str = "pretrain"
    # a ModelConfig preset name, or a checkpoint directory whose config.json gives the architecture
    model: str = "debug"
    # ModelConfig fields replaced on top of `model` (e.g. {"n_mtp_layers": 1}); ignored with init_from
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # start from these weights (a checkpoint directory in the official format, or a run's checkpoint)
    init_from: str | None = None
    # MTP heads trained in this stage; a model with fewer heads gets head 0 copied (copy_mtp_heads)
    n_mtp_heads: int = 1
    # MTP stage: train only the MTP heads (the trunk, embedding and lm_head stay fixed)
    freeze_trunk: bool = False
    out: str = "runs/debug"
    seed: int = 0
    # ---- batch (batch_size: global sequences per micro-batch, see the module docstring)
    steps: int = 40
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 64
    # ---- optimizer (AdamW; decay on matrices only) and schedule (linear warmup, cosine to min_lr)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "float32"
    # ---- losses
    # piecewise-constant MTP loss weight: (fraction of `steps` from which it applies, weight)
    mtp_weights: tuple[tuple[float, float], ...] = ((0.0, 0.3), (0.75, 0.1))
    # DeepSeek-V3 sequence-level balance loss coefficient (MiMo-V2-Flash: 1e-5 pretrain, 1e-6 SFT at 309B);
    # 1e-4 here: 8 experts and ~1e6 tokens per run leave the bias update little time, a small push helps
    aux_loss_coef: float = 1e-4
    # aux-loss-free balancing: bias += rate * sign(mean_load - load_e) after each optimizer step. MiMo-V2-Flash
    # uses 1e-3 at LR 3.2e-4; our LRs are ~10x higher and runs ~1000x shorter, so the rate is 1e-2
    bias_update_rate: float = 1e-2
    # ---- data
    # corpus directory (None: the stdlib corpus built by mimo.data); tokenizer directory (None: built with it)
    corpus: str | None = None
    tokenizer: str | None = None
    # cap on corpus bytes read (debug runs stay fast); None = everything
    corpus_max_bytes: int | None = None
    # pretrain/mtp: fraction of documents that are chat-formatted task examples (the rest is code)
    task_fraction: float = 0.3
    # sft: fraction of sequences that are plain code (full loss) to limit forgetting
    code_fraction: float = 0.1
    # sft: rows (global) of the packed code micro-batch added to every step when code_fraction > 0
    sft_code_rows: int = 8
    tasks: tuple[str, ...] = ("add", "reverse", "sort")
    # sft: how the task conversations are drawn and encoded
    sft_data: SFTData = SFTData()
    # ---- bookkeeping
    log_every: int = 1
    eval_every: int = 20
    eval_batches: int = 4
    ckpt_every: int = 20
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "mtp_weights", tuple((float(a), float(w)) for a, w in self.mtp_weights))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if isinstance(self.sft_data, dict):  # from JSON
            object.__setattr__(self, "sft_data", SFTData(**self.sft_data))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise TrainConfigError(f"TrainConfig.{name}: {msg} (got {getattr(self, name)!r})")

        need(self.stage in STAGES, "stage", f"must be one of {STAGES}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_every", "eval_batches",
                     "ckpt_every", "keep_checkpoints", "sft_code_rows"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, name, "must be a positive integer")
        need(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.steps, "warmup_steps",
             f"must be in [0, steps={self.steps}]")
        need(self.seq_len >= 4, "seq_len", "must be >= 4 (the MTP heads need later tokens)")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}]")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)")
        need(self.eps > 0, "eps", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.grad_clip > 0, "grad_clip", "must be positive")
        need(self.n_mtp_heads >= 0, "n_mtp_heads", "must be >= 0")
        need(self.seq_len > self.n_mtp_heads + 1, "seq_len", "must exceed n_mtp_heads + 1")
        need(len(self.mtp_weights) > 0 and self.mtp_weights[0][0] == 0.0, "mtp_weights",
             "must be a non-empty list of (start fraction, weight) starting at 0.0")
        starts = [a for a, _ in self.mtp_weights]
        need(starts == sorted(starts) and all(0 <= a < 1 for a in starts), "mtp_weights",
             "start fractions must be increasing and in [0, 1)")
        need(all(w >= 0 for _, w in self.mtp_weights), "mtp_weights", "weights must be >= 0")
        need(self.aux_loss_coef >= 0, "aux_loss_coef", "must be >= 0")
        need(self.bias_update_rate >= 0, "bias_update_rate", "must be >= 0")
        need(0 <= self.task_fraction <= 1, "task_fraction", "must be in [0, 1]")
        need(0 <= self.code_fraction < 1, "code_fraction", "must be in [0, 1)")
        need(self.corpus_max_bytes is None or self.corpus_max_bytes > 0, "corpus_max_bytes",
             "must be positive or None")
        need(not self.freeze_trunk or self.n_mtp_heads > 0, "freeze_trunk", "needs n_mtp_heads > 0")
        from mimo.tasks import TASKS

        bad = [t for t in self.tasks if t not in TASKS]
        need(not bad, "tasks", f"unknown task {bad[:1]}; known: {TASKS}")
        need(bool(self.recipe), "recipe", "must be non-empty")
        need(bool(self.out), "out", "must be non-empty")

    # ---- derived
    def mtp_weight(self, step: int) -> float:
        """The MTP loss weight at optimizer step `step` (0-based)."""
        w = self.mtp_weights[0][1]
        for start, weight in self.mtp_weights:
            if step >= start * self.steps:
                w = weight
        return w

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["mtp_weights"] = [list(x) for x in self.mtp_weights]
        d["tasks"] = list(self.tasks)
        tw = self.sft_data.task_weights
        d["sft_data"]["task_weights"] = [list(x) for x in tw] if tw is not None else None
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainConfigError(f"TrainConfig: unknown fields {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_json_dict(json.loads(Path(path).read_text()))
