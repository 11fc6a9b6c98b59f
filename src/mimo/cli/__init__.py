"""The `mimo` command line: one module per command group (`model`, `train`, `serve`), each command a parser plus
a thin function that builds a config and calls the library.

Only the chosen command's parser is built and nothing heavy (torch) is imported before its flags are checked,
so `--help` and flag errors answer at once. Exit codes: 0 success, 2 bad input (one `error: ...` line on
stderr), 1 training diverged (the last good checkpoint is kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ABOUT = "mimo: generate, chat, serve and train with MiMo-V2-Flash language models (a small trained one is bundled)."


class UserError(Exception):
    """Bad input: `main` prints `error: <message>` and exits 2."""


@dataclass(frozen=True)
class Command:
    name: str
    summary: str  # its line in `mimo --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: argument --n: ... (see 'mimo eval --help')`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Turn the library's input errors (exceptions whose message is meant for the user) into `UserError`."""
    try:
        yield
    except types as e:
        raise UserError(first_line(e)) from e


# ---- flag types: argparse names the flag in the error, e.g. "argument --n: expected a positive integer" ----

def number_type(kind: type, ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse `type=`: `kind(text)` when `ok` of it, else an error saying `what` was expected."""
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            x = None
        if x is None or not ok(x):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return x

    return parse


positive_int = number_type(int, lambda x: x > 0, "a positive integer")
nonnegative_int = number_type(int, lambda x: x >= 0, "an integer >= 0")
nonnegative_float = number_type(float, lambda x: 0 <= x < math.inf, "a number >= 0")
positive_float = number_type(float, lambda x: 0 < x < math.inf, "a positive number")
unit_fraction = number_type(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")
nucleus = number_type(float, lambda x: 0 < x <= 1, "a number in (0, 1]")
port_number = number_type(int, lambda x: 0 <= x <= 65535, "a port in [0, 65535]")


def positive_int_list(text: str) -> list[int]:
    """'4096,32768' -> [4096, 32768]."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


# ---- shared steps of the commands --------------------------------------------------------------------------

def text_model_dir(model: str | None, command: str) -> str:
    """The model directory a text-in, text-out command can use: it must exist and hold a tokenizer."""
    if model is None:
        from mimo.engine.config import DEFAULT_MODEL

        model = str(DEFAULT_MODEL)
        if not Path(model, "config.json").is_file():
            raise UserError(f"the bundled default model is missing ({model}); pass --model DIR")
    path = Path(model)
    if not path.is_dir():
        from mimo.model.config import PRESETS

        if model in PRESETS:
            raise UserError(f"'{model}' is a preset (random weights, no tokenizer); {command} needs a model "
                            "directory with tokenizer.json")
        raise UserError(f"model directory not found: {model}")
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"model directory {model} has no tokenizer (tokenizer.json); {command} needs one")
    return model


API_KEY_ENV = "MIMO_API_KEY"


def api_key_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"{what} (default: ${API_KEY_ENV})")


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (stdout stays machine-readable)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="example", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


# ---- dispatch ----------------------------------------------------------------------------------------------

def _groups():
    from mimo.cli import model, serve, train

    return (model, train, serve)


def commands() -> dict[str, Command]:
    return {c.name: c for group in _groups() for c in group.COMMANDS}


def usage() -> str:
    lines = [ABOUT, "", "usage: mimo <command> [options]      ('mimo <command> --help' lists its options)"]
    for group in _groups():
        lines += ["", f"{group.TITLE}:"]
        lines += [f"  {c.name:<13} {c.summary}" for c in group.COMMANDS]
    return "\n".join(lines)


def parser(command: Command) -> ArgumentParser:
    p = ArgumentParser(prog=f"mimo {command.name}", description=command.summary)
    command.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    table = commands()
    command = table.get(argv[0])
    if command is None:
        close = difflib.get_close_matches(argv[0], table, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{argv[0]}'{hint}\ncommands: {', '.join(table)}; see 'mimo --help'",
              file=sys.stderr)
        return 2
    args = parser(command).parse_args(argv[1:])
    try:
        return command.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
