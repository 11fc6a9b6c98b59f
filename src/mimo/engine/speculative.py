"""Speculative decoding acceptance math: pure functions of one request's drafts and distributions.

Notation (engine-notes §5): drafts d_1..d_k, d_i drawn from the draft distribution q_i; one target forward over
[pending token, d_1, .., d_k] gives target distributions p_1..p_{k+1} (row i - 1 predicts d_i's position; the
last row predicts the position after d_k). p must come from `sampler.probs_from_logits` with the request's
own temperature / top-k / top-p, so verification targets exactly the non-speculative distribution.

- `accept_greedy`: the longest prefix with d_i = argmax p_i, then the target's argmax at the first mismatch
  (or the bonus argmax p_{k+1} if all match): 1..k+1 tokens, identical to greedy plain decoding.
- `accept_sampled`: exact speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023): accept d_i
  with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection emit r ~ normalise(max(p_i - q_i, 0))
  and stop; if all k are accepted emit a bonus b ~ p_{k+1}. The emitted tokens are distributed exactly as k + 1
  (or fewer) tokens sampled from the target one at a time.
  q must be the distribution the draft was actually drawn from: argmax drafting (MiMo's topk = 1 MTP chain)
  is a point mass, passed as draft_probs=None. Then accept with probability p_i(d_i) and on rejection sample
  from p_i with d_i removed. Plugging softmax(draft logits) in as q for an argmax draft is wrong.

Shapes: k drafts, V vocabulary. The generator is the request's own (see sampler.make_generator); draws happen
in a fixed order (one uniform per examined draft, then one categorical draw), so seeded runs are reproducible.
Not here: drafting with the MTP heads, batching over requests, KV rollback (the scheduler's committed count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mimo.engine.sampler import sample_from_probs, uniform


def _ids(draft_ids: torch.Tensor | Sequence[int]) -> list[int]:
    return draft_ids.tolist() if isinstance(draft_ids, torch.Tensor) else [int(t) for t in draft_ids]


def accept_greedy(draft_ids: torch.Tensor | Sequence[int], target_logits: torch.Tensor) -> list[int]:
    """draft_ids [k], target_logits [k+1, V] -> the emitted tokens (1..k+1).

    Example: drafts [4, 7, 2], target argmaxes [4, 7, 5, 9] -> [4, 7, 5] (d_3 = 2 rejected, 5 is the
    correction); argmaxes [4, 7, 2, 9] -> [4, 7, 2, 9] (all accepted plus the bonus 9).
    """
    drafts = _ids(draft_ids)
    k = len(drafts)
    if target_logits.dim() != 2 or target_logits.shape[0] != k + 1:
        raise ValueError(f"target_logits must be [k + 1, V] = [{k + 1}, V], got {tuple(target_logits.shape)}")
    best = target_logits.argmax(-1).tolist()  # one host sync for the whole run
    out = []
    for i, d in enumerate(drafts):
        out.append(best[i])
        if best[i] != d:
            return out
    out.append(best[k])
    return out


def accept_sampled(draft_ids: torch.Tensor | Sequence[int], draft_probs: torch.Tensor | None,
                   target_probs: torch.Tensor, generator: torch.Generator | None = None) -> list[int]:
    """Exact speculative sampling for one request.

    draft_ids [k]; draft_probs [k, V] (q_i, the distributions the drafts were drawn from) or None for
    argmax drafting (q_i = point mass on d_i); target_probs [k+1, V] from probs_from_logits. Returns 1..k+1
    tokens. A draft with q_i(d_i) = 0 (it could not have been drawn) is rejected.
    """
    drafts = _ids(draft_ids)
    k = len(drafts)
    if target_probs.dim() != 2 or target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs must be [k + 1, V] = [{k + 1}, V], got {tuple(target_probs.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, target_probs.shape[1]):
        raise ValueError(f"draft_probs must be [k, V] = [{k}, {target_probs.shape[1]}], "
                         f"got {tuple(draft_probs.shape)}")
    p_KV = target_probs.float()
    q_KV = None if draft_probs is None else draft_probs.float().to(p_KV.device)
    out = []
    for i, d in enumerate(drafts):
        p_d = float(p_KV[i, d])
        q_d = 1.0 if q_KV is None else float(q_KV[i, d])
        u = uniform(generator, p_KV.device)
        # u ~ U[0, 1): P(u < p/q) = min(1, p/q); p = 0 never accepts
        if q_d > 0.0 and u < p_d / q_d:
            out.append(d)
            continue
        if q_KV is None:
            residual = p_KV[i].clone()
            residual[d] = 0.0  # max(p - onehot(d), 0) = p without d, since p(d) <= 1
        else:
            residual = (p_KV[i] - q_KV[i]).clamp_min(0.0)
        # residual mass is 0 only if p == q (up to rounding), when rejection has probability ~0; sample p then
        total = float(residual.sum())
        out.append(sample_from_probs(residual / total if total > 1e-12 else p_KV[i], generator))
        return out
    out.append(sample_from_probs(p_KV[k], generator))
    return out
