"""The OpenAI endpoints against a real uvicorn on 127.0.0.1, driven by the official `openai` client."""

import asyncio
import json

import httpx
import openai
import pytest
from tests.serve.conftest import scripted_output

MODEL = "mimo-tiny"
TASKS = ["add 382 47", "reverse hello", "sort 5 3 9 1", "add 12 30"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def chat(client, content, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_health_and_server_info(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    info = httpx.get(server.url + "/server_info").json()
    assert info["num_speculative_tokens"] == 3 and info["avg_spec_accept_length"] >= 1.0


def test_chat_non_streaming_matches_the_engine(idle, client):
    from mimo.engine import LLM, SamplingParams

    r = chat(client, "add 382 47", max_tokens=16, temperature=0)
    ref_llm = LLM()  # the served engine belongs to its thread; a second one on the same weights
    ids = ref_llm.tokenizer.encode_chat([{"role": "user", "content": "add 382 47"}], add_generation_prompt=True)
    ref = ref_llm.generate([ids], SamplingParams(max_tokens=16, temperature=0))[0]
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].finish_reason == {"stop": "stop", "length": "length"}[ref.finish_reason]


def test_chat_streaming_equals_non_streaming_and_ends_with_usage(idle, client):
    full = chat(client, "sort 5 3 9 1", max_tokens=24, temperature=0)
    chunks = list(chat(client, "sort 5 3 9 1", max_tokens=24, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_streaming_and_not(idle, client):
    full = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=20, temperature=0)
    parts = list(client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=20, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text and len(parts) > 2
    assert full.usage.completion_tokens == 20 and full.choices[0].finish_reason == "length"
    batch = client.completions.create(model=MODEL, prompt=["def f(x):", "import os"], max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.completion_tokens == 10


def test_n_samples_and_seeds(idle, client):
    a = chat(client, "reverse hello", max_tokens=12, temperature=1.0, seed=11, n=3, logprobs=True)
    b = chat(client, "reverse hello", max_tokens=12, temperature=1.0, seed=11, n=3)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices], "the same seed gives the same samples"
    assert len(set(texts)) > 1, "n samples are independent"
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)


def test_stop_strings_end_the_text_and_usage_counts_the_kept_tokens(idle, client):
    free = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0,
                                     logprobs=0)
    text = free.choices[0].text
    stop = text[6:8]
    assert stop and text.index(stop) > 0
    for stream in (False, True):
        kw = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0, stop=[stop], logprobs=0)
        if stream:
            parts = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
            got = "".join(p.choices[0].text for p in parts if p.choices)
            usage = parts[-1].usage
            tokens = [t for p in parts if p.choices and p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
            finish = [p.choices[0].finish_reason for p in parts if p.choices][-1]
        else:
            r = client.completions.create(**kw)
            got, usage, tokens, finish = r.choices[0].text, r.usage, r.choices[0].logprobs.tokens, \
                r.choices[0].finish_reason
        assert got == text[:text.index(stop)] and finish == "stop"
        # usage = the tokens that produced the returned text: their text covers it, one fewer would not
        assert usage.completion_tokens == len(tokens) < free.usage.completion_tokens
        joined = "".join(tokens)
        assert joined.startswith(got) and not "".join(tokens[:-1]).startswith(got)


def test_logprobs_are_consistent_with_the_tokens(idle, client):
    r = chat(client, "add 12 30", max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for lp in content:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert lp.top_logprobs[0].logprob == pytest.approx(lp.logprob, abs=1e-5), "greedy picks the top token"
    text = "".join(lp.token for lp in content)
    assert text.startswith(r.choices[0].message.content)


def test_thinking_split_on_and_off(idle, client):
    body = dict(max_tokens=40, temperature=0)
    with scripted_output(idle, "Adding digit by digit.\n</think>\n\n429"):
        on = chat(client, "add 382 47", extra_body={"chat_template_kwargs": {"enable_thinking": True}}, **body)
    m = on.choices[0].message
    assert m.reasoning_content == "Adding digit by digit." and m.content == "429"
    with scripted_output(idle, "Adding digit by digit.\n</think>\n\n429"):
        parts = list(chat(client, "add 382 47", stream=True,
                          extra_body={"chat_template_kwargs": {"enable_thinking": True}}, **body))
    deltas = [p.choices[0].delta for p in parts if p.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Adding digit by digit."
    assert "".join(d.content or "" for d in deltas) == "429"
    off = chat(client, "add 382 47", **body)
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    prompt_on = httpx.post(idle.url + "/tokenize", json={"messages": [{"role": "user", "content": "x"}],
                                                         "chat_template_kwargs": {"enable_thinking": True}}).json()
    assert idle.llm.tokenizer.decode(prompt_on["tokens"]).endswith("<think>\n")


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}]
CALL = ("Let me look.<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(idle, client, stream):
    msgs = [{"role": "user", "content": "weather in Paris for 3 days?"}]
    with scripted_output(idle, CALL):
        r = client.chat.completions.create(model=MODEL, messages=msgs, tools=WEATHER, max_tokens=80,
                                           temperature=0, stream=stream)
        if stream:
            parts = [p for p in r if p.choices]
            calls = [tc for p in parts for tc in (p.choices[0].delta.tool_calls or [])]
            content = "".join(p.choices[0].delta.content or "" for p in parts)
            finish = parts[-1].choices[0].finish_reason
        else:
            calls, content, finish = r.choices[0].message.tool_calls, r.choices[0].message.content, \
                r.choices[0].finish_reason
    assert finish == "tool_calls" and content == "Let me look." and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3}
    call = {"id": calls[0].id, "type": "function",
            "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}
    back = msgs + [{"role": "assistant", "content": content, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": calls[0].id, "content": '{"forecast": "sunny"}'}]
    rendered = idle.llm.tokenizer.decode(httpx.post(idle.url + "/tokenize", json={"messages": back}).json()["tokens"])
    assert "<tool_response>" in rendered and "sunny" in rendered and "<function=get_weather>" in rendered
    reply = client.chat.completions.create(model=MODEL, messages=back, tools=WEATHER, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 60


def test_multibyte_text_streams_intact(idle, client):
    text = "日本語 ✓ naïve café — ok"
    with scripted_output(idle, text):
        parts = list(chat(client, "x", max_tokens=64, stream=True, temperature=0))
    pieces = [p.choices[0].delta.content or "" for p in parts if p.choices]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_client_disconnect_aborts_and_frees_the_kv(idle):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "add 1 2"}], "max_tokens": 3000,
            "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.stream("POST", idle.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(g.startswith("data:") or g == "" for g in got)
        assert idle.llm.has_unfinished_requests()
    # the idle fixture then waits for no request in flight and empty pools


def test_64_concurrent_streams_give_the_texts_they_give_alone(idle):
    prompts = TASKS * 4 + ["add 7 8", "sort 9 1 5", "reverse abc", "add 99 1"] * 12
    async def one(ac, p):
        s = await ac.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=20,
                                             temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

    async def run(ps):
        ac = openai.AsyncOpenAI(base_url=idle.url + "/v1", api_key="none", max_retries=0)
        try:
            return await asyncio.gather(*(one(ac, p) for p in ps))
        finally:
            await ac.close()

    assert len(prompts) == 64
    alone = {p: asyncio.run(run([p]))[0] for p in dict.fromkeys(prompts)}
    together = asyncio.run(run(prompts))
    assert together == [alone[p] for p in prompts]


def test_metrics_expose_vllm_style_names(idle, client):
    chat(client, "add 1 1", max_tokens=4, temperature=0)
    text = httpx.get(idle.url + "/metrics").text
    for name in ("mimo:request_success_total", "mimo:prompt_tokens_total", "mimo:generation_tokens_total",
                 "mimo:time_to_first_token_seconds_bucket", "mimo:time_per_output_token_seconds_bucket",
                 "mimo:inter_token_latency_seconds_bucket", "mimo:e2e_request_latency_seconds_bucket",
                 "mimo:request_queue_time_seconds_bucket", "mimo:num_requests_running", "mimo:num_requests_waiting",
                 'mimo:kv_cache_usage_perc{model_name="mimo-tiny",pool="sliding"}',
                 "mimo:spec_decode_num_draft_tokens_total", "mimo:spec_decode_num_accepted_tokens_total",
                 "mimo:spec_decode_num_drafts_total"):
        assert name in text, name
