"""`mimo.serve.bench`: statistics on hand-built timings, config validation, prompt sets, the streaming client
against scripted in-process responses (httpx.MockTransport), and an end-to-end run against the real server."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import httpx
import numpy as np
import pytest

from mimo import tasks as task_lib
from mimo.serve import bench
from mimo.serve.bench import BenchConfig, BenchResult, RequestResult, SpecCounters

# ---- statistics ----------------------------------------------------------------------------------------------


def test_summarize_known_percentiles():
    s = bench.summarize([4.0, 1.0, 3.0, 2.0])
    # linear interpolation between order statistics: rank p/100 * (n - 1)
    assert (s.mean, s.p50, s.p90, s.p99, s.n) == pytest.approx((2.5, 2.5, 3.7, 3.97, 4))
    s = bench.summarize(list(range(101)))
    assert (s.p50, s.p90, s.p99) == pytest.approx((50, 90, 99))
    one = bench.summarize([0.25])
    assert (one.mean, one.p50, one.p99, one.n) == (0.25, 0.25, 0.25, 1)
    assert bench.summarize([]) is None


def _hand_built() -> BenchResult:
    reqs = [
        # 11 tokens in 11 chunks, 0.1 s apart: TPOT 0.1
        RequestResult(0.0, ttft_s=0.1, e2e_s=1.1, itl_s=[0.1] * 10, chunks=11, prompt_tokens=20, output_tokens=11),
        # 5 tokens in 4 chunks (one chunk carried two drafted tokens): ITL sees 3 gaps, TPOT (0.7-0.3)/4
        RequestResult(0.5, ttft_s=0.3, e2e_s=0.7, itl_s=[0.1, 0.1, 0.2], chunks=4, prompt_tokens=10,
                      output_tokens=5),
        RequestResult(0.6, error="HTTP 500: boom", prompt_tokens=99, output_tokens=99),
        # one token: no TPOT
        RequestResult(1.0, ttft_s=0.2, e2e_s=0.2, chunks=1, prompt_tokens=10, output_tokens=1),
        RequestResult(1.2, ttft_s=0.4, error="stream ended before data: [DONE]"),
    ]
    return BenchResult("m", "completions", 2.0, reqs, SpecCounters(60, 30, 20, 3))


def test_result_figures_on_hand_built_timings():
    r = _hand_built()
    assert len(r.succeeded) == 3 and r.failed == 2
    assert r.first_error == "HTTP 500: boom"
    # failed requests count in no figure
    assert r.output_tokens == 17 and r.prompt_tokens == 40
    assert r.request_throughput == pytest.approx(1.5)
    assert r.output_throughput == pytest.approx(8.5)
    assert r.total_token_throughput == pytest.approx(28.5)
    assert r.mean_concurrency == pytest.approx(1.0)
    assert r.tokens_per_chunk == pytest.approx(17 / 16)
    assert (r.ttft.mean, r.ttft.p50, r.ttft.n) == pytest.approx((0.2, 0.2, 3))
    assert r.requests[0].tpot_s == pytest.approx(0.1)
    assert r.requests[1].tpot_s == pytest.approx(0.1)
    assert r.requests[3].tpot_s is None and r.requests[2].tpot_s is None
    assert (r.tpot.mean, r.tpot.n) == pytest.approx((0.1, 2))
    assert r.itl.n == 13
    assert r.itl.mean == pytest.approx(1.4 / 13)
    assert r.itl.p99 == pytest.approx(0.188)  # rank 0.99 * 12 = 11.88: 0.88 of the way from 0.1 to 0.2
    assert (r.e2e.mean, r.e2e.p50) == pytest.approx((2.0 / 3, 0.7))
    assert r.acceptance_length == pytest.approx(2.5)


def test_result_json_has_every_figure_in_ms():
    r = _hand_built()
    r.config = BenchConfig("http://127.0.0.1:1", api_key="secret")
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["config"]["request_rate"] == "inf" and "api_key" not in d["config"]
    assert d["completed"] == 3 and d["failed"] == 2 and d["first_error"] == "HTTP 500: boom"
    assert d["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert d["tpot_ms"] == pytest.approx({"mean": 100.0, "p50": 100.0, "p90": 100.0, "p99": 100.0, "n": 2})
    assert d["output_throughput"] == pytest.approx(8.5)
    assert d["spec"]["acceptance_length"] == pytest.approx(2.5)
    assert d["spec"]["acceptance_rate"] == pytest.approx(0.5)
    assert [q["error"] for q in d["requests"]][2] == "HTTP 500: boom"
    assert d["requests"][0]["itl_ms"] == pytest.approx([100.0] * 10)


def test_report_table_is_aligned_and_says_na():
    r = _hand_built()
    r.spec = None
    text = bench.format_result(r)
    assert "acceptance length       n/a" in text
    assert "first error             HTTP 500: boom" in text
    table = text[text.index("latency (ms)"):].splitlines()
    assert [row.split()[0] for row in table] == ["latency", "TTFT", "TPOT", "ITL", "E2E"]
    assert len({len(row) for row in table}) == 1
    assert table[1].split()[1:] == ["200.00", "200.00", "280.00", "298.00", "3"]
    empty = bench.format_result(BenchResult("m", "chat", 1.0, [RequestResult(error="x")]))
    assert "TTFT" in empty and "n/a" in empty.splitlines()[-1]


def test_spec_counters_from_server_info():
    before = {"spec_drafted_tokens": 100, "spec_accepted_tokens": 40, "spec_verify_steps": 50,
              "num_speculative_tokens": 3}
    after = {"spec_drafted_tokens": 160, "spec_accepted_tokens": 70, "spec_verify_steps": 70,
             "num_speculative_tokens": 3, "avg_spec_accept_length": 1.9}
    s = bench.spec_counters(before, after)
    assert (s.drafted, s.accepted, s.verify_steps, s.num_speculative_tokens) == (60, 30, 20, 3)
    assert s.acceptance_length == pytest.approx(2.5) and s.acceptance_rate == pytest.approx(0.5)
    off = bench.spec_counters(after, after)
    assert off.acceptance_length == 1.0 and off.acceptance_rate is None
    assert bench.spec_counters(None, after) is None
    assert bench.spec_counters({"avg_spec_accept_length": 2.0}, after) is None


def test_arrival_offsets():
    assert np.array_equal(bench.arrival_offsets(5, float("inf")), np.zeros(5))
    a = bench.arrival_offsets(20_000, 50.0, seed=3)
    assert a[0] == 0 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, bench.arrival_offsets(20_000, 50.0, seed=3))
    assert not np.array_equal(a, bench.arrival_offsets(20_000, 50.0, seed=4))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)  # exponential: std = mean


# ---- configuration -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("url", "localhost:8000"), ("model", ""), ("num_requests", 0), ("num_requests", 2.0),
    ("num_requests", True), ("concurrency", 0), ("request_rate", 0), ("request_rate", float("nan")),
    ("request_rate", -1.0), ("prompts", "no/such/file.jsonl"), ("max_tokens", 0), ("temperature", -0.1),
    ("temperature", float("inf")), ("seed", -1), ("endpoint", "embeddings"), ("ignore_eos", 1),
    ("num_speculative_tokens", -1), ("timeout_s", 0),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BenchConfig(**{"url": "http://127.0.0.1:8000", field: value})


def test_config_defaults_and_endpoint_choice(tmp_path):
    c = BenchConfig("http://127.0.0.1:8000")
    assert (c.num_requests, c.concurrency, c.request_rate, c.prompts, c.max_tokens, c.temperature) == (
        64, 8, float("inf"), "code", 64, 0.0)
    assert (c.seed, c.json_out, c.api_key, c.ignore_eos, c.num_speculative_tokens) == (0, None, None, False, None)
    assert bench.resolve_endpoint(c, ["def f():\n"]) == "completions"
    assert bench.resolve_endpoint(BenchConfig("http://x", prompts="chat"), [[{"role": "user"}]]) == "chat"
    assert bench.resolve_endpoint(BenchConfig("http://x", endpoint="chat"), ["text"]) == "chat"
    with pytest.raises(ValueError, match="endpoint"):
        BenchConfig("http://x", prompts="chat", endpoint="completions")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    c = BenchConfig("http://x", prompts=str(f), endpoint="completions")
    with pytest.raises(ValueError, match="endpoint"):
        bench.resolve_endpoint(c, bench.load_prompts(c))


# ---- prompt sets ---------------------------------------------------------------------------------------------

def test_code_prompts_are_file_beginnings_validation_split_first():
    from mimo.data.corpus import load_corpus

    corpus = load_corpus()
    val = {d.text for d in corpus.val}
    p = bench.code_prompts(len(corpus.val) + 5, seed=0)
    assert p == bench.code_prompts(len(corpus.val) + 5, seed=0)
    assert p[:10] != bench.code_prompts(10, seed=1)
    assert len(set(p)) == len(p)
    for i, text in enumerate(p):
        src = [t for t in (val if i < len(corpus.val) else {d.text for d in corpus.train}) if t.startswith(text)]
        assert src, f"prompt {i} is not the beginning of a file of its split"
        assert 0 < len(text) <= bench.CODE_PROMPT_CHARS
        assert text.endswith("\n")


def test_chat_prompts_are_heldout_task_messages():
    p = bench.chat_prompts(7, seed=0)
    assert p == bench.chat_prompts(7, seed=0) and p != bench.chat_prompts(7, seed=1)
    assert len(p) == 7
    assert [m[0]["content"].split()[0] for m in p] == ["add", "reverse", "sort", "add", "reverse", "sort", "add"]
    for m in p:
        assert len(m) == 1 and m[0]["role"] == "user"
        assert task_lib.is_heldout(m[0]["content"])
        task_lib.solve(m[0]["content"])


def test_file_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n')
    c = BenchConfig("http://x", prompts=str(f), num_requests=5)
    assert bench.load_prompts(c) == ["a", [{"role": "user", "content": "b"}]] * 2 + ["a"]
    for bad, why in (('{"prompt": 3}\n', "line 1"), ('{"prompt": "a"}\nnot json\n', "line 2"), ("\n", "no prompts")):
        f.write_text(bad)
        with pytest.raises(ValueError, match=why):
            bench.file_prompts(str(f))


# ---- the streaming client, against scripted responses --------------------------------------------------------

def _sse(obj) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def _text(t, finish=None):
    return {"object": "text_completion", "choices": [{"index": 0, "text": t, "finish_reason": finish}]}


def _usage(prompt, completion):
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion}}


class Fake:
    """Scripted OpenAI-style server: `script(i, body)` returns (status, [(delay_s, bytes | Exception)])."""

    def __init__(self, script, server_info=None):
        self.script, self.server_info = script, server_info
        self.bodies, self.headers, self.paths = [], [], []
        self.in_flight = self.max_in_flight = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model"}, {"id": "other"}]})
        if request.url.path == "/server_info":
            if self.server_info is None:
                return httpx.Response(404, json={"error": {"message": "no"}})
            return httpx.Response(200, json=self.server_info())
        body = json.loads(request.content)
        i = len(self.bodies)
        self.bodies.append(body)
        self.headers.append(request.headers)
        self.paths.append(request.url.path)
        status, events = self.script(i, body)
        if status != 200:
            return httpx.Response(status, json={"error": {"message": events, "code": status}})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        async def stream():
            for n, (delay, item) in enumerate(events, 1):
                await asyncio.sleep(delay)
                if n == len(events) or isinstance(item, Exception):
                    self.in_flight -= 1  # the request is over once its last event is out
                if isinstance(item, Exception):
                    raise item
                yield item

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    def run(self, **kw) -> BenchResult:
        cfg = BenchConfig("http://fake/v1", **{"prompts": "code", **kw})
        return asyncio.run(bench.benchmark(cfg, transport=httpx.MockTransport(self.handle)))


GOOD = [(0.0, _sse(_text(""))), (0.25, _sse(_text("Hel"))), (0.1, _sse(_text("lo"))), (0.1, _sse(_text("!"))),
        (0.0, _sse(_text("", "length"))), (0.0, _sse(_usage(7, 4))), (0.0, _sse("[DONE]"))]


def test_client_times_token_chunks_and_takes_tokens_from_usage():
    fake = Fake(lambda i, body: (200, GOOD))
    r = fake.run(num_requests=2, concurrency=1, max_tokens=4)
    assert r.failed == 0 and r.model == "fake-model" and r.endpoint == "completions"
    for q in r.requests:
        # the empty first chunk carries no token: TTFT waits for "Hel"
        assert 0.24 < q.ttft_s < 1.5
        assert len(q.itl_s) == 2 and all(0.095 < g < 1.0 for g in q.itl_s)
        assert q.chunks == 3 and q.text == "Hello!"
        assert (q.output_tokens, q.prompt_tokens) == (4, 7)  # the usage chunk, not the 3 chunks
        assert q.e2e_s >= q.ttft_s + sum(q.itl_s)
        assert q.tpot_s == pytest.approx((q.e2e_s - q.ttft_s) / 3)
    assert r.requests[1].start_s >= r.requests[0].start_s + r.requests[0].e2e_s  # concurrency 1: one at a time
    assert r.spec is None and r.acceptance_length is None
    assert fake.paths == ["/v1/completions"] * 2
    body = fake.bodies[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 4 and body["temperature"] == 0
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert isinstance(body["prompt"], str) and "ignore_eos" not in body and "num_speculative_tokens" not in body
    assert "authorization" not in fake.headers[0]


def test_client_chat_deltas_extensions_and_api_key():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    think = {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}
    answer = {"choices": [{"index": 0, "delta": {"content": "429"}}]}
    events = [(0.0, _sse(role)), (0.1, _sse(think)), (0.05, _sse(answer)), (0, _sse(_usage(9, 3))),
              (0, _sse("[DONE]"))]
    fake = Fake(lambda i, body: (200, events))
    r = fake.run(num_requests=3, concurrency=3, prompts="chat", api_key="k", ignore_eos=True,
                 num_speculative_tokens=0)
    assert r.failed == 0 and fake.paths == ["/v1/chat/completions"] * 3
    assert [q.chunks for q in r.requests] == [2, 2, 2]  # reasoning is tokens; the role chunk is not
    assert {q.text for q in r.requests} == {"429"}
    assert [b["messages"] for b in fake.bodies] == bench.chat_prompts(3)
    assert fake.bodies[0]["ignore_eos"] is True and fake.bodies[0]["num_speculative_tokens"] == 0
    assert fake.headers[0]["authorization"] == "Bearer k"


def test_failures_are_counted_never_successes():
    cases = {
        0: (503, "overloaded"),
        1: (200, [(0, _sse(_text("a"))), (0, _sse({"error": {"message": "engine died"}}))]),
        2: (200, [(0, _sse(_text("a"))), (0, _sse(_usage(1, 1)))]),  # no [DONE]
        3: (200, [(0, _sse(_text("a"))), (0, _sse("[DONE]"))]),  # no usage
        4: (200, [(0, _sse(_text("a"))), (0, httpx.RemoteProtocolError("peer closed connection"))]),
        5: (200, [(0, b"data: {not json\n\n")]),
        6: (200, GOOD),
    }
    fake = Fake(lambda i, body: cases[i])
    r = fake.run(num_requests=len(cases), concurrency=1)
    errors = [q.error for q in r.requests]
    assert errors[0] == "HTTP 503: overloaded"
    assert errors[1] == "error in stream: engine died"
    assert errors[2] == "stream ended before data: [DONE]"
    assert "usage" in errors[3]
    assert errors[4].startswith("RemoteProtocolError")
    assert errors[5].startswith("JSONDecodeError")
    assert errors[6] is None
    assert r.failed == 6 and r.first_error == "HTTP 503: overloaded"
    assert r.output_tokens == 4 and r.ttft.n == 1  # only the good request is in the figures


def test_concurrency_limit_and_poisson_schedule():
    events = [(0.1, _sse(_text("x"))), (0, _sse(_usage(1, 1))), (0, _sse("[DONE]"))]
    fake = Fake(lambda i, body: (200, events))
    r = fake.run(num_requests=9, concurrency=3)
    assert r.failed == 0 and fake.max_in_flight == 3
    fake = Fake(lambda i, body: (200, events))
    r = fake.run(num_requests=8, concurrency=8, request_rate=20.0, seed=5)
    offsets = bench.arrival_offsets(8, 20.0, seed=5)
    starts = [q.start_s for q in r.requests]
    assert all(s >= o - 0.005 for s, o in zip(starts, offsets))
    assert r.duration_s >= offsets[-1] + 0.1


def test_acceptance_length_from_server_info_counters():
    counters = {"spec_drafted_tokens": 0, "spec_accepted_tokens": 0, "spec_verify_steps": 0,
                "num_speculative_tokens": 3}

    def script(i, body):
        counters["spec_drafted_tokens"] += 9
        counters["spec_accepted_tokens"] += 6
        counters["spec_verify_steps"] += 3
        return 200, GOOD

    fake = Fake(script, server_info=lambda: dict(counters))
    r = fake.run(num_requests=4, concurrency=2)
    assert (r.spec.drafted, r.spec.accepted, r.spec.verify_steps) == (36, 24, 12)
    assert r.acceptance_length == pytest.approx(3.0) and r.spec.num_speculative_tokens == 3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_returns_1_when_requests_fail(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert bench.run(BenchConfig(url, model="m", num_requests=2, prompts="chat", timeout_s=5)) == 1
    out = capsys.readouterr().out
    assert "0 ok, 2 failed" in out and "ConnectError" in out
    assert bench.run(BenchConfig(url, num_requests=2, prompts="chat", timeout_s=5)) == 1  # no model to list
    assert "could not read a model name" in capsys.readouterr().err


def test_module_import_does_not_import_torch():
    import subprocess

    code = "import sys, mimo.serve.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- end to end against the real server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    from mimo.serve.server import ServeConfig, start_background

    srv = start_background(ServeConfig(port=0, max_model_len=1024))
    yield srv
    srv.stop()


def test_end_to_end_against_the_server(server, tmp_path):
    cfg = BenchConfig(server.url, num_requests=5, concurrency=3, prompts="code", max_tokens=8, ignore_eos=True,
                      json_out=str(tmp_path / "r.json"))
    r = asyncio.run(bench.benchmark(cfg))
    assert r.failed == 0, r.first_error
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert r.model == models[0]["id"] and r.endpoint == "completions"
    prompts = bench.code_prompts(5)
    for q, prompt in zip(r.requests, prompts):
        assert q.output_tokens == 8 and q.prompt_tokens > 10
        assert 0 < q.ttft_s <= q.e2e_s and q.chunks >= 1 and len(q.itl_s) == q.chunks - 1
        assert q.chunks <= q.output_tokens
        # the streamed text and token count are what the server answers without streaming
        plain = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": r.model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).json()
        assert plain["usage"]["completion_tokens"] == q.output_tokens
        assert plain["usage"]["prompt_tokens"] == q.prompt_tokens
        assert plain["choices"][0]["text"] == q.text
    assert r.output_tokens == 40 and r.output_throughput > 0 and r.duration_s >= r.e2e.p99
    assert r.ttft.p50 <= r.ttft.p90 <= r.ttft.p99 and r.tpot.n == 5
    k = r.spec.num_speculative_tokens
    assert k >= 1 and r.spec.verify_steps > 0 and 1.0 <= r.acceptance_length <= 1 + k

    off = asyncio.run(bench.benchmark(BenchConfig(server.url, num_requests=3, concurrency=3, prompts="chat",
                                                  max_tokens=8, num_speculative_tokens=0)))
    assert off.failed == 0 and off.endpoint == "chat", off.first_error
    assert off.spec.drafted == 0 and off.spec.verify_steps == 0 and off.acceptance_length == 1.0
    assert all(0 < q.output_tokens <= 8 and q.prompt_tokens > 0 for q in off.requests)

    assert bench.run(cfg) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["failed"] == 0 and saved["output_tokens"] == 40 and len(saved["requests"]) == 5
