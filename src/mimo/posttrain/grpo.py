"""GRPO as MiMo uses it (posttraining-notes.md §2.3, §4): group-normalised outcome advantages, per-sequence
1/|y| normalisation, a truncated importance-sampling mask between trainer and sampler, no PPO clip, no KL.

Legend: B sequences (G samples of each prompt, consecutive), T positions of the padded training rows.

    A_i   = (r_i - mean_g r) / (std_g r + eps)            std over the G samples of i's prompt (population)
    rho_t = pi_theta(y_t) / mu(y_t)                        trainer / sampler probability of the sampled token
    w_t   = sg[rho_t] if eps_low <= rho_t <= eps_high else 0       (IcePop-style token mask)
    L     = -(1/B) sum_i (1/|y_i|) sum_t w_t A_it log pi_theta(y_t)  +  mtp_weight * mean_k CE_k(heads, detached)

A_it is a per-token advantage: GRPO broadcasts A_i to every token of response i (`outcome_advantage`); MOPD
(mopd.py) adds a per-token teacher term to it, on the same objective.

B is the global number of sequences (all ranks). A group whose rewards are all equal has A = 0 (r - mean is
exactly 0), so it adds nothing; a batch where every group is like that is skipped by the loop, not stepped.
With pi_theta = mu every rho is 1 and the gradient is the sequence-normalised REINFORCE gradient with a group
baseline. Routing replay (R3): the training forward uses the experts the rollout chose, so rho measures the
policy, not a routing flip between the engine and the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mimo.train import losses
from mimo.train.data import Batch
from mimo.train.loop import RoutingRecord
from mimo.train.step import LossFn, LossOutput

# (batch, pi_theta's log-probs of the labels [B, T], detached) -> (per-token advantages [B, T], metric sums).
# The advantage may use the trainer's log-probs (MOPD's teacher term does); only response tokens count.
TokenAdvantage = Callable[[Batch, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# (batch, the trainer's log-distributions [B, T, V], IS-kept tokens [B, T]) -> (a loss term summed over the
# batch's sequences (the objective divides it by B), its metric sums)
ExtraTerm = Callable[[Batch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """rewards [B] (groups of `group_size` consecutive samples) -> advantages [B] float32.

    Example, G = 4, rewards [1, 0, 0, 0]: mean 0.25, std 0.433 -> [1.732, -0.577, -0.577, -0.577];
    rewards [1, 1, 1, 1] -> [0, 0, 0, 0]."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B / G] bool: groups whose samples all got the same reward (they carry no learning signal)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(1)


def is_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [B, T], kept [B, T] bool): w = rho where mask and eps_low <= rho <= eps_high, else 0 (no gradient).

    Example, eps [0.5, 2]: logp - old_logp = [0, 0.9, -1.0] -> rho [1, 2.46, 0.37] -> kept [1, 0, 0]."""
    ratio = torch.exp(logp.detach() - old_logp)
    kept = mask & (ratio >= eps_low) & (ratio <= eps_high)
    return torch.where(kept, ratio, torch.zeros_like(ratio)), kept


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[labels]: [B, T, V], [B, T] -> [B, T] float32. The sampler's
    processed distribution at temperature T with top-k and top-p off."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def outcome_advantage(b: Batch, logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's: the sequence's group-normalised outcome advantage b.advantages [B] at each of its tokens."""
    return b.advantages[:, None].expand_as(logp), {}


def replay_routing(batch: Batch, moe_layers: list[int]) -> RoutingRecord:
    """A routing record that replays the rollout's experts ([B, T, n_moe_layers, K] -> per layer [B, T, K])
    and records what the forward used."""
    routing = RoutingRecord()
    if batch.routed_experts is not None:
        routing.replay = {l: batch.routed_experts[:, :, i].long() for i, l in enumerate(moe_layers)}
    return routing


def mtp_term(mtp_logits: list[torch.Tensor], b: Batch, n_mtp_targets: list[int]
             ) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
    """The MTP heads' part of an objective over the response tokens (b.mask): the mean over heads of each
    head's cross-entropy sum divided by its global target count, and the per-head sums / correct counts the
    step logs (`mtp{k}`, `mtp{k}_correct`). No heads: 0.0 and no metrics."""
    term: torch.Tensor | float = 0.0
    metrics: dict[str, torch.Tensor] = {}
    for k, logits in enumerate(mtp_logits):
        labels, mask = losses.mtp_labels(b.labels, b.mask, k)
        ce = losses.masked_ce_sum(logits, labels, mask)
        term = term + ce / max(n_mtp_targets[k], 1) / len(mtp_logits)
        with torch.no_grad():
            metrics[f"mtp{k}"] = ce.detach()
            metrics[f"mtp{k}_correct"] = losses.masked_correct(logits, labels, mask)
    return term, metrics


def grpo_objective(n_seqs: int, n_mtp_targets: list[int], moe_layers: list[int], eps_low: float,
                   eps_high: float, temperature: float = 1.0, mtp_weight: float = 0.1,
                   replay: bool = True, advantage: TokenAdvantage = outcome_advantage,
                   extra: ExtraTerm | None = None) -> LossFn:
    """The loss of the module docstring as a loss function for `mimo.train.step.forward_backward`.

    n_seqs: sequences in the global batch (B); n_mtp_targets[k]: global response tokens MTP head k predicts.
    The batch carries labels, mask (response tokens), advantages [B], old_logprobs [B, T] (the sampler's),
    loss_weights [B] (1 / |y_i|) and routed_experts [B, T, n_moe_layers, K]; `advantage` turns it and the
    trainer's log-probs into A_it (its metric sums join the loss function's); `extra`, if given, adds a term
    computed from the trainer's full log-distributions at the IS-kept tokens (MOPD's full-vocabulary KL)."""

    def loss_fn(model, b: Batch) -> LossOutput:
        routing = replay_routing(b, moe_layers) if replay else RoutingRecord()
        n_heads = len(n_mtp_targets)
        out = model(b.input_ids, return_mtp=n_heads > 0, routing=routing, mtp_detached=True)
        logits, mtp_logits = out if n_heads else (out, [])
        # one log-softmax [B, T, V] serves the labels' log-probs (as token_logprobs), the extra term and entropy
        logdist = F.log_softmax(logits.float() / temperature, dim=-1)
        logp = logdist.gather(-1, b.labels.unsqueeze(-1)).squeeze(-1)
        w, kept = is_weights(logp, b.old_logprobs, b.mask, eps_low, eps_high)
        adv, adv_metrics = advantage(b, logp.detach())
        per_seq = (w * adv * logp).sum(1) * b.loss_weights  # [B]; w is 0 off the response, so adv is too
        pg = -per_seq.sum() / n_seqs
        mtp_loss, mtp_metrics = mtp_term(mtp_logits, b, n_mtp_targets)
        loss = pg + mtp_weight * mtp_loss
        if extra is not None:
            term, extra_metrics = extra(b, logdist, kept)
            loss = loss + term / n_seqs
            adv_metrics = {**adv_metrics, **extra_metrics}
        with torch.no_grad():
            entropy = -(logdist.exp() * logdist).sum(-1)  # [B, T]
            maskf = b.mask.float()
            metrics = {"objective": loss, "pg": pg, "tokens": maskf.sum(), "kept": kept.sum(),
                       "entropy": (entropy * maskf).sum(),
                       # mean of (old - new) log-prob over response tokens: a k1 estimate of KL(mu || pi_theta)
                       "logp_diff": ((b.old_logprobs - logp) * maskf).sum(), **adv_metrics, **mtp_metrics}
        return LossOutput(loss, metrics, routing.ids)

    return loss_fn
