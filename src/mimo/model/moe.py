"""Mixture of experts: fp32 sigmoid router with selection bias, group-limited top-k, grouped experts.

Legend: N tokens, D model dim, E experts, K experts per token (top-k), I expert intermediate size.

Routing (DeepSeek-V3 "noaux_tc", as MiMo-V2-Flash):
1. scores_NE = sigmoid(x_fp32 @ W_fp32^T)
2. choice_NE = scores_NE + e_score_correction_bias (the bias only steers selection; it is updated outside
   backprop by the trainer to balance load)
3. group-limited: a group's score is the sum of its top-2 choice scores; keep `topk_group` groups
4. ids_NK = top-K of choice over the kept groups
5. weights_NK = scores_NE[ids] (unbiased), normalised to sum 1 if norm_topk_prob, times routed_scaling_factor

`Routing` records the chosen ids (and the scores, for the sequence-level balance loss) per layer, or replays
given ids: on-policy RL with routing replay (R3) trains on exactly the experts chosen at rollout time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import DerivedWeights


@dataclass
class Routing:
    """Per-forward routing record/replay, keyed by layer id (MTP blocks have no MoE)."""

    record: bool = False
    replay: dict[int, torch.Tensor] | None = None
    ids: dict[int, torch.Tensor] = field(default_factory=dict)  # [N, K] chosen experts
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # [N, E] sigmoid scores (with grad)


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E = config.n_experts
        self.top_k, self.n_group, self.topk_group = config.n_active_experts, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(E, config.dim, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def scores(self, x_ND: torch.Tensor) -> torch.Tensor:
        if x_ND.dtype != torch.float32:  # a Python check: even a no-op .float() costs a dispatch per layer
            x_ND = x_ND.float()
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        return torch.sigmoid(F.linear(x_ND, w))

    def select(self, scores_NE: torch.Tensor) -> torch.Tensor:
        choice_NE = (scores_NE.detach() if scores_NE.requires_grad else scores_NE) + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_group < self.n_group:
            N, E = choice_NE.shape
            grouped = choice_NE.view(N, self.n_group, E // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, n_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice_NE = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)
        return choice_NE.topk(self.top_k, dim=-1).indices

    def weights(self, scores_NE: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        w_NK = scores_NE.gather(1, ids_NK)
        if self.norm_topk_prob:
            w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
        return w_NK * self.scaling if self.scaling != 1.0 else w_NK


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights, gate and up rows of an expert together (transformers'
    in-memory layout; checkpoints split them per expert and projection): gate_up_proj [E, 2I, D] (rows
    [0, I) gate, [I, 2I) up), down_proj [E, D, I]. One GEMM gives an expert's gate and up."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, I, D = config.n_experts, config.moe_intermediate_size, config.dim
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self._views = DerivedWeights(lambda ws: tuple(w.unbind(0) for w in ws))  # per-expert matrices
        # per-expert transposed copies [D, 2I] and [I, D], for x @ W^T on the CPU (LinearWeights)
        self._views_t = DerivedWeights(lambda ws: tuple(w.transpose(1, 2).contiguous().unbind(0) for w in ws))

    @staticmethod
    def _swiglu(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    # Decode-size batches run their (token, expert) pairs one by one on the per-expert matrices: no sort, no
    # gather. One layer routed by its router on random inputs, pairs vs grouped (both with one SwiGLU over all
    # chains), on the AMD machine, one thread: 1 token 75 vs 177 us, 4 tokens 202 vs 280, 8 tokens 450 vs 487,
    # 12 tokens 690 vs 593; on the Xeon (transposed weights), two threads: 1 token 54 vs 114, 4 tokens 146 vs
    # 194, 8 tokens 265 vs 263, 12 tokens 335 vs 271 (one thread alike). Running every expert on every token
    # (fewer ops, E / K times the weight reads) lost: 4 tokens 9.9 vs grouped 9.2 ms for a whole forward. Tried
    # again as two batched matmuls over the stacks: one layer alone was faster (4 tokens 325 -> 202 us), but
    # whole engine runs A/B, interleaved, four times: 0.92-1.11x at batch 16 (three of four below 1) and
    # 0.89-1.07x with three drafts at batch 1: it reads E / K times the weights.
    PAIR_LOOP_TOKENS = 8

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """Grouped: sort the N*K (token, expert) pairs by expert, then one matmul chain per active expert
        over its contiguous run of tokens, scattered back with index_add.

        The stacked weights are `unbind`-ed once rather than indexed per expert: the backward of `w[e]` builds
        a zero tensor of the whole [E, ...] stack per use (E^2 traffic per layer and step, ~20% of a training
        step at E = 8), while unbind's backward stacks the E slice gradients once."""
        N, K = ids_NK.shape
        if torch.compiler.is_compiling():
            return self._static(x_ND, ids_NK, w_NK)
        if N <= self.PAIR_LOOP_TOKENS:
            return self._pairs(x_ND, ids_NK, w_NK)
        flat = ids_NK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        token_of = order // K  # pair p = n * K + k belongs to token n
        # index_select, not advanced indexing: its generic path cost ~4x more at decode sizes (kv_cache.py)
        x_sorted = x_ND.index_select(0, token_of)
        w_sorted = w_NK.reshape(-1).index_select(0, order).unsqueeze(-1)
        active = [(e, xs) for e, xs in enumerate(x_sorted.split(counts)) if xs.shape[0]]
        out_sorted = torch.cat(self._chains(*zip(*active))) if active else x_sorted
        out = torch.zeros_like(x_ND)
        y = out_sorted * w_sorted
        out.index_add_(0, token_of, y if y.dtype == x_ND.dtype else y.to(x_ND.dtype))
        return out

    def _chains(self, experts: tuple[int, ...], xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Expert experts[i]'s SwiGLU FFN on the rows xs[i], for every i: the gate/up GEMMs one by one, one
        SwiGLU over all their rows at once, the down GEMMs one by one. That is 2 ops a chain plus 5 shared
        (cat, the SwiGLU's 3, split) where a SwiGLU per chain made it 5 a chain; a 21-token prefill step runs
        ~50 chains over its 7 MoE layers."""
        ws = (self.gate_up_proj, self.down_proj)
        if xs[0].is_cpu and DerivedWeights.caches(ws):
            (gate_up, down), linear = self._views_t.kept(ws), torch.matmul
        else:
            (gate_up, down), linear = self._views(*ws), F.linear
        h = self._swiglu(torch.cat([linear(x, gate_up[e]) for e, x in zip(experts, xs)]))
        return [linear(he, down[e]) for e, he in zip(experts, h.split([x.shape[0] for x in xs]))]

    def _pairs(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        N, K = ids_NK.shape
        w_NK = w_NK if w_NK.dtype == x_ND.dtype else w_NK.to(x_ND.dtype)
        experts = ids_NK.reshape(-1).tolist()  # pair p = n * K + k
        rows = [x_ND] * K if N == 1 else [x_ND[p // K:p // K + 1] for p in range(N * K)]
        ys = torch.cat(self._chains(experts, rows))  # [N * K, D]
        return w_NK @ ys if N == 1 else torch.bmm(w_NK.view(N, 1, K), ys.view(N, K, -1)).view(N, -1)

    # Under torch.compile the graph needs shapes that do not depend on the routing: up to this many tokens
    # each token gathers its K experts' weights (a copy of K / E of the stacks per token), above it every
    # expert runs on every token as plain GEMMs (E / K times the FLOPs, no weight copies). Compiled engine, MTP
    # off, 16 requests: gathering 924-955 tokens/s, every expert 857-868 (eager 900-920); 64 requests, side by
    # side in one process: gathering 2,132, every expert 1,925. Again with one-graph compiled steps, compiled
    # over eager code MTP off in the same process, two processes each: gathering up to 64 tokens 1.56-1.57x
    # at 16 requests and 1.21-1.25x at 64, every expert from 9 tokens on 1.13-1.23x and 0.96-1.01x (one layer
    # alone on one thread had favoured every expert from 8 tokens: 16 tokens 333 against 537 us).
    STATIC_GATHER_TOKENS = 64

    def _static(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        w_NK = w_NK if w_NK.dtype == x_ND.dtype else w_NK.to(x_ND.dtype)
        N, E = x_ND.shape[0], self.gate_up_proj.shape[0]
        if N <= self.STATIC_GATHER_TOKENS:
            h = self._swiglu(torch.einsum("nd,nkid->nki", x_ND, self.gate_up_proj[ids_NK]))
            y = torch.einsum("nki,nkdi->nkd", h, self.down_proj[ids_NK])
            return (w_NK.unsqueeze(-1) * y).sum(1)
        h = self._swiglu(torch.einsum("nd,eid->eni", x_ND, self.gate_up_proj))  # [E, N, I]
        gates = torch.zeros(N, E, dtype=x_ND.dtype, device=x_ND.device).scatter_(1, ids_NK, w_NK)
        y = torch.bmm(h, self.down_proj.transpose(1, 2))  # [E, N, D]
        return (y * gates.t().unsqueeze(-1)).sum(0)

    def forward_ref(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """Slow reference: every (token, slot) pair on its own."""
        out = torch.zeros_like(x_ND)
        I = self.down_proj.shape[2]
        for n in range(x_ND.shape[0]):
            for j in range(ids_NK.shape[1]):
                e = int(ids_NK[n, j])
                x = x_ND[n]
                h = F.silu(self.gate_up_proj[e, :I] @ x) * (self.gate_up_proj[e, I:] @ x)
                out[n] += (w_NK[n, j] * (self.down_proj[e] @ h)).to(out.dtype)
        return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.gate = Router(config)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor, routing: Routing | None = None,
                reference: bool = False) -> torch.Tensor:
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        scores_NE = self.gate.scores(x_ND)
        if routing is not None and routing.replay is not None and self.layer_id in routing.replay:
            ids_NK = routing.replay[self.layer_id].to(x.device).reshape(x_ND.shape[0], -1)
        else:
            ids_NK = self.gate.select(scores_NE)
        if routing is not None and routing.record:
            routing.ids[self.layer_id] = ids_NK
            routing.scores[self.layer_id] = scores_NE
        w_NK = self.gate.weights(scores_NE, ids_NK)
        fn = self.experts.forward_ref if reference else self.experts
        return fn(x_ND, ids_NK, w_NK).view(shape)
