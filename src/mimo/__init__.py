"""mimo: MiMo-V2-Flash end to end in PyTorch — model, checkpoints, training, and an inference engine with a
hybrid sliding/global KV cache and MTP speculative decoding."""

from mimo._lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "mimo.checkpoint.io",
    "LLM": "mimo.engine.llm",
    "ModelConfig": "mimo.model.config",
    "SamplingParams": "mimo.engine.config",
    "Transformer": "mimo.model.transformer",
    "count_parameters": "mimo.model.params",
    "load_model": "mimo.checkpoint.io",
    "save_model": "mimo.checkpoint.io",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
