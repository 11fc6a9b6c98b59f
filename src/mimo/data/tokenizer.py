"""Byte-level BPE tokenizer and the ChatML chat format used by every part of `mimo`.

Notable features:
- trained with the `tokenizers` library (Qwen2-style pre-tokenizer: digits are split one by one, which helps
  the arithmetic task; no normaliser, so encode/decode round-trips any unicode text exactly);
- saved as `tokenizer.json` + `tokenizer_config.json` (+ `special_tokens_map.json`) with a Jinja
  `chat_template`, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it with or without a
  `config.json`;
- one Python renderer (`render_chat`) and one Jinja template (`CHAT_TEMPLATE`); tests check they agree, ids
  and assistant masks included;
- `StreamDecoder` for streaming: bytes of each id go through an incremental UTF-8 decoder, so a multi-byte
  character split over several tokens is emitted only once it is complete.

Special tokens (ids are fixed by training order):

| id | token | role |
|---|---|---|
| 0 | `<|endoftext|>` | document separator in pretraining; padding (`eot_id`, `pad_id`) |
| 1 | `<|im_start|>` | start of a chat message |
| 2 | `<|im_end|>` | end of a chat message; the stop token for chat (`eos_id`) |
| 3 | `<think>` | opens the reasoning block |
| 4 | `</think>` | closes the reasoning block |

`<think>` and `</think>` are atomic added tokens but *not* special (as in Qwen3): `decode(...,
skip_special_tokens=True)` keeps them, so a reasoning parser downstream can still split the text.

Chat format (ChatML with a think block on every assistant turn; thinking is off by default, as in
MiMo-V2-Flash):

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{prompt}<|im_end|>\n
    <|im_start|>assistant\n<think>\n\n</think>\n\n{answer}<|im_end|>\n          (no reasoning_content)
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n  (with reasoning_content)

Generation prompt: `<|im_start|>assistant\n<think>\n\n</think>\n\n` (thinking off) or
`<|im_start|>assistant\n<think>\n` (`enable_thinking=True`). A training example therefore starts with exactly
the prompt used at inference. The assistant span (what the model is trained to produce, see
`render_chat_spans`) is everything the model generates after that prompt: `{answer}<|im_end|>`, or
`{reasoning}\n</think>\n\n{answer}<|im_end|>` when reasoning is given. The role header, the empty think
block and the newline after `<|im_end|>` belong to the prompt.

Tools (MiMo's format: Qwen3-style tool list, Qwen3-Coder-style XML calls; nothing of it appears unless `tools`,
`tool_calls` or a `tool` message is given):

    <|im_start|>system\n{system}\n\n# Tools\n\n...<tools>\n{tool 1 as JSON}\n{tool 2 as JSON}\n</tools>\n\n
        {format instructions}<|im_end|>\n              (`{system}\n\n` only if messages[0] is a system message)
    <|im_start|>assistant\n<think>\n\n</think>\n\n{answer}<tool_call>\n<function={name}>\n
        <parameter={key}>{value}</parameter>\n</function>\n</tool_call><|im_end|>\n      (one block per call)
    <|im_start|>tool\n<tool_response>\n{result 1}\n</tool_response>\n<tool_response>\n{result 2}\n
        </tool_response>\n<|im_end|>\n                           (consecutive tool messages share one turn)

A parameter value is written verbatim when it is a string and as JSON otherwise (`3`, `true`, `null`,
`{"a": 1}`). Tool calls belong to the assistant span. `mimo.serve.parsers` parses this back out of generated
text.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

EOT, IM_START, IM_END, THINK, THINK_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END, THINK, THINK_END)
# Added tokens that decode(skip_special_tokens=True) keeps.
NON_SPECIAL_ADDED = (THINK, THINK_END)

# Qwen2's split rule: contractions, letter runs with one leading non-letter, single digits, punctuation runs,
# newline runs, other whitespace. Single digits keep "382" as three tokens for every number.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

THINK_OFF_PREFIX = "<think>\n\n</think>\n\n"
THINK_ON_PREFIX = "<think>\n"

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
# The tools section of the system prompt: Qwen3's list (one JSON schema per line inside <tools>) followed by the
# format instructions of MiMo's published templates, so a MiMo checkpoint reads the wording it was tuned on.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\n"
    "For each function call, output the function name and arguments in the following format:\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>value_1</parameter>\n"
    "<parameter=example_parameter_2>This is the value for the second parameter\nthat can span\nmultiple lines"
    "</parameter>\n</function>\n</tool_call>\n\n"
    "<IMPORTANT>\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    "within <tool_call></tool_call> XML tags\n"
    "- DO NOT use function calls inside <think></think> tags.\n"
    "- The value enclosed between parameter tags is preserved exactly as-is, including newlines and spaces.\n"
    "</IMPORTANT>"
)


def _jinja_literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal, so the template and `render_chat` share one copy."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The Jinja twin of `render_chat_spans`. Whitespace lives only inside string literals so that the
# trim_blocks/lstrip_blocks settings of transformers cannot change it. `{% generation %}` marks the assistant
# span for `apply_chat_template(..., return_assistant_tokens_mask=True)` (TRL's `assistant_only_loss`).
# Jinja cannot parse JSON, so unlike `render_chat` it takes tool-call arguments only as mappings (as transformers
# documents); `raise_exception` is a global that transformers provides.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro tool_calls(calls) -%}"
    "{%- if calls -%}{%- for call in calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- set args = fn.arguments if fn.arguments is defined else {} -%}"
    "{%- if args is not mapping -%}"
    "{{- raise_exception('tool call arguments must be a mapping (parse the JSON string first)') -}}"
    "{%- endif -%}"
    "{{- '<tool_call>\\n<function=' + fn.name + '>\\n' -}}"
    "{%- for key, value in args | items -%}"
    "{{- '<parameter=' + key + '>' + (value if value is string else value | tojson) + '</parameter>\\n' -}}"
    "{%- endfor -%}"
    "{{- '</function>\\n</tool_call>' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- text(messages[0].content) + '\\n\\n' -}}{%- endif -%}"
    "{{- " + _jinja_literal(TOOLS_PREAMBLE) + " -}}"
    "{%- for tool in tools -%}{{- '\\n' + tool | tojson -}}{%- endfor -%}"
    "{{- " + _jinja_literal(TOOLS_INSTRUCTIONS + IM_END + "\n") + " -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message.role == 'system' -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- if message.reasoning_content -%}"
    "{%- generation -%}"
    "{{- message.reasoning_content + '\\n</think>\\n\\n' + text(message.content) + tool_calls(message.tool_calls)"
    " + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '\\n</think>\\n\\n' -}}"
    "{%- generation -%}"
    "{{- text(message.content) + tool_calls(message.tool_calls) + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>tool\\n' -}}{%- endif -%}"
    "{{- '<tool_response>\\n' + text(message.content) + '\\n</tool_response>\\n' -}}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + text(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- if not (enable_thinking is defined and enable_thinking) -%}{{- '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

Message = Mapping[str, Any]
Tool = Mapping[str, Any]


def _content_text(content: Any) -> str:
    """Message content as text: a string, None, or a list of OpenAI-style parts of which only text is kept."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p["text"] for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def _tool_call_text(call: Mapping[str, Any]) -> str:
    """One OpenAI-shaped tool call (`{"function": {"name", "arguments"}}`, or the inner dict alone) in MiMo's
    format. `arguments` may be a JSON string, as OpenAI clients send it, or a mapping."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(args, Mapping):
        raise TypeError(f"tool call arguments must be a JSON object, got {type(args).__name__}")
    params = "".join(
        f"<parameter={key}>{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
        "</parameter>\n"
        for key, value in args.items()
    )
    return f"{TOOL_CALL_START}\n<function={fn['name']}>\n{params}</function>\n{TOOL_CALL_END}"


def render_chat_spans(
    messages: Sequence[Message],
    add_generation_prompt: bool | None = None,
    enable_thinking: bool = False,
    tools: Sequence[Tool] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return (text, spans): spans are [start, end) character ranges of the assistant
    parts the model is trained to produce (see the module docstring).

    `add_generation_prompt=None` means: add it unless the last message is from the assistant, so
    `render_chat(prompt_messages)` is an inference prompt and `render_chat(prompt_messages + [answer])` a
    training example. An explicit True/False is obeyed as in `apply_chat_template`.

    `tools` (OpenAI format, `{"type": "function", "function": {"name", "description", "parameters"}}`) adds the
    tools section to the system prompt (merged into `messages[0]` when that is a system message). Assistant
    messages may carry OpenAI `tool_calls`; `tool` messages render as `<tool_response>` blocks, `tool_call_id`
    is not rendered (MiMo's template does not render it either).

    Example: [{"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "3"}] renders as
    "<|im_start|>user\\nadd 1 2<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n3<|im_end|>\\n"
    with one span covering "3<|im_end|>" (characters 76..87).
    """
    if not messages:
        raise ValueError("cannot render an empty conversation")
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def emit(s: str, trained: bool = False) -> None:
        nonlocal pos
        if trained:
            spans.append((pos, pos + len(s)))
        parts.append(s)
        pos += len(s)

    rest = messages
    if tools:
        system = ""
        if messages[0]["role"] == "system":
            system = _content_text(messages[0].get("content")) + "\n\n"
            rest = messages[1:]
        listing = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        emit(f"{IM_START}system\n{system}{TOOLS_PREAMBLE}{listing}{TOOLS_INSTRUCTIONS}{IM_END}\n")
    for i, m in enumerate(rest):
        role, content = m["role"], _content_text(m.get("content"))
        if role == "assistant":
            emit(f"{IM_START}assistant\n{THINK}\n")
            reasoning = m.get("reasoning_content")
            calls = "".join(_tool_call_text(c) for c in m.get("tool_calls") or ())
            if reasoning:
                emit(f"{reasoning}\n{THINK_END}\n\n{content}{calls}{IM_END}", trained=True)
            else:
                emit(f"\n{THINK_END}\n\n")
                emit(f"{content}{calls}{IM_END}", trained=True)
            emit("\n")
        elif role == "tool":
            if i == 0 or rest[i - 1]["role"] != "tool":
                emit(f"{IM_START}tool\n")
            emit(f"{TOOL_RESPONSE_START}\n{content}\n{TOOL_RESPONSE_END}\n")
            if i == len(rest) - 1 or rest[i + 1]["role"] != "tool":
                emit(f"{IM_END}\n")
        else:
            emit(f"{IM_START}{role}\n{content}{IM_END}\n")
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1]["role"] != "assistant"
    if add_generation_prompt:
        emit(f"{IM_START}assistant\n" + (THINK_ON_PREFIX if enable_thinking else THINK_OFF_PREFIX))
    return "".join(parts), spans


def render_chat(
    messages: Sequence[Message],
    add_generation_prompt: bool | None = None,
    enable_thinking: bool = False,
    tools: Sequence[Tool] | None = None,
) -> str:
    """The chat text for `messages`; see `render_chat_spans` for the arguments."""
    return render_chat_spans(messages, add_generation_prompt, enable_thinking, tools)[0]


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE: printable Latin-1 bytes stand for themselves,
    the other 68 bytes are moved to code points 256.. in byte order (so no token string holds a space or a
    control character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """A trained byte-level BPE tokenizer plus the chat format. Wraps a `tokenizers.Tokenizer`."""

    def __init__(self, backend: _Backend):
        self.backend = backend
        ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.eot_id: int = ids[EOT]
        self.pad_id: int = ids[EOT]
        self.im_start_id: int = ids[IM_START]
        self.eos_id: int = ids[IM_END]
        self.think_id: int = ids[THINK]
        self.think_end_id: int = ids[THINK_END]
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        # id -> the exact bytes it stands for; used by StreamDecoder.
        self._id_bytes: list[bytes] = []
        for i in range(self.vocab_size):
            if i in added:
                self._id_bytes.append(added[i].content.encode("utf-8"))
            else:
                self._id_bytes.append(bytes(_CHAR_TO_BYTE[c] for c in backend.id_to_token(i)))

    # ---- construction and persistence ---------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Train on an iterator of strings. The result may have fewer than `vocab_size` entries when the
        corpus runs out of pairs seen `min_frequency` times; `vocab_size` is an upper bound."""
        n_base = 256 + len(SPECIAL_TOKENS)
        if vocab_size < n_base:
            raise ValueError(
                f"vocab_size must be at least {n_base} (bytes + special tokens), got {vocab_size}"
            )
        backend = _Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        # The trainer registers every special token as special; the think tokens must survive decoding.
        spec = json.loads(backend.to_str())
        for tok in spec["added_tokens"]:
            if tok["content"] in NON_SPECIAL_ADDED:
                tok["special"] = False
        return cls(_Backend.from_str(json.dumps(spec)))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding `tokenizer.json` (as written by `save`)."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        return cls(_Backend.from_file(str(file)))

    load = from_pretrained

    def save(self, path: str | Path, model_max_length: int | None = None) -> None:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        added = self.backend.get_added_tokens_decoder()
        special_map = {"eos_token": IM_END, "pad_token": EOT}
        config: dict[str, Any] = {
            # An alias of the generic TokenizersBackend in transformers 5, and the same class in 4.x.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "unk_token": None,
            **special_map,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "rstrip": t.rstrip,
                    "normalized": t.normalized,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(added.items())
            },
            "chat_template": CHAT_TEMPLATE,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    # ---- text <-> ids ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(idx)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special-token strings in `text` become their ids (as in transformers)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts; the Rust side runs them in parallel."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_bytes(self, idx: int) -> bytes:
        """The raw bytes token `idx` stands for (may be part of a multi-byte character)."""
        return self._id_bytes[idx]

    # ---- chat ------------------------------------------------------------------------------------------

    chat_template = CHAT_TEMPLATE

    @staticmethod
    def render_chat(
        messages: Sequence[Message],
        add_generation_prompt: bool | None = None,
        enable_thinking: bool = False,
        tools: Sequence[Tool] | None = None,
    ) -> str:
        return render_chat(messages, add_generation_prompt, enable_thinking, tools)

    def encode_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool | None = None,
        enable_thinking: bool = False,
        tools: Sequence[Tool] | None = None,
    ) -> list[int]:
        """Ids of `render_chat(...)`; identical to `AutoTokenizer.apply_chat_template(..., tokenize=True)`."""
        return self.encode(render_chat(messages, add_generation_prompt, enable_thinking, tools))

    def encode_chat_with_mask(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool | None = None,
        enable_thinking: bool = False,
        tools: Sequence[Tool] | None = None,
    ) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] = 1 when token i overlaps an assistant span of `render_chat_spans`.

        The whole conversation is tokenised in one piece, so the ids equal `encode_chat` (no seams where a
        segment-wise encoding could differ), and the overlap rule equals transformers'
        `return_assistant_tokens_mask`.
        """
        text, spans = render_chat_spans(messages, add_generation_prompt, enable_thinking, tools)
        enc = self.backend.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        k = 0
        for i, (start, end) in enumerate(enc.offsets):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k == len(spans):
                break
            if end > spans[k][0]:
                mask[i] = 1
        return enc.ids, mask

    # ---- streaming ---------------------------------------------------------------------------------------

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
        """Yield the new text after each id; pieces join to `decode(ids)`. Empty pieces are not yielded."""
        dec = StreamDecoder(self, skip_special_tokens)
        for i in ids:
            piece = dec.push(i)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail


class StreamDecoder:
    """Incremental detokeniser: `push(id)` returns the text completed by that id, holding back the bytes of a
    character that is not finished yet; `flush()` ends the stream (an unfinished character becomes U+FFFD,
    as in `decode`)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, idx: int) -> str:
        if idx in self._skip:
            return ""
        return self._utf8.decode(self._tok.id_bytes(idx))

    def feed(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
