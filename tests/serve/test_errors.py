"""Every error the server answers, with its status and envelope; and the server keeps serving afterwards."""

import json
import threading
import time

import anthropic
import httpx
import openai
import pytest

from mimo.serve.server import ServeConfig, start_background

MODEL = "mimo-tiny"
MSG = [{"role": "user", "content": "add 1 2"}]


def post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"content-type": "application/json", **kw}, timeout=30)


def envelope(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body,param", [
    ({"messages": MSG, "temperature": -1}, "temperature"),
    ({"messages": MSG, "top_p": 0}, "top_p"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "n": 0}, "n"),
    ({"messages": MSG, "logit_bias": {"1": 5}}, "logit_bias"),
    ({"messages": MSG, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": MSG, "tool_choice": "required", "tools": []}, None),
    ({"messages": MSG, "top_logprobs": 2}, None),
    ({"messages": MSG, "num_speculative_tokens": 9}, "num_speculative_tokens"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({"messages": MSG, "max_tokens": 10_000}, "max_tokens"),
])
def test_bad_parameters_are_400_naming_the_field(idle, body, param):
    err = envelope(post(idle, "/v1/chat/completions", body), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param and param.split(".")[0] in err["message"]


def test_malformed_json_prompt_too_long_and_body_too_large(idle):
    assert "malformed JSON" in envelope(post(idle, "/v1/chat/completions", b'{"messages": ['), 400)["message"]
    assert "JSON object" in envelope(post(idle, "/v1/completions", b"[1, 2]"), 400)["message"]
    long = [{"role": "user", "content": "add 1 2 " * 3000}]
    err = envelope(post(idle, "/v1/chat/completions", {"messages": long}), 400)
    assert "context" in err["message"] and err["code"] == "context_length_exceeded"
    big = {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    assert "limit" in envelope(post(idle, "/v1/chat/completions", big), 413)["message"]
    assert envelope(post(idle, "/v1/completions", {"prompt": "x", "echo": True}), 400)["param"] == "echo"


def test_unknown_model_and_path_are_404(idle):
    c = openai.OpenAI(base_url=idle.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=MSG)
    envelope(httpx.get(idle.url + "/v1/nothing"), 404)
    envelope(httpx.post(idle.url + "/v2/chat"), 404)


def test_an_exception_inside_one_request_is_its_500_and_others_are_served(idle, monkeypatch):
    tok = idle.llm.tokenizer
    real = tok.encode_chat

    def exploding(messages, *a, **kw):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("kaboom")
        return real(messages, *a, **kw)

    monkeypatch.setattr(tok, "encode_chat", exploding)
    results = {}

    def other():
        results["ok"] = post(idle, "/v1/chat/completions", {"messages": MSG, "max_tokens": 30, "temperature": 0})

    t = threading.Thread(target=other)
    t.start()
    err = envelope(post(idle, "/v1/chat/completions", {"messages": [{"role": "user", "content": "boom"}]}), 500)
    assert "kaboom" in err["message"]
    t.join()
    assert results["ok"].status_code == 200
    assert post(idle, "/v1/chat/completions", {"messages": MSG, "max_tokens": 3}).status_code == 200


@pytest.fixture(scope="module")
def guarded():
    """A server with an API key and room for one request at a time."""
    srv = start_background(ServeConfig(port=0, api_key="sekret", max_num_seqs=1, max_queue=0))
    yield srv
    srv.stop()


def test_api_key_is_required_as_bearer_or_x_api_key(guarded):
    body = {"messages": MSG, "max_tokens": 2}
    err = envelope(post(guarded, "/v1/chat/completions", body), 401)
    assert err["type"] == "authentication_error"
    envelope(post(guarded, "/v1/chat/completions", body, authorization="Bearer wrong"), 401)
    assert post(guarded, "/v1/chat/completions", body, authorization="Bearer sekret").status_code == 200
    assert post(guarded, "/v1/chat/completions", body, **{"x-api-key": "sekret"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=guarded.url, api_key="nope", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=MSG)
    assert httpx.get(guarded.url + "/health").status_code == 200  # health and metrics stay open


def test_a_full_admission_queue_is_429(guarded):
    auth = {"authorization": "Bearer sekret"}
    body = {"messages": MSG, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", guarded.url + "/v1/chat/completions", json=body, headers=auth, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped line iterator closes the stream, which aborts the request
        next(lines)
        busy = post(guarded, "/v1/chat/completions", {"messages": MSG, "max_tokens": 2}, **auth)
        err = envelope(busy, 429)
        assert err["type"] == "rate_limit_error" and "busy" in err["message"]
        busy = post(guarded, "/v1/chat/completions", {**body, "max_tokens": 2}, **auth)
        envelope(busy, 429)  # a stream is refused before its first byte, with a status, not an event
    # closing the stream aborts its request, and the engine thread frees the slot a moment later (that the abort
    # frees it is test_client_disconnect_aborts_and_frees_the_kv's subject; here it only has to happen)
    deadline = time.monotonic() + 10.0
    while (ok := post(guarded, "/v1/chat/completions", {"messages": MSG, "max_tokens": 2}, **auth)).status_code == 429:
        assert time.monotonic() < deadline, "the aborted stream still holds the only slot"
        time.sleep(0.05)
    assert ok.status_code == 200


def test_an_error_after_the_stream_started_is_an_error_event(idle, monkeypatch):
    import mimo.serve.app as app_mod

    class Failing(app_mod.OutputParser):
        calls = 0

        def push(self, text):
            Failing.calls += 1
            if Failing.calls == 3:
                raise RuntimeError("parser broke")
            return super().push(text)

    monkeypatch.setattr(app_mod, "OutputParser", Failing)
    body = {"messages": MSG, "max_tokens": 40, "ignore_eos": True, "stream": True, "num_speculative_tokens": 0}
    with httpx.stream("POST", idle.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "parser broke" in events[-1]["error"]["message"] and events[-1]["error"]["code"] == "500"
    monkeypatch.undo()
    assert post(idle, "/v1/chat/completions", {"messages": MSG, "max_tokens": 3}).status_code == 200
