"""Engine benchmark on the default model, everything measured side by side in one run (float32, CPU).

1. batch-1 greedy decode, ms per generated token and mean acceptance length: transformers `generate` on the
   same weights, this engine with MTP off, and with 1, 2, 3 drafts; on code prompts and on chat task prompts;
2. total generated tokens/s at 1, 4, 16 and 64 concurrent requests (MTP off and on);
3. prefill tokens/s at 1K, 4K and 16K tokens;
4. KV bytes per request against context length: this engine's pools vs transformers' cache.

    python benchmarks/bench_engine.py [--model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from mimo import tasks as task_lib
from mimo.engine import LLM, SamplingParams
from mimo.engine.llm import DEFAULT_MODEL
from mimo.engine.planner import request_kv

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


def decode_table(llm, hf, prompts, max_tokens, ks, rounds):
    """Batch 1, one request at a time. Every prompt runs under every configuration (transformers `generate`,
    then the engine with k = 0..3 drafts) back to back, `rounds` times; a (prompt, configuration) pair keeps
    its fastest round, so machine load that comes and goes hits all configurations alike.
    Returns {config: (ms per generated token, mean acceptance length)}; config "hf" is transformers."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    def run(cfg, p):
        t0 = time.perf_counter()
        if cfg == "hf":
            x = torch.tensor([p])
            out = hf.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            return time.perf_counter() - t0, out.shape[1] - x.shape[1], 0, 0
        o = llm.generate(p, sp, num_speculative_tokens=cfg)[0]
        return time.perf_counter() - t0, len(o.token_ids), o.metrics.num_accepted, o.metrics.num_verify_steps

    cfgs = ["hf", *ks]
    for cfg in cfgs:  # warm-up
        run(cfg, prompts[0])
    best: dict[tuple, tuple] = {}
    for _ in range(rounds):
        for i, p in enumerate(prompts):
            for cfg in cfgs:
                r = run(cfg, p)
                if (cfg, i) not in best or r[0] < best[cfg, i][0]:
                    best[cfg, i] = r
    table = {}
    for cfg in cfgs:
        rows = [best[cfg, i] for i in range(len(prompts))]
        t, n, acc, ver = (sum(col) for col in zip(*rows))
        table[cfg] = (1000 * t / n, (1 + acc / ver) if ver else 1.0)
    return table


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
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the batch-1 decode table")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    llm = LLM(args.model, max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=2048)
    tok = llm.tokenizer
    cfg = llm.model.config
    print(f"model {args.model}: {sum(p.numel() for p in llm.model.parameters()) / 1e6:.1f}M parameters, "
          f"{cfg.n_layers} layers, {llm.model.n_mtp} MTP heads, window {cfg.sliding_window}, "
          f"threads {torch.get_num_threads()}")

    code = [tok.encode(p) for p in CODE_PROMPTS[: 3 if args.quick else 6]]
    chat = chat_prompts(tok, 3 if args.quick else 6)
    print(f"\n1. batch-1 greedy decode (ms/token, mean acceptance length; fastest of {args.rounds} interleaved rounds)")
    for name, prompts in (("code", code), ("chat tasks", chat)):
        mt = args.max_tokens if name == "code" else 16
        table = decode_table(llm, hf, prompts, mt, range(llm.model.n_mtp + 1), args.rounds)
        t_hf, t_off = table.pop("hf")[0], table[0][0]
        print(f"  {name:<10} transformers {t_hf:7.2f} ms/token")
        for k, (ms, al) in table.items():
            # cost of one verify step (+ its drafting round) in plain decode steps: speedup = AL / this
            print(f"  {name:<10} engine k={k}   {ms:7.2f} ms/token  AL {al:.2f}  "
                  f"{t_hf / ms:5.2f}x transformers  {t_off / ms:5.2f}x MTP-off  "
                  f"step cost {ms * al / t_off:4.2f}x a plain step")

    print("\n1b. sampled decode (temperature 0.7, top-p 0.95), batch 1: mean acceptance length with all drafts")
    for name, prompts in (("code", code), ("chat tasks", chat)):
        k = llm.model.n_mtp
        outs = [llm.generate(p, SamplingParams(max_tokens=args.max_tokens, temperature=0.7, top_p=0.95, seed=i),
                             num_speculative_tokens=k)[0] for i, p in enumerate(prompts)]
        acc = sum(o.metrics.num_accepted for o in outs)
        ver = sum(o.metrics.num_verify_steps for o in outs)
        print(f"  {name:<10} k={k}: AL {1 + acc / max(ver, 1):.2f} over {ver} verify steps")

    print("\n2. throughput, concurrent requests (code prompts, 64 tokens each)")
    base = None
    for n in (1, 4, 16, 64):
        prompts = [code[i % len(code)] for i in range(n)]
        for k in (0, llm.model.n_mtp):
            sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
            llm.generate(prompts[:1], sp, num_speculative_tokens=k)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp, num_speculative_tokens=k)
            dt = time.perf_counter() - t0
            tps = sum(len(o.token_ids) for o in outs) / dt
            if n == 1 and k == 0:
                base = tps
            print(f"  {n:3d} requests, k={k}: {tps:8.1f} tokens/s  ({tps / base:5.2f}x one request, k=0)")

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
