"""KV planner: the spec's MiMo-V2-Flash figures, agreement with the block manager, pool sizing."""

import random

import pytest

from mimo.engine.block_manager import KVBlockManager
from mimo.engine.config import EngineConfig
from mimo.engine.planner import (
    block_bytes,
    build_block_manager,
    format_plan,
    kv_bytes_per_token,
    kv_plan,
    request_kv,
    resolve_num_blocks,
)
from mimo.engine.scheduler import Scheduler
from mimo.engine.sequence import Sequence
from mimo.model.config import FULL, SLIDING, ModelConfig

FLASH = ModelConfig.from_preset("mimo-v2-flash")


def test_per_token_figures_of_the_real_model():
    """bf16: a global layer 4 x 320 x 2 = 2,560 B/token (9 layers: 23,040); a sliding layer 8 x 320 x 2."""
    assert kv_bytes_per_token(FLASH, FULL) == 2560
    assert kv_bytes_per_token(FLASH, SLIDING) == 5120
    plan = kv_plan(FLASH, [1024])
    assert plan.full_bytes_per_token == 23_040
    assert plan.sliding_bytes_per_token == 199_680
    assert plan.mtp_bytes_per_token == 15_360
    assert plan.all_global_bytes_per_token == 48 * 2560
    assert kv_bytes_per_token(FLASH, FULL, "float8_e4m3fn") == 1280  # FP8 KV halves it


def test_spec_sanity_numbers_at_256k():
    """~6.04 GB global, ~25.8 MB sliding (constant), ~32.2 GB all-global, about 5.3x."""
    r = request_kv(FLASH, 262_144, block_size=1)
    assert r.full_bytes == 23_040 * 262_144 and abs(r.full_bytes / 1e9 - 6.04) < 0.01
    assert abs(r.sliding_bytes / 1e6 - 25.8) < 0.1
    assert abs(r.mtp_bytes / 1e6 - 2.0) < 0.1
    assert abs(r.all_global_bytes / 1e9 - 32.2) < 0.05
    assert 5.25 < r.ratio < 5.35


def test_sliding_part_is_constant_and_full_part_linear():
    plan = kv_plan(FLASH, [4096, 65536, 262144], block_size=16, num_speculative_tokens=3)
    sl = {r.sliding_bytes for r in plan.rows}
    assert len(sl) == 1
    # 16-token blocks with 3 drafts: 10 blocks = 160 slots (W 129 + 3 drafts, plus alignment slack)
    assert sl.pop() == 160 * 199_680
    a, b = plan.rows[1], plan.rows[2]
    assert abs(b.full_bytes / a.full_bytes - 4) < 1e-3
    assert [r.ratio for r in plan.rows] == sorted(r.ratio for r in plan.rows)  # the saving grows with length


def test_short_requests_do_not_hold_a_whole_window():
    r = request_kv(FLASH, 10, block_size=16)
    assert r.sliding_bytes == 16 * 199_680  # one block, not the window


def test_plan_matches_block_manager_peaks():
    """Drive a request through KVBlockManager and compare its peak table sizes with the planner's figures."""
    cfg = ModelConfig.from_preset("test")  # W 9, 2 global and 4 sliding layers, 3 MTP heads
    for B, k, N in [(1, 0, 50), (4, 3, 61), (3, 2, 40), (16, 1, 100)]:
        bm = KVBlockManager(B, 10_000, 10_000, cfg.sliding_window)
        seq = Sequence("r", [1])
        rng = random.Random(B)
        peak_full = peak_sliding = 0
        while True:  # decode with random acceptance until the step that computes position N - 1
            n = seq.num_computed_tokens
            bm.allocate(seq, n + 1 + k)
            peak_full = max(peak_full, len(seq.full_block_table))
            peak_sliding = max(peak_sliding, bm.num_live_sliding_blocks(seq))
            if n == N - 1:
                break
            seq.num_computed_tokens = min(N - 1, n + rng.randint(1, 1 + k))
            bm.free_out_of_window(seq)
        r = request_kv(cfg, N, block_size=B, num_speculative_tokens=k)
        full_tok = kv_bytes_per_token(cfg, FULL) * 2
        swa_tok = kv_bytes_per_token(cfg, SLIDING) * 4
        assert r.full_bytes == peak_full * B * full_tok  # the same arithmetic, exactly
        assert r.sliding_bytes >= peak_sliding * B * swa_tok  # the plan is an upper bound ...
        if B == 1:
            assert r.sliding_bytes == peak_sliding * B * swa_tok  # ... and tight without block slack


@pytest.mark.parametrize("layer_types", [("full",) * 4, ("sliding",) * 4])
def test_single_attention_type_models(layer_types):
    cfg = ModelConfig.from_preset("test").replace(n_layers=4, layer_types=layer_types,
                                                  mlp_types=("dense",) * 4, n_mtp_layers=0)
    r = request_kv(cfg, 1000, block_size=4)
    if layer_types[0] == "full":
        assert r.sliding_bytes == 0 and r.ratio == 1.0
    else:
        assert r.full_bytes == 0 and r.sliding_bytes > 0
    ec = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=128, block_size=4,
                      kv_cache_bytes=10**7)
    bm = build_block_manager(ec, cfg)
    assert bm.has_full == (layer_types[0] == "full") and bm.has_sliding == (layer_types[0] == "sliding")
    Scheduler(ec, bm)  # the resolved pools pass the scheduler's one-request-fits check


def test_format_plan_table():
    text = format_plan(kv_plan(FLASH, [262_144], block_size=1))
    assert "262,144" in text and "6.04 GB" in text and "32.21 GB" in text and "5.31x" in text
    assert "23,040 B/token" in text and "199,680 B/token" in text


def test_resolve_num_blocks_from_budget():
    ec = EngineConfig(max_num_seqs=8, max_num_batched_tokens=8192, max_model_len=262_144, block_size=16,
                      num_speculative_tokens=3, kv_cache_bytes=60 * 10**9)
    full, sliding = resolve_num_blocks(ec, FLASH)
    fb, sb = block_bytes(FLASH, 16)
    assert fb == 23_040 * 16 and sb == (199_680 + 15_360) * 16
    assert full * fb + sliding * sb <= 60 * 10**9 < (full + 1) * fb + sliding * sb
    assert full >= 262_144 // 16  # one max-length request fits
    Scheduler(ec, build_block_manager(ec, FLASH))
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        resolve_num_blocks(ec.__class__(**{**ec.__dict__, "kv_cache_bytes": 5 * 10**9}), FLASH)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        resolve_num_blocks(EngineConfig(max_model_len=300_000, max_num_batched_tokens=8192), FLASH)


def test_default_pools_fit_every_sequence_at_full_length():
    ec = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, block_size=4,
                      num_speculative_tokens=2)
    cfg = ModelConfig.from_preset("test")
    full, sliding = resolve_num_blocks(ec, cfg)
    assert full == 4 * 16
    bm = build_block_manager(ec, cfg)
    assert (bm.full_pool.num_blocks, bm.sliding_pool.num_blocks) == (full, sliding)
    explicit = resolve_num_blocks(EngineConfig(num_full_blocks=7, num_sliding_blocks=5), cfg)
    assert explicit == (7, 5)
