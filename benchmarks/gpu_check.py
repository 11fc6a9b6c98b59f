"""Engine check on one CUDA GPU: greedy output with MTP on equals MTP off, and ms per token with and without.

1. Greedy equality: code and chat task prompts, batched, MTP off vs 1..n fixed drafts per step (adaptive drafting
   off) vs the default (adaptive). On a GPU the verify step computes 1 + k rows where plain decoding computes
   one, and GEMM kernels chosen per shape may round differently, so a greedy pick can flip where the two best
   logits are (nearly) tied. Every mismatch is therefore checked against a full forward of the reference model
   at the first differing position: a flip with a top-2 margin above --tie-margin is a failure (exit 1).
2. Batch-1 decode, ms per generated token, MTP off vs the default, interleaved rounds, fastest kept.
3. Throughput at 1, 16 and 64 concurrent requests, MTP off vs the default.
CUDA graphs are not used (the engine runs eagerly); the figures are eager-mode figures.

    python benchmarks/gpu_check.py [--model DIR] [--dtype float32|bfloat16] [--max-tokens 64] [--rounds 3]

Without CUDA it exits at once with status 2 and says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_engine's prompts and runners


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_margin(model, ids: list[int]) -> float:
    """Gap between the two largest next-token logits after `ids`, from one full forward (float32)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=next(model.parameters()).device))[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model directory (default: the bundled default model)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tie-margin", type=float, default=None,
                    help="largest top-2 logit gap a flip may have (default 1e-3 for float32, 0.05 otherwise)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False): this check needs an NVIDIA "
              "GPU and a CUDA build of torch; nothing was run.", file=sys.stderr)
        return 2

    from bench_engine import CODE_PROMPTS, DEFAULT, chat_prompts, drafting, engine_run, params_for
    from mimo.engine import LLM
    from mimo.engine.llm import DEFAULT_MODEL

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    tie = args.tie_margin if args.tie_margin is not None else (1e-3 if dtype == torch.float32 else 0.05)
    llm = LLM(args.model or str(DEFAULT_MODEL), device="cuda", dtype=dtype, max_model_len=1024, max_num_seqs=64,
              max_num_batched_tokens=2048)
    tok, n_mtp = llm.tokenizer, llm.model.n_mtp
    print(f"{torch.cuda.get_device_name()}: model {args.model or DEFAULT_MODEL}, {args.dtype}, {n_mtp} MTP heads")
    code = [tok.encode(p) for p in CODE_PROMPTS]
    chat = chat_prompts(tok, 6)

    print("\n1. greedy, MTP on vs off (batched)")
    failures = 0
    for cls, prompts, mt in (("code", code, args.max_tokens), ("chat tasks", chat, 16)):
        sp = params_for(cls, mt, 0)
        off = [o.token_ids for o in llm.generate(prompts, sp, num_speculative_tokens=0)]
        for cfg in (*range(1, n_mtp + 1), DEFAULT):
            with drafting(llm, cfg) as k:
                outs = llm.generate(prompts, sp, num_speculative_tokens=k)
            on = [o.token_ids for o in outs]
            acc = sum(o.metrics.num_accepted for o in outs)
            equal = sum(a == b for a, b in zip(on, off))
            flips = []
            for p, a, b in zip(prompts, on, off):
                i = first_mismatch(a, b)
                if i is not None:
                    flips.append(top2_margin(llm.model, p + b[:i]))
            bad = [m for m in flips if m > tie]
            failures += len(bad)
            name = f"k={cfg}" if cfg != DEFAULT else DEFAULT
            print(f"  {cls:<10} {name:<8} {equal}/{len(prompts)} identical, {acc} drafts accepted"
                  + (f"; flips at top-2 margins {', '.join(f'{m:.2e}' for m in flips)}" if flips else "")
                  + (f"  FAIL: {len(bad)} above {tie:g}" if bad else ""))

    print(f"\n2. batch-1 decode, ms/token (fastest of {args.rounds} interleaved rounds)")
    for cls, prompts, mt in (("code", code, args.max_tokens), ("chat tasks", chat, 16),
                             ("sampled", code, args.max_tokens)):
        best: dict[tuple, tuple] = {}
        for cfg in (0, DEFAULT):  # warm-up: kernels, allocator
            engine_run(llm, [prompts[0]], params_for(cls, mt, 0), cfg)
        for _ in range(args.rounds):
            for i, p in enumerate(prompts):
                for cfg in (0, DEFAULT):
                    torch.cuda.synchronize()
                    r = engine_run(llm, [p], params_for(cls, mt, i), cfg)
                    if (cfg, i) not in best or r[0] < best[cfg, i][0]:
                        best[cfg, i] = r
        ms = {}
        for cfg in (0, DEFAULT):
            t, n, acc, ver = (sum(col) for col in zip(*[best[cfg, i] for i in range(len(prompts))]))
            ms[cfg] = (1000 * t / n, 1 + acc / ver if ver else 1.0)
        print(f"  {cls:<10} MTP off {ms[0][0]:6.2f} ms/token   {DEFAULT} {ms[DEFAULT][0]:6.2f} ms/token "
              f"(AL {ms[DEFAULT][1]:.2f}, {ms[0][0] / ms[DEFAULT][0]:.2f}x)")

    print("\n3. throughput, greedy code prompts (tokens/s)")
    for n in (1, 16, 64):
        batch = [code[i % len(code)] for i in range(n)]
        sp = params_for("code", args.max_tokens, 0)
        tps = {}
        for cfg in (0, DEFAULT):
            engine_run(llm, batch[:1], sp, cfg)
            dt, toks, _, _ = engine_run(llm, batch, sp, cfg)
            tps[cfg] = toks / dt
        print(f"  {n:3d} requests: MTP off {tps[0]:8.1f}  {DEFAULT} {tps[DEFAULT]:8.1f} ({tps[DEFAULT] / tps[0]:.2f}x)")

    print("\ngreedy MTP on == off: " + ("ok" if not failures else f"FAILED ({failures} flips beyond ties)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
