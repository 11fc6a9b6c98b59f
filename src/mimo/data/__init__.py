"""Data layer: tokenizer and chat format, pretraining corpus, batch loaders. Task generators live in
`mimo.tasks` (torch-free)."""

from mimo.data.corpus import (
    Corpus,
    CorpusInfo,
    Document,
    load_corpus,
    mixed_documents,
    stdlib_dir,
    task_documents,
)
from mimo.data.loader import IGNORE_INDEX, PackedStream, SFTLoader, sft_batches, tokenize_documents
from mimo.data.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    render_chat,
    render_chat_spans,
)

__all__ = [
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "Corpus",
    "CorpusInfo",
    "Document",
    "PackedStream",
    "SFTLoader",
    "StreamDecoder",
    "Tokenizer",
    "load_corpus",
    "mixed_documents",
    "render_chat",
    "render_chat_spans",
    "sft_batches",
    "stdlib_dir",
    "task_documents",
    "tokenize_documents",
]
