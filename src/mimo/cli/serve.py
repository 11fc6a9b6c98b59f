"""`mimo serve`, `mimo chat`, `mimo bench-serve`: the HTTP server, a terminal client of it, a load generator.

The implementations live in `mimo.serve` and `mimo.cli.chat`; they are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mimo.cli import (
    Command,
    env_default,
    nonnegative_float,
    nonnegative_int,
    port_number,
    positive_int,
    user_errors,
)

TITLE = "Serve"
API_KEY_ENV = "MIMO_API_KEY"


def _api_key_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--api-key", default=env_default(API_KEY_ENV), help=f"{what} (default: ${API_KEY_ENV})")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="model directory (default: the bundled mimo-tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8000, help="default: %(default)s; 0 = any free port")
    _api_key_arg(p, "clients must send it as a bearer token")
    p.add_argument("--served-model-name", help="the model name clients see and send (default: from --model)")
    p.add_argument("--num-speculative-tokens", type=nonnegative_int, help="MTP drafts per step (default: all heads)")
    p.add_argument("--max-num-seqs", type=positive_int, help="requests decoded together at most")
    p.add_argument("--max-model-len", type=positive_int, help="prompt + output tokens of a request at most")
    p.add_argument("--max-queue", type=positive_int, help="waiting requests at most (more get HTTP 503)")


def serve(args: argparse.Namespace) -> int:
    from mimo.serve.server import ServeConfig, run

    with user_errors(ValueError, FileNotFoundError):
        config = ServeConfig(model=args.model, host=args.host, port=args.port, api_key=args.api_key,
                             served_model_name=args.served_model_name,
                             num_speculative_tokens=args.num_speculative_tokens, max_num_seqs=args.max_num_seqs,
                             max_model_len=args.max_model_len, max_queue=args.max_queue)
    return run(config)


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000 (default: start one "
                   "in this process)")
    p.add_argument("--model", help="with --url: the model name to ask for (default: the server's first); "
                   "without: the model directory to serve (default: the bundled mimo-tiny)")
    _api_key_arg(p, "sent as a bearer token")
    p.add_argument("--think", action="store_true", help="start with thinking on (toggle with /think on|off)")
    p.add_argument("--max-tokens", type=positive_int, help="per reply (default: the server's)")
    p.add_argument("--temperature", type=nonnegative_float, help="default: the server's")


def chat(args: argparse.Namespace) -> int:
    from mimo.cli.chat import Chat, chat_loop, terminal_input

    server = None
    url = args.url
    if url is None:
        from mimo.serve.server import ServeConfig, start_background

        with user_errors(ValueError, FileNotFoundError):
            server = start_background(ServeConfig(model=args.model, port=0))
        url = server.url
    try:
        with Chat.connect(url, model=args.model if args.url else None, api_key=args.api_key, think=args.think,
                          max_tokens=args.max_tokens, temperature=args.temperature) as session:
            return chat_loop(session, terminal_input(), sys.stdout)
    finally:
        if server is not None:
            server.stop()


def _prompt_set(text: str) -> str:
    if text in ("code", "chat") or (text.endswith(".jsonl") and Path(text).is_file()):
        return text
    raise argparse.ArgumentTypeError(f"expected code, chat or an existing .jsonl file, got {text!r}")


def _request_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"expected requests per second > 0 or inf, got {text!r}")
    return rate


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--model", help="model name to ask for (default: the server's first)")
    p.add_argument("--num-requests", type=positive_int, default=64, help="default: %(default)s")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight at most "
                   "(default: %(default)s)")
    p.add_argument("--request-rate", type=_request_rate, default=float("inf"),
                   help="Poisson arrivals per second (default: inf = all at once)")
    p.add_argument("--prompts", type=_prompt_set, default="code", metavar="code|chat|FILE.jsonl",
                   help="built-in code or chat prompts, or one JSON object per line (default: %(default)s)")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="per request (default: %(default)s)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", dest="json_out", help="also write the results here")
    _api_key_arg(p, "sent as a bearer token")
    p.add_argument("--endpoint", choices=("chat", "completions"),
                   help="/v1/chat/completions or /v1/completions (default: completions for text prompts, chat "
                   "for messages)")
    p.add_argument("--num-speculative-tokens", type=nonnegative_int, help="MTP drafts per step, sent with each "
                   "request (default: the server's)")


def bench_serve(args: argparse.Namespace) -> int:
    from mimo.serve.bench import BenchConfig, run

    with user_errors(ValueError, FileNotFoundError):
        config = BenchConfig(url=args.url, model=args.model, num_requests=args.num_requests,
                             concurrency=args.concurrency, request_rate=args.request_rate, prompts=args.prompts,
                             max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                             json_out=args.json_out, api_key=args.api_key, endpoint=args.endpoint,
                             ignore_eos=args.ignore_eos, num_speculative_tokens=args.num_speculative_tokens)
    return run(config)


COMMANDS = (
    Command("serve", "OpenAI- and Anthropic-compatible HTTP server over the engine", _serve_args, serve),
    Command("chat", "chat in the terminal with a server (or one started in this process)", _chat_args, chat),
    Command("bench-serve", "load-test a server: throughput, time to first token, inter-token latency",
            _bench_args, bench_serve),
)
