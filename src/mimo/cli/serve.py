"""`mimo serve`, `mimo chat`, `mimo bench-serve`: the HTTP server, a terminal client of it, a load generator.

The implementations live in `mimo.serve` and `mimo.cli.chat`; they are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mimo.cli import (
    Command,
    api_key_arg,
    nonnegative_float,
    nonnegative_int,
    number_type,
    port_number,
    positive_int,
    text_model_dir,
    user_errors,
)

TITLE = "Serve"


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="model directory (default: the bundled mimo-tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8000, metavar="N",
                   help="default: %(default)s; 0 = any free port")
    api_key_arg(p, "clients must send it as a bearer token")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients see and send (default: the model directory's name)")
    p.add_argument("--num-speculative-tokens", type=nonnegative_int, metavar="K",
                   help="MTP drafts per step (default: all heads)")
    p.add_argument("--max-num-seqs", type=positive_int, metavar="N", help="requests decoded together at most")
    p.add_argument("--max-model-len", type=positive_int, metavar="N",
                   help="prompt + output tokens of a request at most")
    p.add_argument("--max-queue", type=nonnegative_int, metavar="N",
                   help="requests admitted beyond --max-num-seqs before answering 429")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads")
    p.add_argument("--compile", action="store_true", default=None,
                   help="run decode steps as torch.compile graphs (faster; the first requests wait for the compile)")


SERVE_FIELDS = ("model", "host", "port", "api_key", "served_model_name", "num_speculative_tokens", "max_num_seqs",
                "max_model_len", "max_queue", "threads", "compile")
BENCH_FIELDS = ("url", "model", "num_requests", "concurrency", "request_rate", "prompts", "max_tokens", "temperature",
                "seed", "json_out", "api_key", "endpoint", "ignore_eos", "num_speculative_tokens")


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The flags the user gave (the rest keep the config dataclass's defaults, one source for them)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def serve(args: argparse.Namespace) -> int:
    if args.model is not None:
        text_model_dir(args.model, "mimo serve")
    from mimo.serve.server import ServeConfig, run

    with user_errors(ValueError, FileNotFoundError):
        return run(ServeConfig(**_given(args, SERVE_FIELDS)))


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000 (default: start one "
                   "in this process)")
    p.add_argument("--model", help="with --url: the model name to ask for (default: the server's first); "
                   "without: the model directory to serve (default: the bundled mimo-tiny)")
    api_key_arg(p, "sent as a bearer token")
    p.add_argument("--think", action="store_true", help="start with thinking on (toggle with /think on|off)")
    p.add_argument("--max-tokens", type=positive_int, metavar="N", help="per reply (default: the server's)")
    p.add_argument("--temperature", type=nonnegative_float, metavar="T", help="default: the server's")


def chat(args: argparse.Namespace) -> int:
    from mimo.cli.chat import Chat, chat_loop, terminal_input

    server = None
    url = args.url
    if url is None:
        if args.model is not None:
            text_model_dir(args.model, "mimo chat")
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


_request_rate = number_type(float, lambda x: x > 0, "requests per second > 0 or inf")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--model", help="model name to ask for (default: the server's first)")
    p.add_argument("--num-requests", type=positive_int, metavar="N")
    p.add_argument("--concurrency", type=positive_int, metavar="N", help="requests in flight at most")
    p.add_argument("--request-rate", type=_request_rate, metavar="R",
                   help="Poisson arrivals per second (default: inf = all at once)")
    p.add_argument("--prompts", type=_prompt_set, metavar="code|chat|FILE.jsonl",
                   help="built-in code or chat prompts (default: code), or a file of one JSON object per line")
    p.add_argument("--max-tokens", type=positive_int, metavar="N", help="per request")
    p.add_argument("--ignore-eos", action="store_true", default=None, help="always generate --max-tokens tokens")
    p.add_argument("--temperature", type=nonnegative_float, metavar="T")
    p.add_argument("--seed", type=int, metavar="N")
    p.add_argument("--json", metavar="FILE", dest="json_out", help="also write the results here")
    api_key_arg(p, "sent as a bearer token")
    p.add_argument("--endpoint", choices=("chat", "completions"),
                   help="/v1/chat/completions or /v1/completions (default: completions for text prompts, chat "
                   "for messages)")
    p.add_argument("--num-speculative-tokens", type=nonnegative_int, metavar="K",
                   help="MTP drafts per step, sent with each request (default: the server's)")


def bench_serve(args: argparse.Namespace) -> int:
    from mimo.serve.bench import BenchConfig, run

    with user_errors(ValueError, FileNotFoundError):
        config = BenchConfig(**_given(args, BENCH_FIELDS))
    return run(config)


COMMANDS = (
    Command("serve", "OpenAI- and Anthropic-compatible HTTP server over the engine", _serve_args, serve),
    Command("chat", "chat in the terminal with a server (or one started in this process)", _chat_args, chat),
    Command("bench-serve", "load-test a server: throughput, time to first token, inter-token latency",
            _bench_args, bench_serve),
)
