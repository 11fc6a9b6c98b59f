"""`mimo chat`: a terminal chat with any OpenAI-compatible server, replies streamed as they come.

Each turn streams `POST {url}/v1/chat/completions` (`stream: true`, server-sent events) with the whole history
and `chat_template_kwargs.enable_thinking`. A delta's `reasoning_content` is the model's thinking, shown dimmed;
its `content` is the reply, and only that goes back into the history. Ctrl-C stops the reply being streamed
(closing the connection aborts the request on the server), Ctrl-D exits. Input and output are parameters so a
test can drive a session.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any, TextIO

import httpx

from mimo.cli import UserError

HELP = "/reset starts over, /think on|off, /quit exits; Ctrl-C stops a reply, Ctrl-D exits"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def parse_line(line: str) -> tuple[str, Any]:
    """One input line -> (action, argument): ("say", text), ("reset", None), ("think", bool), ("quit", None),
    ("help", None), ("skip", None) for a blank line, or ("error", message) for a bad command."""
    text = line.strip()
    if not text:
        return "skip", None
    if not text.startswith("/"):
        return "say", text
    command, _, arg = text.partition(" ")
    arg = arg.strip().lower()
    if command == "/think":
        if arg in ("on", "off"):
            return "think", arg == "on"
        return "error", "usage: /think on|off"
    if command in ("/quit", "/exit", "/reset", "/help") and not arg:
        return {"/quit": "quit", "/exit": "quit", "/reset": "reset", "/help": "help"}[command], None
    return "error", f"unknown command {text!r}; {HELP}"


class ChatError(Exception):
    """A failed turn: shown, and the session goes on without it."""


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"] if isinstance(body.get("error"), dict) else body)
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text.strip()[:300] or response.reason_phrase


class Chat:
    """The conversation and the connection: `stream()` sends the history and yields the reply's pieces."""

    def __init__(self, client: httpx.Client, model: str, think: bool = False, max_tokens: int | None = None,
                 temperature: float | None = None):
        self.client, self.model, self.think = client, model, think
        self.max_tokens, self.temperature = max_tokens, temperature
        self.messages: list[dict[str, str]] = []

    @classmethod
    def connect(cls, url: str, model: str | None = None, api_key: str | None = None,
                transport: httpx.BaseTransport | None = None, **kw) -> Chat:
        """Check the server answers (GET /v1/models) and pick the model: `model`, else the server's first."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no read timeout: a reply on a CPU may pause long between tokens
        client = httpx.Client(base_url=url.rstrip("/"), headers=headers, transport=transport,
                              timeout=httpx.Timeout(10.0, read=None))
        try:
            r = client.get("/v1/models")
        except httpx.HTTPError as e:
            client.close()
            raise UserError(f"cannot reach {url}: {e}") from e
        if r.status_code == 401:
            client.close()
            raise UserError(f"{url} refused the API key (HTTP 401); pass --api-key or set MIMO_API_KEY")
        if model is None:
            try:
                ids = [m["id"] for m in r.json()["data"]] if r.status_code == 200 else []
            except (ValueError, KeyError, TypeError):
                ids = []
            if not ids:
                client.close()
                raise UserError(f"{url} lists no model (GET /v1/models: HTTP {r.status_code}); pass --model NAME")
            model = ids[0]
        return cls(client, model, **kw)

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages, "stream": True,
                                "chat_template_kwargs": {"enable_thinking": self.think}}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def stream(self) -> Iterator[tuple[str, str]]:
        """("reasoning" | "content", text) pieces of the reply to the history as it stands."""
        try:
            with self.client.stream("POST", "/v1/chat/completions", json=self.payload()) as r:
                if r.status_code != 200:
                    r.read()
                    raise ChatError(f"HTTP {r.status_code}: {_error_text(r)}")
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ChatError(str(chunk["error"].get("message", chunk["error"])))
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        for kind in ("reasoning_content", "content"):
                            if delta.get(kind):
                                yield kind.removesuffix("_content"), delta[kind]
        except httpx.HTTPError as e:
            raise ChatError(f"connection failed: {e}") from e


def turn(chat: Chat, text: str, out: TextIO, color: bool) -> None:
    """Send `text`, stream the reply to `out`; the history gains the turn unless it failed."""
    chat.messages.append({"role": "user", "content": text})
    reply: list[str] = []
    kind = None

    def switch(to: str | None) -> None:
        nonlocal kind
        if kind == "reasoning":
            out.write(RESET + "\n" if color else "\n</think>\n")
        if to == "reasoning":
            out.write(DIM if color else "<think>\n")
        kind = to

    try:
        with closing(chat.stream()) as pieces:
            for k, piece in pieces:
                if k != kind:
                    switch(k)
                out.write(piece)
                out.flush()
                if k == "content":
                    reply.append(piece)
    except KeyboardInterrupt:
        switch(None)
        out.write(" [stopped]\n")
        if not reply:  # stopped before any answer: the question stays unasked
            chat.messages.pop()
            return
    except ChatError as e:
        switch(None)
        out.write(f"\nerror: {e}\n")
        chat.messages.pop()
        return
    else:
        switch(None)
        out.write("\n")
    chat.messages.append({"role": "assistant", "content": "".join(reply)})


def chat_loop(chat: Chat, read_line: Callable[[str], str], out: TextIO, color: bool | None = None) -> int:
    """The session: read a line, act on it, until /quit or end of input (Ctrl-D). Returns the exit code."""
    if color is None:
        color = out.isatty() and "NO_COLOR" not in os.environ
    out.write(f"chatting with {chat.model}, thinking {'on' if chat.think else 'off'}; {HELP}\n")
    while True:
        try:
            line = read_line("> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as in a shell
            out.write("\n")
            continue
        action, arg = parse_line(line)
        if action == "say":
            turn(chat, arg, out, color)
        elif action == "think":
            chat.think = arg
            out.write(f"thinking {'on' if arg else 'off'}\n")
        elif action == "reset":
            chat.messages.clear()
            out.write("new conversation\n")
        elif action == "quit":
            return 0
        elif action == "help":
            out.write(HELP + "\n")
        elif action == "error":
            out.write(arg + "\n")


def terminal_input() -> Callable[[str], str]:
    """`input`, with line editing and history when stdin is a terminal (importing readline provides them)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401
        except ImportError:  # not on every platform; plain input still works
            pass
    return input


def stream_input(stream: TextIO, out: TextIO) -> Callable[[str], str]:
    """`input` over a text stream (a test's scripted lines); end of stream is Ctrl-D."""
    def read(prompt: str) -> str:
        out.write(prompt)
        line = stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read
