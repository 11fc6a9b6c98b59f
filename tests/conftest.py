import pytest
import torch

from mimo.model import ModelConfig, Transformer, init_weights

# tiny models are dispatch-bound: one thread avoids oversubscription on small shared machines
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    # on a shared 2-core machine, 2 OpenMP threads per process can be 10-100x slower than 1 (spin-waiting);
    # restored after each test, since commands under test (--threads) set their own
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_extras(model: Transformer, seed: int = 0) -> Transformer:
    """Give sinks and router biases non-zero values so tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if getattr(mod, "attention_sink_bias", None) is not None:
                mod.attention_sink_bias.copy_(torch.randn(mod.attention_sink_bias.shape, generator=g))
            if hasattr(mod, "e_score_correction_bias"):
                bias = mod.e_score_correction_bias
                bias.copy_(0.1 * torch.randn(bias.shape, generator=g))
    return model


def make_model(preset: str = "test", seed: int = 0, **overrides) -> Transformer:
    cfg = ModelConfig.from_preset(preset).replace(**overrides)
    model = Transformer(cfg)
    init_weights(model, seed=seed, std=0.1)
    return randomize_extras(model, seed).eval()


@pytest.fixture
def tiny_model() -> Transformer:
    return make_model()
