"""mimo: MiMo-V2-Flash end to end in PyTorch — model, checkpoints, training, and an inference engine with a
hybrid sliding/global KV cache and MTP speculative decoding."""

from mimo.checkpoint import CheckpointError, load_model, save_model
from mimo.engine import LLM, SamplingParams
from mimo.model import ModelConfig, Transformer
from mimo.model.params import count_parameters

__all__ = [
    "CheckpointError", "LLM", "ModelConfig", "SamplingParams", "Transformer", "count_parameters", "load_model",
    "save_model",
]
