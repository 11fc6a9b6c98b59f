"""Attention: GQA with q/k head dim != v head dim, partial RoPE, value scale, sliding window, sink logits.

Legend: B batch, T queries, S keys, H query heads, K kv heads, G = H / K query heads per kv head,
D q/k head dim, Dv v head dim. Query head h reads kv head h // G (contiguous grouping, as transformers'
`repeat_kv`).

Sinks (sliding layers): one learnable logit s_h per query head is an extra softmax column with no value, so
it only enlarges the denominator: p_ij = exp(a_ij) / (exp(s_h) + sum_j' exp(a_ij')).

The model never owns a KV cache. With `cache=None` it attends causally over the tokens it is given (the
training path: sliding layers in query chunks so the cost is O(T * window)); otherwise it hands q/k/v to
`cache.attend(...)`, which stores k/v and attends over everything it holds (`DenseKVCache` below is the
simple reference; the engine passes a paged one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SLIDING, ModelConfig
from .layers import LinearWeights, Rope, apply_rope


def attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Reference softmax attention with an explicit boolean mask (True = may attend).

    q [B, T, H, D], k [B, S, K, D], v [B, S, K, Dv], mask broadcastable to [B, 1, 1, T, S];
    returns [B, T, H, Dv]. Softmax in fp32.
    """
    B, T, H, D = q.shape
    K, S, Dv = k.shape[2], k.shape[1], v.shape[-1]
    G = H // K
    # each kv head's G query heads and T queries as one row block: [B, K, G * T, D], row g * T + t, so both
    # products are plain batched matmuls (no broadcast copy of k / v per query head)
    if T == 1:
        qg = q.view(B, K, G, D)
    else:
        qg = q.view(B, T, K, G, D).permute(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
    scores = torch.matmul(qg, k.transpose(1, 2).transpose(-1, -2))  # [B, K, G * T, S]
    scores = scores * scale if scores.dtype == torch.float32 else scores.float() * scale
    if mask is not None:
        mask = mask.reshape(-1, 1, T, S)  # [B or 1, 1, T, S]
        if T > 1:
            mask = mask.unsqueeze(2).expand(-1, 1, G, T, S).reshape(-1, 1, G * T, S)
        scores = torch.where(mask, scores, float("-inf"))
    if sinks is not None:
        sink = sinks.view(1, K, G, 1).expand(B, K, G, T).reshape(B, K, G * T, 1)
        sink = sink if sink.dtype == scores.dtype else sink.float()
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs if probs.dtype == v.dtype else probs.to(v.dtype), v.transpose(1, 2))  # [B, K, G*T, Dv]
    if T == 1:
        return out.view(B, 1, H, Dv)
    return out.view(B, K, G, T, Dv).permute(0, 3, 1, 2, 4).reshape(B, T, H, Dv)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [.., T, S] mask: key j visible to query i iff q_pos[i] - window < k_pos[j] <= q_pos[i]."""
    diff = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                     sinks: torch.Tensor | None, scale: float, chunk: int = 128, q_start: int = 0,
                     k_start: int = 0) -> torch.Tensor:
    """Causal (optionally windowed) attention of queries at positions [q_start, q_start + T) over keys at
    positions [k_start, q_start + T): q [B, T, H, D], k [B, S, K, D], v [B, S, K, Dv] -> [B, T, H, Dv].

    Training passes a whole sequence (q_start = k_start = 0); the engine passes a prefill chunk with the keys
    it gathered from the cache. Full attention without sinks over a whole sequence goes to SDPA's causal
    kernel (V zero-padded to D, since SDPA's fast CPU kernels need equal q/k/v head dims). Otherwise queries
    walk in chunks [a, a + C) against keys [a - W + 1, a + C): e.g. W = 129, C = 128, a = 256 reads keys
    128..383, so each chunk costs C * (C + W - 1), O(T * W) overall.
    """
    B, T, H, D = q.shape
    Dv = v.shape[-1]

    def sdpa(qc, kc, vc, **kw):
        vp = F.pad(vc, (0, D - Dv)) if Dv < D else vc
        out = F.scaled_dot_product_attention(qc.transpose(1, 2), kc.transpose(1, 2), vp.transpose(1, 2),
                                             scale=scale, enable_gqa=True, **kw)
        return out.transpose(1, 2)[..., :Dv]

    if sinks is None and q_start == k_start and (window is None or window >= T):
        return sdpa(q, k, v, is_causal=True)
    outs = []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        pa, pb = q_start + a, q_start + b
        lo = k_start if window is None else max(k_start, pa - window + 1)
        ks, vs = k[:, lo - k_start:pb - k_start], v[:, lo - k_start:pb - k_start]
        m = window_mask(torch.arange(pa, pb, device=q.device), torch.arange(lo, pb, device=q.device), window)
        outs.append(sdpa(q[:, a:b], ks, vs, attn_mask=m) if sinks is None
                    else attend_masked(q[:, a:b], ks, vs, m, sinks, scale))
    return torch.cat(outs, dim=1)


class DenseKVCache:
    """Reference cache: per layer, k/v of every position so far, contiguous from position 0.

    Used by tests and the reference generate; the engine has its own paged cache with the same `attend`.
    All rows of the batch share one length (no padding support, on purpose: it is the obviously-correct one).
    """

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def length(self, layer_id: int = 0) -> int:
        return 0 if layer_id not in self.k else self.k[layer_id].shape[1]

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               positions: torch.Tensor, sliding_window: int | None, sinks: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        if layer_id in self.k:
            k = torch.cat([self.k[layer_id], k], dim=1)
            v = torch.cat([self.v[layer_id], v], dim=1)
        self.k[layer_id], self.v[layer_id] = k, v
        k_pos = torch.arange(k.shape[1], device=q.device)
        mask = window_mask(positions, k_pos, sliding_window)  # [B, T, S]
        return attend_masked(q, k, v, mask[:, None, None], sinks, scale)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str, layer_id: int) -> None:
        super().__init__()
        H, K, D, Dv = config.attn_shape(layer_type)
        self.n_heads, self.n_kv_heads, self.head_dim, self.v_head_dim = H, K, D, Dv
        self.layer_id = layer_id
        self.window = config.sliding_window if layer_type == SLIDING else None
        self.value_scale = config.attention_value_scale
        self.scale = D ** -0.5
        self.q_proj = nn.Linear(config.dim, H * D, bias=False)
        self.k_proj = nn.Linear(config.dim, K * D, bias=False)
        self.v_proj = nn.Linear(config.dim, K * Dv, bias=False)
        self.o_proj = nn.Linear(H * Dv, config.dim, bias=False)
        self.attention_sink_bias = nn.Parameter(torch.zeros(H)) if config.has_sink(layer_type) else None
        self._qkv = LinearWeights(torch.cat)  # q, k and v as one [(H + K) * D + K * Dv, dim] matrix: one GEMM
        self._o = LinearWeights()

    def forward(self, x: torch.Tensor, rope: Rope, positions: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        y = self._qkv.linear(x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        qk = apply_rope(y[..., :(H + K) * D].view(B, T, H + K, D), rope)  # one RoPE over q and k heads
        q, k = qk[:, :, :H], qk[:, :, H:]
        # the value scale is applied before caching, so cached values are already scaled
        v = y[..., (H + K) * D:].view(B, T, K, self.v_head_dim) * self.value_scale
        if cache is None:
            out = causal_attention(q, k, v, self.window, self.attention_sink_bias, self.scale)
        else:
            out = cache.attend(self.layer_id, q, k, v, positions=positions, sliding_window=self.window,
                               sinks=self.attention_sink_bias, scale=self.scale)
        return self._o.linear(out.reshape(B, T, self.n_heads * self.v_head_dim), self.o_proj.weight)
