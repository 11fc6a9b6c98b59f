"""KVBlockManager / BlockPool: slot arithmetic, the sliding-window free rule, ownership invariants."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mimo.engine.block_manager import (
    BlockPool,
    KVBlockManager,
    NoFreeBlocksError,
    cdiv,
    max_blocks_spanned,
    sliding_blocks_bound,
    slots,
)
from mimo.engine.sequence import Sequence


def make_seq(rid="r", n_prompt=4):
    return Sequence(rid, list(range(n_prompt)))


def check_ownership(bm: KVBlockManager, seqs):
    """Every used block is owned by exactly one table entry of one sequence; free + owned = pool size."""
    for pool, tables in ((bm.full_pool, [s.full_block_table for s in seqs]),
                         (bm.sliding_pool, [s.sliding_block_table for s in seqs])):
        owned = [b for t in tables for b in t if b is not None]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert all(not pool.is_free(b) for b in owned), "an owned block is on the free list"
        assert len(owned) == pool.num_used, "a used block is owned by nobody (leak)"
        assert pool.num_free + pool.num_used == pool.num_blocks


# ---- arithmetic ----------------------------------------------------------------------------------------------
def test_slots_worked_examples():
    """B 16, table [7, 9, 4]: positions 30..34 are 30, 31 in block 9 (slots 158, 159), then 32..34 in block 4."""
    assert slots([7, 9, 4], 30, 35, 16) == [158, 159, 64, 65, 66]
    assert slots([7, 9, 4], 21, 22, 16) == [149]  # position 21: block 9, offset 5 -> 9 * 16 + 5
    assert slots([7, 9, 4], 5, 5, 16) == []
    with pytest.raises(IndexError):  # a freed block
        slots([None, 9], 3, 20, 16)
    with pytest.raises(IndexError):  # past the table
        slots([7, 9, 4], 40, 49, 16)


def test_slots_match_a_position_by_position_map():
    rng = random.Random(0)
    for _ in range(200):
        B = rng.randint(1, 6)
        table = rng.sample(range(50), 8)
        lo = rng.randint(0, 8 * B)
        hi = rng.randint(lo, 8 * B)
        assert slots(table, lo, hi, B) == [table[p // B] * B + p % B for p in range(lo, hi)]


def test_max_blocks_spanned_matches_brute_force():
    """The closed form is the worst case over every alignment, and never above ceil(L/B) + 1."""
    for B in range(1, 7):
        for L in range(0, 30):
            brute = max((len({p // B for p in range(a, a + L)}) for a in range(B)), default=0)
            assert max_blocks_spanned(L, B) == brute
            assert max_blocks_spanned(L, B) <= cdiv(L, B) + 1


def test_sliding_bound_real_model_numbers():
    """W 129, B 16, 3 drafts: 132 live positions -> 10 blocks; B 1 without drafts: exactly W slots."""
    assert sliding_blocks_bound(129, 16, 4) == 10
    assert sliding_blocks_bound(129, 1, 1) == 129


# ---- pool ----------------------------------------------------------------------------------------------------
def test_block_pool_detects_double_free_and_exhaustion():
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    assert {a, b} == {0, 1} and pool.num_free == 0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()
    pool.free(a)
    with pytest.raises(ValueError, match="double free"):
        pool.free(a)
    with pytest.raises(ValueError, match="outside"):
        pool.free(7)
    assert pool.num_free == 1


# ---- allocation and the window rule --------------------------------------------------------------------------
def test_sliding_free_rule_worked_example():
    """B 4, W 5: n 11 -> first live 7 -> only block 0 freed; n 12 -> first live 8 -> block 1 freed too."""
    bm = KVBlockManager(4, 10, 10, sliding_window=5)
    seq = make_seq(n_prompt=20)
    bm.allocate(seq, 12)  # prefill positions 0..11 in one chunk: 3 blocks in each table
    assert len(seq.full_block_table) == 3 and bm.num_live_sliding_blocks(seq) == 3
    seq.num_computed_tokens = 11
    assert bm.free_out_of_window(seq) == 1
    assert seq.sliding_block_table[0] is None and seq.sliding_block_table[1] is not None
    slots(seq.sliding_block_table, 7, 12, 4)  # still readable: the query at 11 reads keys 7..11
    with pytest.raises(IndexError):
        slots(seq.sliding_block_table, 3, 4, 4)
    seq.num_computed_tokens = 12
    assert bm.free_out_of_window(seq) == 1
    assert len(slots(seq.full_block_table, 0, 12, 4)) == 12  # the full table keeps everything
    check_ownership(bm, [seq])


def test_uncommitted_speculative_slots_never_trigger_frees():
    """Reserving verify slots n..n+k must not free anything: freeing follows the committed count only."""
    bm = KVBlockManager(2, 50, 50, sliding_window=3)
    seq = make_seq(n_prompt=10)
    bm.allocate(seq, 10)
    seq.num_computed_tokens = 10
    bm.free_out_of_window(seq)
    live_before = {b for b in seq.sliding_block_table if b is not None}
    bm.allocate(seq, 10 + 1 + 5)  # pending token + 5 drafts
    assert live_before <= set(seq.sliding_block_table)
    # all drafts rejected: n advances by 1 only; every key the next query (at 11) reads is still there
    seq.num_computed_tokens = 11
    bm.free_out_of_window(seq)
    assert len(set(slots(seq.sliding_block_table, 11 - 3 + 1, 16, 2))) == 16 - 9


def test_can_allocate_checks_both_pools():
    seq = make_seq()
    small_sliding = KVBlockManager(4, 100, 2, sliding_window=8)
    assert not small_sliding.can_allocate(seq, 20)  # sliding needs 5 blocks at n = 0
    with pytest.raises(NoFreeBlocksError):
        small_sliding.allocate(seq, 20)
    assert seq.full_block_table == [], "a failed allocate must not take anything"
    small_full = KVBlockManager(4, 2, 100, sliding_window=8)
    assert not small_full.can_allocate(seq, 20)
    assert small_full.can_allocate(seq, 8)
    assert small_full.max_allocatable(seq, 0, 20) == 8


def test_can_allocate_counts_blocks_allocate_will_reclaim():
    """A pool with no free block can still serve a step when the step's own dead blocks are recycled."""
    bm = KVBlockManager(1, 100, 4, sliding_window=3)
    seq = make_seq()
    bm.allocate(seq, 4)  # sliding holds positions 0..3: pool exhausted
    assert bm.sliding_pool.num_free == 0
    seq.num_computed_tokens = 4  # positions < 2 are dead but not yet freed
    assert bm.can_allocate(seq, 6)
    bm.allocate(seq, 6)
    assert [b is None for b in seq.sliding_block_table] == [True, True, False, False, False, False]
    check_ownership(bm, [seq])


@pytest.mark.parametrize("has_full,has_sliding", [(True, False), (False, True)])
def test_single_layer_type_models(has_full, has_sliding):
    bm = KVBlockManager(4, 0 if not has_full else 8, 0 if not has_sliding else 8, sliding_window=4,
                        has_full=has_full, has_sliding=has_sliding)
    seq = make_seq()
    assert bm.can_allocate(seq, 20)
    bm.allocate(seq, 20)
    assert bool(seq.full_block_table) == has_full
    assert any(b is not None for b in seq.sliding_block_table) == has_sliding
    seq.num_computed_tokens = 20
    bm.free_out_of_window(seq)
    bm.free(seq)
    assert bm.usage() == bm.usage().__class__(0, bm.full_pool.num_blocks, 0, bm.sliding_pool.num_blocks)


def test_sliding_usage_bounded_over_many_windows():
    """Decoding 2,000 tokens with W 9, B 4, 3 drafts and random acceptance: live sliding blocks never exceed
    ceil((W - 1 + T) / B) + 1 with T = 1 + k (the bound stated for the engine), while the full table grows."""
    W, B, K = 9, 4, 3
    bm = KVBlockManager(B, 1000, 6, sliding_window=W)
    seq = make_seq(n_prompt=1)
    rng = random.Random(0)
    peak = 0
    while seq.num_computed_tokens < 2000:
        n = seq.num_computed_tokens
        bm.allocate(seq, n + 1 + K)
        peak = max(peak, bm.num_live_sliding_blocks(seq))
        seq.num_computed_tokens = n + rng.randint(1, 1 + K)
        bm.free_out_of_window(seq)
    assert peak <= cdiv(W - 1 + 1 + K, B) + 1 == 4
    assert peak == sliding_blocks_bound(W, B, 1 + K)  # the bound is reached, so it is tight
    assert len(seq.full_block_table) >= 2000 // B
    check_ownership(bm, [seq])


# ---- property test -------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.integers(1, 5),
    window=st.integers(1, 12),
    margin=st.integers(0, 2),
    kinds=st.sampled_from([(True, True), (True, False), (False, True)]),
    num_full=st.integers(0, 40),
    num_sliding=st.integers(0, 25),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9), st.integers(1, 6), st.integers(0, 100)),
                 max_size=80),
)
def test_random_operations_keep_ownership_and_bounds(block_size, window, margin, kinds, num_full, num_sliding,
                                                     ops):
    """Random grow / commit / free over 4 sequences: no leak, no double ownership, every slot a future query
    may read is allocated, sliding usage within the bound, and everything is free at the end."""
    has_full, has_sliding = kinds
    bm = KVBlockManager(block_size, num_full, num_sliding, window, has_full, has_sliding, margin)
    seqs = [make_seq(f"s{i}") for i in range(4)]
    reserved = [0] * 4  # upto of the last successful allocate
    for who, kind, step, frac in ops:
        seq = seqs[who]
        n = seq.num_computed_tokens
        if kind == 0:  # a finished or preempted sequence
            bm.free(seq)
            seq.num_computed_tokens, reserved[who] = 0, 0
        elif bm.can_allocate(seq, n + step):
            bm.allocate(seq, n + step)
            reserved[who] = max(reserved[who], n + step)
            live = bm.num_live_sliding_blocks(seq)
            assert live <= bm.sliding_bound(max(step, reserved[who] - n))
            # the runner accepts some of the step; committed count moves only over accepted tokens
            seq.num_computed_tokens = n + max(1, step * frac // 100)
            bm.free_out_of_window(seq)
        else:
            with pytest.raises(NoFreeBlocksError):
                bm.allocate(seq, n + step)
        check_ownership(bm, seqs)
        for s, up in zip(seqs, reserved):
            if up == 0:
                continue
            if has_full:
                assert len(set(slots(s.full_block_table, 0, up, block_size))) == up
            if has_sliding:  # every key the next query (at n, or n - margin back) can read
                lo = bm.first_live_position(s.num_computed_tokens)
                assert len(set(slots(s.sliding_block_table, lo, up, block_size))) == up - lo
    for s in seqs:
        bm.free(s)
    u = bm.usage()
    assert u.full_used == 0 and u.sliding_used == 0
    assert bm.full_pool.num_free == bm.full_pool.num_blocks
