"""Training losses and the MoE balance machinery; pure functions of tensors (plus one in-place bias update).

Legend: B sequences, T tokens per sequence, V vocabulary, N = B * T tokens, E experts, K experts per token.

Every loss here returns a *sum* and the caller divides by a count taken over the whole global batch (all
micro-batches, all ranks). Dividing each micro-batch by its own count would weight a loss-masked (SFT)
micro-batch with few assistant tokens as much as a full one, and would make 2 ranks x 1 micro-batch differ
from 1 rank x 2 micro-batches.

MTP targets (non-chain heads, architecture-spec.md §6.2): with inputs x[0:T] and labels y[t] = x[t+1], head k
row t predicts x[t+k+2] = y[t+k+1], so its labels are y[:, k+1:] and its mask is mask[:, k+1:].

Sequence-level balance loss (DeepSeek-V3 eq. 17-20), per sequence of T tokens:
    f_e = E / (K * T) * #{t : e in topk(t)}           (1 for every expert under perfect balance)
    P_e = 1/T * sum_t s_{t,e} / sum_e' s_{t,e'}         (normalised sigmoid scores)
    L   = sum_e f_e * P_e                               (1 under perfect balance)
f is a count (no gradient); the gradient flows through P into the router.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_ce_sum(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of token cross-entropies where mask is true. logits [B, T, V], labels/mask [B, T]."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
    if mask is None:
        return ce.sum()
    return (ce * mask.reshape(-1).to(ce.dtype)).sum()


def masked_correct(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Number of positions where argmax(logits) == label (within mask)."""
    hit = logits.argmax(-1) == labels
    if mask is not None:
        hit = hit & mask
    return hit.sum()


def mtp_labels(labels: torch.Tensor, mask: torch.Tensor | None, k: int):
    """Labels [B, T-k-1] and mask of MTP head k (see module docstring)."""
    return labels[:, k + 1:], (None if mask is None else mask[:, k + 1:])


def seq_aux_loss_sum(scores_NE: torch.Tensor, ids_NK: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Sum over the B sequences of the sequence-level balance loss (module docstring)."""
    N, E = scores_NE.shape
    K = ids_NK.shape[1]
    counts_BE = torch.zeros(B, E, device=ids_NK.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, ids_NK.reshape(B, T * K), torch.ones(B, T * K, device=ids_NK.device))
    f_BE = counts_BE * (E / (K * T))
    p = scores_NE.float()
    p = p / (p.sum(-1, keepdim=True) + 1e-20)
    P_BE = p.view(B, T, E).mean(1)
    return (f_BE * P_BE).sum()


def expert_counts(ids_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] (int64) from the chosen ids [N, K]."""
    return torch.bincount(ids_NK.reshape(-1), minlength=n_experts)


@torch.no_grad()
def update_router_bias(routers: dict[int, torch.nn.Module], counts: dict[int, torch.Tensor], rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3 §2.1.2), outside backprop: for each MoE layer,
    bias_e += rate * sign(mean_e' load - load_e), so an overloaded expert gets chosen less often."""
    if rate == 0:
        return
    for layer, router in routers.items():
        load = counts[layer].float()
        router.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load).to(
            router.e_score_correction_bias.device))


def load_imbalance(counts: dict[int, torch.Tensor]) -> dict[int, float]:
    """max / mean expert load per MoE layer (1.0 = perfectly balanced, E/K = all on K experts)."""
    out = {}
    for layer, c in counts.items():
        c = c.float()
        out[layer] = float(c.max() / c.mean()) if c.sum() > 0 else 0.0
    return out
