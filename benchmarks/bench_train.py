"""Training throughput: mimo vs transformers' MiMoV2FlashForCausalLM on the same config, weights and batch.

One training step = forward + next-token cross-entropy + backward + AdamW step, float32 on CPU. mimo runs
without MTP heads and without the balance loss, so both sides do the same work. The two are measured
interleaved in one process (warmup, then alternating steps), so machine load hits both alike; the script
prints the median tokens/s of each and the ratio.

    python benchmarks/bench_train.py                 # default config below, batch 8 x 256
    python benchmarks/bench_train.py --threads 1 --steps 6

The config is transformers-compatible: transformers derives the sliding layers' heads from the global ones
(swa_n_heads = n_heads, swa_n_kv_heads = 2 * n_kv_heads) and uses the same head dims for both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def build(args):
    from transformers import AutoModelForCausalLM

    from mimo.checkpoint import save_model
    from mimo.model import ModelConfig, Transformer, init_weights

    cfg = ModelConfig(
        vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=1, head_dim=48,
        v_head_dim=32, swa_n_heads=4, swa_n_kv_heads=2, swa_head_dim=48, swa_v_head_dim=32, sliding_window=129,
        intermediate_size=4 * args.dim, moe_intermediate_size=args.dim, n_experts=8, n_active_experts=2,
        n_mtp_layers=0, max_position_embeddings=4096)
    ours = Transformer(cfg)
    init_weights(ours, seed=0)
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    return cfg, ours.train(), theirs.train()


def mimo_step(model, opt, x):
    logits = model(x)
    # labels shifted, not logits (as transformers does): slicing [B, T, V] logits would copy them
    labels = F.pad(x[:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def hf_step(model, opt, x):
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, ours, theirs = build(args)
    n_params = sum(p.numel() for p in ours.parameters())
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    with torch.no_grad():
        diff = float((ours(x) - theirs(input_ids=x).logits).abs().max())
    sides = {
        "mimo": (ours, torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95)), mimo_step),
        "transformers": (theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95)), hf_step),
    }
    print(f"config: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_experts} experts top-{cfg.n_active_experts}, "
          f"vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params; batch {args.batch} x {args.seq}; float32, "
          f"{torch.get_num_threads()} threads; initial logits max |diff| {diff:.1e}")
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(args.warmup + args.steps):
        for name, (model, opt, step) in sides.items():
            t = time.perf_counter()
            losses[name].append(step(model, opt, x))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    for k in sides:
        print(f"{k:>12}: {tps[k]:8.0f} tokens/s  (median step {statistics.median(times[k]) * 1e3:.0f} ms; "
              f"losses {losses[k][0]:.4f} -> {losses[k][-1]:.4f})")
    print(f"ratio mimo / transformers: {tps['mimo'] / tps['transformers']:.2f}x")


if __name__ == "__main__":
    main()
