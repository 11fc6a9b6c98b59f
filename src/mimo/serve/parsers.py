"""Incremental parsers that split generated *text* into reasoning, content and tool calls.

The server detokenises as it goes and feeds each new piece of text here. A piece may hold several tokens'
worth of text (speculative decoding commits up to four tokens a step), so every delimiter may arrive split over
pieces, or together with text on both sides; each parser keeps back only what could still be the start of a
delimiter (or of framing whitespace) and releases everything else at once.

What the model writes after the generation prompt (see `mimo.data.tokenizer`):

    {reasoning}\\n</think>\\n\\n{content}<tool_call>\\n<function=NAME>\\n<parameter=KEY>VALUE</parameter>\\n
    </function>\\n</tool_call>...

With thinking on, the prompt ends with `<think>\\n`, so the output starts inside the reasoning. With thinking off
the prompt already holds the empty think block and the output is content. The framing newlines are dropped, so
`reasoning_content` and `content` are what `render_chat` turns back into the same text (round trip).

Worked example (thinking on, one tool):

    >>> tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    ...     "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    >>> p = OutputParser(thinking=True, tools=tools)
    >>> p.push("Need the forecast.\\n</th")
    ParsedDelta(reasoning='Need the forecast.', content='', tool_calls=[])
    >>> p.push("ink>\\n\\nLet me check.<tool_call>\\n<function=get_weather>\\n")
    ParsedDelta(reasoning='', content='Let me check.', tool_calls=[])
    >>> d = p.push("<parameter=city>Paris</parameter>\\n<parameter=days>3</parameter>\\n</function>\\n</tool_call>")
    >>> d.tool_calls[0].name, d.tool_calls[0].arguments
    ('get_weather', '{"city": "Paris", "days": 3}')
    >>> p.finish()
    ParsedDelta(reasoning='', content='', tool_calls=[])

Decisions (each has a test):
- Reasoning. With thinking off, a stray `<think>` at the start of the output (after whitespace) opens a
  reasoning block all the same; a `<think>` or `</think>` later in the content is content. Reasoning that never
  closes is reasoning to the end.
- Parameter values are typed by the tool's JSON schema: a `string` (also in a union) is kept verbatim, newlines
  and spaces included; integer, number, boolean, null, object and array are parsed as JSON (booleans and null
  also in Python spelling, `True`/`None`, which MiMo's published template writes); a value that does not fit
  its schema stays a string. Untyped or unknown parameters: JSON if it parses, else the string.
- A call naming a function that is not in `tools` is kept (as vLLM does): the client sees what the model asked
  for and can answer with an error; its parameters are untyped.
- Malformed calls are content, verbatim: a `<tool_call>` block without `<function=NAME>` first, or one still
  open at `finish()` (cut off by `max_tokens`: running half a command is worse than showing it). An open call
  whose `</function>` has arrived is complete but for its wrapper and is parsed.
- Whitespace-only text right before or after a tool call (the model's separators) is dropped.
- Tool calls inside the reasoning (MiMo-V2-Flash does this despite its prompt, and engines that only scan the
  content return no calls): when the content held none, `OutputParser.finish()` returns the well-formed calls
  to declared tools found in the reasoning. The reasoning text itself is left as the model wrote it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mimo.data.tokenizer import THINK, THINK_END, TOOL_CALL_END, TOOL_CALL_START

__all__ = ["OutputParser", "ParsedDelta", "ReasoningParser", "ToolCall", "ToolCallParser", "parse_output"]

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>")
_PARAMETER_END = "</parameter>"
_FUNCTION_END = "</function>"
# Python spellings of JSON words: MiMo's published template writes non-string scalars with `{{ value | string }}`.
_WORDS: dict[str, Any] = {"true": True, "false": False, "null": None, "none": None}


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call; `arguments` is a JSON object as a string (the OpenAI wire format)."""

    name: str
    arguments: str
    id: str = field(default_factory=_new_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The call as an entry of an OpenAI message's `tool_calls` (and of `render_chat`'s input)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedDelta:
    """What one piece of generated text adds: reasoning text, content text, and tool calls completed by it."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def _held_back(text: str, *delimiters: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `delimiters`."""
    for n in range(min(len(text), max(map(len, delimiters)) - 1), 0, -1):
        tail = text[-n:]
        if any(d.startswith(tail) for d in delimiters):
            return n
    return 0


class ReasoningParser:
    """Splits generated text into (reasoning, content) at `</think>`, dropping the template's framing newlines
    (`\\n</think>\\n\\n`, and the `\\n` after a stray `<think>`)."""

    def __init__(self, thinking: bool):
        # "start": thinking off, a stray <think> may still come; "reasoning"; "closing": after </think>, up to
        # two framing newlines are dropped; "content".
        self._state = "reasoning" if thinking else "start"
        self._buf = ""
        self._skip_newline = False
        self._closing_newlines = 0

    def push(self, text: str) -> tuple[str, str]:
        """Feed new text; return the (reasoning, content) it releases."""
        self._buf += text
        reasoning: list[str] = []
        content: list[str] = []
        while self._buf:
            if self._state == "start":
                lead = self._buf.lstrip()
                if lead.startswith(THINK):
                    self._buf = lead[len(THINK) :]
                    self._state, self._skip_newline = "reasoning", True
                elif THINK.startswith(lead):
                    break
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                if self._skip_newline:
                    self._skip_newline = False
                    self._buf = self._buf.removeprefix("\n")
                    continue
                end = self._buf.find(THINK_END)
                if end < 0:
                    keep = _held_back(self._buf, "\n" + THINK_END, THINK_END)
                    reasoning.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                reasoning.append(self._buf[:end].removesuffix("\n"))
                self._buf = self._buf[end + len(THINK_END) :]
                self._state = "closing"
            elif self._state == "closing":
                while self._closing_newlines < 2 and self._buf.startswith("\n"):
                    self._buf = self._buf[1:]
                    self._closing_newlines += 1
                if self._buf or self._closing_newlines == 2:
                    self._state = "content"
            else:
                content.append(self._buf)
                self._buf = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """End of generation: release what was held back (an unclosed reasoning block stays reasoning)."""
        rest, self._buf = self._buf, ""
        return (rest, "") if self._state == "reasoning" else ("", rest)


def _tool_index(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    """Function name -> its parameters' `properties` schema, for OpenAI-shaped or bare function dicts."""
    index: dict[str, Mapping[str, Any]] = {}
    for tool in tools or ():
        fn = tool.get("function", tool)
        params = fn.get("parameters")
        properties = params.get("properties") if isinstance(params, Mapping) else None
        index[fn["name"]] = properties if isinstance(properties, Mapping) else {}
    return index


def _schema_types(schema: Any) -> set[str]:
    """The JSON types a schema allows: `type` (a name or a list) and those of `anyOf`/`oneOf` branches."""
    if not isinstance(schema, Mapping):
        return set()
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else []
    types = {t for t in kinds if isinstance(t, str)}
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key) or ():
            types |= _schema_types(branch)
    return types


def _reject_constant(name: str) -> Any:
    # NaN and Infinity parse in Python but are not JSON; the arguments string must stay valid JSON.
    raise ValueError(name)


def _fit(value: Any, types: set[str]) -> tuple[bool, Any]:
    """Whether a parsed JSON value is of one of `types`, and the value as that type."""
    if isinstance(value, bool):
        return "boolean" in types, value
    if isinstance(value, int):
        return bool(types & {"integer", "number"}), value
    if isinstance(value, float):
        if "number" in types:
            return True, value
        return "integer" in types and value.is_integer(), int(value) if value.is_integer() else value
    if value is None:
        return "null" in types, value
    if isinstance(value, dict):
        return "object" in types, value
    if isinstance(value, list):
        return "array" in types, value
    return False, value


def _typed(raw: str, schema: Any) -> Any:
    """A parameter's text as the value its schema asks for; never raises (see the module docstring)."""
    types = _schema_types(schema)
    if "string" in types:
        return raw
    text = raw.strip()
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        if not (types & {"boolean", "null"} and text.lower() in _WORDS):
            return raw
        value = _WORDS[text.lower()]
    if not types:
        return value
    ok, value = _fit(value, types)
    return value if ok else raw


def _parse_call(body: str, tools: Mapping[str, Mapping[str, Any]]) -> ToolCall | None:
    """The call in the text between `<tool_call>` and `</tool_call>`, or None when it has no function tag."""
    head = _FUNCTION.match(body)
    if head is None or not head.group(1).strip():
        return None
    name = head.group(1).strip()
    schema = tools.get(name, {})
    args: dict[str, Any] = {}
    pos = head.end()
    while (param := _PARAMETER.match(body, pos)) is not None:
        start = param.end()
        end = body.find(_PARAMETER_END, start)
        if end >= 0:
            raw, pos = body[start:end], end + len(_PARAMETER_END)
        else:
            # An unclosed value runs to the next tag; the newline before that tag is the format's, not the value's.
            stops = [i for i in (body.find("<parameter=", start), body.find(_FUNCTION_END, start)) if i >= 0]
            pos = min(stops, default=len(body))
            raw = body[start:pos].removesuffix("\n")
        key = param.group(1).strip()
        # Qwen3-Coder-style output puts the value on its own lines (`<parameter=p>\nvalue\n</parameter>`);
        # those two newlines are framing, as in SGLang's and vLLM's parsers for this format
        if raw.startswith("\n") and raw.endswith("\n") and len(raw) >= 2:
            raw = raw[1:-1]
        args[key] = _typed(raw, schema.get(key))
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Splits content text into plain content and MiMo tool calls (`<tool_call>...</tool_call>` blocks)."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None):
        self._tools = _tool_index(tools)
        self._buf = ""
        self._in_call = False
        # At the start, or right after a call: whitespace is held, and dropped if a call or the end follows.
        self._at_boundary = True
        self._gap = ""
        self._made_call = False

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """Feed new content text; return the content it releases and the calls it completes."""
        self._buf += text
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._in_call:
                end = self._buf.find(TOOL_CALL_END)
                if end < 0:
                    break
                body, self._buf = self._buf[:end], self._buf[end + len(TOOL_CALL_END) :]
                self._in_call = False
                self._close_call(body, TOOL_CALL_END, out, calls)
                continue
            start = self._buf.find(TOOL_CALL_START)
            if start < 0:
                keep = _held_back(self._buf, TOOL_CALL_START)
                ready = self._buf[: len(self._buf) - keep]
                if not (self._at_boundary and ready.isspace() or not ready):
                    out.append(ready)
                    self._buf = self._buf[len(ready) :]
                    self._at_boundary = False
                break
            before = self._buf[:start]
            if self._at_boundary and (before.isspace() or not before):
                self._gap = before
            else:
                out.append(before)
                self._gap = ""
            self._buf = self._buf[start + len(TOOL_CALL_START) :]
            self._in_call = True
        return "".join(out), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of generation: release held text; an open call is parsed only if its `</function>` came."""
        rest, self._buf = self._buf, ""
        out: list[str] = []
        calls: list[ToolCall] = []
        if self._in_call:
            self._in_call = False
            if _FUNCTION_END in rest:
                self._close_call(rest, "", out, calls)
            else:
                out.append(self._gap + TOOL_CALL_START + rest)
        elif not (self._at_boundary and self._made_call and rest.isspace()):
            out.append(rest)
        return "".join(out), calls

    def _close_call(self, body: str, closing: str, out: list[str], calls: list[ToolCall]) -> None:
        call = _parse_call(body, self._tools)
        if call is None:
            out.append(self._gap + TOOL_CALL_START + body + closing)
            self._at_boundary = False
        else:
            calls.append(call)
            self._made_call = self._at_boundary = True
        self._gap = ""


class OutputParser:
    """Reasoning first, then tool calls in the content: what the chat endpoint needs from generated text.

    `tools` empty or None means no tool parsing (the request offered none, or `tool_choice` is "none"): all the
    content is content.
    """

    def __init__(self, thinking: bool, tools: Sequence[Mapping[str, Any]] | None = None):
        self._reasoning = ReasoningParser(thinking)
        self._tools = list(tools or ())
        self._calls = ToolCallParser(self._tools) if self._tools else None
        self._reasoning_text: list[str] = []
        self._made_call = False

    def push(self, text: str) -> ParsedDelta:
        reasoning, content = self._reasoning.push(text)
        return self._step(reasoning, content, final=False)

    def finish(self) -> ParsedDelta:
        reasoning, content = self._reasoning.finish()
        delta = self._step(reasoning, content, final=True)
        if self._calls is not None and not self._made_call:
            delta.tool_calls.extend(self._calls_in_reasoning())
        return delta

    def _step(self, reasoning: str, content: str, final: bool) -> ParsedDelta:
        if self._calls is None:
            return ParsedDelta(reasoning, content)
        self._reasoning_text.append(reasoning)
        text, calls = self._calls.push(content)
        if final:
            tail, more = self._calls.finish()
            text, calls = text + tail, calls + more
        self._made_call = self._made_call or bool(calls)
        return ParsedDelta(reasoning, text, calls)

    def _calls_in_reasoning(self) -> list[ToolCall]:
        # Only calls to declared tools: reasoning also mentions the syntax in passing.
        finder = ToolCallParser(self._tools)
        _, calls = finder.push("".join(self._reasoning_text))
        calls += finder.finish()[1]
        declared = _tool_index(self._tools)
        return [c for c in calls if c.name in declared]


def parse_output(text: str, thinking: bool, tools: Sequence[Mapping[str, Any]] | None = None) -> ParsedDelta:
    """The whole of a finished generation at once (the non-streaming response)."""
    parser = OutputParser(thinking, tools)
    first, last = parser.push(text), parser.finish()
    return ParsedDelta(
        first.reasoning + last.reasoning, first.content + last.content, first.tool_calls + last.tool_calls
    )
