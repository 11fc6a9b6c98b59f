"""Engine benchmark on the default model, everything measured side by side in one run (float32, CPU).

1. batch-1 decode, ms per generated token and mean acceptance length, on three prompt classes (code prompts
   greedy, chat task prompts greedy, code prompts sampled at temperature 0.7 / top-p 0.95): transformers
   `generate` on the same weights, this engine with MTP off, with 1, 2, 3 drafts every step (adaptive
   drafting off), and the default setting (adaptive drafting, up to all heads);
2. total generated tokens/s at 1, 4, 16 and 64 concurrent requests, MTP off vs the default, per class;
3. prefill tokens/s at 1K, 4K and 16K tokens;
4. KV bytes per request against context length: this engine's pools vs transformers' cache.
Then the targets, met or not, from the figures above.

Configurations run back to back inside every round (interleaved) and each keeps its fastest round, so load
that comes and goes on a shared machine hits all of them alike.

With --compile the engine runs its decode, verify and drafting steps as torch.compile graphs
(`LLM(compile=True)`), and only MTP off and the default run (each configuration compiles graphs of its own);
the compile time of the warm-up is printed first. Transformers stays eager.

    python benchmarks/bench_engine.py [--model DIR] [--quick] [--rounds N] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from mimo import tasks as task_lib
from mimo.engine import LLM, SamplingParams
from mimo.engine.llm import DEFAULT_MODEL, ONE_THREAD_ROWS
from mimo.engine.planner import request_kv

DEFAULT = "default"  # the engine's default speculative setting: adaptive drafting with every head

CODE_PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "    for i in range(len(items)):\n        if items[i] is None:\n",
    "def read_lines(path):\n    with open(path) as f:\n",
    "try:\n    import json\nexcept ImportError:\n",
]


def chat_prompts(tok, n=6):
    exs = task_lib.mixed_examples(n // 3 + 1, "heldout", 0, task_lib.TASKS)[:n]
    return [tok.encode_chat(task_lib.to_messages(e, with_answer=False)) for e in exs]


def params_for(cls: str, max_tokens: int, seed: int) -> SamplingParams:
    if cls == "sampled":
        return SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=seed, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@contextlib.contextmanager
def drafting(llm, cfg):
    """DEFAULT: the engine as it ships (adaptive drafting). A fixed number of drafts: adaptive drafting off, so
    every step proposes all of them."""
    before, llm.adaptive_drafting = llm.adaptive_drafting, cfg == DEFAULT
    try:
        yield None if cfg == DEFAULT else cfg  # the num_speculative_tokens to pass
    finally:
        llm.adaptive_drafting = before


def engine_run(llm, prompts, sp, cfg):
    """Generate under configuration cfg (see `drafting`); (seconds, generated tokens, accepted drafts,
    verify steps)."""
    with drafting(llm, cfg) as k:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, num_speculative_tokens=k)
        dt = time.perf_counter() - t0
    return (dt, sum(len(o.token_ids) for o in outs), sum(o.metrics.num_accepted for o in outs),
            sum(o.metrics.num_verify_steps for o in outs))


def decode_table(llm, hf, prompts, cls, max_tokens, cfgs, rounds):
    """Batch 1, one request at a time; every prompt under every configuration back to back, `rounds` times;
    a (prompt, configuration) pair keeps its fastest round. Returns {config: (ms per generated token, mean
    acceptance length)}; config "hf" is transformers."""

    def run(cfg, i, p):
        sp = params_for(cls, max_tokens, i)
        if cfg == "hf":
            x = torch.tensor([p])
            kw = dict(do_sample=True, temperature=0.7, top_p=0.95) if cls == "sampled" else dict(do_sample=False)
            t0 = time.perf_counter()
            out = hf.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
            return time.perf_counter() - t0, out.shape[1] - x.shape[1], 0, 0
        return engine_run(llm, [p], sp, cfg)

    for cfg in cfgs:  # warm-up
        run(cfg, 0, prompts[0])
    best: dict[tuple, tuple] = {}
    for _ in range(rounds):
        for i, p in enumerate(prompts):
            for cfg in cfgs:
                r = run(cfg, i, p)
                if (cfg, i) not in best or r[0] < best[cfg, i][0]:
                    best[cfg, i] = r
    table = {}
    for cfg in cfgs:
        t, n, acc, ver = (sum(col) for col in zip(*[best[cfg, i] for i in range(len(prompts))]))
        table[cfg] = (1000 * t / n, (1 + acc / ver) if ver else 1.0)
    return table


def throughput_table(llm, classes, counts, rounds):
    """{(class, n, config): tokens/s} for n concurrent requests, MTP off (0) vs DEFAULT, interleaved rounds,
    fastest round kept."""
    best: dict[tuple, float] = {}
    for _ in range(rounds):
        for cls, prompts, mt in classes:
            for n in counts:
                batch = [prompts[i % len(prompts)] for i in range(n)]
                sps = [params_for(cls, mt, i) for i in range(n)]
                for cfg in (0, DEFAULT):
                    dt, toks, _, _ = engine_run(llm, batch, sps, cfg)
                    best[cls, n, cfg] = max(best.get((cls, n, cfg), 0.0), toks / dt)
    return best


def hf_cache_bytes(hf, n_tokens, vocab):
    with torch.inference_mode():
        out = hf(torch.randint(0, vocab, (1, n_tokens)), use_cache=True)
    total = 0
    for layer in out.past_key_values.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="fewer prompts and lengths")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decode and throughput tables")
    ap.add_argument("--compile", action="store_true", help="the engine's steps as torch.compile graphs")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    llm = LLM(args.model, max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=2048, compile=args.compile)
    tok = llm.tokenizer
    cfg = llm.model.config
    print(f"model {args.model}: {sum(p.numel() for p in llm.model.parameters()) / 1e6:.1f}M parameters, "
          f"{cfg.n_layers} layers, {llm.model.n_mtp} MTP heads, window {cfg.sliding_window}, "
          f"threads {torch.get_num_threads()} (steps of <= {ONE_THREAD_ROWS} rows on 1 where timed faster), "
          f"engine {'compiled' if args.compile else 'eager'}")

    code = [tok.encode(p) for p in CODE_PROMPTS[: 3 if args.quick else 6]]
    chat = chat_prompts(tok, 3 if args.quick else 6)
    n_mtp = llm.model.n_mtp
    classes = [("code", code, args.max_tokens), ("chat tasks", chat, 16), ("sampled", code, args.max_tokens)]
    counts = (1, 4) if args.quick else (1, 4, 16, 64)
    ks = [0] if args.compile else list(range(n_mtp + 1))
    if args.compile:  # the graphs the tables need, compiled before anything is timed
        t0 = time.perf_counter()
        for n in counts:
            for cls, prompts, _ in classes:
                for c in (0, DEFAULT):
                    engine_run(llm, [prompts[i % len(prompts)] for i in range(n)],
                               [params_for(cls, 16, i) for i in range(n)], c)
        print(f"compile warm-up: {time.perf_counter() - t0:.0f} s")
    print(f"\n1. batch-1 decode (ms/token, mean acceptance length; fastest of {args.rounds} interleaved rounds); "
          f"k = drafts every step, {DEFAULT} = adaptive drafting with up to {n_mtp}")
    tables = {}
    for cls, prompts, mt in classes:
        cfgs = ["hf", *ks, DEFAULT]
        table = tables[cls] = decode_table(llm, hf, prompts, cls, mt, cfgs, args.rounds)
        t_hf, t_off = table["hf"][0], table[0][0]
        print(f"  {cls:<10} transformers {t_hf:7.2f} ms/token")
        for c in cfgs[1:]:
            ms, al = table[c]
            # cost of one verify step (+ its drafting round) in plain decode steps: speedup = AL / this
            name = f"k={c}" if c != DEFAULT else DEFAULT
            print(f"  {cls:<10} engine {name:<8} {ms:7.2f} ms/token  AL {al:.2f}  {t_hf / ms:5.2f}x transformers  "
                  f"{t_off / ms:5.2f}x MTP-off  step cost {ms * al / t_off:4.2f}x a plain step")

    print(f"\n2. throughput, concurrent requests (tokens/s, fastest of {args.rounds} interleaved rounds)")
    thr = throughput_table(llm, classes, counts, args.rounds)
    for cls, _, mt in classes:
        for n in counts:
            off, on = thr[cls, n, 0], thr[cls, n, DEFAULT]
            print(f"  {cls:<10} {n:3d} requests x {mt} tokens: MTP off {off:8.1f}  {DEFAULT} {on:8.1f}  "
                  f"({on / off:4.2f}x; {on / thr[cls, 1, DEFAULT]:5.2f}x one request)")

    print("\ntargets")
    code_t = tables["code"]
    sp3 = code_t[0][0] / code_t[DEFAULT][0]
    cost3 = code_t[DEFAULT][0] * code_t[DEFAULT][1] / code_t[0][0]
    ratios = [tables[c][0][0] / tables[c][DEFAULT][0] for c, _, _ in classes]
    ratios += [thr[c, n, DEFAULT] / thr[c, n, 0] for c, _, _ in classes for n in counts]
    hf_x = [tables[c]["hf"][0] / tables[c][0][0] for c in ("code", "chat tasks")]
    scale = thr["code", counts[-1] if args.quick else 16, DEFAULT] / thr["code", 1, DEFAULT]

    def verdict(ok):
        return "met" if ok else "NOT met"

    print(f"  batch-1 greedy code, {DEFAULT} >= 2.0x MTP off: {sp3:.2f}x, step cost {cost3:.2f} plain steps "
          f"({verdict(sp3 >= 2.0)})")
    print(f"  {DEFAULT} never slower than MTP off (3 classes x batch 1 and {len(counts)} concurrencies): worst "
          f"{min(ratios):.2f}x ({verdict(min(ratios) >= 1.0)})")
    print(f"  MTP off >= 2.0x transformers (greedy code, chat): {hf_x[0]:.2f}x, {hf_x[1]:.2f}x "
          f"({verdict(min(hf_x) >= 2.0)})")
    print(f"  {16 if not args.quick else counts[-1]} concurrent requests >= 8x one (code, {DEFAULT}): {scale:.2f}x "
          f"({verdict(scale >= 8.0)})")

    print("\n3. prefill")
    lengths = (1024, 4096) if args.quick else (1024, 4096, 16384)
    # positions beyond the trained context are fine for timing: RoPE is computed on the fly
    long_model = llm.model
    long_model.config = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, lengths[-1] + 64))
    llm = LLM(long_model, max_model_len=lengths[-1] + 64, max_num_seqs=1, max_num_batched_tokens=2048)
    for n in lengths:
        ids = torch.randint(5, cfg.vocab_size, (n,)).tolist()
        sp = SamplingParams(max_tokens=1, temperature=0)
        t0 = time.perf_counter()
        llm.generate(ids, sp, num_speculative_tokens=0)
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf(torch.tensor([ids]) if n <= 4096 else torch.tensor([ids[:1]]))
        dt_hf = time.perf_counter() - t0 if n <= 4096 else float("nan")
        print(f"  {n:6d} tokens: engine {n / dt:8.0f} tokens/s   transformers forward {n / dt_hf:8.0f} tokens/s")

    print("\n4. KV bytes per request (float32)")
    for n in (128, 512, 2048, 8192):
        kv = request_kv(cfg.replace(n_mtp_layers=llm.model.n_mtp), n, block_size=16, dtype="float32")
        hf_b = hf_cache_bytes(hf, n, cfg.vocab_size) if n <= 2048 else float("nan")
        print(f"  {n:6d} tokens: engine {kv.total_bytes / 1e6:8.2f} MB (sliding layers "
              f"{kv.sliding_bytes / 1e6:.2f} MB)   transformers cache {hf_b / 1e6:8.2f} MB")


if __name__ == "__main__":
    main()
