"""Paged KV bookkeeping for the hybrid cache: a FULL pool and a SLIDING pool of fixed-size blocks; torch-free.

Layout (vLLM-style per-type block tables, not a ring buffer, so speculative rollback is free):
- Both pools hold `block_size` token slots per block; block b covers slots [b * block_size, (b+1) * block_size)
  of that pool's KV tensors. The KV cache writes/reads a token through `slots()`:
  slot = block_id * block_size + offset.
- A sequence's position p lives in logical block p // block_size at offset p % block_size, in each table.
- FULL pool: global-attention layers. The full table holds blocks for every position [0, upto).
- SLIDING pool: sliding-window layers and the MTP heads' sliding caches (they are sliding layers with their own
  tensors indexed by the same slots, so they share the sliding table). It holds only live positions.

Window rule. W = `sliding_window` keys per query *including itself*: a query at p reads keys (p - W, p]. With
n = committed (computed, accepted) tokens, every future query is at a position >= n, so positions
< n - W + 1 are never read again and a sliding block is freed once all its positions are below that:

    first_live(n) = max(0, n - W + 1 - margin)          (margin: EngineConfig.sliding_window_margin)
    logical blocks < first_live(n) // block_size are dead.

Worked example, block_size 4, W 5, margin 0: n = 11 -> first_live = 11 - 5 + 1 = 7 -> 7 // 4 = 1, so only
logical block 0 (positions 0-3) is freed; block 1 (positions 4-7) stays because the query at 11 reads keys 7..11.

Speculation never frees anything a retry needs: freeing is keyed on the committed n only. A verify step at
n with k drafts writes positions n..n+k; rejected ones are left as garbage and overwritten by the next step,
because n advances only over accepted tokens. So per sequence the sliding table spans at most the positions
[first_live(n), n + T) for a step of T query tokens: L = W - 1 + margin + T positions, which touch at most

    max_blocks_spanned(L) = ceil((L - 1) / block_size) + 1   (<= ceil(L / block_size) + 1)

blocks. Example: W 129, block 16, decode with 3 drafts (T 4): L 132 -> ceil(131/16) + 1 = 10 blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mimo.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """A pool ran out; callers check can_allocate first, so this is a bookkeeping bug."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_blocks_spanned(num_positions: int, block_size: int) -> int:
    """Most blocks a run of `num_positions` consecutive positions can touch, over all alignments.

    A run [a, a + L) touches blocks a // B .. (a + L - 1) // B; the worst alignment gives ceil((L - 1) / B) + 1.
    Example, B 4, L 5: [3, 8) touches blocks 0, 1, 2 -> 3 = ceil(4/4) + 1. L 0 -> 0.
    """
    if num_positions <= 0:
        return 0
    return cdiv(num_positions - 1, block_size) + 1


def sliding_blocks_bound(sliding_window: int, block_size: int, tokens_in_step: int, margin: int = 0) -> int:
    """Upper bound on one sequence's live sliding blocks during a step of `tokens_in_step` query tokens.

    Live positions: [n - W + 1 - margin, n + tokens_in_step), i.e. W - 1 + margin + tokens_in_step positions.
    Example: W 129, B 1, decode without drafts (T 1): 129 blocks = 129 token slots.
    """
    return max_blocks_spanned(sliding_window - 1 + margin + tokens_in_step, block_size)


class BlockPool:
    """Fixed set of block ids 0..num_blocks-1 with a free list and double-free detection."""

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def is_free(self, block_id: int) -> bool:
        return self._is_free[block_id]

    def allocate(self) -> int:
        if not self._free:
            raise NoFreeBlocksError(f"pool of {self.num_blocks} blocks is exhausted")
        b = self._free.popleft()
        self._is_free[b] = False
        return b

    def free(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside the pool [0, {self.num_blocks})")
        if self._is_free[block_id]:
            raise ValueError(f"double free of block {block_id}")
        self._is_free[block_id] = True
        self._free.append(block_id)


@dataclass(frozen=True)
class KVUsage:
    full_used: int
    full_total: int
    sliding_used: int
    sliding_total: int

    @property
    def fraction(self) -> float:
        """Fullness of the tighter pool, in [0, 1] (what vLLM reports as kv_cache_usage_perc)."""
        fr = [u / t for u, t in ((self.full_used, self.full_total), (self.sliding_used, self.sliding_total))
              if t > 0]
        return max(fr, default=0.0)


class KVBlockManager:
    """Block tables for the full and sliding pools.

    has_full / has_sliding: whether the model has any global / any sliding (or MTP) layer. A missing type
    keeps its table empty and its pool is never consulted (its size may be 0).
    """

    def __init__(self, block_size: int, num_full_blocks: int, num_sliding_blocks: int, sliding_window: int,
                 has_full: bool = True, has_sliding: bool = True, sliding_window_margin: int = 0):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {sliding_window}")
        if sliding_window_margin < 0:
            raise ValueError(f"sliding_window_margin must be >= 0, got {sliding_window_margin}")
        if not (has_full or has_sliding):
            raise ValueError("a model needs at least one attention layer type (has_full or has_sliding)")
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.margin = sliding_window_margin
        self.has_full = has_full
        self.has_sliding = has_sliding
        self.full_pool = BlockPool(num_full_blocks if has_full else 0)
        self.sliding_pool = BlockPool(num_sliding_blocks if has_sliding else 0)

    # ---- arithmetic ------------------------------------------------------------------------------------
    def first_live_position(self, num_computed: int) -> int:
        """Oldest position a future query can read in a sliding layer: max(0, n - W + 1 - margin)."""
        return max(0, num_computed - self.sliding_window + 1 - self.margin)

    def num_full_blocks_needed(self, upto: int) -> int:
        """Full-table length covering positions [0, upto). Example, B 16: upto 33 -> 3 blocks."""
        return cdiv(upto, self.block_size)

    def sliding_bound(self, tokens_in_step: int) -> int:
        return sliding_blocks_bound(self.sliding_window, self.block_size, tokens_in_step, self.margin)

    def _sliding_lo(self, seq: Sequence) -> int:
        """First logical sliding block still needed: blocks below it hold only dead positions."""
        return self.first_live_position(seq.num_computed_tokens) // self.block_size

    def blocks_needed(self, seq: Sequence, upto: int) -> tuple[int, int]:
        """(new full blocks, net new sliding blocks) that allocate(seq, upto) would take from the pools.

        The sliding figure subtracts the dead blocks allocate() frees first, so it can be negative.
        """
        full = max(0, self.num_full_blocks_needed(upto) - len(seq.full_block_table)) if self.has_full else 0
        if not self.has_sliding:
            return full, 0
        lo = self._sliding_lo(seq)
        hi = self.num_full_blocks_needed(upto)  # one past the last logical block needed
        table = seq.sliding_block_table
        new = max(0, hi - max(len(table), lo))
        reclaim = sum(1 for b in table[seq.sliding_freed_upto:lo] if b is not None)
        return full, new - reclaim

    def can_allocate(self, seq: Sequence, upto: int) -> bool:
        """Whether both pools can hold slots for positions [0, upto) (sliding: only the live part)."""
        full, sliding = self.blocks_needed(seq, upto)
        return full <= self.full_pool.num_free and sliding <= self.sliding_pool.num_free

    def max_allocatable(self, seq: Sequence, start: int, limit: int) -> int:
        """Largest t in [0, limit] with can_allocate(seq, start + t): how far a prefill chunk can reach.

        Needed blocks grow monotonically with t, so a binary search is exact.
        """
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.can_allocate(seq, start + mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    # ---- allocation --------------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, upto: int) -> None:
        """Ensure slots for positions [0, upto) in the full table and [first_live(n), upto) in the sliding one.

        Frees out-of-window sliding blocks first (keyed on the committed n), then appends. Never shrinks: slots
        reserved for drafts a previous step rejected stay and are overwritten.
        """
        if not self.can_allocate(seq, upto):
            raise NoFreeBlocksError(f"cannot allocate slots up to position {upto} for {seq.request_id!r}")
        if self.has_full:
            for _ in range(self.num_full_blocks_needed(upto) - len(seq.full_block_table)):
                seq.full_block_table.append(self.full_pool.allocate())
        if self.has_sliding:
            self.free_out_of_window(seq)
            table = seq.sliding_block_table
            lo = self._sliding_lo(seq)
            if len(table) < lo:  # nothing was ever allocated there (defensive: cannot happen from n = 0)
                table.extend([None] * (lo - len(table)))
                seq.sliding_freed_upto = lo
            for _ in range(self.num_full_blocks_needed(upto) - len(table)):
                table.append(self.sliding_pool.allocate())

    def free_out_of_window(self, seq: Sequence) -> int:
        """Free sliding blocks whose positions are all < first_live(n); returns how many were freed.

        Example, B 4, W 5: n 11 -> first_live 7 -> frees logical block 0 (positions 0-3) only.
        """
        if not self.has_sliding:
            return 0
        lo = min(self._sliding_lo(seq), len(seq.sliding_block_table))
        freed = 0
        table = seq.sliding_block_table
        for j in range(seq.sliding_freed_upto, lo):
            b = table[j]
            if b is not None:
                self.sliding_pool.free(b)
                table[j] = None
                freed += 1
        seq.sliding_freed_upto = max(seq.sliding_freed_upto, lo)
        return freed

    def free(self, seq: Sequence) -> None:
        """Return every block the sequence holds, in both pools, and empty its tables."""
        for b in seq.full_block_table:
            self.full_pool.free(b)
        for b in seq.sliding_block_table:
            if b is not None:
                self.sliding_pool.free(b)
        seq.full_block_table = []
        seq.sliding_block_table = []
        seq.sliding_freed_upto = 0

    def usage(self) -> KVUsage:
        return KVUsage(self.full_pool.num_used, self.full_pool.num_blocks,
                       self.sliding_pool.num_used, self.sliding_pool.num_blocks)

    @staticmethod
    def num_live_sliding_blocks(seq: Sequence) -> int:
        return sum(1 for b in seq.sliding_block_table if b is not None)


def slots(table: list[int | None], lo: int, hi: int, block_size: int) -> list[int]:
    """Slots of positions [lo, hi) of one sequence in one pool: table[p // B] * B + p % B.

    The one position -> slot map: the KV cache writes and gathers through it. E.g. B = 16, table [7, 9, 4],
    lo = 30, hi = 35: block 9 holds 30..31 (slots 158, 159), block 4 holds 32..34 (slots 64, 65, 66).
    IndexError if a position's block was freed (out of the window) or never allocated. Python ranges, not
    tensor ops: a step's metadata is a few hundred small integers, and every tensor op would cost more.
    """
    out: list[int] = []
    p = lo
    while p < hi:
        j, off = divmod(p, block_size)
        b = table[j] if 0 <= j < len(table) else None
        if b is None:
            raise IndexError(f"position {p} has no KV slot (its block is freed or was never allocated)")
        n = min(block_size - off, hi - p)
        out.extend(range(b * block_size + off, b * block_size + off + n))
        p += n
    return out
