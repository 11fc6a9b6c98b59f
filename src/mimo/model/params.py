"""Parameter counts from a ModelConfig alone (no weights), total and active per token (spec §3).

Conventions, chosen so the released model reproduces the published 309B total / 15B active:
- "embedding" means the input lookup table `model.embed_tokens` only. The `lm_head` is a matmul every token
  pays for, so it stays in every count (when tied it is the same tensor and is counted once, as part of the
  embedding).
- "active" counts what one token touches in a forward pass: every attention, norm and dense weight, the full
  router of each MoE layer (all experts are scored) and `n_active_experts` experts per MoE layer.
- The MoE correction bias `e_score_correction_bias` is not a learnable parameter; it is reported under
  `router_bias` and left out of the totals.
- MTP blocks are all dense and share the main embedding and head, so a block's active count equals its total.
"""

from __future__ import annotations

from mimo.model.config import DENSE, MOE, SLIDING, ModelConfig


def attention_params(config: ModelConfig, layer_type: str) -> int:
    """q [H*dqk, D] + k [Hkv*dqk, D] + v [Hkv*dv, D] + o [D, H*dv] (+ one sink logit per query head)."""
    h, hkv, dqk, dv = config.attn_shape(layer_type)
    d = config.dim
    n = d * h * dqk + d * hkv * dqk + d * hkv * dv + h * dv * d
    return n + (h if config.has_sink(layer_type) else 0)


def dense_ffn_params(config: ModelConfig) -> int:
    """SwiGLU gate/up [I, D] and down [D, I]."""
    return 3 * config.dim * config.intermediate_size


def expert_params(config: ModelConfig) -> int:
    return 3 * config.dim * config.moe_intermediate_size


def router_params(config: ModelConfig) -> int:
    """Router weight [E, D] (fp32); the correction bias is a buffer and not counted."""
    return config.n_experts * config.dim


def mtp_layer_params(config: ModelConfig) -> int:
    """enorm, hnorm, eh_proj [D, 2D], input_layernorm, SWA attention, pre_mlp_layernorm, dense FFN,
    final_layernorm."""
    d = config.dim
    return 5 * d + 2 * d * d + attention_params(config, SLIDING) + dense_ffn_params(config)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Total and active-per-token parameter counts, each with/without MTP and with/without the embedding.

    Keys: `total`, `total_no_mtp`, `total_no_embedding`, `total_no_mtp_no_embedding`, and the same four for
    `active`; the parts `embedding`, `lm_head` (0 when tied), `attention`, `dense_ffn`, `moe_experts`
    (all routed experts), `moe_active_experts`, `router`, `norms`, `mtp_per_layer`, `mtp`, `n_mtp_layers`,
    `expert`, and `router_bias` (buffer elements, not in any total).
    """
    d = config.dim
    embedding = config.vocab_size * d
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * d
    attention = sum(attention_params(config, t) for t in config.layer_types)
    n_dense = sum(t == DENSE for t in config.mlp_types)
    n_moe = sum(t == MOE for t in config.mlp_types)
    dense_ffn = n_dense * dense_ffn_params(config)
    moe_experts = n_moe * config.n_experts * expert_params(config)
    moe_active = n_moe * config.n_active_experts * expert_params(config)
    router = n_moe * router_params(config)
    norms = 2 * d * config.n_layers + d  # two per layer + the final norm
    mtp_one = mtp_layer_params(config)
    mtp = config.n_mtp_layers * mtp_one

    shared = attention + dense_ffn + router + norms + lm_head  # everything but experts and embedding
    total_no_mtp_no_emb = shared + moe_experts
    active_no_mtp_no_emb = shared + moe_active
    out = {
        "total": total_no_mtp_no_emb + embedding + mtp,
        "total_no_mtp": total_no_mtp_no_emb + embedding,
        "total_no_embedding": total_no_mtp_no_emb + mtp,
        "total_no_mtp_no_embedding": total_no_mtp_no_emb,
        "active": active_no_mtp_no_emb + embedding + mtp,
        "active_no_mtp": active_no_mtp_no_emb + embedding,
        "active_no_embedding": active_no_mtp_no_emb + mtp,
        "active_no_mtp_no_embedding": active_no_mtp_no_emb,
        "embedding": embedding,
        "lm_head": lm_head,
        "attention": attention,
        "dense_ffn": dense_ffn,
        "moe_experts": moe_experts,
        "moe_active_experts": moe_active,
        "expert": expert_params(config),
        "router": router,
        "router_bias": n_moe * config.n_experts,
        "norms": norms,
        "mtp_per_layer": mtp_one,
        "mtp": mtp,
        "n_mtp_layers": config.n_mtp_layers,
    }
    return out


def format_count(n: int) -> str:
    """1234567 -> '1.23M' (for CLI/report printing)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
