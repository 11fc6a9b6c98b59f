"""The inference engine: paged hybrid KV cache, continuous batching, MTP speculative decoding.

Token ids in, token ids out; it knows no HTTP and no chat templates (text only through an optional tokenizer).
"""

from mimo.engine.config import EngineConfig, SamplingParams
from mimo.engine.llm import LLM, RequestOutput

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]
