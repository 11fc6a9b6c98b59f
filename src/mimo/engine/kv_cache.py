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

import array
import itertools
from dataclasses import dataclass

import torch

from mimo.engine.block_manager import slots as slots_of
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


def long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """A 1-D int64 tensor of a list of ints, through array('q'): a step's metadata is thousands of ints at
    64 requests, and torch.tensor inspects them one Python object at a time (64 x 180 ints: nested lists
    2,687 us, one flat list 1,726, this 244). Never empty here (frombuffer refuses an empty buffer)."""
    t = torch.frombuffer(array.array("q", values), dtype=torch.long)  # shares the array's memory, keeps it alive
    return t if device.type == "cpu" else t.to(device)


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
        self.device = torch.device(device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())

    def view(self, segments: list[Segment]) -> StepView:
        return StepView(self, segments)


class StepView:
    """What the model's `cache` argument is during an engine step (see module docstring).

    The slot lists are built in Python per segment and turned into a handful of tensors: per pool the write
    slots [N], and for the short segments the key slots [Bq, S] and the mask [Bq, 1, 1, Tq, S].
    """

    def __init__(self, cache: KVCache, segments: list[Segment]):
        self.cache = cache
        dev = cache.device
        W, B = cache.window, cache.block_size
        self.has_full = any(not v for v in cache.sliding.values())
        pools = (True, False) if self.has_full else (True,)

        def table(s: Segment, sliding: bool) -> list[int | None]:
            return s.swa_table if sliding else s.full_table

        self.N = sum(s.length for s in segments)
        self.write = {p: long_tensor([x for s in segments for x in slots_of(table(s, p), s.start, s.end, B)], dev)
                      for p in pools}
        offsets = list(itertools.accumulate((s.length for s in segments), initial=0))
        short = [i for i, s in enumerate(segments) if s.length <= SHORT]
        self.long = [(offsets[i], s) for i, s in enumerate(segments) if s.length > SHORT]
        self.short_keys: dict[bool, tuple[torch.Tensor, torch.Tensor | None]] = {}  # slots, mask (None: all True)
        self.dense = not self.long and len({s.length for s in segments}) == 1
        if short:
            ss = [segments[i] for i in short]
            Tq = max(s.length for s in ss)
            # query j of short segment r is row qidx[r, j] of the batch; pad queries repeat the last one
            qlast = [[min(j, s.length - 1) for j in range(Tq)] for s in ss]
            if not self.dense:
                self.qidx = long_tensor([offsets[i] + j for i, js in zip(short, qlast) for j in js], dev).view(-1, Tq)
                # the output rows of the short segments, in order, as rows of the flattened [Bq * Tq] batch,
                # and where they go among all N rows: e.g. lengths 2, 1 (Tq 2): src [0, 1, 2], dst [0, 1, 2]
                self.qsrc = long_tensor([r * Tq + j for r, s in enumerate(ss) for j in range(s.length)], dev)
                self.qdst = long_tensor([offsets[i] + j for i in short for j in range(segments[i].length)], dev)
            qpos = long_tensor([s.start + j for s, js in zip(ss, qlast) for j in js], dev).view(-1, Tq)  # [Bq, Tq]
            for sliding in pools:
                los = [max(s.start - W + 1, s.kv_lo) if sliding else s.kv_lo for s in ss]
                S = max(s.end - lo for s, lo in zip(ss, los))
                # one query per segment over its whole unpadded key range (decode steps of requests with equal
                # key counts: any single one) sees every key, so its mask would be all True: None, two ops less
                # per layer
                sees_all = Tq == 1 and all(s.end - lo == S for s, lo in zip(ss, los))
                slots, kpos = [], []  # [Bq * S], row-major
                for s, lo in zip(ss, los):
                    r = slots_of(table(s, sliding), lo, s.end, B)
                    pad = S - len(r)
                    slots += r + [r[0]] * pad  # padding reads any valid slot; the mask drops it
                    if not sees_all:
                        kpos += list(range(lo, s.end)) + [_PAD_POS] * pad
                mask = None if sees_all else \
                    window_mask(qpos, long_tensor(kpos, dev).view(-1, S), W if sliding else None)[:, None, None]
                self.short_keys[sliding] = (long_tensor(slots, dev).view(-1, S), mask)  # mask [Bq, 1, 1, Tq, S]
        # per long segment, per pool: key slots and the position of the first key
        self.long_keys: list[dict[bool, tuple[torch.Tensor, int]]] = []
        for _, s in self.long:
            los = {True: max(s.start - W + 1, s.kv_lo), False: s.kv_lo}
            self.long_keys.append({p: (long_tensor(slots_of(table(s, p), los[p], s.end, B), dev), los[p])
                                   for p in pools})

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               positions: torch.Tensor, sliding_window: int | None, sinks: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        c = self.cache
        sliding = c.sliding[layer_id]
        kc, vc = c.k[layer_id], c.v[layer_id]
        w = self.write[sliding]
        # index_copy_ / index_select rather than kc[w] = k / kc[slots]: advanced indexing takes a generic
        # path that costs 4-6x more at 16-64 sequences (gathering 16 x 65 slots: 116 us against 21)
        kc.index_copy_(0, w, k[0] if k.dtype == kc.dtype else k[0].to(kc.dtype))
        vc.index_copy_(0, w, v[0] if v.dtype == vc.dtype else v[0].to(vc.dtype))
        q0 = q[0]  # [N, H, D]
        H, Dv = q0.shape[1], vc.shape[-1]
        if self.short_keys:
            slots, mask = self.short_keys[sliding]
            Bq, S = slots.shape
            flat = slots.view(-1)
            kb = kc.index_select(0, flat).view(Bq, S, *kc.shape[1:])  # [Bq, S, K, D]
            vb = vc.index_select(0, flat).view(Bq, S, *vc.shape[1:])  # [Bq, S, K, Dv]
            if self.dense:  # every segment short and of one length: the batch is a plain [Bq, Tq] grid
                qb = q0.view(Bq, self.N // Bq, H, -1)
                return attend_masked(qb, kb, vb, mask, sinks, scale).reshape(1, self.N, H, Dv)
            qb = q0.index_select(0, self.qidx.view(-1)).view(*self.qidx.shape, H, -1)  # not q0[qidx]: 10x slower
            ob = attend_masked(qb, kb, vb, mask, sinks, scale)  # [Bq, Tq, H, Dv]
            # index_select rather than boolean masks: static shapes, so a compiled step does not break here
            rows = ob.reshape(-1, H, Dv).index_select(0, self.qsrc)
            if not self.long:
                return rows.unsqueeze(0).to(q0.dtype)
        out = q0.new_empty(self.N, H, Dv)
        if self.short_keys:
            out.index_copy_(0, self.qdst, rows.to(out.dtype))
        for (off, s), keys in zip(self.long, self.long_keys):
            slots, lo = keys[sliding]
            out[off:off + s.length] = causal_attention(
                q0[None, off:off + s.length], kc.index_select(0, slots)[None], vc.index_select(0, slots)[None],
                sliding_window, sinks, scale,
                chunk=256, q_start=s.start, k_start=lo)[0]
        return out.unsqueeze(0)
