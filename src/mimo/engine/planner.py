"""KV planner: bytes of KV per request and pool sizes, from a ModelConfig alone (no weights); torch-free.

Uses the block manager's own arithmetic (`cdiv`, `sliding_blocks_bound`), so a plan and the engine agree.

Per token slot and layer: n_kv_heads * (qk head dim + v head dim) * dtype bytes. MiMo-V2-Flash in bf16:
- global layers (9): 4 * (192 + 128) * 2 = 2,560 B per layer -> 23,040 B per token for all 9; 6.04 GB at 256K;
- sliding layers (39): 8 * 320 * 2 = 5,120 B per layer -> 199,680 B per token; only a window is held:
  ~129 slots -> ~25.8 MB per request at any length (block_size 1, no drafts);
- MTP heads (3): sliding layers with the sliding shape, 15,360 B per token, ~2 MB per request;
- the all-global equivalent (all 48 main layers global, 4 KV heads each): 122,880 B per token, 32.2 GB at 256K,
  about 5.3x this engine's total. MTP heads are left out of the all-global figure: it answers "what would the
  trunk cost without sliding windows".

A request's peak is taken at the step that computes its last position N - 1 with k drafts: positions
[0, N + k) are reserved in the full table and at most `sliding_blocks_bound(W, B, 1 + k)` blocks (never more
than the full table's) in the sliding table. Prefill chunks hold more sliding blocks while they run
(W - 1 + chunk positions); that transient is a pool-sizing question (`resolve_num_blocks`), not a per-request one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mimo.engine.block_manager import KVBlockManager, cdiv, sliding_blocks_bound
from mimo.engine.config import DTYPE_BYTES, EngineConfig
from mimo.model.config import FULL, SLIDING, ModelConfig

DEFAULT_CONTEXTS = (4096, 16384, 32768, 65536, 131072, 262144)


def kv_bytes_per_token(model_config: ModelConfig, layer_type: str, dtype: str = "bfloat16") -> int:
    """One layer's K and V for one token slot: n_kv_heads * (qk dim + v dim) * dtype bytes."""
    _, n_kv, d_qk, d_v = model_config.attn_shape(layer_type)
    return n_kv * (d_qk + d_v) * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class LayerCounts:
    n_full: int
    n_sliding: int
    n_mtp: int

    @classmethod
    def of(cls, model_config: ModelConfig) -> LayerCounts:
        t = model_config.layer_types
        return cls(t.count(FULL), t.count(SLIDING), model_config.n_mtp_layers)


@dataclass(frozen=True)
class RequestKV:
    """KV bytes of one request whose context is `num_tokens` positions."""

    num_tokens: int
    full_bytes: int  # global-attention layers: grows with num_tokens
    sliding_bytes: int  # sliding layers: bounded by the window
    mtp_bytes: int  # MTP heads' sliding caches: bounded by the window
    all_global_bytes: int  # every main layer global, same block arithmetic

    @property
    def total_bytes(self) -> int:
        return self.full_bytes + self.sliding_bytes + self.mtp_bytes

    @property
    def ratio(self) -> float:
        """How many times more KV the all-global equivalent needs."""
        return self.all_global_bytes / self.total_bytes if self.total_bytes else float("inf")


@dataclass(frozen=True)
class KVPlan:
    layers: LayerCounts
    full_bytes_per_token: int  # all global layers together
    sliding_bytes_per_token: int  # all sliding layers together
    mtp_bytes_per_token: int
    all_global_bytes_per_token: int
    sliding_window: int
    block_size: int
    num_speculative_tokens: int
    dtype: str
    rows: tuple[RequestKV, ...]


def request_kv(model_config: ModelConfig, num_tokens: int, *, block_size: int = 16,
               num_speculative_tokens: int = 0, dtype: str = "bfloat16",
               sliding_window_margin: int = 0) -> RequestKV:
    """Peak KV bytes of one request of `num_tokens` positions (see the module docstring for the peak)."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    lc = LayerCounts.of(model_config)
    full_tok = kv_bytes_per_token(model_config, FULL, dtype)
    swa_tok = kv_bytes_per_token(model_config, SLIDING, dtype)
    full_blocks = cdiv(num_tokens + num_speculative_tokens, block_size)
    sliding_blocks = min(full_blocks, sliding_blocks_bound(model_config.sliding_window, block_size,
                                                           1 + num_speculative_tokens, sliding_window_margin))
    full_slots, sliding_slots = full_blocks * block_size, sliding_blocks * block_size
    return RequestKV(
        num_tokens=num_tokens,
        full_bytes=lc.n_full * full_tok * full_slots,
        sliding_bytes=lc.n_sliding * swa_tok * sliding_slots,
        mtp_bytes=lc.n_mtp * swa_tok * sliding_slots,
        all_global_bytes=model_config.n_layers * full_tok * full_slots,
    )


def kv_plan(model_config: ModelConfig, contexts: Iterable[int] = DEFAULT_CONTEXTS, *, block_size: int = 16,
            num_speculative_tokens: int = 0, dtype: str = "bfloat16",
            sliding_window_margin: int = 0) -> KVPlan:
    """The table `mimo kv-plan` prints: one RequestKV per context length."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    lc = LayerCounts.of(model_config)
    full_tok = kv_bytes_per_token(model_config, FULL, dtype)
    swa_tok = kv_bytes_per_token(model_config, SLIDING, dtype)
    rows = tuple(request_kv(model_config, n, block_size=block_size, num_speculative_tokens=num_speculative_tokens,
                            dtype=dtype, sliding_window_margin=sliding_window_margin)
                 for n in sorted(set(contexts)))
    return KVPlan(layers=lc, full_bytes_per_token=lc.n_full * full_tok,
                  sliding_bytes_per_token=lc.n_sliding * swa_tok, mtp_bytes_per_token=lc.n_mtp * swa_tok,
                  all_global_bytes_per_token=model_config.n_layers * full_tok,
                  sliding_window=model_config.sliding_window, block_size=block_size,
                  num_speculative_tokens=num_speculative_tokens, dtype=dtype, rows=rows)


def format_bytes(n: float) -> str:
    """Decimal units, as the spec quotes them: 6,039,797,760 -> '6.04 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(plan: KVPlan) -> str:
    lc = plan.layers
    lines = [
        f"KV cache per request ({plan.dtype}, block_size {plan.block_size}, "
        f"{plan.num_speculative_tokens} draft tokens, sliding window {plan.sliding_window})",
        f"  global layers:  {lc.n_full:3d}  {plan.full_bytes_per_token:>9,} B/token (all positions)",
        f"  sliding layers: {lc.n_sliding:3d}  {plan.sliding_bytes_per_token:>9,} B/token (window only)",
        f"  MTP heads:      {lc.n_mtp:3d}  {plan.mtp_bytes_per_token:>9,} B/token (window only)",
        f"  all-global:     {lc.n_full + lc.n_sliding:3d}  {plan.all_global_bytes_per_token:>9,} B/token "
        "(every main layer global)",
        "",
    ]
    header = ("context", "global", "sliding", "mtp", "total", "all-global", "ratio")
    table = [header] + [(f"{r.num_tokens:,}", format_bytes(r.full_bytes), format_bytes(r.sliding_bytes),
                         format_bytes(r.mtp_bytes), format_bytes(r.total_bytes), format_bytes(r.all_global_bytes),
                         f"{r.ratio:.2f}x") for r in plan.rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


# ---- pool sizing ---------------------------------------------------------------------------------------------
def block_bytes(model_config: ModelConfig, block_size: int, dtype: str = "bfloat16") -> tuple[int, int]:
    """(bytes of one full-pool block, bytes of one sliding-pool block) over all layers using that pool."""
    lc = LayerCounts.of(model_config)
    full = lc.n_full * kv_bytes_per_token(model_config, FULL, dtype) * block_size
    sliding = (lc.n_sliding + lc.n_mtp) * kv_bytes_per_token(model_config, SLIDING, dtype) * block_size
    return full, sliding


def resolve_num_blocks(engine_config: EngineConfig, model_config: ModelConfig) -> tuple[int, int]:
    """(num_full_blocks, num_sliding_blocks) for an engine config.

    - explicit counts are used as given (a count left None is sized as below);
    - otherwise the sliding pool holds every running sequence's decode window plus one full-budget prefill
      chunk: max_num_seqs * min(bound(1 + k), ceil(max_model_len / B)) + bound(min(budget, max_model_len));
    - the full pool gets max_num_seqs * ceil(max_model_len / B) blocks, or, with kv_cache_bytes, whatever the
      budget leaves after the sliding pool (ValueError if that cannot hold one max_model_len request).
    """
    ec, mc = engine_config, model_config
    if ec.max_model_len > mc.max_position_embeddings:
        raise ValueError(f"max_model_len ({ec.max_model_len}) exceeds the model's max_position_embeddings "
                         f"({mc.max_position_embeddings})")
    lc = LayerCounts.of(mc)
    has_full, has_sliding = lc.n_full > 0, lc.n_sliding + lc.n_mtp > 0
    B, k, margin = ec.block_size, ec.num_speculative_tokens, ec.sliding_window_margin
    per_seq_full = cdiv(ec.max_model_len, B)
    step = min(ec.max_num_batched_tokens, ec.max_model_len)
    auto_sliding = (ec.max_num_seqs * min(sliding_blocks_bound(mc.sliding_window, B, 1 + k, margin), per_seq_full)
                    + sliding_blocks_bound(mc.sliding_window, B, step, margin))
    auto_full = ec.max_num_seqs * per_seq_full
    if ec.kv_cache_bytes is None:
        full = auto_full if ec.num_full_blocks is None else ec.num_full_blocks
        sliding = auto_sliding if ec.num_sliding_blocks is None else ec.num_sliding_blocks
        return (full if has_full else 0), (sliding if has_sliding else 0)
    fb, sb = block_bytes(mc, B, ec.dtype)
    if not has_full:
        return 0, ec.kv_cache_bytes // sb
    sliding = auto_sliding if has_sliding else 0
    full = (ec.kv_cache_bytes - sliding * sb) // fb
    if full < per_seq_full:
        raise ValueError(f"kv_cache_bytes ({ec.kv_cache_bytes:,}) is too small: the sliding pool takes "
                         f"{sliding * sb:,} B and one request of max_model_len needs {per_seq_full * fb:,} B "
                         "of full-pool blocks; lower max_num_seqs / max_model_len or raise the budget")
    return full, sliding


def build_block_manager(engine_config: EngineConfig, model_config: ModelConfig) -> KVBlockManager:
    lc = LayerCounts.of(model_config)
    num_full, num_sliding = resolve_num_blocks(engine_config, model_config)
    return KVBlockManager(engine_config.block_size, num_full, num_sliding, model_config.sliding_window,
                          has_full=lc.n_full > 0, has_sliding=lc.n_sliding + lc.n_mtp > 0,
                          sliding_window_margin=engine_config.sliding_window_margin)
