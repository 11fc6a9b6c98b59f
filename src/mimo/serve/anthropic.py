"""Anthropic Messages on top of the chat path: request -> chat messages + tools, events -> content blocks.

Mapping (the chat template is MiMo's, so one rendering serves both APIs):
- `system` (string or text blocks) -> a system message; user text blocks -> the user message's text;
  `tool_result` blocks -> `role: "tool"` messages (before the user's text, as Anthropic orders them);
  assistant `text` / `thinking` / `tool_use` blocks -> content / reasoning_content / tool_calls.
- `tools[{name, description, input_schema}]` -> OpenAI function tools; `thinking.type == "enabled"` turns
  the template's thinking on.
- stop_reason: EOS -> end_turn, length -> max_tokens, a stop sequence -> stop_sequence (named in
  `stop_sequence`), parsed tool calls -> tool_use.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from mimo.serve.protocol import APIError, CountTokensRequest, MessagesRequest

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "abort": "end_turn"}


class SamplingView:
    """The OpenAI-side sampling fields a Messages request maps to (the rest at their defaults)."""

    def __init__(self, req: MessagesRequest):
        self.temperature, self.top_p, self.top_k = req.temperature, req.top_p, req.top_k
        self.min_p, self.seed, self.stop_token_ids, self.ignore_eos, self.n = 0.0, None, None, False, 1
        self.min_tokens, self.repetition_penalty, self.presence_penalty, self.frequency_penalty = 0, 1.0, 0.0, 0.0
        self.num_speculative_tokens = None


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for b in content or ():
        if b.get("type") != "text":
            raise APIError(400, f"{where}: only text blocks are supported here, got {b.get('type')!r}",
                           param="messages")
        parts.append(b.get("text", ""))
    return "".join(parts)


def to_chat(req: MessagesRequest | CountTokensRequest) -> tuple[list[dict], list[dict] | None, bool]:
    msgs: list[dict[str, Any]] = []
    if req.system:
        msgs.append({"role": "system", "content": _text(req.system, "system")})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            msgs.append({"role": m.role, "content": m.content})
            continue
        text, reasoning, calls = [], [], []
        for b in m.content:
            kind = b.get("type")
            if kind == "text":
                text.append(b.get("text", ""))
            elif kind == "tool_result" and m.role == "user":
                msgs.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                             "content": _text(b.get("content", ""), f"messages.{i}.tool_result")})
            elif kind == "tool_use" and m.role == "assistant":
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input", {}))}})
            elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                reasoning.append(b.get("thinking", ""))
            else:
                raise APIError(400, f"messages.{i}: content block type {kind!r} is not supported for role "
                                    f"{m.role!r}", param=f"messages.{i}.content")
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            msgs.append(msg)
        elif text:
            msgs.append({"role": "user", "content": "".join(text)})
    tools = None
    if req.tools:
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                   "parameters": t.input_schema}} for t in req.tools]
    thinking = req.thinking is not None and req.thinking.type == "enabled"
    return msgs, tools, thinking


def _tool_use(tc) -> dict[str, Any]:
    try:
        args = json.loads(tc.arguments)
    except json.JSONDecodeError:
        args = {"raw": tc.arguments}
    return {"type": "tool_use", "id": "toolu_" + tc.id.removeprefix("call_"), "name": tc.name, "input": args}


def _stop(ev) -> tuple[str, str | None]:
    reason = _STOP.get(ev.finish_reason, "end_turn")
    if ev.finish_reason == "stop" and isinstance(ev.stop_reason, str):
        return "stop_sequence", ev.stop_reason
    return reason, None


async def full(gen, model: str, guarded: Callable) -> dict[str, Any]:
    reasoning, content, calls, last = [], [], [], None
    async for ev in guarded(gen.events()):
        reasoning.append(ev.reasoning)
        content.append(ev.content)
        calls += ev.tool_calls
        if ev.finish_reason:
            last = ev
    blocks: list[dict[str, Any]] = []
    if "".join(reasoning):
        blocks.append({"type": "thinking", "thinking": "".join(reasoning), "signature": ""})
    if "".join(content) or not calls:
        blocks.append({"type": "text", "text": "".join(content)})
    blocks += [_tool_use(tc) for tc in calls]
    stop_reason, stop_sequence = _stop(last)
    return {"id": f"msg_{gen.request_id}", "type": "message", "role": "assistant", "model": model,
            "content": blocks, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": len(gen.prompt_ids), "output_tokens": gen.completion_tokens}}


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


async def stream(gen, model: str) -> AsyncIterator[str]:
    """The Messages event sequence: message_start, per block start / deltas / stop, message_delta, stop."""
    from mimo.serve.app import _primed

    events = await _primed(gen.events())
    yield _event("message_start", {"message": {
        "id": f"msg_{gen.request_id}", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": len(gen.prompt_ids), "output_tokens": 0}}})
    index, open_kind = -1, None

    def start(kind: str, block: dict[str, Any]):
        nonlocal index, open_kind
        out = []
        if open_kind is not None:
            out.append(_event("content_block_stop", {"index": index}))
        index, open_kind = index + 1, kind
        out.append(_event("content_block_start", {"index": index, "content_block": block}))
        return out

    last = None
    async for ev in events:
        if ev.reasoning:
            if open_kind != "thinking":
                for e in start("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                    yield e
            yield _event("content_block_delta", {"index": index,
                                                 "delta": {"type": "thinking_delta", "thinking": ev.reasoning}})
        if ev.content:
            if open_kind != "text":
                for e in start("text", {"type": "text", "text": ""}):
                    yield e
            yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": ev.content}})
        for tc in ev.tool_calls:
            block = _tool_use(tc)
            for e in start("tool_use", {**block, "input": {}}):
                yield e
            yield _event("content_block_delta", {"index": index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
        if ev.finish_reason:
            last = ev
    if open_kind is None:
        for e in start("text", {"type": "text", "text": ""}):
            yield e
    yield _event("content_block_stop", {"index": index})
    stop_reason, stop_sequence = _stop(last) if last is not None else ("end_turn", None)
    yield _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                   "usage": {"output_tokens": gen.completion_tokens}})
    yield _event("message_stop", {})
