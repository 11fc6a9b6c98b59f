"""`mimo chat`: the line commands, and a scripted session against a fake OpenAI-compatible server (an httpx
mock transport) — what each turn sends (history, thinking switch) and what the terminal shows."""

import io
import json
import subprocess
import sys

import httpx
import pytest

from mimo.cli import UserError
from mimo.cli.chat import Chat, chat_loop, parse_line, stream_input


@pytest.mark.parametrize("line, action", [
    ("hello there", ("say", "hello there")),
    ("  padded  \n", ("say", "padded")),
    ("", ("skip", None)),
    ("   ", ("skip", None)),
    ("/think on", ("think", True)),
    ("/think OFF", ("think", False)),
    ("/reset", ("reset", None)),
    ("/quit", ("quit", None)),
    ("/exit", ("quit", None)),
    ("/help", ("help", None)),
])
def test_parse_line(line, action):
    assert parse_line(line) == action


@pytest.mark.parametrize("line", ["/think", "/think maybe", "/quit now", "/bogus"])
def test_bad_commands_are_errors_not_messages(line):
    action, message = parse_line(line)
    assert action == "error" and ("/think on|off" in message or "unknown command" in message)


def sse(*deltas) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": d}]} for d in deltas]
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"


class FakeServer:
    """Answers /v1/models and streams a canned reply per chat request; records every request body."""

    def __init__(self, replies):
        self.replies, self.requests, self.auth = list(replies), [], []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("authorization"))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "mimo-tiny", "object": "model"}]})
        self.requests.append(json.loads(request.content))
        status, body = self.replies.pop(0)
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})


def session(server, lines, **kw):
    chat = Chat.connect("http://fake", api_key="k", transport=httpx.MockTransport(server), **kw)
    out = io.StringIO()
    rc = chat_loop(chat, stream_input(io.StringIO("".join(f"{x}\n" for x in lines)), out), out, color=False)
    return rc, out.getvalue(), chat


def test_a_session_keeps_history_switches_thinking_and_resets():
    server = FakeServer([
        (200, sse({"role": "assistant"}, {"content": "Hi"}, {"content": " there"})),
        (200, sse({"reasoning_content": "they said again"}, {"content": "Again!"})),
        (200, sse({"content": "fresh"})),
    ])
    rc, out, chat = session(server, ["hello", "/think on", "again", "/reset", "hi", "/quit", "never read"])
    assert rc == 0
    first, second, third = server.requests
    assert first["messages"] == [{"role": "user", "content": "hello"}] and first["stream"] is True
    assert first["model"] == "mimo-tiny" and first["chat_template_kwargs"] == {"enable_thinking": False}
    assert second["chat_template_kwargs"] == {"enable_thinking": True}
    # the reply goes back into the history, its thinking does not
    assert second["messages"] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there"},
                                  {"role": "user", "content": "again"}]
    assert third["messages"] == [{"role": "user", "content": "hi"}]
    assert "Hi there\n" in out and "<think>\nthey said again\n</think>\nAgain!\n" in out
    assert "thinking on" in out and "new conversation" in out
    assert set(server.auth) == {"Bearer k"}
    assert chat.messages[-1] == {"role": "assistant", "content": "fresh"}


def test_a_failed_turn_is_shown_and_left_out_of_the_history():
    error = json.dumps({"error": {"message": "prompt too long", "type": "invalid_request_error"}}).encode()
    server = FakeServer([(400, error), (200, sse({"content": "ok"}))])
    rc, out, chat = session(server, ["too long", "short"])  # end of input = Ctrl-D
    assert rc == 0
    assert "error: HTTP 400: prompt too long" in out
    assert server.requests[1]["messages"] == [{"role": "user", "content": "short"}]
    assert chat.messages == [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]


def test_connect_refuses_a_bad_key_and_an_unreachable_server():
    deny = httpx.MockTransport(lambda request: httpx.Response(401, json={"error": {"message": "bad key"}}))
    with pytest.raises(UserError, match="refused the API key"):
        Chat.connect("http://fake", api_key="wrong", transport=deny)
    proc = subprocess.run([sys.executable, "-m", "mimo.cli", "chat", "--url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach http://127.0.0.1:9")


def test_ctrl_c_stops_the_reply_not_the_session():
    def interrupted():
        yield sse({"content": "Partial"}).split(b"data: [DONE]")[0]
        raise KeyboardInterrupt  # what Ctrl-C raises while the reply streams in

    server = FakeServer([(200, interrupted()), (200, sse({"content": "next"}))])
    rc, out, chat = session(server, ["long question", "go on"])
    assert rc == 0 and "Partial [stopped]\n" in out and "next\n" in out
    assert server.requests[1]["messages"][:2] == [{"role": "user", "content": "long question"},
                                                  {"role": "assistant", "content": "Partial"}]


def test_a_reply_of_thinking_only_stays_in_the_history():
    server = FakeServer([(200, sse({"reasoning_content": "hmm"})), (200, sse({"content": "ok"}))])
    rc, out, chat = session(server, ["/think on", "q", "again"])
    assert "<think>\nhmm\n</think>\n" in out
    assert server.requests[1]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""},
                                              {"role": "user", "content": "again"}]
