"""`mimo mopd`: multi-teacher on-policy distillation (posttraining-notes.md §2.3, §3) on the RL loop (loop.py).

The student samples from itself; each response is scored by the one teacher of its prompt's domain (hard,
prompt-level routing), and the policy-gradient objective of grpo.py gets a per-token advantage:

    A_t = sg[log pi_d(x)(y_t) - log pi_theta(y_t)] * s_t  +  alpha * A_i
    s_t = 0 where y_t is a special token (<|im_end|>, <|endoftext|>, ...), else 1     (notes §9.6)
    A_i = GRPO's group-normalised outcome advantage of response i (the exact-match verifier)

with GRPO's truncated IS mask w_t, 1/|y| per sequence, routing replay and one update per rollout batch:

    L = -(1/B) sum_i (1/|y_i|) sum_t w_t A_t log pi_theta(y_t)

The teacher term is the k1 estimate of -KL(pi_theta || pi_d) at the sampled token: minus the per-token reverse
KL, logged as `reverse_kl` (mean over the distilled tokens) and `reverse_kl_by_domain`. log pi_theta is the
trainer's (the replayed forward of the loss), as in Eq. 9; log pi_d is the teacher's at temperature 1 (verl
forces the same), whatever the sampling temperature. Worked example, alpha 0.5, one response of a group with
A_i = 1.5: a token the teacher gives log-prob -0.2 and the student -1.0 gets A_t = 0.8 + 0.75 = 1.55; the
closing <|im_end|> gets only 0.75. With teacher = student (a "self" teacher at step 0) the first term is 0 and
MOPD is alpha-scaled GRPO (minus GRPO's skipping of batches without reward variance: the teacher term
teaches on every batch).

`kl="full"` (not MiMo's; the "dense" variant of on-policy distillation, as in GKD) replaces that one-sample
estimate by its expectation over the vocabulary: each teacher returns its whole log-distribution at the
response positions, the advantage keeps only alpha * A_i, and the loss adds the exact per-position reverse KL

    + (1/B) sum_i (1/|y_i|) sum_t s_t k_t KL(pi_theta(.|y_<t) || pi_d(.|y_<t))     (k_t: the IS mask's kept tokens)

whose gradient at each position is the expectation over y_t ~ pi_theta of the sampled-token term's gradient
(sum_v p(v) grad log p(v) = 0), so the objective is the same and its variance lower; `reverse_kl` is then
the exact KL. Its cost: the teacher's [B, T, V] log-probs per batch and one more log-softmax in the loss.

Teachers: `(domain, directory or "self")` pairs; "self" is the student's starting weights (`init_from`, also
after `--resume`), MiMo's "Self" teachers. A directory used for several domains is loaded once. Teachers must
share the student's tokenizer (tokenizer.json) and vocabulary size: the advantage compares log-probs of the
same token ids. Each teacher runs one no-grad forward over the rows of its domains (prompt + response), with
its own routing and logits at the response rows only; the prompt mixture already interleaves domains in a
shuffled order within every batch (rewards.step_examples). Every row carries its domain, and scoring a row
with a teacher of another domain raises TeacherRoutingError.

Teacher-SFT (`TeacherSFTConfig`, the SFT-on-teacher-samples baseline of posttraining-notes.md §9.3 (c1)) runs
on the same loop with the same teachers, prompts, seeds and optimizer: each domain's teacher samples the G
responses of its prompts in its own engine (as the student's rollouts are sampled), the correct ones
(reward 1) are kept, and the student takes one update of plain SFT on them (`sft_objective`: cross-entropy
on the response tokens, the mean over the kept tokens of the global batch; no importance ratio, no routing
replay). A batch without a correct sample is skipped. In the ledger, "rollout" is the teachers' generation,
rejected samples included, and "logprob" / "backward" the update over the kept rows; "teacher" stays 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimo.checkpoint import CheckpointError, load_model
from mimo.model.config import ConfigError, ModelConfig
from mimo.train.data import Batch
from mimo.train.loop import TrainError
from mimo.train.step import LossFn, LossOutput

from . import flops as flop_lib
from . import grpo
from .loop import Method, RLConfig, RLConfigError, model_dir, policy_gradient, rollout_engine, tokenizer_digest
from .loop import preset as rl_preset
from .rewards import DOMAINS
from .rollout import RolloutBatch

SELF = "self"
KL_MODES = ("sampled", "full")


class TeacherRoutingError(RuntimeError):
    """A row was scored by a teacher of another domain (a bug in the routing, never an input error)."""


@dataclass
class Teacher:
    source: str  # the directory given, or "self"
    domains: tuple[str, ...]  # the domains routed to it
    model: torch.nn.Module


@dataclass
class MOPDBatch(Batch):
    """GRPO's training rows plus what the teacher term needs."""

    teacher_logprobs: torch.Tensor | None = None  # [B, T] log pi_d(x)(labels) at temperature 1; 0 off the response
    teacher_logdist: torch.Tensor | None = None  # kl="full": [B, T, V] log pi_d(x)(.) at temperature 1; 0 off it
    distill_mask: torch.Tensor | None = None  # [B, T] bool: response tokens that are not special tokens
    domains: tuple[str, ...] = ()  # each row's domain


def parse_teacher(text: str) -> tuple[str, str]:
    """"add=runs/add-teacher" -> ("add", "runs/add-teacher"); "sort=self" -> ("sort", "self"). ValueError
    for a missing "=", an unknown domain or an empty source."""
    domain, eq, source = text.partition("=")
    domain, source = domain.strip(), source.strip()
    if not eq or not source:
        raise ValueError(f"expected DOMAIN=DIR or DOMAIN=self, got {text!r}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r} in {text!r}; known domains: {','.join(DOMAINS)}")
    return domain, source


@dataclass(frozen=True)
class TeachersConfig(RLConfig):
    """An RLConfig with one teacher per domain of the prompt mixture (MOPD, teacher-SFT)."""

    teachers: tuple[tuple[str, str], ...] = ()  # (domain, teacher directory or "self"), one per domain

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        pairs = tuple((str(d), str(s)) for d, s in self.teachers)  # JSON gives lists
        object.__setattr__(self, "teachers", pairs)
        for d, s in pairs:
            if d not in DOMAINS:
                raise RLConfigError(f"{name}.teachers: unknown domain {d!r}; known domains: {','.join(DOMAINS)}")
            if not s:
                raise RLConfigError(f"{name}.teachers: no teacher given for {d!r}")
        named = [d for d, _ in pairs]
        if len(set(named)) < len(named):
            dup = next(d for d in named if named.count(d) > 1)
            raise RLConfigError(f"two teachers for domain {dup!r}: routing is one teacher per domain")
        missing = [d for d in self.domains if d not in named]
        if missing:
            raise RLConfigError(f"domain {missing[0]!r} of the prompt mixture has no teacher (give --teacher "
                                f"{missing[0]}=DIR, or {missing[0]}=self for the starting weights)")
        extra = [d for d in named if d not in self.domains]
        if extra:
            raise RLConfigError(f"a teacher for {extra[0]!r}, which is not in the prompt mixture "
                                f"({','.join(self.domains)})")


@dataclass(frozen=True)
class MOPDConfig(TeachersConfig):
    out: str = "runs/mopd"
    alpha: float = 0.5  # weight of the GRPO outcome advantage; MiMo combines by default, its value unpublished
    kl: str = "sampled"  # the teacher term: "sampled" (MiMo's, at the sampled token) or "full" (its expectation)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha < math.inf:
            raise RLConfigError(f"MOPDConfig.alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.kl not in KL_MODES:
            raise RLConfigError(f"MOPDConfig.kl must be one of {', '.join(KL_MODES)}, got {self.kl!r}")

    def method(self, init: Path, tokenizer, student: ModelConfig) -> Method:
        teachers = load_teachers(self.teachers, init, student)
        special = torch.tensor(sorted(tokenizer.special_ids), dtype=torch.long)
        full = self.kl == "full"
        objective = (policy_gradient(token_advantage(self.alpha, self.domains, teacher_term=False),
                                     full_kl_term(self.domains)) if full
                     else policy_gradient(token_advantage(self.alpha, self.domains)))
        # the teacher term teaches on every token, so MOPD never skips a batch
        return Method("mopd", lambda rb, batch: score_rollouts(teachers, rb, batch, special, full), objective,
                      lambda sums: summarise(sums, self.domains), lambda *counts: None)


@dataclass(frozen=True)
class TeacherSFTConfig(TeachersConfig):
    """SFT on teacher samples filtered to correct answers (posttraining-notes.md §9.3 arm c1), on the RL loop:
    the module docstring's last section."""

    out: str = "runs/teacher-sft"

    def method(self, init: Path, tokenizer, student: ModelConfig) -> Method:
        samplers = {}
        for t in load_teachers(self.teachers, init, student):
            samplers.update(dict.fromkeys(t.domains, rollout_engine(t.model, tokenizer, self)))
        return Method("teacher-sft", lambda rb, batch: (correct_rows(rb, batch), 0),
                      lambda cfg, n_seqs, n_tokens, n_mtp, moe_layers: sft_objective(n_tokens, n_mtp, cfg.mtp_weight),
                      lambda sums: {}, without_correct_sample, samplers)


def load_teachers(pairs: Sequence[tuple[str, str]], init: Path, student: ModelConfig) -> list[Teacher]:
    """The teacher of every (domain, source) pair, each source loaded once, frozen, in eval mode. TrainError
    (one line, naming the --teacher flag) for a directory that is missing, unloadable, or has another
    tokenizer or vocabulary size than the student (`init`, `student`)."""
    by_source: dict[str, list[str]] = {}
    for d, s in pairs:
        by_source.setdefault(s, []).append(d)
    want = tokenizer_digest(init)
    teachers = []
    for source, domains in by_source.items():
        flag = f"--teacher {domains[0]}={source}"
        path = init if source == SELF else model_dir(source, flag)
        if tokenizer_digest(path) != want:
            raise TrainError(f"{flag}: its tokenizer differs from the student's (--init-from {init}); a teacher "
                             "must share the student's token ids")
        try:
            model = load_model(path, dtype=torch.float32)
        except (CheckpointError, ConfigError, FileNotFoundError, OSError, RuntimeError) as e:
            raise TrainError(f"{flag}: cannot load {path}: {str(e).splitlines()[0]}") from None
        if model.config.vocab_size != student.vocab_size:
            raise TrainError(f"{flag}: vocabulary of {model.config.vocab_size} ids, the student's has "
                             f"{student.vocab_size}; a teacher must share the student's token ids")
        model.eval().requires_grad_(False)
        teachers.append(Teacher(source, tuple(domains), model))
    return teachers


def teacher_logprobs(teacher: Teacher, batch: MOPDBatch, full: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(log pi_teacher(labels) at temperature 1 [B, T], 0 off the response; with `full` its whole
    log-distribution there [B, T, V], else None; the forward's FLOPs). Raises TeacherRoutingError if a row's
    domain is not one of the teacher's."""
    wrong = [d for d in batch.domains if d not in teacher.domains]
    if wrong or len(batch.domains) != batch.input_ids.shape[0]:
        raise TeacherRoutingError(f"teacher {teacher.source} (domains {','.join(teacher.domains)}) asked to score rows "
                           f"of domains {','.join(batch.domains)}")
    B, T = batch.input_ids.shape
    with torch.no_grad():
        hidden = teacher.model.forward_hidden(batch.input_ids)
        logits = teacher.model.logits(hidden[batch.mask])  # [N, V]: response rows only
        out = torch.zeros(B, T, dtype=torch.float32)
        out[batch.mask] = grpo.token_logprobs(logits, batch.labels[batch.mask], 1.0)
        dist = None
        if full:
            dist = torch.zeros(B, T, logits.shape[-1], dtype=torch.float32)
            dist[batch.mask] = torch.log_softmax(logits.float(), -1)
    return out, dist, flop_lib.scoring_flops(teacher.model.config, B, T, int(batch.mask.sum()))


def _rows(batch: MOPDBatch, rows: list[int]) -> MOPDBatch:
    """Rows `rows` of the batch, cut to their longest response (padding beyond it is never scored)."""
    idx = torch.tensor(rows)
    mask = batch.mask[idx]
    T = int(mask.nonzero()[:, 1].max()) + 1 if mask.any() else 1
    return MOPDBatch(batch.input_ids[idx, :T], batch.labels[idx, :T], mask[:, :T],
                     domains=tuple(batch.domains[i] for i in rows))


def score_batch(teachers: Iterable[Teacher], batch: MOPDBatch, full: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(teacher log-probs [B, T] with each row scored by its domain's teacher, with `full` their
    log-distributions [B, T, V] (else None), their FLOPs): one forward per teacher over its rows.
    TeacherRoutingError if a row's domain has no teacher."""
    out = torch.zeros(batch.labels.shape, dtype=torch.float32)
    dist = None
    scored = [False] * len(batch.domains)
    spent = 0
    for t in teachers:
        rows = [i for i, d in enumerate(batch.domains) if d in t.domains]
        if not rows:
            continue
        sub = _rows(batch, rows)
        lp, ld, f = teacher_logprobs(t, sub, full)
        out[rows, :lp.shape[1]] = lp
        if full:
            if dist is None:
                dist = torch.zeros(*batch.labels.shape, ld.shape[-1], dtype=torch.float32)
            dist[rows, :ld.shape[1]] = ld
        spent += f
        for i in rows:
            scored[i] = True
    if not all(scored):
        raise TeacherRoutingError(f"no teacher for domain {batch.domains[scored.index(False)]!r}")
    return out, dist, spent


def mopd_advantages(teacher_logp: torch.Tensor, student_logp: torch.Tensor, distill_mask: torch.Tensor,
                    outcome: torch.Tensor, alpha: float) -> torch.Tensor:
    """A_t of the module docstring [B, T] from log-probs [B, T], the distilled tokens [B, T] and the outcome
    advantages [B]. Example: teacher [-0.2, -0.5], student [-1.0, -0.5], distilled [1, 0], outcome 1.5,
    alpha 0.5 -> [0.8 + 0.75, 0 + 0.75] = [1.55, 0.75]."""
    teacher_term = torch.where(distill_mask, teacher_logp - student_logp, torch.zeros_like(student_logp))
    return teacher_term + alpha * outcome[:, None]


def token_advantage(alpha: float, domains: Sequence[str], teacher_term: bool = True) -> grpo.TokenAdvantage:
    """MOPD's advantage for grpo_objective, with the sums behind `reverse_kl` (overall and per domain);
    without `teacher_term` only alpha * A_i (kl="full": the teacher term is full_kl_term's)."""

    def advantage(b: MOPDBatch, logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not teacher_term:
            return alpha * b.advantages[:, None].expand_as(logp), {}
        rkl = torch.where(b.distill_mask, logp - b.teacher_logprobs, torch.zeros_like(logp))  # k1 per token
        return (mopd_advantages(b.teacher_logprobs, logp, b.distill_mask, b.advantages, alpha),
                _kl_sums(rkl, b, domains))

    return advantage


def _kl_sums(rkl: torch.Tensor, b: MOPDBatch, domains: Sequence[str]) -> dict[str, torch.Tensor]:
    """The sums behind `reverse_kl` from per-token KL values [B, T] (0 off the distilled tokens)."""
    n = b.distill_mask.float()
    metrics = {"rkl": rkl.sum(), "distilled": n.sum()}
    for d in domains:  # every domain, so every rank reduces the same keys
        rows = torch.tensor([x == d for x in b.domains])
        metrics[f"rkl/{d}"], metrics[f"distilled/{d}"] = rkl[rows].sum(), n[rows].sum()
    return metrics


def full_kl_term(domains: Sequence[str]) -> grpo.ExtraTerm:
    """kl="full"'s loss term (module docstring): sum_i (1/|y_i|) sum_t s_t k_t KL_t from the trainer's
    log-distributions [B, T, V]. Example, V = 2, one distilled token, student [0.5, 0.5], teacher [0.9, 0.1],
    |y| = 1: 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.511."""

    def term(b: MOPDBatch, logdist: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kl = (logdist.exp() * (logdist - b.teacher_logdist)).sum(-1)  # [B, T]
        on = b.distill_mask & kept
        loss = (torch.where(on, kl, torch.zeros_like(kl)).sum(1) * b.loss_weights).sum()
        return loss, _kl_sums(torch.where(b.distill_mask, kl.detach(), torch.zeros_like(kl)), b, domains)

    return term


def score_rollouts(teachers: list[Teacher], rb: RolloutBatch, batch: Batch, special: torch.Tensor,
                   full: bool = False) -> tuple[MOPDBatch, int]:
    """The rows with their domains, distilled tokens (response tokens not in `special`) and teacher log-probs
    (with `full`, log-distributions too), and the teachers' FLOPs."""
    mb = MOPDBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)},
                   domains=tuple(r.example.task for r in rb.rollouts))
    mb.distill_mask = batch.mask & ~torch.isin(batch.labels, special)
    mb.teacher_logprobs, mb.teacher_logdist, spent = score_batch(teachers, mb, full)
    return mb, spent


def summarise(sums: dict[str, float], domains: Sequence[str]) -> dict[str, Any]:
    """Global metric sums -> `reverse_kl` (nats per distilled token) and `reverse_kl_by_domain`."""
    by_domain = {d: sums[f"rkl/{d}"] / sums[f"distilled/{d}"] for d in domains if sums[f"distilled/{d}"] > 0}
    return {"reverse_kl": sums["rkl"] / max(sums["distilled"], 1.0), "reverse_kl_by_domain": by_domain}


# ---- teacher-SFT ----------------------------------------------------------------------------------------------

def without_correct_sample(n_flat: int, n_groups: int, n_correct: int) -> str | None:
    """Teacher-SFT's skip: it learns only from correct samples."""
    return None if n_correct else "no correct teacher sample, no update"


def correct_rows(rb: RolloutBatch, batch: Batch) -> Batch:
    """The training rows of the correct samples (reward 1), cut to their longest response, with the sampler's
    log-probs. No routed experts: they are the teacher's routing, not the student's. A rank without a
    correct sample keeps its first row with the mask cleared, so that every rank joins the update (FSDP)."""
    ok = rb.rewards >= 1
    rows = ok.nonzero()[:, 0] if ok.any() else torch.tensor([0])
    mask = batch.mask[rows] & ok[rows, None]
    T = int(mask.nonzero()[:, 1].max()) + 1 if mask.any() else 1
    return Batch(batch.input_ids[rows, :T], batch.labels[rows, :T], mask[:, :T],
                 old_logprobs=batch.old_logprobs[rows, :T])


def sft_objective(n_tokens: int, n_mtp_targets: list[int], mtp_weight: float = 0.1) -> LossFn:
    """Plain SFT as a loss function for `mimo.train.step.forward_backward`: the cross-entropy of the rows'
    response tokens (b.mask) divided by the `n_tokens` of the global batch, plus the MTP heads on them with
    the trunk detached, weighted as grpo_objective weights them.

        L = -(1/N) sum_i sum_t log pi_theta(y_t)  +  mtp_weight * mean_k CE_k(heads, detached)

    It logs grpo_objective's sums: `pg` is the cross-entropy term (the policy-gradient loss with advantage 1,
    no importance ratio, normalised per token), every token is `kept`, and `logp_diff` is log mu - log
    pi_theta with mu the teacher's sampling distribution: a k1 estimate of KL(teacher sampler || student)."""

    def loss_fn(model, b: Batch) -> LossOutput:
        n_heads = len(n_mtp_targets)
        out = model(b.input_ids, return_mtp=n_heads > 0, mtp_detached=True)
        logits, mtp_logits = out if n_heads else (out, [])
        logp = grpo.token_logprobs(logits, b.labels, 1.0)
        maskf = b.mask.float()
        ce = -(logp * maskf).sum() / max(n_tokens, 1)
        mtp_loss, mtp_metrics = grpo.mtp_term(mtp_logits, b, n_mtp_targets)
        loss = ce + mtp_weight * mtp_loss
        with torch.no_grad():
            p = torch.softmax(logits.float(), -1)
            entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
            metrics = {"objective": loss, "pg": ce, "tokens": maskf.sum(), "kept": maskf.sum(),
                       "entropy": (entropy * maskf).sum(), "logp_diff": ((b.old_logprobs - logp) * maskf).sum(),
                       **mtp_metrics}
        return LossOutput(loss, metrics)

    return loss_fn


def preset(name: str, **overrides: Any) -> MOPDConfig:
    """A MOPDConfig from one of loop.PRESETS (default, debug) and field overrides."""
    return rl_preset(name, MOPDConfig, **overrides)
