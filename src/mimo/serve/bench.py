"""Load generator for any OpenAI-compatible server: streaming requests, client-side latency and throughput.

    mimo bench-serve --url http://127.0.0.1:8000 --num-requests 64 --concurrency 8 --prompts code

Every request streams (`stream: true`, `stream_options.include_usage`) and is timed on the client with a
monotonic clock, the way `vllm bench serve` and `sglang.bench_serving` do:

| figure | definition |
|---|---|
| TTFT | send -> first chunk that carries tokens (text, reasoning or tool-call deltas) |
| ITL | gaps between successive token-bearing chunks of a request, pooled over all requests |
| TPOT | per request (E2E - TTFT) / (output tokens - 1), then statistics over requests |
| E2E | send -> `data: [DONE]` |
| output tokens | the server's `usage.completion_tokens` (never a count of chunks) |
| throughputs | successful requests, their output tokens, their prompt + output tokens, each / wall time |
| wall time | first arrival -> last request done |
| acceptance length | 1 + accepted / verify steps, from `/server_info` counters before and after the run |

Under speculative decoding one chunk may carry several tokens, so ITL (per chunk) and TPOT (per token)
diverge; TPOT is the figure to compare MTP on against MTP off. The acceptance counters are server-wide:
other traffic during the run is counted too.

A request is a success only when it returned HTTP 200, streamed to `data: [DONE]` and reported usage; any
other outcome (HTTP error, error chunk, broken or truncated stream, timeout) is a failure and excluded from
the latency and throughput figures.

Load: at most `concurrency` requests in flight; with a finite `request_rate` arrivals are a Poisson process
(exponential gaps from a seeded RNG), otherwise all requests arrive at once. Latencies start when a request is
actually sent, after it gets a concurrency slot.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PROMPT_SETS = ("code", "chat")
ENDPOINTS = ("chat", "completions")
CODE_PROMPT_CHARS = 512  # ~150 tokens of the default model's vocabulary; cut back to a line end
PERCENTILES = (50, 90, 99)

Prompt = str | list[dict[str, Any]]  # completion text, or chat messages


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class BenchConfig:
    url: str
    model: str | None = None  # None: the first model of /v1/models
    num_requests: int = 64
    concurrency: int = 8  # most requests in flight
    request_rate: float = math.inf  # requests/s, Poisson arrivals; inf: all at once
    prompts: str = "code"  # "code" | "chat" | path to a JSONL file of {"prompt": ...} or {"messages": [...]}
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    json_out: str | None = None
    api_key: str | None = None
    endpoint: str | None = None  # None: completions for text prompts, chat for messages
    ignore_eos: bool = False
    num_speculative_tokens: int | None = None  # None: the server's default
    timeout_s: float = 600.0  # per request, for connecting and for each read of the stream

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model must be a non-empty string or None, got {self.model!r}")
        _check_int("num_requests", self.num_requests, 1)
        _check_int("concurrency", self.concurrency, 1)
        rate = self.request_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or math.isnan(rate) or rate <= 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), got {rate!r}")
        self.prompts = str(self.prompts)
        if self.prompts not in PROMPT_SETS and not Path(self.prompts).is_file():
            raise ValueError(f"prompts must be one of {PROMPT_SETS} or a JSONL file, got {self.prompts!r}")
        _check_int("max_tokens", self.max_tokens, 1)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        _check_int("seed", self.seed, 0)
        if self.json_out is not None:
            self.json_out = str(self.json_out)
        if self.endpoint is not None and self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS} or None, got {self.endpoint!r}")
        if self.endpoint == "completions" and self.prompts == "chat":
            raise ValueError("endpoint: 'chat' prompts are chat messages, which need endpoint 'chat'")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.num_speculative_tokens is not None:
            _check_int("num_speculative_tokens", self.num_speculative_tokens, 0)
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")


# ---- prompts -------------------------------------------------------------------------------------------------

def code_prompts(n: int, seed: int = 0) -> list[str]:
    """Beginnings of `n` standard-library files, validation split first (text the default model was not
    trained on), then training files once those run out; the order is a shuffle fixed by `seed`."""
    from mimo.data.corpus import load_corpus  # imports torch: only when code prompts are asked for

    corpus = load_corpus()
    rng = random.Random(f"mimo.serve.bench/code/{seed}")
    pool = []
    for docs in (corpus.val, corpus.train):
        docs = list(docs)
        rng.shuffle(docs)
        pool += docs
    out = []
    for i in range(n):
        head = pool[i % len(pool)].text[:CODE_PROMPT_CHARS]
        cut = head.rfind("\n")
        out.append(head[: cut + 1] if cut > 0 else head)
    return out


def chat_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`n` held-out task prompts (`add 382 47`, ...) as single user messages, tasks interleaved."""
    from mimo import tasks as task_lib

    exs = task_lib.mixed_examples(n // len(task_lib.TASKS) + 1, "heldout", seed, task_lib.TASKS)[:n]
    return [task_lib.to_messages(e, with_answer=False) for e in exs]


def file_prompts(path: str) -> list[Prompt]:
    """One prompt per non-empty line of a JSONL file: {"prompt": str} or {"messages": [...]}."""
    out: list[Prompt] = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts: {path} line {i} is not JSON ({e})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            out.append(row["messages"])
        else:
            raise ValueError(f"prompts: {path} line {i} needs a string 'prompt' or a non-empty 'messages' list")
    if not out:
        raise ValueError(f"prompts: {path} holds no prompts")
    return out


def load_prompts(config: BenchConfig) -> list[Prompt]:
    """`config.num_requests` prompts; a file with fewer lines is cycled."""
    if config.prompts == "code":
        return code_prompts(config.num_requests, config.seed)
    if config.prompts == "chat":
        return chat_prompts(config.num_requests, config.seed)
    rows = file_prompts(config.prompts)
    return [rows[i % len(rows)] for i in range(config.num_requests)]


def resolve_endpoint(config: BenchConfig, prompts: list[Prompt]) -> str:
    has_messages = any(not isinstance(p, str) for p in prompts)
    if config.endpoint is None:
        return "chat" if has_messages else "completions"
    if config.endpoint == "completions" and has_messages:
        raise ValueError(f"endpoint: completions takes text prompts; {config.prompts} holds chat messages")
    return config.endpoint


def arrival_offsets(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Seconds after the start at which each request arrives: 0 for all when `rate` is inf, else a Poisson
    process at `rate` per second whose first arrival is at 0."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


# ---- results and statistics ----------------------------------------------------------------------------------

@dataclass
class RequestResult:
    start_s: float = 0.0  # send time after the benchmark start
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunks: int = 0  # token-bearing chunks
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Stats:
    mean: float
    p50: float
    p90: float
    p99: float
    n: int


def summarize(values: list[float]) -> Stats | None:
    """Mean and linearly interpolated percentiles (numpy's default, as vLLM reports them); None if empty."""
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    p50, p90, p99 = (float(x) for x in np.percentile(a, PERCENTILES))
    return Stats(float(a.mean()), p50, p90, p99, len(a))


@dataclass(frozen=True)
class SpecCounters:
    """Differences of the server's cumulative speculative-decoding counters over the run."""

    drafted: int
    accepted: int
    verify_steps: int
    num_speculative_tokens: int | None  # the server's default

    @property
    def acceptance_length(self) -> float:
        """Tokens per verify step, bonus included; 1 when nothing was verified (MTP off)."""
        return 1.0 + self.accepted / self.verify_steps if self.verify_steps else 1.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


_SPEC_KEYS = ("spec_drafted_tokens", "spec_accepted_tokens", "spec_verify_steps")


def spec_counters(before: dict | None, after: dict | None) -> SpecCounters | None:
    """None when either `/server_info` answer lacks the counters (a server without them)."""
    if not before or not after or not all(isinstance(d.get(k), int) for d in (before, after) for k in _SPEC_KEYS):
        return None
    d = [after[k] - before[k] for k in _SPEC_KEYS]
    k = after.get("num_speculative_tokens")
    return SpecCounters(d[0], d[1], d[2], k if isinstance(k, int) else None)


@dataclass
class BenchResult:
    model: str
    endpoint: str
    duration_s: float
    requests: list[RequestResult]
    spec: SpecCounters | None = None
    config: BenchConfig | None = None

    @property
    def succeeded(self) -> list[RequestResult]:
        return [r for r in self.requests if r.ok]

    @property
    def failed(self) -> int:
        return len(self.requests) - len(self.succeeded)

    @property
    def first_error(self) -> str | None:
        return next((r.error for r in self.requests if not r.ok), None)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.succeeded)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.succeeded)

    def _per_s(self, x: float) -> float:
        return x / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def request_throughput(self) -> float:
        return self._per_s(len(self.succeeded))

    @property
    def output_throughput(self) -> float:
        return self._per_s(self.output_tokens)

    @property
    def total_token_throughput(self) -> float:
        return self._per_s(self.prompt_tokens + self.output_tokens)

    @property
    def mean_concurrency(self) -> float:
        """Sum of request latencies / wall time: how many requests were in flight on average."""
        return self._per_s(sum(r.e2e_s for r in self.succeeded if r.e2e_s is not None))

    @property
    def tokens_per_chunk(self) -> float | None:
        chunks = sum(r.chunks for r in self.succeeded)
        return self.output_tokens / chunks if chunks else None

    @property
    def ttft(self) -> Stats | None:
        return summarize([r.ttft_s for r in self.succeeded if r.ttft_s is not None])

    @property
    def tpot(self) -> Stats | None:
        return summarize([r.tpot_s for r in self.succeeded if r.tpot_s is not None])

    @property
    def itl(self) -> Stats | None:
        return summarize([g for r in self.succeeded for g in r.itl_s])

    @property
    def e2e(self) -> Stats | None:
        return summarize([r.e2e_s for r in self.succeeded if r.e2e_s is not None])

    @property
    def acceptance_length(self) -> float | None:
        return None if self.spec is None else self.spec.acceptance_length

    def to_dict(self) -> dict[str, Any]:
        """Every figure, JSON-ready: latencies in milliseconds, inf as the string "inf"."""

        def ms(s: Stats | None) -> dict | None:
            if s is None:
                return None
            return {"mean": s.mean * 1e3, "p50": s.p50 * 1e3, "p90": s.p90 * 1e3, "p99": s.p99 * 1e3, "n": s.n}

        def plain(v: Any) -> Any:
            return "inf" if isinstance(v, float) and math.isinf(v) else v

        cfg = None
        if self.config is not None:
            cfg = {f.name: plain(getattr(self.config, f.name)) for f in fields(self.config) if f.name != "api_key"}
        spec = None
        if self.spec is not None:
            spec = {**asdict(self.spec), "acceptance_length": self.spec.acceptance_length,
                    "acceptance_rate": self.spec.acceptance_rate}
        return {
            "config": cfg,
            "model": self.model,
            "endpoint": self.endpoint,
            "num_requests": len(self.requests),
            "completed": len(self.succeeded),
            "failed": self.failed,
            "first_error": self.first_error,
            "duration_s": self.duration_s,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "mean_concurrency": self.mean_concurrency,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "tokens_per_chunk": self.tokens_per_chunk,
            "ttft_ms": ms(self.ttft),
            "tpot_ms": ms(self.tpot),
            "itl_ms": ms(self.itl),
            "e2e_ms": ms(self.e2e),
            "acceptance_length": self.acceptance_length,
            "spec": spec,
            "requests": [
                {"start_s": r.start_s, "ttft_ms": None if r.ttft_s is None else r.ttft_s * 1e3,
                 "tpot_ms": None if r.tpot_s is None else r.tpot_s * 1e3,
                 "e2e_ms": None if r.e2e_s is None else r.e2e_s * 1e3, "itl_ms": [g * 1e3 for g in r.itl_s],
                 "chunks": r.chunks, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                 "error": r.error}
                for r in self.requests
            ],
        }


def format_result(result: BenchResult) -> str:
    """The plain-text report: totals, then one aligned row per latency figure."""
    c = result.config
    lines = []
    if c is not None:
        lines.append(f"model {result.model}  endpoint {result.endpoint}  prompts {c.prompts}  "
                     f"max_tokens {c.max_tokens}  concurrency {c.concurrency}  request rate {c.request_rate:g}/s")
    else:
        lines.append(f"model {result.model}  endpoint {result.endpoint}")
    n_ok = len(result.succeeded)
    tpc = result.tokens_per_chunk
    if result.spec is None:
        al = "n/a (the server reports no speculative-decoding counters)"
    else:
        s = result.spec
        al = (f"{s.acceptance_length:.2f} (server counters over the run: {s.accepted} accepted of "
              f"{s.drafted} drafted, {s.verify_steps} verify steps)")
    rows = [
        ("requests", f"{n_ok} ok, {result.failed} failed"),
        ("wall time", f"{result.duration_s:.3f} s"),
        ("request throughput", f"{result.request_throughput:.2f} requests/s"),
        ("output throughput", f"{result.output_throughput:.1f} tokens/s"),
        ("total token throughput", f"{result.total_token_throughput:.1f} tokens/s"),
        ("mean concurrency", f"{result.mean_concurrency:.2f}"),
        ("output tokens", f"{result.output_tokens} ({result.output_tokens / max(n_ok, 1):.1f} per request, "
                          + ("n/a" if tpc is None else f"{tpc:.2f}") + " per chunk)"),
        ("prompt tokens", f"{result.prompt_tokens}"),
        ("acceptance length", al),
    ]
    if result.first_error is not None:
        rows.append(("first error", result.first_error))
    width = max(len(k) for k, _ in rows)
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'latency (ms)':<12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'n':>8}")
    for name, s in (("TTFT", result.ttft), ("TPOT", result.tpot), ("ITL", result.itl), ("E2E", result.e2e)):
        if s is None:
            lines.append(f"{name:<12}{'n/a':>10}{'n/a':>10}{'n/a':>10}{'n/a':>10}{0:>8}")
        else:
            lines.append(f"{name:<12}{s.mean * 1e3:>10.2f}{s.p50 * 1e3:>10.2f}{s.p90 * 1e3:>10.2f}"
                         f"{s.p99 * 1e3:>10.2f}{s.n:>8}")
    return "\n".join(lines)


# ---- the client ----------------------------------------------------------------------------------------------

def _base_url(url: str) -> str:
    """The server root, whether `url` was given with or without a trailing /v1."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        return str(err)
    return str(body)


def _chunk_tokens(chunk: dict, endpoint: str) -> tuple[bool, str]:
    """(whether the chunk carries generated tokens, its answer text). Reasoning and tool-call deltas are
    tokens too, though they are not answer text."""
    choices = chunk.get("choices") or []
    if not choices:
        return False, ""
    choice = choices[0]
    if endpoint == "completions":
        text = choice.get("text") or ""
        return bool(text), text
    delta = choice.get("delta") or {}
    text = delta.get("content") or ""
    other = delta.get("reasoning_content") or delta.get("reasoning") or delta.get("tool_calls")
    return bool(text or other), text


def request_body(config: BenchConfig, model: str, endpoint: str, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": config.max_tokens, "temperature": config.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "completions":
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    # extensions go out only when set, so servers that reject unknown fields still take the default run
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.num_speculative_tokens is not None:
        body["num_speculative_tokens"] = config.num_speculative_tokens
    return body


async def _stream_request(client: httpx.AsyncClient, path: str, body: dict, endpoint: str,
                          t_start: float) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    res.start_s = t0 - t_start
    last = t0
    done = False
    usage = None
    pieces: list[str] = []
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode("utf-8", "replace")
                try:
                    msg = _error_text(json.loads(raw))
                except json.JSONDecodeError:
                    msg = raw
                res.error = f"HTTP {resp.status_code}: {msg[:500]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, `event:` names and `:` keep-alive comments
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"chunk is not a JSON object: {data[:200]}")
                if "error" in chunk or chunk.get("object") == "error":
                    res.error = f"error in stream: {_error_text(chunk)[:500]}"
                    return res
                if chunk.get("usage"):
                    usage = chunk["usage"]
                carries, text = _chunk_tokens(chunk, endpoint)
                if carries:
                    now = time.perf_counter()
                    if res.ttft_s is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last)
                    last = now
                    res.chunks += 1
                    pieces.append(text)
    # any failure is this request's error, never the benchmark's: the run goes on and reports it
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"[:500]
        return res
    res.e2e_s = time.perf_counter() - t0
    res.text = "".join(pieces)
    if not done:
        res.error = "stream ended before data: [DONE]"
    elif not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        res.error = "stream carried no usage chunk (stream_options.include_usage unsupported?)"
    else:
        res.output_tokens = usage["completion_tokens"]
        res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return res


async def _server_info(client: httpx.AsyncClient) -> dict | None:
    try:
        resp = await client.get("/server_info")
        info = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


async def _first_model(client: httpx.AsyncClient) -> str:
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"could not read a model name from {client.base_url}v1/models: "
                           f"{type(e).__name__}: {e}") from None


async def benchmark(config: BenchConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> BenchResult:
    """Run the benchmark. `transport` replaces the network (e.g. `httpx.ASGITransport(app)` benchmarks an app
    in-process). Raises RuntimeError when no model is given and the server lists none."""
    prompts = load_prompts(config)
    endpoint = resolve_endpoint(config, prompts)
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # a connection per slot, plus one for the /server_info reads around the run
    limits = httpx.Limits(max_connections=config.concurrency + 1, max_keepalive_connections=config.concurrency + 1)
    async with httpx.AsyncClient(base_url=_base_url(config.url), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(config.timeout_s), transport=transport) as client:
        model = config.model or await _first_model(client)
        bodies = [request_body(config, model, endpoint, p) for p in prompts]
        offsets = arrival_offsets(len(bodies), config.request_rate, config.seed)
        slots = asyncio.Semaphore(config.concurrency)
        before = await _server_info(client)
        t_start = time.perf_counter()

        async def one(body: dict, offset: float) -> RequestResult:
            delay = t_start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with slots:
                return await _stream_request(client, path, body, endpoint, t_start)

        results = await asyncio.gather(*(one(b, float(o)) for b, o in zip(bodies, offsets)))
        duration = time.perf_counter() - t_start
        after = await _server_info(client)
    return BenchResult(model, endpoint, duration, list(results), spec_counters(before, after), config)


def run(config: BenchConfig) -> int:
    """Benchmark, print the report, write `config.json_out` if set. 0 when every request succeeded, else 1."""
    try:
        result = asyncio.run(benchmark(config))
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_result(result))
    if config.json_out is not None:
        Path(config.json_out).write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    return 0 if result.failed == 0 else 1
