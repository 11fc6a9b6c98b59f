"""`mimo` command line: each subcommand parses its flags and calls one function; nothing runs at import.

    mimo generate [--model DIR] --prompt TEXT [--chat] [--max-tokens N] [--temperature T] [--drafts K]
    mimo kv-plan (--preset NAME | --model DIR) [--context 4096,262144] [--dtype bfloat16]
    mimo params (--preset NAME | --model DIR)
    mimo pretrain | sft | eval | recipe | export | distill-mtp ...   (training: see `mimo pretrain --help`)
"""

from __future__ import annotations

import argparse
import json
import sys


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser taking the model as --preset NAME or --model DIR (config only, no weights loaded)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset")
    g.add_argument("--model")
    return p


def _model_config(args):
    from mimo.model import ModelConfig

    if args.preset:
        return ModelConfig.from_preset(args.preset)
    return ModelConfig.from_pretrained(args.model)


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mimo generate", description="generate with the engine (MTP drafts on)")
    p.add_argument("--model", default=None, help="model directory or preset (default: the bundled mimo-tiny)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user chat message")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--drafts", type=int, default=None, help="MTP drafts per step (default: all heads)")
    args = p.parse_args(argv)
    from mimo.engine import LLM, SamplingParams

    try:
        llm = LLM(args.model, num_speculative_tokens=args.drafts)
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
        prompts = args.prompt
        if args.chat:
            if llm.tokenizer is None:
                return _error("--chat needs a model directory with a tokenizer")
            prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in prompts]
        outs = llm.generate(prompts, sp)
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e))
    for q, o in zip(args.prompt, outs):
        print(json.dumps({"prompt": q, "text": o.text, "finish_reason": o.finish_reason,
                          "tokens": len(o.token_ids), "acceptance_length": o.metrics.acceptance_length}))
    st = llm.stats()
    print(json.dumps({"mean_acceptance_length": round(st["mean_acceptance_length"], 3),
                      "drafted": st["drafted_tokens"], "accepted": st["accepted_tokens"]}), file=sys.stderr)
    return 0


def kv_plan_main(argv: list[str]) -> int:
    p = _config_parser("mimo kv-plan", "KV bytes per request vs an all-global model")
    p.add_argument("--context", default="4096,32768,131072,262144", help="comma-separated token counts")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--drafts", type=int, default=0, help="speculative tokens per step")
    args = p.parse_args(argv)
    from mimo.engine.planner import format_plan, kv_plan

    try:
        cfg = _model_config(args)
        contexts = [int(x) for x in args.context.split(",") if x]
        print(format_plan(kv_plan(cfg, contexts, block_size=args.block_size, num_speculative_tokens=args.drafts,
                                  dtype=args.dtype)))
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e))
    return 0


def params_main(argv: list[str]) -> int:
    args = _config_parser("mimo params", "parameter counts from a config alone").parse_args(argv)
    from mimo.model.params import count_parameters

    try:
        counts = count_parameters(_model_config(args))
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e))
    print(json.dumps(counts, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    local = {"generate": generate_main, "kv-plan": kv_plan_main, "params": params_main}
    training = ("pretrain", "sft", "eval", "recipe", "export", "distill-mtp")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*local, *training):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] in training:
        from mimo.train import cli as train_cli

        return train_cli.main(argv)
    return local[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
