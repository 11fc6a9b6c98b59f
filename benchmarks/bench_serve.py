"""Serving benchmark on the default model: `mimo serve` as its own process (as users run it), the load
generator (`mimo.serve.bench`) in this one, and in-process `LLM.generate` on the same prompts for comparison
(run while the server idles).

Configurations: code and chat-task prompts at concurrency 1, 8, 32 and 64 with MTP on (the server's default
drafts); code at concurrency 1 with MTP off (`num_speculative_tokens: 0`); `LLM.generate` one prompt at a
time on the concurrency-1 prompts. Code requests ignore end-of-sequence, so every request generates
`--max-tokens` tokens and all concurrencies do the same work; chat requests stop where the model stops.
Every configuration runs once per round, rounds interleaved, and keeps its round with the highest output
throughput, so machine load that comes and goes hits all configurations alike. Errors are summed over all
rounds.

    python benchmarks/bench_serve.py [--model DIR] [--rounds 3] [--requests 16] [--max-tokens 64] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from mimo.engine import LLM, SamplingParams
from mimo.serve import bench

CONCURRENCIES = (1, 8, 32, 64)


@dataclass(frozen=True)
class Run:
    prompts: str  # "code" | "chat" | "llm-code" | "llm-chat" (in-process LLM.generate)
    concurrency: int
    drafts: int | None = None  # None: the server's default

    @property
    def name(self) -> str:
        mtp = "MTP off" if self.drafts == 0 else "MTP on"
        if self.prompts.startswith("llm-"):
            return f"LLM.generate {self.prompts[4:]:<4} c={self.concurrency:<3} {mtp}"
        return f"server {self.prompts:<4} c={self.concurrency:<3} {mtp}"


@dataclass
class Figures:
    ok: int
    errors: int
    output_tps: float
    tpot_p50_ms: float | None = None
    ttft_p50_ms: float | None = None
    itl_p50_ms: float | None = None
    e2e_p50_ms: float | None = None
    acceptance_length: float | None = None


def num_requests(run: Run, at_least: int) -> int:
    """At least two waves of requests at every concurrency, so throughput is not one batch's ramp-up."""
    return max(at_least, 2 * run.concurrency)


def serve_figures(url: str, run: Run, n: int, max_tokens: int) -> tuple[Figures, str | None]:
    cfg = bench.BenchConfig(url, num_requests=n, concurrency=run.concurrency, prompts=run.prompts,
                            max_tokens=max_tokens, ignore_eos=run.prompts == "code",
                            num_speculative_tokens=run.drafts)
    r = asyncio.run(bench.benchmark(cfg))

    def p50(s):
        return None if s is None else s.p50 * 1e3

    return Figures(len(r.succeeded), r.failed, r.output_throughput, p50(r.tpot), p50(r.ttft), p50(r.itl),
                   p50(r.e2e), r.acceptance_length), r.first_error


def llm_figures(llm: LLM, prompts: list, max_tokens: int, ignore_eos: bool) -> Figures:
    """One request at a time, back to back, timed like the server run: output tokens / wall time."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    tokens = 0
    t0 = time.perf_counter()
    for p in prompts:
        tokens += len(llm.generate(p, sp)[0].token_ids)
    return Figures(len(prompts), 0, tokens / (time.perf_counter() - t0))


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def start_server(model: str | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mimo.cli", "serve", "--port", "0"] + (["--model", model] if model else [])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:
        m = re.search(r"at (http://[\d.]+:\d+)", line)
        if m:
            threading.Thread(target=p.stdout.read, daemon=True).start()
            return p, m.group(1)
    raise SystemExit(f"mimo serve exited with {p.wait()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model directory (default: the bundled mimo-tiny)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each configuration keeps its best")
    ap.add_argument("--requests", type=int, default=16, help="requests per configuration (at least 2 x concurrency)")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 8 requests (1-2 minutes)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.requests = 3, 8

    import torch

    torch.set_num_threads(1)  # as the server runs
    server, url = start_server(args.model)
    try:
        llm = LLM(args.model)
        runs = [Run(p, c) for p in ("code", "chat") for c in CONCURRENCIES]
        runs += [Run("code", 1, drafts=0), Run("llm-code", 1), Run("llm-chat", 1)]
        # LLM.generate gets exactly the prompts of the concurrency-1 server runs
        n1 = num_requests(Run("code", 1), args.requests)
        llm_prompts = {"llm-code": bench.code_prompts(n1),
                       "llm-chat": [llm.tokenizer.encode_chat(m) for m in bench.chat_prompts(n1)]}
        print(f"server {url}, model {args.model or 'mimo-tiny (default)'}, max_tokens {args.max_tokens}, "
              f"{args.rounds} rounds, >= {args.requests} requests per configuration")

        # warm-up: first requests pay one-off costs (allocator growth, lazy imports) in every path
        for run in (Run("code", 8), Run("code", 8, drafts=0), Run("chat", 8)):
            serve_figures(url, run, 8, 8)
        for key in llm_prompts:
            llm_figures(llm, llm_prompts[key][:1], 8, key == "llm-code")

        best: dict[Run, Figures] = {}
        errors = {run: 0 for run in runs}
        first_error = None
        for rnd in range(args.rounds):
            t = time.perf_counter()
            for run in runs:
                if run.prompts in llm_prompts:
                    f = llm_figures(llm, llm_prompts[run.prompts], args.max_tokens, run.prompts == "llm-code")
                else:
                    f, err = serve_figures(url, run, num_requests(run, args.requests), args.max_tokens)
                    first_error = first_error or err
                errors[run] += f.errors
                if run not in best or f.output_tps > best[run].output_tps:
                    best[run] = f
            print(f"  round {rnd + 1}/{args.rounds}: {time.perf_counter() - t:.1f} s")
    finally:
        server.terminate()
        server.wait(30)

    print(f"\n{'configuration':<34}{'requests':>9}{'errors':>7}{'out tok/s':>11}{'TTFT p50':>10}"
          f"{'TPOT p50':>10}{'ITL p50':>9}{'E2E p50':>10}{'AL':>6}   (latencies in ms)")
    for run in runs:
        f = best[run]
        print(f"{run.name:<34}{f.ok:>9}{errors[run]:>7}{f.output_tps:>11.1f}{fmt(f.ttft_p50_ms, '.1f'):>10}"
              f"{fmt(f.tpot_p50_ms, '.2f'):>10}{fmt(f.itl_p50_ms, '.2f'):>9}{fmt(f.e2e_p50_ms, '.0f'):>10}"
              f"{fmt(f.acceptance_length, '.2f'):>6}")

    total_errors = sum(errors.values())
    scale = {p: best[Run(p, 32)].output_tps / best[Run(p, 1)].output_tps for p in ("code", "chat")}
    vs_llm = {p: best[Run(p, 1)].output_tps / best[Run(f"llm-{p}", 1)].output_tps for p in ("code", "chat")}
    on, off = best[Run("code", 1)].tpot_p50_ms, best[Run("code", 1, drafts=0)].tpot_p50_ms
    tpot_ratio = on / off if on is not None and off else None
    checks = [
        ("zero errors, all rounds", f"{total_errors}", "0", total_errors == 0),
        ("output tok/s, concurrency 32 vs 1, code", f"{scale['code']:.2f}x", ">= 5x", scale["code"] >= 5),
        ("output tok/s, concurrency 32 vs 1, chat", f"{scale['chat']:.2f}x", "(info)", None),
        ("server vs LLM.generate tok/s, concurrency 1, code", f"{vs_llm['code']:.2f}x", ">= 0.90x",
         vs_llm["code"] >= 0.9),
        ("server vs LLM.generate tok/s, concurrency 1, chat", f"{vs_llm['chat']:.2f}x", "(info)", None),
        ("median TPOT MTP on / off, concurrency 1, code", fmt(tpot_ratio, ".2f"), "<= 0.6",
         tpot_ratio is not None and tpot_ratio <= 0.6),
    ]
    print(f"\n{'check':<52}{'value':>8}{'target':>10}  met")
    for name, value, target, met in checks:
        print(f"{name:<52}{value:>8}{target:>10}  {'' if met is None else ('yes' if met else 'NO')}")
    if first_error:
        print(f"first error: {first_error}")


if __name__ == "__main__":
    main()
