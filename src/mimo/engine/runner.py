"""ModelRunner: turns scheduled sequences into one flattened model call over the paged cache, and runs the
MTP blocks to draft tokens.

Main step: every item's query tokens are concatenated into input_ids [1, N] with their positions; the model
attends through `KVCache.view(segments)`. Only the rows that are sampled or verified go through lm_head.

MTP drafting, non-chain, as SGLang runs MiMo-V2-Flash (engine-notes §4.2). With committed tokens x_0..x_n
(x_n pending, the main model holds KV of 0..n-1 and hidden states h_t):
  block k at position t takes (h_t, x_{t+k+1}) and its output at t = n - 1 drafts x_{n+k+1};
  tokens beyond x_n are the drafts made earlier in the same round: block 0 drafts d1 = x_{n+1}, block 1 reads
  d1 at t = n - 1 and drafts d2, block 2 reads d1 at t = n - 2 and d2 at t = n - 1 and drafts d3.
An entry of block k at position t is final once x_{t+k+1} is committed, i.e. for t < n - k; entries from
drafts are recomputed in the next round, which starts block k at its first non-final position (its
`valid` mark). An MTP block is a single layer, so its K/V at t depend on its inputs at t only: after a
prefill of P tokens only positions >= P - W are computed (no later query reads older keys).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from mimo.engine.kv_cache import KVCache, Segment
from mimo.engine.sequence import Sequence


@dataclass
class MTPState:
    """Per-sequence drafting state: recent main hidden states and each block's first non-final position."""

    h: torch.Tensor | None = None  # [L, D] hidden states of positions [h_start, h_start + L)
    h_start: int = 0
    valid: list[int] = field(default_factory=list)  # per block: entries at positions < valid[k] are final
    kv_lo: int = 0  # first position the MTP blocks ever computed (the same for all blocks)
    drafts: list[int] = field(default_factory=list)  # drafts for the next verify step

    def append(self, start: int, rows: torch.Tensor, keep_from: int) -> None:
        """Add hidden rows of positions [start, start + len(rows)), dropping rows before keep_from."""
        if self.h is None or start != self.h_start + self.h.shape[0]:
            self.h, self.h_start = rows, start
        else:
            self.h = torch.cat([self.h, rows])
        if keep_from > self.h_start:
            cut = min(keep_from - self.h_start, self.h.shape[0])
            self.h, self.h_start = self.h[cut:], self.h_start + cut

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.h[lo - self.h_start:hi - self.h_start]


class ModelRunner:
    def __init__(self, model, cache: KVCache, device: torch.device | str = "cpu"):
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.window = model.config.sliding_window

    def forward(self, items: list[tuple[Sequence, int, list[int]]], routing=None) -> torch.Tensor:
        """items: (seq, start position, query token ids). Returns pre-norm hidden states [N, D]; `routing`
        (mimo.model.moe.Routing) records the chosen experts of the N flattened rows."""
        segs, ids, pos = [], [], []
        for seq, start, toks in items:
            segs.append(Segment(start, len(toks), seq.full_block_table, seq.sliding_block_table))
            ids += toks
            pos += range(start, start + len(toks))
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.tensor([pos], device=self.device)
        return self.model.forward_hidden(input_ids, positions, self.cache.view(segs), routing)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden).float()

    def draft(self, seqs: list[Sequence], states: list[MTPState], num_drafts: list[int]) -> None:
        """One drafting round: fills states[i].drafts with num_drafts[i] greedy MTP drafts.

        Every block of a sequence runs over the same positions [lo, n), lo = the oldest non-final entry of any
        of its blocks, so one step view serves all blocks; re-running a final entry rewrites the same K/V.
        """
        W = self.window
        los = []
        for seq, st, nd in zip(seqs, states, num_drafts):
            n = seq.num_computed_tokens
            if not st.valid:  # first round after (re)admission: only the last window matters
                st.valid = [max(0, n - W)] * nd
                st.kv_lo = max(0, n - W)
            los.append(max(min(st.valid[:nd]), n - W))
            st.drafts = []
        view_for: dict[tuple[int, ...], object] = {}
        for k in range(max(num_drafts, default=0)):
            live = tuple(i for i, nd in enumerate(num_drafts) if nd > k)
            if live not in view_for:
                view_for[live] = self.cache.view([
                    Segment(los[i], seqs[i].num_computed_tokens - los[i], seqs[i].full_block_table,
                            seqs[i].sliding_block_table, states[i].kv_lo) for i in live])
            ids, pos, hid, lengths = [], [], [], []
            for i in live:
                seq, st, lo = seqs[i], states[i], los[i]
                n = seq.num_computed_tokens
                # tokens x_{t+k+1} for t in [lo, n): committed up to x_n, then this round's drafts
                toks = seq.token_ids_slice(lo + k + 1, n + 1) if lo + k + 1 <= n else []
                toks = (toks + st.drafts[max(0, lo + k - n):])[: n - lo]
                ids += toks
                pos += range(lo, n)
                hid.append(st.rows(lo, n))
                lengths.append(n - lo)
                st.valid[k] = n - k
            hidden = hid[0] if len(hid) == 1 else torch.cat(hid)
            u = self.model.mtp_hidden(k, hidden[None], torch.tensor([ids], device=self.device),
                                      torch.tensor([pos], device=self.device), view_for[live])[0]
            last = list(itertools.accumulate(lengths))  # each live sequence's row for its last position, + 1
            rows = u[-1:] if len(last) == 1 else u[torch.tensor(last, device=u.device) - 1]
            nxt = self.model.lm_head(rows).argmax(-1).tolist()
            for i, t in zip(live, nxt):
                states[i].drafts.append(int(t))
