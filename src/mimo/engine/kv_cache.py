"""The KV tensors of the paged cache and the per-step view the model attends through.

Two slot spaces, allocated up front:
- full: one slot per (block, offset) of the global-attention pool, used by every global layer;
- sliding: one slot per (block, offset) of the sliding-window pool, used by every sliding layer and every
  MTP block (each layer id has its own tensors; they share the slot numbering, so one sliding block table per
  sequence serves them all).
slot = block_id * block_size + offset; e.g. block_size 16, position 37 in the sequence's logical block 2
(offset 5), physical block 9 -> slot 149.

A step flattens every scheduled sequence's query tokens into one [1, N] batch (the model sees a batch of one)
and hands the model a `StepView`: `attend()` first writes the new k/v into their slots, then attends each
query over its sequence's keys gathered from the slots. Short segments (decode: 1 + drafts tokens; MTP draft
extends) are padded into one [Bq, Tq] batch and done with one grouped matmul per layer; long segments
(prefill chunks) are done one by one in query chunks, so a sliding layer reads only window + chunk keys per
chunk: O(T * window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo.model.attention import attend_masked, causal_attention, window_mask
from mimo.model.config import SLIDING, ModelConfig

_PAD_POS = 1 << 30  # key position of padding: q_pos - _PAD_POS < 0, so the causal mask drops it
SHORT = 16  # segments up to this many queries go through the batched path


@dataclass
class Segment:
    """One sequence's queries in this step: positions [start, start + length), with its block tables.

    `full_table[j]` / `swa_table[j]` hold the block of positions [j * B, (j + 1) * B) in each pool; sliding
    entries below the window may be None (freed). Only positions >= start - sliding_window + 1 are read from
    the sliding table, and none below `kv_lo`: an MTP block's cache starts where its first draft extend
    started (its entries are functions of their own inputs only, so older ones are never computed).
    """

    start: int
    length: int
    full_table: list[int]
    swa_table: list[int | None]
    kv_lo: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


class KVCache:
    """Per-layer-id k/v slot tensors: [num_slots, n_kv_heads, head_dim] and [num_slots, n_kv_heads, v_dim]."""

    def __init__(self, config: ModelConfig, block_size: int, num_full_blocks: int, num_swa_blocks: int,
                 n_mtp_layers: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.config = config
        self.block_size = block_size
        num_full_slots, num_swa_slots = num_full_blocks * block_size, num_swa_blocks * block_size
        self.window = config.sliding_window
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.sliding: dict[int, bool] = {}
        types = list(config.layer_types) + [SLIDING] * n_mtp_layers
        for layer_id, t in enumerate(types):
            _, K, D, Dv = config.attn_shape(t)
            n = num_swa_slots if t == SLIDING else num_full_slots
            self.k[layer_id] = torch.zeros(n, K, D, dtype=dtype, device=device)
            self.v[layer_id] = torch.zeros(n, K, Dv, dtype=dtype, device=device)
            self.sliding[layer_id] = t == SLIDING

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())

    def view(self, segments: list[Segment]) -> StepView:
        return StepView(self, segments)


def _table(tables: list[list[int | None]]) -> torch.Tensor:
    """Block tables as one [n, max_len] tensor; freed (None) and padding entries are -1."""
    width = max((len(t) for t in tables), default=0) or 1
    return torch.tensor([[-1 if b is None else b for b in t] + [-1] * (width - len(t)) for t in tables],
                        dtype=torch.long)


def _lookup(table: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots of positions `pos` in block-table rows `rows` (same shapes): table[row, p // B] * B + p % B."""
    blocks = table[rows, pos // block_size]
    if (blocks < 0).any():
        raise IndexError("a position reaches a freed or missing KV block")
    return blocks * block_size + pos % block_size


def _range_slots(table: torch.Tensor, row: int, lo: int, hi: int, block_size: int) -> torch.Tensor:
    """Slots of positions [lo, hi) of one sequence (row of the block-table tensor)."""
    pos = torch.arange(lo, hi)
    return _lookup(table, torch.full_like(pos, row), pos, block_size)


class StepView:
    """What the model's `cache` argument is during an engine step (see module docstring).

    Built once per step with a handful of tensor ops over all segments (no per-sequence loop for the batched
    short segments), so the per-step overhead does not grow with Python work per request.
    """

    def __init__(self, cache: KVCache, segments: list[Segment]):
        self.cache = cache
        dev = next(iter(cache.k.values())).device
        W, B = cache.window, cache.block_size
        self.has_full = any(not v for v in cache.sliding.values())
        n = len(segments)
        start = torch.tensor([s.start for s in segments])
        length = torch.tensor([s.length for s in segments])
        kv_lo = torch.tensor([s.kv_lo for s in segments])
        offset = length.cumsum(0) - length
        self.N = int(length.sum())
        tables = {True: _table([s.swa_table for s in segments])}
        if self.has_full:
            tables[False] = _table([s.full_table for s in segments])
        # token i of the flattened batch: segment seg[i] at position pos[i]
        seg = torch.repeat_interleave(torch.arange(n), length)
        pos = torch.arange(self.N) - offset[seg] + start[seg]
        self.write = {p: _lookup(t, seg, pos, B).to(dev) for p, t in tables.items()}

        short = (length <= SHORT).nonzero().flatten()
        self.long = [(int(offset[i]), segments[i]) for i in (length > SHORT).nonzero().flatten().tolist()]
        self.short_keys: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dense = not self.long and bool((length == length[0]).all())
        if len(short):
            st, ln, lo_kv = start[short], length[short], kv_lo[short]
            Tq = int(ln.max())
            j = torch.minimum(torch.arange(Tq)[None, :], (ln - 1)[:, None])  # pad rows repeat their last query
            self.qidx = (offset[short][:, None] + j).to(dev)  # [Bq, Tq]
            self.qvalid = (torch.arange(Tq)[None, :] < ln[:, None]).to(dev)
            qpos = st[:, None] + j
            end = st + ln
            for sliding, table in tables.items():
                lo = torch.maximum(st - W + 1, lo_kv) if sliding else lo_kv
                S = int((end - lo).max())
                kpos = lo[:, None] + torch.arange(S)[None, :]  # [Bq, S]
                valid = kpos < end[:, None]
                slots = _lookup(table, short[:, None].expand(-1, S), torch.where(valid, kpos, lo[:, None]), B)
                kpos = torch.where(valid, kpos, _PAD_POS)
                mask = window_mask(qpos, kpos, W if sliding else None)[:, None, None]  # [Bq, 1, 1, Tq, S]
                self.short_keys[sliding] = (slots.to(dev), mask.to(dev))
        # per long segment, per pool: key slots and the position of the first key
        self.long_keys: list[dict[bool, tuple[torch.Tensor, int]]] = []
        for i in (length > SHORT).nonzero().flatten().tolist():
            s = segments[i]
            lo = max(s.start - W + 1, s.kv_lo)
            d = {True: (_range_slots(tables[True], i, lo, s.end, B).to(dev), lo)}
            if self.has_full:
                d[False] = (_range_slots(tables[False], i, s.kv_lo, s.end, B).to(dev), s.kv_lo)
            self.long_keys.append(d)

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               positions: torch.Tensor, sliding_window: int | None, sinks: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        c = self.cache
        sliding = c.sliding[layer_id]
        kc, vc = c.k[layer_id], c.v[layer_id]
        w = self.write[sliding]
        kc[w] = k[0] if k.dtype == kc.dtype else k[0].to(kc.dtype)
        vc[w] = v[0] if v.dtype == vc.dtype else v[0].to(vc.dtype)
        q0 = q[0]  # [N, H, D]
        H, Dv = q0.shape[1], vc.shape[-1]
        if self.short_keys:
            slots, mask = self.short_keys[sliding]
            kb, vb = kc[slots], vc[slots]  # [Bq, S, K, D], [Bq, S, K, Dv]
            if self.dense:  # every segment short and of one length: the batch is a plain [Bq, Tq] grid
                qb = q0.view(self.qidx.shape[0], self.qidx.shape[1], H, -1)
                return attend_masked(qb, kb, vb, mask, sinks, scale).reshape(1, self.N, H, Dv)
            ob = attend_masked(q0[self.qidx], kb, vb, mask, sinks, scale)  # [Bq, Tq, H, Dv]
        out = q0.new_empty(self.N, H, Dv)
        if self.short_keys:
            out[self.qidx[self.qvalid]] = ob[self.qvalid].to(out.dtype)
        for (off, s), keys in zip(self.long, self.long_keys):
            slots, lo = keys[sliding]
            out[off:off + s.length] = causal_attention(
                q0[None, off:off + s.length], kc[slots][None], vc[slots][None], sliding_window, sinks, scale,
                chunk=256, q_start=s.start, k_start=lo)[0]
        return out.unsqueeze(0)
