"""The inference engine: paged hybrid KV cache, continuous batching, MTP speculative decoding.

Token ids in, token ids out; it knows no HTTP and no chat templates (text only through an optional tokenizer).
The names below load lazily, so the torch-free parts (config, sequence, block manager, scheduler, planner) import
without torch.
"""

from mimo._lazy import lazy_exports

_EXPORTS = {
    "LLM": "mimo.engine.llm",
    "EngineConfig": "mimo.engine.config",
    "RequestOutput": "mimo.engine.llm",
    "SamplingParams": "mimo.engine.config",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
