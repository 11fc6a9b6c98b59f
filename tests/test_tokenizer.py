"""Tokenizer: special ids, exact round trip, streaming, saving, chat-template parity with transformers."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mimo.data.corpus import load_corpus, task_documents
from mimo.data.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TOOLS_INSTRUCTIONS,
    TOOLS_PREAMBLE,
    Tokenizer,
    render_chat,
    render_chat_spans,
)

VOCAB = 512
USER = {"role": "user", "content": "add 382 47"}
ANSWER = {"role": "assistant", "content": "429"}
SYSTEM = {"role": "system", "content": "You are MiMo. Answer briefly."}
CONVERSATIONS = {
    "user": [USER],
    "system_user": [SYSTEM, USER],
    "answered": [USER, ANSWER],
    "multi_turn": [
        SYSTEM,
        USER,
        ANSWER,
        {"role": "user", "content": "reverse héllo wörld 😀"},
        {"role": "assistant", "content": "😀 dlröw olléh"},
        {"role": "user", "content": "sort 5 3 9 1\n\nthanks  "},
    ],
    "edge_cases": [
        {"role": "tool", "content": "42"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "add 1"}, {"type": "image"}, {"type": "text", "text": " 2"}],
        },
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": "3", "reasoning_content": ""},
    ],
    "reasoning": [
        USER,
        {"role": "assistant", "content": "429", "reasoning_content": "382 + 47 = 429"},
        {"role": "user", "content": "again"},
    ],
}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Forecast in °C for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {"type": "object"}},
            "required": ["city"],
        },
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, ADD]
WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {
        "name": "get_weather",
        "arguments": {"city": "Paris\nrive gauche", "days": 3, "opts": {"units": ["C"], "hourly": True, "tz": None}},
    },
}
ADD_CALL = {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": {"a": 382, "b": 4.5}}}
TOOL_CONVERSATIONS = {
    "user": [USER],
    "system_user": [SYSTEM, USER],
    "tool_round": [
        SYSTEM,
        USER,
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL, ADD_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "386.5"},
        {"role": "assistant", "content": "Sunny; 386.5."},
        {"role": "user", "content": "thanks"},
    ],
    "thinking_tool_call": [
        USER,
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "need weather",
            "tool_calls": [WEATHER_CALL],
        },
        {"role": "tool", "content": [{"type": "text", "text": "rain 😀"}]},
    ],
    "tool_turns_apart": [
        USER,
        {"role": "assistant", "content": "", "tool_calls": [ADD_CALL]},
        {"role": "tool", "content": "386.5"},
        {"role": "assistant", "content": "", "tool_calls": [ADD_CALL]},
        {"role": "tool", "content": "386.5"},
    ],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    corpus = load_corpus(max_files=12)
    texts = corpus.texts() + task_documents(30) + ["héllo wörld 😀 日本語のテキスト"] * 5
    return Tokenizer.train(texts, VOCAB)


@pytest.fixture(scope="module")
def saved_dirs(tok, tmp_path_factory):
    """The tokenizer saved twice: alone, and next to a model config.json (model_type mimo_v2_flash)."""
    from mimo.model.config import ModelConfig

    bare = tmp_path_factory.mktemp("tok_bare")
    tok.save(bare)
    with_config = tmp_path_factory.mktemp("tok_model")
    tok.save(with_config)
    ModelConfig.from_preset("test").save(with_config)
    return {"bare": bare, "with_config": with_config}


@pytest.fixture(scope="module", params=["bare", "with_config"])
def hf_tok(request, saved_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(saved_dirs[request.param])


def test_special_token_ids(tok):
    """Special tokens get ids 0..4 in a fixed order; eos is <|im_end|>, eot = pad is <|endoftext|>."""
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.eot_id, tok.pad_id, tok.im_start_id, tok.eos_id) == (0, 0, 1, 2)
    assert (tok.think_id, tok.think_end_id) == (3, 4)
    assert tok.special_ids == {0, 1, 2}
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= VOCAB


def test_train_rejects_tiny_vocab():
    """A vocabulary that cannot hold the 256 bytes and the special tokens is refused."""
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], 200)


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_roundtrip_arbitrary_unicode(tok, text):
    """decode(encode(text)) == text for any unicode string."""
    assert tok.decode(tok.encode(text)) == text


def test_roundtrip_special_strings_and_skip(tok):
    """Special-token strings become single ids; skip_special_tokens drops them but keeps the think tokens."""
    text = "<|im_start|>user\nhi<|im_end|>\n<think>\nx\n</think>\n\ny<|endoftext|>"
    ids = tok.encode(text)
    assert ids.count(tok.im_start_id) == 1 and ids.count(tok.eot_id) == 1 and tok.think_id in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n<think>\nx\n</think>\n\ny"


def test_digits_are_single_tokens(tok):
    """Every digit is its own token, so numbers tokenize position by position."""
    ids = tok.encode("add 382 47")
    assert [tok.id_to_token(i) for i in ids if tok.decode([i]).strip().isdigit()] == list("38247")


@settings(max_examples=100, deadline=None)
@given(text=st.text(min_size=1))
def test_stream_decoder_never_splits_characters(tok, text):
    """Streamed pieces join to the text and none holds a replacement character (no split UTF-8 sequence)."""
    pieces = list(tok.decode_stream(tok.encode(text)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, VOCAB - 1), max_size=40), skip=st.booleans())
def test_stream_decoder_matches_decode_on_any_ids(tok, ids, skip):
    """For any id sequence (even invalid UTF-8) the stream equals decode(), specials skipped or not."""
    ids = [i % tok.vocab_size for i in ids]
    assert "".join(tok.decode_stream(ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_holds_back_partial_character(tok):
    """A 4-byte emoji arriving byte-token by byte-token is emitted once, by the last of its tokens."""
    byte_ids = {tok.id_bytes(i): i for i in range(tok.vocab_size) if len(tok.id_bytes(i)) == 1}
    ids = [byte_ids[bytes([b])] for b in "😀".encode()]
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == ["", "", "", "😀"]
    assert dec.flush() == ""


def test_save_load_roundtrip(tok, saved_dirs):
    """A saved tokenizer reloads with the same vocabulary, ids and chat template."""
    d = saved_dirs["bare"]
    assert {p.name for p in d.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == "<|im_end|>"
    again = Tokenizer.load(d)
    text = "def f(x):\n    return x + 1  # ünïcode"
    assert again.vocab_size == tok.vocab_size and again.encode(text) == tok.encode(text)


def test_load_missing_dir_names_path(tmp_path):
    """Loading from a directory without tokenizer.json raises FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")


def test_render_exact_formats():
    """The ChatML strings, think block included, are exactly the documented ones."""
    assert render_chat([USER]) == (
        "<|im_start|>user\nadd 382 47<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render_chat([USER], enable_thinking=True) == (
        "<|im_start|>user\nadd 382 47<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert render_chat([SYSTEM, USER, ANSWER]) == (
        "<|im_start|>system\nYou are MiMo. Answer briefly.<|im_end|>\n"
        "<|im_start|>user\nadd 382 47<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n429<|im_end|>\n"
    )
    assert render_chat(CONVERSATIONS["reasoning"][:2]) == (
        "<|im_start|>user\nadd 382 47<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n382 + 47 = 429\n</think>\n\n429<|im_end|>\n"
    )


def test_training_example_starts_with_inference_prompt():
    """A rendered answer is the generation prompt followed by '{answer}<|im_end|>\\n'."""
    assert render_chat([USER, ANSWER]) == render_chat([USER]) + "429<|im_end|>\n"
    explicit = render_chat([USER, ANSWER], add_generation_prompt=True)
    assert explicit == render_chat([USER, ANSWER]) + "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_spans_cover_answer_and_im_end_only():
    """Assistant spans hold exactly the generated text: the answer (or reasoning onwards) and <|im_end|>."""
    text, spans = render_chat_spans(CONVERSATIONS["multi_turn"])
    assert [text[a:b] for a, b in spans] == ["429<|im_end|>", "😀 dlröw olléh<|im_end|>"]
    text, spans = render_chat_spans(CONVERSATIONS["reasoning"])
    assert [text[a:b] for a, b in spans] == ["382 + 47 = 429\n</think>\n\n429<|im_end|>"]
    assert render_chat_spans([USER])[1] == []


def test_content_parts_and_errors():
    """OpenAI-style content parts render as their text; an empty conversation is an error."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "add 1"}, {"type": "text", "text": " 2"}]}]
    assert render_chat(parts) == render_chat([{"role": "user", "content": "add 1 2"}])
    with pytest.raises(ValueError):
        render_chat([])


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_hf_chat_template_matches(tok, hf_tok, name, enable_thinking, add_generation_prompt):
    """transformers' apply_chat_template gives our text and our ids, with and without a config.json."""
    messages = CONVERSATIONS[name]
    kw = dict(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    ours = render_chat(messages, **kw)
    assert hf_tok.apply_chat_template(messages, tokenize=False, **kw) == ours
    ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    assert ids == tok.encode_chat(messages, **kw) == tok.encode(ours)
    assert hf_tok.apply_chat_template(messages, tokenize=True, **kw)["input_ids"] == ids


@pytest.mark.parametrize("name", ["answered", "multi_turn", "reasoning"])
def test_hf_assistant_mask_matches(tok, hf_tok, name):
    """Our training mask equals transformers' return_assistant_tokens_mask (the {% generation %} spans)."""
    messages = CONVERSATIONS[name]
    out = hf_tok.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)
    ids, mask = tok.encode_chat_with_mask(messages, add_generation_prompt=False)
    assert out["input_ids"] == ids and out["assistant_masks"] == mask
    assert sum(mask) > 0


def test_hf_tokenizer_agrees(tok, hf_tok):
    """Special ids, plain encode and decode agree with the transformers view of the same files."""
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id) == (tok.eos_id, tok.pad_id, None)
    assert len(hf_tok) == tok.vocab_size
    text = "class A:\n\tpass  # 382 ünï 😀<|im_end|>"
    assert hf_tok.encode(text) == tok.encode(text)
    ids = tok.encode_chat(CONVERSATIONS["reasoning"])
    for skip in (False, True):
        assert hf_tok.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_render_tools_exact_format():
    """The tools section, tool calls and grouped tool replies are exactly the documented strings."""
    listing = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in TOOLS)
    assert "°C" in listing and TOOLS_PREAMBLE.startswith("# Tools\n\n") and TOOLS_PREAMBLE.endswith("<tools>")
    assert TOOLS_INSTRUCTIONS.startswith("\n</tools>\n\n")
    assert "<parameter=example_parameter_1>value_1</parameter>\n" in TOOLS_INSTRUCTIONS
    system = f"<|im_start|>system\n{TOOLS_PREAMBLE}{listing}{TOOLS_INSTRUCTIONS}<|im_end|>\n"
    assert render_chat([USER], tools=TOOLS) == system + render_chat([USER])
    merged = system.replace("system\n", "system\nYou are MiMo. Answer briefly.\n\n", 1)
    assert render_chat([SYSTEM, USER], tools=TOOLS) == merged + render_chat([USER])
    assert render_chat(TOOL_CONVERSATIONS["tool_round"], tools=TOOLS) == merged + (
        "<|im_start|>user\nadd 382 47<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>Paris\nrive gauche</parameter>\n"
        "<parameter=days>3</parameter>\n"
        '<parameter=opts>{"units": ["C"], "hourly": true, "tz": null}</parameter>\n</function>\n</tool_call>'
        "<tool_call>\n<function=add>\n<parameter=a>382</parameter>\n<parameter=b>4.5</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>tool\n<tool_response>\nsunny, 21 °C\n</tool_response>\n"
        "<tool_response>\n386.5\n</tool_response>\n<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nSunny; 386.5.<|im_end|>\n"
        "<|im_start|>user\nthanks<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    text = render_chat(TOOL_CONVERSATIONS["tool_turns_apart"])
    assert text.count("<|im_start|>tool\n<tool_response>\n386.5\n</tool_response>\n<|im_end|>\n") == 2


def test_no_tools_renders_as_before():
    """tools=None and tools=[] render every tool-free conversation exactly as without the argument."""
    for messages in CONVERSATIONS.values():
        for thinking in (False, True):
            plain = render_chat(messages, enable_thinking=thinking)
            assert render_chat(messages, None, thinking, None) == render_chat(messages, None, thinking, []) == plain


def test_tool_call_spans():
    """Tool calls are part of the trained assistant span, with the answer before them and <|im_end|>."""
    text, spans = render_chat_spans(TOOL_CONVERSATIONS["thinking_tool_call"], tools=TOOLS)
    first = text[spans[0][0] : spans[0][1]]
    assert first.startswith("need weather\n</think>\n\nChecking.<tool_call>\n<function=get_weather>\n")
    assert first.endswith("</function>\n</tool_call><|im_end|>") and len(spans) == 1


def test_tool_call_arguments_as_json_string(hf_tok):
    """OpenAI clients send arguments as a JSON string: render_chat parses it; the Jinja template wants a mapping."""
    as_string = json.loads(json.dumps(TOOL_CONVERSATIONS["tool_round"]))
    for message in as_string:
        for c in message.get("tool_calls") or ():
            c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
    assert render_chat(as_string, tools=TOOLS) == render_chat(TOOL_CONVERSATIONS["tool_round"], tools=TOOLS)
    with pytest.raises(Exception, match="mapping"):
        hf_tok.apply_chat_template(as_string, tools=TOOLS, tokenize=False)
    bad = [USER, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]
    with pytest.raises(TypeError, match="JSON object"):
        render_chat(bad)


@pytest.mark.parametrize("name", sorted(TOOL_CONVERSATIONS))
@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_hf_chat_template_matches_with_tools(tok, hf_tok, name, enable_thinking, add_generation_prompt):
    """With tools, tool calls and tool replies, apply_chat_template still gives our text and ids."""
    messages = TOOL_CONVERSATIONS[name]
    kw = dict(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    ours = render_chat(messages, tools=TOOLS, **kw)
    assert hf_tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, **kw) == ours
    ids = hf_tok.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=False, **kw)
    assert ids == tok.encode_chat(messages, tools=TOOLS, **kw) == tok.encode(ours)


@pytest.mark.parametrize("name", ["tool_round", "thinking_tool_call"])
def test_hf_assistant_mask_matches_with_tools(tok, hf_tok, name):
    """The training mask over tool calls equals transformers' return_assistant_tokens_mask."""
    messages = TOOL_CONVERSATIONS[name]
    out = hf_tok.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_assistant_tokens_mask=True)
    ids, mask = tok.encode_chat_with_mask(messages, add_generation_prompt=False, tools=TOOLS)
    assert out["input_ids"] == ids and out["assistant_masks"] == mask
    assert sum(mask) > 0


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_shipped_model_template_with_tools(enable_thinking):
    """The shipped model's saved template is CHAT_TEMPLATE and gives mimo's ids for tool conversations."""
    from transformers import AutoTokenizer

    config = json.loads(open("models/mimo-tiny/tokenizer_config.json", encoding="utf-8").read())
    assert config["chat_template"] == CHAT_TEMPLATE
    hf = AutoTokenizer.from_pretrained("models/mimo-tiny")
    ours = Tokenizer.from_pretrained("models/mimo-tiny")
    kw = dict(add_generation_prompt=True, enable_thinking=enable_thinking)
    for messages in [*TOOL_CONVERSATIONS.values(), *CONVERSATIONS.values()]:
        assert hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, **kw) == render_chat(
            messages, tools=TOOLS, **kw
        )
        ids = hf.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=False, **kw)
        assert ids == ours.encode_chat(messages, tools=TOOLS, **kw)
