"""Text-side parsers: reasoning / content / tool calls, streamed in deltas of any size."""

import doctest
import json
import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mimo.serve.parsers as parsers_module
from mimo.data.tokenizer import Tokenizer, render_chat
from mimo.serve.parsers import OutputParser, ParsedDelta, ReasoningParser, ToolCall, ToolCallParser, parse_output

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
            },
            "required": ["city"],
        },
    },
}
TYPED = {
    "type": "function",
    "function": {
        "name": "typed",
        "parameters": {
            "type": "object",
            "properties": {
                "s": {"type": "string"},
                "i": {"type": "integer"},
                "f": {"type": "number"},
                "b": {"type": "boolean"},
                "z": {"type": "null"},
                "o": {"type": "object"},
                "a": {"type": "array"},
                "opt": {"type": ["string", "null"]},
                "either": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "free": {},
            },
        },
    },
}
TOOLS = [WEATHER, TYPED]


def call(name: str, **params: str) -> str:
    """A tool call exactly as the chat template writes it."""
    body = "".join(f"<parameter={k}>{v}</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def chunkings(text: str, seed: int = 0):
    """Every way the test splits a text: fixed sizes 1..len, every single cut, and random bursts."""
    for size in range(1, len(text) + 1):
        yield [text[i : i + size] for i in range(0, len(text), size)]
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]
    rng = random.Random(seed)
    for _ in range(20):
        pieces, i = [], 0
        while i < len(text):
            n = rng.choice([0, 1, 2, 3, 5, 8, 13])
            pieces.append(text[i : i + n])
            i += n
        yield pieces


def stream(chunks, thinking: bool, tools=TOOLS) -> tuple[str, str, list[tuple[str, dict]]]:
    """Feed `chunks` to an OutputParser; return (reasoning, content, [(name, arguments)])."""
    parser = OutputParser(thinking, tools)
    deltas = [parser.push(c) for c in chunks] + [parser.finish()]
    calls = [(c.name, json.loads(c.arguments)) for d in deltas for c in d.tool_calls]
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas), calls


def assert_every_split(text: str, thinking: bool, expected, tools=TOOLS) -> None:
    for chunks in chunkings(text):
        assert stream(chunks, thinking, tools) == expected, chunks


def generated_part(messages, thinking: bool, tools=None) -> str:
    """What the model writes for the last (assistant) message: the rendering after the generation prompt."""
    prompt = render_chat(messages[:-1], add_generation_prompt=True, enable_thinking=thinking, tools=tools)
    full = render_chat(messages, tools=tools)
    assert full.startswith(prompt) and full.endswith("<|im_end|>\n")
    return full[len(prompt) : -len("<|im_end|>\n")]


# ---- reasoning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reasoning, content",
    [
        ("382 + 47 = 429", "429"),
        ("line one\nline two\n", "\nanswer with leading newline"),
        ("ends with two\n\n", "x"),
        ("😀 multi-byte 日本語 ünï", "é 😀"),
        ("a</thin", "</think> quoted later is content"),
        ("<", "\n\n\n"),
    ],
)
def test_reasoning_round_trip(reasoning, content):
    """render_chat's generated part for (reasoning_content, content) parses back to exactly that pair."""
    user = {"role": "user", "content": "q"}
    answer = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    assert_every_split(generated_part([user, answer], thinking=True), True, (reasoning, content, []))


@pytest.mark.parametrize("content", ["429", "\nstarts with a newline", "😀", "<thinking> is not a tag"])
def test_thinking_off_is_content(content):
    """With thinking off, the output after the empty think block is all content."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]
    assert_every_split(generated_part(messages, thinking=False), False, ("", content, []))


def test_think_end_in_one_delta_with_answer():
    """`</think>` arriving in the same delta as text on both sides splits inside that delta."""
    p = ReasoningParser(thinking=True)
    assert p.push("so 4\n</think>\n\nThe answer is 4.") == ("so 4", "The answer is 4.")
    assert p.finish() == ("", "")


def test_reasoning_holds_back_only_delimiter_prefixes():
    """Text is released at once except a possible start of `\\n</think>`; content is never held."""
    p = ReasoningParser(thinking=True)
    assert p.push("step one") == ("step one", "")
    assert p.push(" <b>bold</b> <") == (" <b>bold</b> ", "")
    assert p.push("/thi") == ("", "")
    assert p.push("s is not it\n") == ("</this is not it", "")
    assert p.push("\n</think>") == ("\n", "")
    assert p.push("\n") == ("", "")
    assert p.push("\nA") == ("", "A")
    assert p.push("\n</think>\n") == ("", "\n</think>\n")


def test_unclosed_reasoning_stays_reasoning():
    """A generation cut off inside the reasoning is all reasoning, held-back text included."""
    assert stream(["thinking forever\n", "</th"], True) == ("thinking forever\n</th", "", [])


def test_stray_think_block_with_thinking_off():
    """Thinking off, a leading `<think>` (after whitespace) still opens a reasoning block; a later one does not."""
    assert_every_split("\n<think>\nplan\n</think>\n\nanswer", False, ("plan", "answer", []))
    assert_every_split("<think>never closed", False, ("never closed", "", []))
    assert_every_split("  answer <think>x</think>", False, ("", "  answer <think>x</think>", []))


# ---- tool calls -----------------------------------------------------------------------------------------------


def test_typed_parameters():
    """Values follow the schema: strings verbatim, numbers/booleans/null/JSON parsed, misfits kept as strings."""
    text = call(
        "typed",
        s=" 42\n  keep  all \n",
        i=" 7\n",
        f="2.5",
        b="false",
        z="null",
        o='{"k": [1, "😀"]}',
        a="[1, 2]",
        opt="null",
        either="null",
        free="3",
    )
    expected = {
        "s": " 42\n  keep  all \n",
        "i": 7,
        "f": 2.5,
        "b": False,
        "z": None,
        "o": {"k": [1, "😀"]},
        "a": [1, 2],
        "opt": "null",
        "either": None,
        "free": 3,
    }
    assert_every_split(text, False, ("", "", [("typed", expected)]))


@pytest.mark.parametrize(
    "param, raw, value",
    [
        ("i", "seven", "seven"),
        ("i", "2.0", 2),
        ("i", "2.5", "2.5"),
        ("i", "true", "true"),
        ("f", "NaN", "NaN"),
        ("f", "3", 3),
        ("b", "True", True),
        ("b", "yes", "yes"),
        ("z", "None", None),
        ("o", "[1]", "[1]"),
        ("o", "{broken", "{broken"),
        ("free", "not json", "not json"),
        ("free", "True", "True"),
        ("unknown", '{"x": null}', {"x": None}),
    ],
)
def test_parameter_values_never_crash(param, raw, value):
    """Values that do not fit their schema stay strings; Python spellings of booleans and null are accepted."""
    assert stream([call("typed", **{param: raw})], False) == ("", "", [("typed", {param: value})])


def test_several_calls_and_content_around_them():
    """Content before, between and after calls is content; whitespace-only separators are dropped."""
    text = (
        "Checking both cities.\n"
        + call("get_weather", city="Paris", days="3")
        + "\n\n"
        + call("get_weather", city="Ōsaka 大阪", metric="true")
        + "\n and one more remark."
    )
    expected = (
        "",
        "Checking both cities.\n\n and one more remark.",
        [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Ōsaka 大阪", "metric": True})],
    )
    assert_every_split(text, False, expected)
    rome = call("get_weather", city="Rome")
    assert_every_split("\n" + rome + "\n", False, ("", "", [("get_weather", {"city": "Rome"})]))


def test_tool_call_after_thinking_content():
    """Thinking on: reasoning, then content, then a call, all split correctly."""
    text = "The user wants weather.\n</think>\n\nLet me look.\n" + call("get_weather", city="Oslo")
    expected = ("The user wants weather.", "Let me look.\n", [("get_weather", {"city": "Oslo"})])
    assert_every_split(text, True, expected)


def test_tool_call_round_trip_through_template():
    """render_chat of an assistant message with reasoning, content and tool calls parses back to the same."""
    args = [{"city": "Paris", "days": 3, "metric": False}, {"s": "two\nlines ", "o": {"k": None}, "a": [], "f": 1.5}]
    calls = [
        ToolCall("get_weather", json.dumps(args[0])).to_openai(),
        {"type": "function", "function": {"name": "typed", "arguments": args[1]}},
    ]
    answer = {"role": "assistant", "content": "On it.", "reasoning_content": "use tools", "tool_calls": calls}
    text = generated_part([{"role": "user", "content": "q"}, answer], thinking=True, tools=TOOLS)
    expected = ("use tools", "On it.", [("get_weather", args[0]), ("typed", args[1])])
    assert_every_split(text, True, expected)


def test_calls_are_released_in_the_delta_that_completes_them():
    """A call comes out with the delta holding its `</tool_call>`; the content before it is not held back."""
    p = ToolCallParser(TOOLS)
    assert p.push("Sure. <tool_") == ("Sure. ", [])
    content, calls = p.push("call>\n<function=get_weather>\n<parameter=city>Rome</parameter>\n</function>\n")
    assert (content, calls) == ("", [])
    content, calls = p.push("</tool_call>" + call("get_weather", city="Bern") + "\nDone")
    assert content == "\nDone" and [json.loads(c.arguments)["city"] for c in calls] == ["Rome", "Bern"]
    assert p.finish() == ("", [])


def test_unknown_function_is_kept():
    """A call to a function not in `tools` is returned, with untyped (JSON-or-string) parameters."""
    text = call("search_web", query="mimo", limit="5")
    assert_every_split(text, False, ("", "", [("search_web", {"query": "mimo", "limit": 5})]))


CUT = "Run:\n<tool_call>\n<function=get_weather>\n<parameter=city>Pa"
NO_NAME = "\n<tool_call>\n<function=>\n</function>\n</tool_call>"
UNCLOSED_PARAM = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>Lima\n<parameter=days>2"
    "\n</function>\n</tool_call>"
)


@pytest.mark.parametrize(
    "text, expected",
    [
        # no function tag: the block is content, verbatim, separators included
        ('a\n<tool_call>{"name": "x"}</tool_call> b', ("", 'a\n<tool_call>{"name": "x"}</tool_call> b', [])),
        (NO_NAME, ("", NO_NAME, [])),
        # cut off before </function>: content, verbatim
        (CUT, ("", CUT, [])),
        # only the wrapper's end is missing: parsed
        (CUT + "</parameter>\n</function>", ("", "Run:\n", [("get_weather", {"city": "Pa"})])),
        # an unclosed parameter runs to the next tag
        (UNCLOSED_PARAM, ("", "", [("get_weather", {"city": "Lima", "days": 2})])),
        # a partial start tag at the end, or a lone end tag, is content
        ("text <tool_ca", ("", "text <tool_ca", [])),
        ("</tool_call> stray end", ("", "</tool_call> stray end", [])),
    ],
)
def test_malformed_output(text, expected):
    """Malformed tool-call markup never raises and never loses text (see the module docstring)."""
    assert_every_split(text, False, expected)


def test_no_tools_means_no_parsing():
    """Without tools, tool-call markup is plain content."""
    text = "Example:\n" + call("get_weather", city="Paris")
    assert_every_split(text, False, ("", text, []), tools=None)
    assert_every_split(text, False, ("", text, []), tools=[])


def test_tool_calls_inside_reasoning():
    """Calls written inside the reasoning are returned at finish when the content has none; reasoning is kept."""
    inner = call("get_weather", city="Paris")
    reasoning = "I will call it now.\n" + inner
    assert_every_split(reasoning, True, (reasoning, "", [("get_weather", {"city": "Paris"})]))
    assert_every_split(reasoning + "\n</think>\n\n", True, (reasoning, "", [("get_weather", {"city": "Paris"})]))
    # the content's own call wins: no duplicate from the reasoning
    text = reasoning + "\n</think>\n\n" + call("get_weather", city="Rome")
    assert_every_split(text, True, (reasoning, "", [("get_weather", {"city": "Rome"})]))
    # prose about an undeclared function is not a call
    prose = "Some models write " + call("example_function_name", x="1")
    assert_every_split(prose, True, (prose, "", []))


# ---- bursts of real tokens, and arbitrary text ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_tok() -> Tokenizer:
    return Tokenizer.from_pretrained("models/mimo-tiny")


@pytest.mark.parametrize("seed", range(5))
def test_bursty_token_deltas(shipped_tok, seed):
    """Text detokenised from 1-4 tokens per step (speculative decoding) parses like the whole text."""
    text = (
        "Два города 😀: Paris\n</think>\n\nBoth.\n"
        + call("get_weather", city="Paris 巴黎", days="2")
        + call("typed", o='{"emoji": "😀"}', s="a\nb")
    )
    expected = parse_output(text, True, TOOLS)
    ids = shipped_tok.encode(text)
    rng = random.Random(seed)
    dec = shipped_tok.stream_decoder()
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        chunks.append(dec.feed(ids[i : i + n]))
        i += n
    chunks.append(dec.flush())
    got = stream(chunks, True)
    assert got == (
        expected.reasoning,
        expected.content,
        [(c.name, json.loads(c.arguments)) for c in expected.tool_calls],
    )
    assert got[0] == "Два города 😀: Paris" and got[1] == "Both.\n" and len(got[2]) == 2


FRAGMENTS = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<function=get_weather>", "<function=typed>",
    "<parameter=city>", "<parameter=i>", "</parameter>", "</function>", "\n", "\n\n", " ", "<", "</", "x", "7",
    "😀", "日本", "<tool_", "</thi", "true",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=25),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    thinking=st.booleans(),
)
def test_any_text_any_split(parts, cuts, thinking):
    """For any text built from delimiter fragments, any split gives the one-shot result; nothing raises."""
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    whole = parse_output(text, thinking, TOOLS)
    assert stream(chunks, thinking) == (
        whole.reasoning,
        whole.content,
        [(c.name, json.loads(c.arguments)) for c in whole.tool_calls],
    )
    if "<tool_call>" not in text and not thinking and "<think>" not in text:
        assert whole == ParsedDelta("", text, [])


# ---- the small things --------------------------------------------------------------------------------------


def test_tool_call_ids_and_openai_shape():
    """Ids are `call_` + 24 hex digits and unique; to_openai gives the OpenAI message entry."""
    a, b = ToolCall("f", "{}"), ToolCall("f", "{}")
    assert re.fullmatch(r"call_[0-9a-f]{24}", a.id) and a.id != b.id
    assert a.to_openai() == {"id": a.id, "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_module_docstring_example():
    """The worked example in the module docstring runs as written."""
    result = doctest.testmod(parsers_module)
    assert result.attempted > 0 and result.failed == 0


def test_imports_without_torch():
    """The parsers are plain Python: importing them loads no torch."""
    code = "import sys, mimo.serve.parsers; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_values_on_their_own_lines_lose_the_framing_newlines():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string"}, "n": {"type": "integer"}}}}}]
    text = ("<tool_call>\n<function=f>\n<parameter=s>\nline one\nline two\n</parameter>\n"
            "<parameter=n>\n7\n</parameter>\n</function>\n</tool_call>")
    d = parse_output(text, thinking=False, tools=tools)
    assert json.loads(d.tool_calls[0].arguments) == {"s": "line one\nline two", "n": 7}
    d = parse_output(text.replace("<parameter=s>\nline one", "<parameter=s>\n\nline one"), False, tools)
    assert json.loads(d.tool_calls[0].arguments)["s"] == "\nline one\nline two"
