"""The MiMo-V2-Flash model: plain single-device PyTorch (imports only torch)."""

from .attention import DenseKVCache
from .config import ConfigError, ModelConfig
from .init import init_weights
from .moe import Routing
from .transformer import Transformer, generate

__all__ = ["ConfigError", "DenseKVCache", "ModelConfig", "Routing", "Transformer", "generate", "init_weights"]
