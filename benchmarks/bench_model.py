"""Forward (prefill) time of mimo vs transformers' MiMoV2FlashForCausalLM on the same weights, float32, CPU.

Prints, for T in 512, 2048 and 8192: seconds per forward of each and the ratio, measured side by side in one
run (interleaved, median of repeats). Then the 8192/2048 time ratio of a sliding-layer-only config, which
must stay under 5 if sliding layers cost O(T * window) (quadratic attention would give up to 16).

    python benchmarks/bench_model.py [--lengths 512,2048,8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from mimo.checkpoint import save_model
from mimo.model import ModelConfig, Transformer, init_weights

# transformers-compatible (sliding kv heads = 2x global kv heads, one head dim for both types)
CONFIG = dict(
    vocab_size=8192, dim=256, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=96, v_head_dim=64,
    swa_n_heads=8, swa_n_kv_heads=4, swa_head_dim=96, swa_v_head_dim=64, sliding_window=129,
    intermediate_size=1024, moe_intermediate_size=256, n_experts=8, n_active_experts=2, n_mtp_layers=0,
    max_position_embeddings=32768,
)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf-above", type=int, default=8192, help="skip transformers above this length")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIG)
    model = Transformer(cfg)
    init_weights(model, seed=0)
    model.eval()
    from transformers import MiMoV2FlashForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        hf = MiMoV2FlashForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    print(f"config: dim {cfg.dim}, {cfg.n_layers} layers ({cfg.layer_types.count('full')} global), "
          f"{cfg.n_experts} experts top-{cfg.n_active_experts}, window {cfg.sliding_window}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'tokens':>7} {'mimo s':>9} {'transformers s':>15} {'speedup':>8}")
    with torch.inference_mode():
        for T in [int(x) for x in args.lengths.split(",")]:
            ids = torch.randint(0, cfg.vocab_size, (1, T))
            model(ids[:, :64])
            t_m = timed(lambda: model(ids), args.repeats)
            if T <= args.skip_hf_above:
                hf(ids[:, :64])
                t_h = timed(lambda: hf(ids).logits, args.repeats)
                print(f"{T:>7} {t_m:>9.3f} {t_h:>15.3f} {t_h / t_m:>7.2f}x")
            else:
                print(f"{T:>7} {t_m:>9.3f} {'(skipped)':>15}")
        swa = ModelConfig(**{**CONFIG, "layer_types": ("sliding",) * CONFIG["n_layers"]})
        m2 = Transformer(swa)
        init_weights(m2, seed=0)
        m2.eval()
        ids = torch.randint(0, cfg.vocab_size, (1, 8192))
        t2 = timed(lambda: m2(ids[:, :2048]), args.repeats)
        t8 = timed(lambda: m2(ids), args.repeats)
        print(f"sliding-only config: 2048 tokens {t2:.3f} s, 8192 tokens {t8:.3f} s, ratio {t8 / t2:.2f} "
              "(linear = 4, quadratic = 16)")


if __name__ == "__main__":
    main()
