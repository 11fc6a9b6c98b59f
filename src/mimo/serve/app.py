"""The FastAPI app: validate -> tokenise -> engine (one thread) -> detokenise / parse -> JSON or SSE.

Every endpoint reads its body itself (size limit, malformed JSON, then the pydantic model), so each failure
has its own status and an OpenAI error envelope (Anthropic's shape under /v1/messages). One request's
exception is that request's 500; the engine thread and every other request go on.

`Generation` is the text layer of one request shared by the three generating endpoints: per sample a
`TextStream` (incremental detokenisation, stop strings, token cut) and an `OutputParser` (reasoning, tool
calls), usage counted on the kept tokens, and the request's metrics observed when it ends.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mimo.data.detok import TextStream
from mimo.engine import LLM, SamplingParams
from mimo.engine.llm import RequestDelta
from mimo.serve.async_engine import AsyncEngine, EngineDead, QueueFull
from mimo.serve.metrics import Metrics
from mimo.serve.parsers import OutputParser, ToolCall
from mimo.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    DetokenizeRequest,
    MessagesRequest,
    TokenizeRequest,
)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class ServerState:
    llm: LLM
    engine: AsyncEngine
    metrics: Metrics
    model_name: str
    api_key: str | None
    started: float = field(default_factory=time.time)
    shutting_down: bool = False


# ---- the text layer of one request ------------------------------------------------------------------------------
@dataclass
class ChoiceEvent:
    """What one engine delta means for one sample, in text."""

    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # kept tokens new in this event
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | tool_calls | abort
    stop_reason: str | int | None = None


class _Choice:
    def __init__(self, tok, stop, thinking, tools):
        self.stream = TextStream(tok, stop)
        self.parser = OutputParser(thinking, tools)
        self.ids: list[int] = []
        self.lps: list[Any] = []
        self.kept = 0
        self.made_call = False
        self.done = False
        self.times: list[float] = []
        self.first: float | None = None
        self.spec = (0, 0, 0)  # this sample's (drafted, accepted, verify steps) so far


class Generation:
    def __init__(self, state: ServerState, prompt_ids: list[int], params: SamplingParams, k: int | None,
                 arrival: float, thinking: bool = False, tools: list[dict] | None = None):
        self.state, self.prompt_ids, self.params, self.k, self.arrival = state, prompt_ids, params, k, arrival
        tok = state.llm.tokenizer
        self.choices = [_Choice(tok, params.stop, thinking, tools) for _ in range(params.n)]
        self.request_id = uuid.uuid4().hex
        self.drafted = self.accepted = self.verify_steps = 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.kept for c in self.choices)

    @property
    def acceptance_length(self) -> float | None:
        return None if not self.verify_steps else 1 + self.accepted / self.verify_steps

    def usage(self) -> dict[str, int]:
        p = len(self.prompt_ids)
        return {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                "total_tokens": p + self.completion_tokens}

    def mimo_stats(self) -> dict[str, Any]:
        return {"acceptance_length": self.acceptance_length, "num_drafted": self.drafted,
                "num_accepted": self.accepted, "num_verify_steps": self.verify_steps}

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        engine = self.state.engine
        async for d in engine.generate(self.prompt_ids, self.params, self.k, self.arrival, self.request_id):
            c = self.choices[d.index]
            if c.done:
                continue
            ev = self._apply(c, d)
            if ev.finish_reason is not None:
                c.done = True
                self._observe(c, d, ev.finish_reason)
                if not d.finished:  # a stop string: the engine still runs this sample
                    engine.abort(self.request_id, d.index, "stop")
            yield ev

    def _apply(self, c: _Choice, d: RequestDelta) -> ChoiceEvent:
        text = c.stream.push(d.new_token_ids)
        c.ids += d.new_token_ids
        if d.new_logprobs:
            c.lps += d.new_logprobs
        stopped = c.stream.stopped is not None
        if d.finished or stopped:
            text += c.stream.finish()
        n_kept = c.stream.released_tokens
        ev = ChoiceEvent(d.index, token_ids=c.ids[c.kept:n_kept], logprobs=c.lps[c.kept:n_kept])
        if n_kept > c.kept:
            if c.first is None:
                c.first = d.time
            c.times.append(d.time)
        c.kept = n_kept
        m = d.metrics
        c.spec = (m.num_drafted, m.num_accepted, m.num_verify_steps)  # cumulative per sample
        self.drafted, self.accepted, self.verify_steps = (sum(v) for v in zip(*(x.spec for x in self.choices)))
        parsed = c.parser.push(text)
        if d.finished or stopped:
            tail = c.parser.finish()
            parsed.reasoning += tail.reasoning
            parsed.content += tail.content
            parsed.tool_calls += tail.tool_calls
        ev.reasoning, ev.content, ev.tool_calls = parsed.reasoning, parsed.content, parsed.tool_calls
        c.made_call |= bool(parsed.tool_calls)
        if stopped:
            ev.finish_reason, ev.stop_reason = "stop", c.stream.stopped
        elif d.finished:
            ev.finish_reason, ev.stop_reason = d.finish_reason, d.stop_token_id
        if ev.finish_reason == "stop" and c.made_call:
            ev.finish_reason = "tool_calls"
        return ev

    def _observe(self, c: _Choice, d: RequestDelta, reason: str) -> None:
        gaps = [b - a for a, b in zip(c.times, c.times[1:])]
        self.state.metrics.observe_request(arrival=self.arrival, first_token=c.first, finish=time.monotonic(),
                                           queue_time=d.metrics.queue_time, prompt_tokens=len(self.prompt_ids),
                                           output_tokens=c.kept, finish_reason=reason, gaps=gaps)


# ---- request helpers --------------------------------------------------------------------------------------------
async def _body(request: Request, model_cls):
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model_cls.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = f"unsupported field {loc!r}: this server cannot honour it"
        else:
            msg = f"invalid {loc or 'body'}: {err['msg']}"
        raise APIError(400, msg, param=loc or None) from None


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {state.model_name!r}",
                       type="not_found_error", param="model", code="model_not_found")


def _sampling(state: ServerState, req, prompt_len: int, max_tokens: int | None, logprobs: int | None,
              stop: list[str] | None) -> SamplingParams:
    limit = state.llm.config.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {limit} tokens "
                            "(prompt plus at least one output token)", param="messages", code="context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds this "
                            f"model's context of {limit} tokens", param="max_tokens", code="context_length_exceeded")
    if req.num_speculative_tokens is not None and req.num_speculative_tokens > state.llm.config.num_speculative_tokens:
        raise APIError(400, f"num_speculative_tokens must be in [0, {state.llm.config.num_speculative_tokens}]",
                       param="num_speculative_tokens")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop=stop,
                              stop_token_ids=req.stop_token_ids, logprobs=logprobs, ignore_eos=req.ignore_eos,
                              n=req.n, min_tokens=req.min_tokens, repetition_penalty=req.repetition_penalty,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(" ")[0]) from None


def _render_chat(state: ServerState, messages: list[dict], thinking: bool, tools: list[dict] | None,
                 add_generation_prompt: bool = True) -> list[int]:
    tok = state.llm.tokenizer
    for m in messages:
        if m["role"] == "developer":
            m["role"] = "system"
    try:
        return tok.encode_chat(messages, add_generation_prompt=add_generation_prompt, enable_thinking=thinking,
                               tools=tools)
    except (ValueError, TypeError, KeyError) as e:
        raise APIError(400, f"invalid messages: {e}", param="messages") from None


def _token_str(tok, i: int) -> tuple[str, list[int]]:
    b = tok.id_bytes(i)
    return b.decode("utf-8", errors="replace"), list(b)


def _chat_logprobs(tok, lps: list) -> dict[str, Any]:
    content = []
    for lp in lps:
        s, b = _token_str(tok, lp.token_id)
        top = [dict(zip(("token", "bytes"), _token_str(tok, t)), logprob=v) for t, v in lp.top]
        content.append({"token": s, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
    return {"content": content}


def _completion_logprobs(tok, lps: list, offset: int) -> dict[str, Any]:
    tokens, tlp, top, offs = [], [], [], []
    for lp in lps:
        s, _ = _token_str(tok, lp.token_id)
        tokens.append(s)
        tlp.append(lp.logprob)
        top.append({_token_str(tok, t)[0]: v for t, v in lp.top})
        offs.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": tlp, "top_logprobs": top, "text_offset": offs}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _tool_call_json(tc: ToolCall, index: int) -> dict[str, Any]:
    return {"index": index, "id": tc.id, "type": "function",
            "function": {"name": tc.name, "arguments": tc.arguments}}


# ---- the app ----------------------------------------------------------------------------------------------------
def build_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="mimo", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.mimo = state

    def anthropic_path(request: Request) -> bool:
        return request.url.path.startswith("/v1/messages")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        body = e.anthropic() if anthropic_path(request) else e.openai()
        return JSONResponse(body, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return await _api_error(request, APIError(e.status_code, msg, type=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return await _api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                  type="internal_server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if state.api_key and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")):
            given = request.headers.get("x-api-key") or ""
            auth = request.headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                e = APIError(401, "missing or wrong API key (send Authorization: Bearer KEY or x-api-key: KEY)",
                             type="authentication_error", code="invalid_api_key")
                return JSONResponse(e.anthropic() if path.startswith("/v1/messages") else e.openai(), 401)
        try:
            return await call_next(request)
        except Exception as e:  # exceptions raised past the handlers (e.g. inside a route's background work)
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_server_error")
            return JSONResponse(err.openai(), 500)

    # ---- info ----
    @app.get("/health")
    async def health():
        if state.shutting_down or state.engine._error is not None:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started),
                                            "owned_by": "mimo", "max_model_len": state.llm.config.max_model_len}]}

    @app.get("/server_info")
    async def server_info():
        s = state.llm.stats()
        return {"model": state.model_name, "max_model_len": state.llm.config.max_model_len,
                "max_num_seqs": state.llm.config.max_num_seqs,
                "num_speculative_tokens": state.llm.config.num_speculative_tokens,
                "avg_spec_accept_length": s["mean_acceptance_length"], "spec_drafted_tokens": s["drafted_tokens"],
                "spec_accepted_tokens": s["accepted_tokens"], "spec_verify_steps": s["verify_steps"],
                "num_running": s["running"], "num_waiting": s["waiting"], "kv_usage": s["kv_usage"],
                "generated_tokens": s["generated_tokens"], "prompt_tokens": s["prompt_tokens"],
                "internal_states": [{"avg_spec_accept_length": s["mean_acceptance_length"]}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await _body(request, TokenizeRequest)
        _check_model(state, req.model)
        if req.prompt is not None:
            ids = state.llm.tokenizer.encode(req.prompt)
        else:
            thinking = bool(req.chat_template_kwargs and req.chat_template_kwargs.enable_thinking)
            ids = _render_chat(state, [m.model_dump(exclude_none=True) for m in req.messages], thinking, None,
                               req.add_generation_prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.llm.config.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await _body(request, DetokenizeRequest)
        _check_model(state, req.model)
        V = state.llm.model.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < V]
        if bad:
            raise APIError(400, f"token ids must be in [0, {V}), got {bad[0]}", param="tokens")
        return {"prompt": state.llm.tokenizer.decode(req.tokens)}

    # ---- OpenAI chat ----
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrival = time.monotonic()
        req = await _body(request, ChatCompletionRequest)
        _check_model(state, req.model)
        thinking = bool(req.chat_template_kwargs and req.chat_template_kwargs.enable_thinking)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        parse_tools = tools if req.tool_choice != "none" else None
        ids = _render_chat(state, [m.model_dump(exclude_none=True) for m in req.messages], thinking, tools)
        lp = (req.top_logprobs or 0) if req.logprobs else None
        sp = _sampling(state, req, len(ids), req.max_completion_tokens or req.max_tokens, lp, req.stop)
        gen = Generation(state, ids, sp, req.num_speculative_tokens, arrival, thinking, parse_tools)
        cid, created = f"chatcmpl-{gen.request_id}", int(time.time())
        tok = state.llm.tokenizer
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(chat_stream(gen, cid, created, tok, req.logprobs, include_usage))
        return await chat_full(gen, cid, created, tok, req.logprobs)

    async def chat_full(gen: Generation, cid, created, tok, want_lp):
        acc = [dict(reasoning=[], content=[], calls=[], lps=[], finish=None, stop=None) for _ in gen.choices]
        async for ev in _guarded(gen.events()):
            a = acc[ev.index]
            a["reasoning"].append(ev.reasoning)
            a["content"].append(ev.content)
            a["calls"] += ev.tool_calls
            a["lps"] += ev.logprobs
            if ev.finish_reason:
                a["finish"], a["stop"] = ev.finish_reason, ev.stop_reason
        choices = []
        for i, a in enumerate(acc):
            content = "".join(a["content"])
            msg: dict[str, Any] = {"role": "assistant", "content": content if content or not a["calls"] else None,
                                   "reasoning_content": "".join(a["reasoning"]) or None}
            if a["calls"]:
                msg["tool_calls"] = [_tool_call_json(tc, j) for j, tc in enumerate(a["calls"])]
                for t in msg["tool_calls"]:
                    del t["index"]
            choices.append({"index": i, "message": msg, "finish_reason": a["finish"], "stop_reason": a["stop"],
                            "logprobs": _chat_logprobs(tok, a["lps"]) if want_lp else None})
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": gen.usage(), "mimo": gen.mimo_stats()}

    async def chat_stream(gen: Generation, cid, created, tok, want_lp, include_usage):
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}
        events = await _primed(gen.events())  # admission (429 / 400) happens before the first byte is sent
        for i in range(len(gen.choices)):
            yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        n_calls = [0] * len(gen.choices)
        async for ev in events:
            delta: dict[str, Any] = {}
            if ev.reasoning:
                delta["reasoning_content"] = ev.reasoning
            if ev.content:
                delta["content"] = ev.content
            if ev.tool_calls:
                delta["tool_calls"] = [_tool_call_json(tc, n_calls[ev.index] + j) for j, tc in enumerate(ev.tool_calls)]
                n_calls[ev.index] += len(ev.tool_calls)
            if not delta and ev.finish_reason is None and not (want_lp and ev.logprobs):
                continue
            choice = {"index": ev.index, "delta": delta, "finish_reason": ev.finish_reason,
                      "logprobs": _chat_logprobs(tok, ev.logprobs) if want_lp and ev.logprobs else None}
            if ev.finish_reason:
                choice["stop_reason"] = ev.stop_reason
            yield _sse({**head, "choices": [choice]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": gen.usage(), "mimo": gen.mimo_stats()})

    # ---- OpenAI completions ----
    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.monotonic()
        req = await _body(request, CompletionRequest)
        _check_model(state, req.model)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if len(prompts) > 1 and req.stream:
            raise APIError(400, "streaming takes one prompt; send a batch without stream", param="prompt")
        gens = []
        for q in prompts:
            try:
                ids = state.llm.encode(q) if q else []
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            sp = _sampling(state, req, len(ids), req.max_tokens if req.max_tokens is not None else 16,
                           req.logprobs, req.stop)
            gens.append(Generation(state, ids, sp, req.num_speculative_tokens, arrival))
        cid, created = f"cmpl-{gens[0].request_id}", int(time.time())
        tok = state.llm.tokenizer
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(completion_stream(gens[0], cid, created, tok, req.logprobs is not None, include_usage))
        return await completion_full(gens, cid, created, tok, req.logprobs is not None)

    async def completion_full(gens: list[Generation], cid, created, tok, want_lp):
        async def one(gen):
            acc = [dict(text=[], lps=[], finish=None, stop=None) for _ in gen.choices]
            async for ev in _guarded(gen.events()):
                a = acc[ev.index]
                a["text"].append(ev.content)
                a["lps"] += ev.logprobs
                if ev.finish_reason:
                    a["finish"], a["stop"] = ev.finish_reason, ev.stop_reason
            return acc

        results = await asyncio.gather(*(one(g) for g in gens))
        choices = []
        for acc in results:
            for a in acc:
                choices.append({"index": len(choices), "text": "".join(a["text"]), "finish_reason": a["finish"],
                                "stop_reason": a["stop"],
                                "logprobs": _completion_logprobs(tok, a["lps"], 0) if want_lp else None})
        usage = {k: sum(g.usage()[k] for g in gens) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        stats = gens[0].mimo_stats() if len(gens) == 1 else None
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": choices, "usage": usage, "mimo": stats}

    async def completion_stream(gen: Generation, cid, created, tok, want_lp, include_usage):
        head = {"id": cid, "object": "text_completion", "created": created, "model": state.model_name}
        offsets = [0] * len(gen.choices)
        async for ev in gen.events():
            if not ev.content and ev.finish_reason is None and not (want_lp and ev.logprobs):
                continue
            lp = _completion_logprobs(tok, ev.logprobs, offsets[ev.index]) if want_lp else None
            offsets[ev.index] += len(ev.content)
            choice = {"index": ev.index, "text": ev.content, "finish_reason": ev.finish_reason, "logprobs": lp}
            if ev.finish_reason:
                choice["stop_reason"] = ev.stop_reason
            yield _sse({**head, "choices": [choice]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": gen.usage(), "mimo": gen.mimo_stats()})

    # ---- Anthropic Messages ----
    from mimo.serve import anthropic as anth

    @app.post("/v1/messages")
    async def messages(request: Request):
        arrival = time.monotonic()
        req = await _body(request, MessagesRequest)
        _check_model(state, req.model)
        msgs, tools, thinking = anth.to_chat(req)
        ids = _render_chat(state, msgs, thinking, tools)
        sp = _sampling(state, anth.SamplingView(req), len(ids), req.max_tokens, None, req.stop_sequences)
        parse_tools = tools if (req.tool_choice or {}).get("type") != "none" else None
        gen = Generation(state, ids, sp, None, arrival, thinking, parse_tools)
        if req.stream:
            return await _stream(anth.stream(gen, state.model_name), anthropic=True)
        return await anth.full(gen, state.model_name, _guarded)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        req = await _body(request, CountTokensRequest)
        _check_model(state, req.model)
        msgs, tools, thinking = anth.to_chat(req)
        return {"input_tokens": len(_render_chat(state, msgs, thinking, tools))}

    # ---- the chat page ----
    if (STATIC / "index.html").exists():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/")
        async def index():
            return FileResponse(STATIC / "index.html")

    return app


def _admission_error(e: Exception) -> APIError:
    """Engine admission and validation failures as the API errors they are."""
    if isinstance(e, QueueFull):
        return APIError(429, f"server busy: {e}; retry later", type="rate_limit_error")
    if isinstance(e, EngineDead):
        return APIError(503, str(e), type="service_unavailable")
    return APIError(400, str(e))


_ADMISSION = (QueueFull, EngineDead, ValueError)


async def _guarded(events: AsyncIterator[ChoiceEvent]) -> AsyncIterator[ChoiceEvent]:
    """The non-streaming paths: admission failures become API errors."""
    try:
        async for ev in events:
            yield ev
    except _ADMISSION as e:
        raise _admission_error(e) from None


async def _primed(it: AsyncIterator[ChoiceEvent]) -> AsyncIterator[ChoiceEvent]:
    """Run `it` up to its first item now (so its admission errors raise here), then yield everything."""
    it = it.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest():
        if first is not None:
            yield first
        async for x in it:
            yield x

    return rest()


async def _stream(chunks: AsyncIterator[str], anthropic: bool = False) -> Response:
    """An SSE response; admission errors before the first chunk are plain HTTP errors (429 / 400 / 503), and an
    error after the stream started is sent as an error event, then the stream ends."""
    async def body(first: str | None, it):
        if first is not None:
            yield first
        try:
            async for c in it:
                yield c
            if not anthropic:
                yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_server_error")
            yield (f"event: error\ndata: {json.dumps(err.anthropic())}\n\n" if anthropic else _sse(err.openai()))

    it = chunks.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    except _ADMISSION as e:
        raise _admission_error(e) from None
    return StreamingResponse(body(first, it), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
