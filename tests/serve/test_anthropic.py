"""The Anthropic Messages endpoint, driven by the official `anthropic` client against the real server."""

import anthropic
import httpx
import pytest
from tests.serve.conftest import scripted_output

MODEL = "mimo-tiny"
WEATHER = [{"name": "get_weather", "description": "Weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}]
CALL = ("Checking.<tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n"
        "<parameter=days>2</parameter>\n</function>\n</tool_call>")


# this client version has no sampling arguments; the server still takes them (as Anthropic's API did)
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)


def test_message_matches_the_openai_path(idle, client):
    m = client.messages.create(model=MODEL, max_tokens=16, **GREEDY, system="You add numbers.",
                               messages=[{"role": "user", "content": "add 382 47"}])
    o = httpx.post(idle.url + "/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "add 382 47"}]}
                   ).json()
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text == o["choices"][0]["message"]["content"]
    assert m.usage.input_tokens == o["usage"]["prompt_tokens"] and m.usage.output_tokens == o["usage"][
        "completion_tokens"]
    assert m.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[o["choices"][0]["finish_reason"]]
    count = client.messages.count_tokens(model=MODEL, system="You add numbers.",
                                         messages=[{"role": "user", "content": "add 382 47"}])
    assert count.input_tokens == m.usage.input_tokens


def test_stream_assembles_to_the_same_message(idle, client):
    kw = dict(model=MODEL, max_tokens=20, **GREEDY, messages=[{"role": "user", "content": "sort 5 3 9 1"}])
    full = client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert final.content[0].text == full.content[0].text and final.stop_reason == full.stop_reason
    assert final.usage.output_tokens == full.usage.output_tokens


def test_stop_sequence_is_named(idle, client):
    free = client.messages.create(model=MODEL, max_tokens=20, **GREEDY,
                                  messages=[{"role": "user", "content": "reverse hello"}]).content[0].text
    assert len(free) >= 2
    stop = free[1:2]
    m = client.messages.create(model=MODEL, max_tokens=20, **GREEDY, stop_sequences=[stop],
                               messages=[{"role": "user", "content": "reverse hello"}])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == free[:free.index(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_and_tool_use_round_trip(idle, client, stream):
    msgs = [{"role": "user", "content": "weather in Paris for 2 days?"}]
    kw = dict(model=MODEL, max_tokens=120, tools=WEATHER, thinking={"type": "enabled", "budget_tokens": 64})
    with scripted_output(idle, "Use the tool.\n</think>\n\n" + CALL):
        if stream:
            with client.messages.stream(messages=msgs, **kw) as s:
                m = s.get_final_message()
        else:
            m = client.messages.create(messages=msgs, **kw)
    assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
    assert m.content[0].thinking == "Use the tool." and m.content[1].text == "Checking."
    use = m.content[2]
    assert use.name == "get_weather" and use.input == {"city": "Paris", "days": 2}
    assert m.stop_reason == "tool_use"
    back = msgs + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                 "content": "sunny, 24 C"}]}]
    n = client.messages.count_tokens(model=MODEL, messages=back, tools=WEATHER).input_tokens
    reply = client.messages.create(model=MODEL, max_tokens=8, **GREEDY, messages=back, tools=WEATHER)
    assert reply.usage.input_tokens == n > 80 and reply.stop_reason in ("end_turn", "max_tokens")


def test_errors_in_anthropic_shape(idle, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    r = httpx.post(idle.url + "/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {}}]}]})
    assert r.status_code == 400 and "image" in r.json()["error"]["message"]
