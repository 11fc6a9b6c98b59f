"""`mimo generate`, `mimo kv-plan`, `mimo params`: run a model through the engine, or size one from its config."""

from __future__ import annotations

import argparse
import json
import sys

from mimo.cli import (
    Command,
    UserError,
    nonnegative_float,
    nonnegative_int,
    nucleus,
    positive_int,
    positive_int_list,
    text_model_dir,
    user_errors,
)

TITLE = "Run and size models"


def _check_drafts(drafts: int | None, n_mtp: int) -> None:
    if drafts is not None and drafts > n_mtp:
        raise UserError(f"--drafts {drafts} is more than the model's {n_mtp} MTP heads")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="model directory with a tokenizer (default: the bundled mimo-tiny)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="repeat for a batch")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user chat message")
    p.add_argument("--max-tokens", type=positive_int, default=64, metavar="N")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-p", type=nucleus, default=1.0, metavar="P")
    p.add_argument("--seed", type=int, metavar="N")
    p.add_argument("--drafts", type=nonnegative_int, metavar="K", help="MTP drafts per step (default: all heads)")


def generate(args: argparse.Namespace) -> int:
    model_dir = text_model_dir(args.model, "mimo generate")
    from mimo.data.tokenizer import Tokenizer
    from mimo.model.config import ModelConfig

    with user_errors(ValueError, FileNotFoundError):
        cfg = ModelConfig.from_pretrained(model_dir)
        tok = Tokenizer.from_pretrained(model_dir)
    _check_drafts(args.drafts, cfg.n_mtp_layers)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) if args.chat else tok.encode(q)
               for q in args.prompt]
    if not all(prompts):
        raise UserError("--prompt must not be empty")
    # The engine's context is sized to the request, so --max-tokens is honoured up to the model's limit.
    longest, context = max(map(len, prompts)), cfg.max_position_embeddings
    if longest >= context:
        raise UserError(f"--prompt has {longest} tokens; the model's context is {context} tokens")
    if longest + args.max_tokens > context:
        raise UserError(f"--max-tokens must be at most {context - longest} for this prompt (the model's context "
                        f"is {context} tokens), got {args.max_tokens}")
    from mimo.engine import LLM, SamplingParams

    with user_errors(ValueError):
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
        llm = LLM(model_dir, num_speculative_tokens=args.drafts, max_num_seqs=len(prompts),
                  max_model_len=longest + args.max_tokens, tokenizer=tok)
    return _stream_generate(llm, tok, args.prompt, prompts, sp)


def _stream_generate(llm, tok, texts: list[str], prompts: list[list[int]], sp) -> int:
    """Every prompt runs in one batch; the text is written as it comes, one prompt after the other (a later
    prompt's text, buffered meanwhile, catches up when its turn comes). A header line names each prompt when
    there are several; per-prompt figures go to stderr."""
    import time

    from mimo.data.detok import TextStream

    for i, p in enumerate(prompts):
        llm.add_request(str(i), p, sp)
    streams = [TextStream(tok) for _ in prompts]
    pending, done, figures = [""] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    t0, cur, out = time.perf_counter(), 0, sys.stdout

    def show(i: int) -> None:
        if pending[i]:
            out.write(pending[i])
            out.flush()
            pending[i] = ""

    if len(prompts) > 1:
        out.write(f">>> {texts[0]}\n")
    while cur < len(prompts):
        for d in llm.step():
            i = int(d.request_id)
            pending[i] += streams[i].push(d.new_token_ids)
            if d.finished:
                pending[i] += streams[i].finish()
                done[i] = d
                figures[i] = time.perf_counter() - t0
        show(cur)
        while cur < len(prompts) and done[cur] is not None:
            d = done[cur]
            out.write("\n")
            al = d.metrics.acceptance_length
            print(f"[{d.num_output_tokens} tokens, {d.finish_reason}, {d.num_output_tokens / figures[cur]:.0f} "
                  f"tokens/s, acceptance length {al:.2f}]" if al else
                  f"[{d.num_output_tokens} tokens, {d.finish_reason}, {d.num_output_tokens / figures[cur]:.0f} "
                  "tokens/s]", file=sys.stderr, flush=True)
            cur += 1
            if cur < len(prompts):
                out.write(f">>> {texts[cur]}\n")
                show(cur)
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    """The model as --preset NAME or --model DIR: its config alone, no weights loaded."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="a named config, e.g. mimo-v2-flash (the released model), tiny, debug")
    g.add_argument("--model", metavar="DIR", help="a directory with config.json")


def _model_config(args: argparse.Namespace):
    from mimo.model.config import ModelConfig

    with user_errors(ValueError, FileNotFoundError):
        return ModelConfig.from_preset(args.preset) if args.preset else ModelConfig.from_pretrained(args.model)


def _kv_plan_args(p: argparse.ArgumentParser) -> None:
    from mimo.engine.config import DTYPE_BYTES

    _config_args(p)
    p.add_argument("--context", type=positive_int_list, default=[4096, 32768, 131072, 262144],
                   help="comma-separated token counts (default: 4096,32768,131072,262144)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    p.add_argument("--block-size", type=positive_int, default=16)
    p.add_argument("--drafts", type=nonnegative_int, default=0, help="speculative tokens per step")


def kv_plan(args: argparse.Namespace) -> int:
    from mimo.engine.planner import format_plan, kv_plan

    cfg = _model_config(args)
    _check_drafts(args.drafts, cfg.n_mtp_layers)
    with user_errors(ValueError):
        plan = kv_plan(cfg, args.context, block_size=args.block_size, num_speculative_tokens=args.drafts,
                       dtype=args.dtype)
    print(format_plan(plan))
    return 0


def params(args: argparse.Namespace) -> int:
    from mimo.model.params import count_parameters

    print(json.dumps(count_parameters(_model_config(args)), indent=2, default=str))
    return 0


COMMANDS = (
    Command("generate", "generate text with the engine (MTP speculative decoding on)", _generate_args, generate),
    Command("kv-plan", "KV cache bytes per request of a config, against an all-global model", _kv_plan_args,
            kv_plan),
    Command("params", "parameter counts of a config (total, active, per part)", _config_args, params),
)
