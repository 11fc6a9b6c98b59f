"""MiMo-V2-Flash: hybrid sliding/global attention, sigmoid-routed MoE, and MTP blocks, single device.

Notable features (architecture-spec.md):
- pre-norm residual blocks; layer types per `config.layer_types` ("full" = global causal, "sliding" =
  window incl. the current token + per-head sink logit); FFN per `config.mlp_types` ("dense" / "moe");
- partial NeoX RoPE with a different theta per attention type; V scaled by `attention_value_scale`;
- MTP block k at position t takes the main model's *pre-final-norm* hidden state h_t and the token at
  t + k + 1, and predicts the token at t + k + 2 (non-chain: every block gets the main hidden state, as
  SGLang runs MiMo-V2-Flash). The blocks share the main embedding and lm_head;
- parameter names are the official checkpoint names (except the stacked experts; checkpoint/ splits them).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .config import DENSE, SLIDING, ModelConfig
from .layers import MLP, DerivedWeights, LinearWeights, RMSNorm, rope_cos_sin
from .moe import MoE, Routing


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_id]
        self.input_layernorm = RMSNorm(config.dim, config.rms_norm_eps)
        self.self_attn = Attention(config, self.layer_type, layer_id)
        self.post_attention_layernorm = RMSNorm(config.dim, config.rms_norm_eps)
        if config.mlp_types[layer_id] == DENSE:
            self.mlp: nn.Module = MLP(config.dim, config.intermediate_size)
        else:
            self.mlp = MoE(config, layer_id)

    def forward(self, x, rope, positions, cache=None, routing=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, positions, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, routing) if isinstance(self.mlp, MoE) else self.mlp(h))


class MTPBlock(nn.Module):
    """u = eh_proj([enorm(embed(token)); hnorm(h)]); one sliding-window block with a dense FFN;
    final_layernorm; the shared lm_head gives the logits."""

    def __init__(self, config: ModelConfig, k: int) -> None:
        super().__init__()
        D, eps = config.dim, config.rms_norm_eps
        self.enorm = RMSNorm(D, eps)
        self.hnorm = RMSNorm(D, eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self._eh = LinearWeights()
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Attention(config, SLIDING, config.n_layers + k)
        self.pre_mlp_layernorm = RMSNorm(D, eps)
        self.mlp = MLP(D, config.intermediate_size)
        self.final_layernorm = RMSNorm(D, eps)

    def forward(self, emb, hidden, rope, positions, cache=None):
        u = self._eh.linear(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1), self.eh_proj.weight)
        u = u + self.self_attn(self.input_layernorm(u), rope, positions, cache)
        u = u + self.mlp(self.pre_mlp_layernorm(u))
        return self.final_layernorm(u)


class MTP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MTPBlock(config, k) for k in range(config.n_mtp_layers))


class Body(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.mtp = MTP(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.weights_version = 0
        self._lm_head = LinearWeights()

    def mark_weights_changed(self) -> int:
        """Declare that parameters changed in place (load_state_dict, `p.data.copy_`, `p.data = t`, an
        optimizer step): bumps `weights_version` and drops every cached derived weight (layers.DerivedWeights).
        Returns the new version."""
        for m in self.modules():
            for v in vars(m).values():
                if isinstance(v, DerivedWeights):
                    v.invalidate()
        self.weights_version += 1
        return self.weights_version

    @property
    def n_mtp(self) -> int:
        return len(self.model.mtp.layers)

    def _rope(self, positions: torch.Tensor, layer_type: str, dtype: torch.dtype):
        c = self.config
        return rope_cos_sin(positions, c.rotary_dim(layer_type), c.attn_shape(layer_type)[2], c.theta(layer_type),
                            dtype)

    @staticmethod
    def _positions(input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            B, T = input_ids.shape
            return torch.arange(T, device=input_ids.device).expand(B, T)
        return positions.expand(input_ids.shape) if positions.dim() == 1 else positions

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                       routing: Routing | None = None) -> torch.Tensor:
        """Pre-final-norm hidden states [B, T, D]."""
        positions = self._positions(input_ids, positions)
        x = self.model.embed_tokens(input_ids)
        ropes = {t: self._rope(positions, t, x.dtype) for t in dict.fromkeys(self.config.layer_types)}
        for layer in self.model.layers:
            x = layer(x, ropes[layer.layer_type], positions, cache, routing)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head.linear(self.model.norm(hidden), self.lm_head.weight)

    def mtp_hidden(self, k: int, hidden: torch.Tensor, token_ids: torch.Tensor,
                   positions: torch.Tensor | None = None, cache=None, detach: bool = False) -> torch.Tensor:
        """MTP block k's final-normed output [B, T, D]: row t from (hidden[:, t], token_ids[:, t] = x_{t+k+1});
        `positions` are those of the hidden states. lm_head of it predicts x_{t+k+2}. `detach`: the hidden
        states and the shared embedding enter as constants (see forward's `mtp_detached`)."""
        positions = self._positions(token_ids, positions)
        emb = self.model.embed_tokens(token_ids)
        if detach:
            emb, hidden = emb.detach(), hidden.detach()
        rope = self._rope(positions, SLIDING, hidden.dtype)
        return self.model.mtp.layers[k](emb, hidden, rope, positions, cache)

    def mtp_forward(self, k: int, hidden: torch.Tensor, token_ids: torch.Tensor,
                    positions: torch.Tensor | None = None, cache=None, detach: bool = False) -> torch.Tensor:
        """Logits of MTP block k [B, T, V] (see mtp_hidden); `detach` also keeps the shared lm_head constant."""
        u = self.mtp_hidden(k, hidden, token_ids, positions, cache, detach)
        if detach:
            return torch.nn.functional.linear(u, self.lm_head.weight.detach())
        return self._lm_head.linear(u, self.lm_head.weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None, *,
                return_mtp: bool = False, routing: Routing | None = None, mtp_detached: bool = False):
        """Logits [B, T, V]; with return_mtp, also mtp_logits[k] [B, T-k-1, V] (teacher forcing).

        `mtp_detached`: the MTP heads read the trunk's hidden states, the embedding and lm_head as constants,
        so an MTP loss trains only the MTP blocks (RL trains the heads on rollouts this way, as verl's
        `detach_encoder`: the policy is then moved by the RL objective alone)."""
        h = self.forward_hidden(input_ids, positions, cache, routing)
        logits = self.logits(h)
        if not return_mtp:
            return logits
        positions = self._positions(input_ids, positions)
        T = input_ids.shape[1]
        mtp_logits = [self.mtp_forward(k, h[:, : T - k - 1], input_ids[:, k + 1:], positions[:, : T - k - 1],
                                       detach=mtp_detached)
                      for k in range(self.n_mtp) if T - k - 1 > 0]
        return logits, mtp_logits


def _per_row(x, n: int, default, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scalar, None (= default) or a tensor [n] as a tensor [n]."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).expand(n) if x.dim() == 0 else x.to(device=device, dtype=dtype)
    return torch.full((n,), default if x is None else x, dtype=dtype, device=device)


# Top-p from the C largest logits instead of sorting the row, with C growing over the rows it could not decide.
# The default model at temperature 0.7 / top-p 0.95, 64 code and chat-task requests: the nucleus (plus margin)
# fits in 64 candidates in 69% of rows, 1,024 in 89%; 11% need the sort. One thread, 64 rows of 4,096:
# topk(64) 1.4 ms, topk(1024) 5.4 ms, the sort 15.8 ms. Deciding the whole batch at once (one C = 1,024, any
# undecided row sending every row to the sort) sorted nearly every 64-row step: 0.89^64.
NUCLEUS_CANDIDATES = (64, 1024)
NUCLEUS_MARGIN = 1e-4  # mass beyond top_p the candidates must hold, so float rounding cannot reach past them


def _nucleus_of_candidates(x_NV: torch.Tensor, p_N: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p of each row from its C largest logits: (rows [N, V], decided [N]); a row is decided when that
    equals sorting it.

    The same as the sort when (a) the mass before the last candidate reaches top_p (with `NUCLEUS_MARGIN`), so
    it and every token after it are dropped, whatever the order of ties among them; (b) no two candidates tie,
    so the kept ones are in the sort's order (a stable sort puts tied tokens in index order, topk in no
    promised order). Example, C = 2, probs [0.1, 0.6, 0.3] (over all V), top_p 0.5: candidates [1, 2], mass
    before the last 0.6 >= 0.5; mass before each [0, 0.6] -> token 1 alone kept.
    """
    vals_NC, idx_NC = x_NV.topk(C, dim=-1)
    ps_NC = torch.exp(vals_NC - torch.logsumexp(x_NV, dim=-1, keepdim=True))
    cum_NC = torch.cumsum(ps_NC, dim=-1)
    decided_N = (cum_NC[:, -2] >= p_N + NUCLEUS_MARGIN) & (vals_NC[:, 1:] != vals_NC[:, :-1]).all(-1)
    kept_NC = vals_NC.masked_fill(cum_NC - ps_NC >= p_N[:, None], float("-inf"))
    return torch.full_like(x_NV, float("-inf")).scatter_(-1, idx_NC, kept_NC), decided_N


def _sorted_filter(x_NV: torch.Tensor, k_N: torch.Tensor, p_N: torch.Tensor) -> torch.Tensor:
    """filter_logits by sorting each row: the reference."""
    V = x_NV.shape[-1]
    k_on, p_on = (k_N > 0) & (k_N < V), p_N < 1.0
    sorted_NV, idx_NV = x_NV.sort(dim=-1, descending=True, stable=True)
    drop_NV = torch.zeros_like(sorted_NV, dtype=torch.bool)
    if bool(k_on.any()):
        kth_N1 = sorted_NV.gather(-1, (torch.where(k_on, k_N, torch.full_like(k_N, V)) - 1)[:, None])
        drop_NV |= (sorted_NV < kth_N1) & k_on[:, None]
    if bool(p_on.any()):
        ps_NV = torch.softmax(sorted_NV.float().masked_fill(drop_NV, float("-inf")), dim=-1)
        before_NV = torch.cumsum(ps_NV, dim=-1) - ps_NV  # mass strictly before each token
        # rows with top-p off are left alone: float rounding in the cumsum must not drop their tail
        drop_NV |= (before_NV >= p_N[:, None]) & p_on[:, None]
    return torch.empty_like(x_NV).scatter_(-1, idx_NV, sorted_NV.masked_fill(drop_NV, float("-inf")))


def filter_logits(logits: torch.Tensor, top_k: int | torch.Tensor | None = None,
                  top_p: float | torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k, then outside the top-p nucleus; logits [..., V].

    The one definition of top-k / top-p: the reference `generate` here and the engine's sampler both use it.
    top_k / top_p: scalars or per-row tensors (one value per row of logits.reshape(-1, V)); top_k <= 0 or None
    = off, top_p >= 1 or None = off. top-k keeps every token tied with the k-th largest logit, so the result
    does not depend on how ties are ordered (vLLM does the same). top-p then keeps the most likely tokens until
    their mass reaches top_p: a token is dropped when the mass sorted before it already reaches top_p, so the
    most likely token always stays. Example, probs [0.5, 0.3, 0.2], top_p 0.7: mass before each token
    [0, 0.5, 0.8] -> the first two are kept.

    Each row is filtered on its own: a row with top-p alone is first tried on its 64, then its 1,024 largest
    logits (`NUCLEUS_CANDIDATES`, `_nucleus_of_candidates`), kept where that gives the sort's result; the rows
    left and the rows with top-k are sorted, as `reference` sorts every row; a row with neither is returned as
    it is. So one request's top-k or undecided nucleus does not make the batch sort.
    """
    V = logits.shape[-1]
    x_NV = logits.reshape(-1, V)
    N, dev = x_NV.shape[0], logits.device
    k_N = _per_row(top_k, N, 0, torch.long, dev)
    p_N = _per_row(top_p, N, 1.0, torch.float32, dev)
    k_on, p_on = (k_N > 0) & (k_N < V), p_N < 1.0
    if not (bool(k_on.any()) or bool(p_on.any())):
        return logits
    if reference:
        return _sorted_filter(x_NV, k_N, p_N).reshape(logits.shape)
    fast_N = p_on & ~k_on  # top-p alone: from candidates, where they decide
    # rows_R: the top-p-only rows not decided yet; None while that is every row (no indexing, no copy)
    rows_R = None if bool(fast_N.all()) else fast_N.nonzero()[:, 0]
    out_NV = None if rows_R is None else x_NV.clone()  # rows with neither filter stay as they are
    for C in NUCLEUS_CANDIDATES:
        if C >= V or (rows_R is not None and not len(rows_R)):
            break
        x_RV, p_R = (x_NV, p_N) if rows_R is None else (x_NV[rows_R], p_N[rows_R])
        cand_RV, decided_R = _nucleus_of_candidates(x_RV, p_R, C)
        if rows_R is None:
            if bool(decided_R.all()):  # the common case at batch 1
                return cand_RV.reshape(logits.shape)
            out_NV, rows_R = cand_RV, torch.arange(N, device=dev)
        else:
            out_NV[rows_R[decided_R]] = cand_RV[decided_R]
        rows_R = rows_R[~decided_R]
    if rows_R is None:  # no candidate count below V
        out_NV, rows_R = x_NV.clone(), torch.arange(N, device=dev)
    sort_R = torch.cat([rows_R, k_on.nonzero()[:, 0]])  # undecided top-p rows and every top-k row
    if len(sort_R):
        out_NV[sort_R] = _sorted_filter(x_NV[sort_R], k_N[sort_R], p_N[sort_R])
    return out_NV.reshape(logits.shape)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from probabilities [V] (any positive total): `draws` of one row."""
    return draws(probs[None], [generator])[0]


def draws(probs_NV: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of probabilities [N, V] (any positive totals) by inverse CDF: one U[0, 1) draw u per
    row, from that row's generator (None: the global RNG), in row order; then the first token whose cumulative
    mass exceeds u times the row's total. A zero-probability token is never drawn: its cumulative mass equals
    the one before it. Example, probs [0.2, 0, 0.8], u 0.5: cumulative [0.2, 0.2, 1.0] -> token 2. One draw over
    4,096 ids, one thread: torch.multinomial 162-197 us, this 25-36; 64 rows at once instead of one by one ~3x
    less. The one draw rule: the reference `generate` and the engine's sampler both use it."""
    cdf_NV = probs_NV.cumsum(-1)
    u_N = torch.stack([torch.rand((), generator=g, device=g.device if g is not None else probs_NV.device)
                       for g in generators]).to(probs_NV.device)
    out = torch.searchsorted(cdf_NV, (u_N * cdf_NV[:, -1])[:, None], right=True)[:, 0].tolist()
    V = probs_NV.shape[-1]
    # u * total can round up to the total itself: then the last token with mass
    return [t if t < V else int(probs_NV[i].nonzero()[-1]) for i, t in enumerate(out)]


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | None = None) -> list[int]:
    """Slow, obviously-correct reference: a full forward over the whole sequence for every new token."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]))[0, -1].float()
        if temperature == 0.0:
            nxt = int(logits.argmax())
        else:
            probs = filter_logits(logits / temperature, top_k, top_p, reference=True).softmax(-1)
            nxt = draw(probs, gen)
        ids.append(nxt)
        out.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
    return out
