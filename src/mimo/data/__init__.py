"""Data layer: tokenizer and chat format, pretraining corpus, batch loaders. Task generators live in
`mimo.tasks` (torch-free).

The names below load lazily, so the tokenizer and the corpus (torch-free) import without torch.
"""

from mimo._lazy import lazy_exports

_EXPORTS = {
    "CHAT_TEMPLATE": "mimo.data.tokenizer",
    "IGNORE_INDEX": "mimo.data.loader",
    "SPECIAL_TOKENS": "mimo.data.tokenizer",
    "Corpus": "mimo.data.corpus",
    "CorpusInfo": "mimo.data.corpus",
    "Document": "mimo.data.corpus",
    "PackedStream": "mimo.data.loader",
    "SFTLoader": "mimo.data.loader",
    "StreamDecoder": "mimo.data.tokenizer",
    "Tokenizer": "mimo.data.tokenizer",
    "load_corpus": "mimo.data.corpus",
    "mixed_documents": "mimo.data.corpus",
    "render_chat": "mimo.data.tokenizer",
    "render_chat_spans": "mimo.data.tokenizer",
    "sft_batches": "mimo.data.loader",
    "stdlib_dir": "mimo.data.corpus",
    "task_documents": "mimo.data.corpus",
    "tokenize_documents": "mimo.data.loader",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
