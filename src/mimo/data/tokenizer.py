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

# The Jinja twin of `render_chat_spans`. Whitespace lives only inside string literals so that the
# trim_blocks/lstrip_blocks settings of transformers cannot change it. `{% generation %}` marks the assistant
# span for `apply_chat_template(..., return_assistant_tokens_mask=True)` (TRL's `assistant_only_loss`).
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- if message.reasoning_content -%}"
    "{%- generation -%}"
    "{{- message.reasoning_content + '\\n</think>\\n\\n' + text(message.content) + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '\\n</think>\\n\\n' -}}"
    "{%- generation -%}{{- text(message.content) + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
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


def _content_text(content: Any) -> str:
    """Message content as text: a string, None, or a list of OpenAI-style parts of which only text is kept."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p["text"] for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def render_chat_spans(
    messages: Sequence[Message], add_generation_prompt: bool | None = None, enable_thinking: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return (text, spans): spans are [start, end) character ranges of the assistant
    parts the model is trained to produce (see the module docstring).

    `add_generation_prompt=None` means: add it unless the last message is from the assistant, so
    `render_chat(prompt_messages)` is an inference prompt and `render_chat(prompt_messages + [answer])` a
    training example. An explicit True/False is obeyed as in `apply_chat_template`.

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

    for m in messages:
        role, content = m["role"], _content_text(m.get("content"))
        if role == "assistant":
            emit(f"{IM_START}assistant\n{THINK}\n")
            reasoning = m.get("reasoning_content")
            if reasoning:
                emit(f"{reasoning}\n{THINK_END}\n\n{content}{IM_END}", trained=True)
            else:
                emit(f"\n{THINK_END}\n\n")
                emit(f"{content}{IM_END}", trained=True)
            emit("\n")
        else:
            emit(f"{IM_START}{role}\n{content}{IM_END}\n")
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1]["role"] != "assistant"
    if add_generation_prompt:
        emit(f"{IM_START}assistant\n" + (THINK_ON_PREFIX if enable_thinking else THINK_OFF_PREFIX))
    return "".join(parts), spans


def render_chat(
    messages: Sequence[Message], add_generation_prompt: bool | None = None, enable_thinking: bool = False
) -> str:
    """The chat text for `messages`; see `render_chat_spans` for the arguments."""
    return render_chat_spans(messages, add_generation_prompt, enable_thinking)[0]


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
        messages: Sequence[Message], add_generation_prompt: bool | None = None, enable_thinking: bool = False
    ) -> str:
        return render_chat(messages, add_generation_prompt, enable_thinking)

    def encode_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool | None = None,
        enable_thinking: bool = False,
    ) -> list[int]:
        """Ids of `render_chat(...)`; identical to `AutoTokenizer.apply_chat_template(..., tokenize=True)`."""
        return self.encode(render_chat(messages, add_generation_prompt, enable_thinking))

    def encode_chat_with_mask(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool | None = None,
        enable_thinking: bool = False,
    ) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] = 1 when token i overlaps an assistant span of `render_chat_spans`.

        The whole conversation is tokenised in one piece, so the ids equal `encode_chat` (no seams where a
        segment-wise encoding could differ), and the overlap rule equals transformers'
        `return_assistant_tokens_mask`.
        """
        text, spans = render_chat_spans(messages, add_generation_prompt, enable_thinking)
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
