"""FLOP ledger (posttraining-notes.md §9.5): every model call of an RL run adds its FLOPs, computed
analytically from the ModelConfig. Counted are the matmuls (2 FLOPs per multiply-add), which is what
`torch.utils.flop_counter.FlopCounterMode` counts; norms, RoPE, softmax and embeddings are left out.

Per query row of the main model, with S_full / S_sliding keys visible in full / sliding layers:
    attention projections  2 D (H Dq + Kv Dq + Kv Dv) + 2 H Dv D          per layer (shapes per layer type)
    attention              2 H S (Dq + Dv)                                QK^T and PV over the S keys
    FFN                    dense 2 * 3 D I;  MoE 2 D E (router) + 2 * k * 3 D I_moe (k active experts)
                           + 2 k D (the weighted sum of the k expert outputs)
    lm_head                2 D V                                          only for rows whose logits are used
An MTP block row: eh_proj 2 * 2D * D, one sliding attention layer, a dense FFN, lm_head.

Causal keys: a query at position p sees p + 1 keys in a full layer, min(p + 1, W) in a sliding one (W =
sliding_window, the query included). The training forward computes every row's logits and its backward
costs twice the forward (both input and weight gradients), so an update is 3x its forward.

Ledger entries: "rollout" (engine prefill, decode/verify and MTP drafting), "logprob" (the trainer's forward
over the rollouts: pi_theta for the mask, and the loss), "backward" (its backward), "teacher" (MOPD: each
teacher's forward over its rows, logits at the response rows only), "eval" (greedy evaluation).
Approximations, for the engine only: rejected draft rows and MTP drafting rows are charged at the sequence's
final context length; a recompute after a preemption is not charged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mimo.model.config import DENSE, SLIDING, ModelConfig


def _sum_min(a: int, b: int, cap: int | None) -> int:
    """sum over p in [a, b) of min(p + 1, cap) (cap None = no cap). E.g. a 0, b 5, cap 3: 1+2+3+3+3 = 12."""
    def full(n: int) -> int:  # sum over p in [0, n) of min(p + 1, cap)
        if cap is None or n <= cap:
            return n * (n + 1) // 2
        return cap * (cap + 1) // 2 + (n - cap) * cap
    return full(b) - full(a)


def _attn_proj(cfg: ModelConfig, layer_type: str) -> int:
    H, K, Dq, Dv = cfg.attn_shape(layer_type)
    return 2 * cfg.dim * (H * Dq + K * Dq + K * Dv) + 2 * H * Dv * cfg.dim


def _attn_per_key(cfg: ModelConfig, layer_type: str) -> int:
    H, _, Dq, Dv = cfg.attn_shape(layer_type)
    return 2 * H * (Dq + Dv)


def lm_head_flops(cfg: ModelConfig) -> int:
    return 2 * cfg.dim * cfg.vocab_size


def forward_flops(cfg: ModelConfig, start: int, n: int, logit_rows: int = 0) -> int:
    """Main-model FLOPs of query rows at positions [start, start + n) over causal keys from position 0, plus
    `logit_rows` rows through lm_head."""
    D = cfg.dim
    total = 0
    for i in range(cfg.n_layers):
        t = cfg.layer_types[i]
        total += n * _attn_proj(cfg, t)
        total += _attn_per_key(cfg, t) * _sum_min(start, start + n, cfg.sliding_window if t == SLIDING else None)
        if cfg.mlp_types[i] == DENSE:
            total += n * 2 * 3 * D * cfg.intermediate_size
        else:
            k = cfg.n_active_experts
            total += n * (2 * D * cfg.n_experts + 2 * k * 3 * D * cfg.moe_intermediate_size + 2 * k * D)
    return total + logit_rows * lm_head_flops(cfg)


def mtp_flops(cfg: ModelConfig, start: int, n: int, logit_rows: int | None = None) -> int:
    """One MTP block over rows at positions [start, start + n) (sliding keys), plus lm_head for `logit_rows`
    rows (default all n)."""
    D = cfg.dim
    per_row = 2 * 2 * D * D + _attn_proj(cfg, SLIDING) + 2 * 3 * D * cfg.intermediate_size
    attn = _attn_per_key(cfg, SLIDING) * _sum_min(start, start + n, cfg.sliding_window)
    return n * per_row + attn + (n if logit_rows is None else logit_rows) * lm_head_flops(cfg)


def training_flops(cfg: ModelConfig, B: int, T: int, n_mtp: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of a training step on padded rows [B, T] with logits at every row and
    `n_mtp` MTP heads (head k over T - k - 1 rows)."""
    fwd = forward_flops(cfg, 0, T, T) + sum(mtp_flops(cfg, 0, T - k - 1) for k in range(n_mtp) if T - k - 1 > 0)
    return B * fwd, 2 * B * fwd


def scoring_flops(cfg: ModelConfig, B: int, T: int, logit_rows: int) -> int:
    """A no-grad forward over padded rows [B, T] (no MTP heads) with lm_head at `logit_rows` rows of them: a
    teacher scoring the rollouts' response tokens (MOPD)."""
    return B * forward_flops(cfg, 0, T) + logit_rows * lm_head_flops(cfg)


def rollout_flops(cfg: ModelConfig, n_prompt: int, n_output: int, n_drafted: int, n_accepted: int) -> int:
    """Engine FLOPs of one sample: prompt P, output O, drafts proposed / accepted over its verify steps.

    The model ran over positions [0, P + O - 1) (the last token is never fed back); its decode steps number
    O - 1 - accepted (each emits 1 + its accepted drafts), each computing logits for 1 + its drafts rows, and
    the prefill's last row samples the first token. Rejected rows and one MTP row per draft are charged at
    the final context (module docstring)."""
    P, O = n_prompt, n_output
    n_pos = P + O - 1
    steps = max(O - 1 - n_accepted, 0)
    main = forward_flops(cfg, 0, n_pos, 1 + steps + n_drafted)
    rejected = n_drafted - n_accepted
    main += forward_flops(cfg, n_pos, 1) * rejected
    drafting = mtp_flops(cfg, n_pos, 1) * n_drafted
    return main + drafting


@dataclass
class FlopLedger:
    """FLOPs spent so far, by kind (module docstring); saved with a checkpoint so a resumed run continues."""

    flops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("rollout", "logprob", "backward",
                                                                           "teacher", "eval"), 0))

    def add(self, kind: str, flops: int) -> None:
        if kind not in self.flops:
            raise KeyError(f"unknown ledger entry {kind!r}; entries: {', '.join(self.flops)}")
        self.flops[kind] += int(flops)

    @property
    def total(self) -> int:
        return sum(self.flops.values())

    def state_dict(self) -> dict[str, int]:
        return dict(self.flops)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.flops = {k: int(state.get(k, 0)) for k in self.flops}

