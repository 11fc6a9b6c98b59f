"""The MiMo-V2-Flash model: plain single-device PyTorch (imports only torch).

The names below load lazily, so `mimo.model.config` and `mimo.model.params` (torch-free) import without torch.
"""

from mimo._lazy import lazy_exports

_EXPORTS = {
    "ConfigError": "mimo.model.config",
    "DenseKVCache": "mimo.model.attention",
    "ModelConfig": "mimo.model.config",
    "Routing": "mimo.model.moe",
    "Transformer": "mimo.model.transformer",
    "generate": "mimo.model.transformer",
    "init_weights": "mimo.model.init",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
