"""Op-saving forms used on the decode path: RoPE as a gather (equals the textbook rotate-half form; its cached
constants made under inference_mode still work in training), and the fused q/k/v weight kept under
inference_mode (follows in-place updates and replaced parameters) as a transposed copy."""

import pytest
import torch

from mimo.model.layers import apply_rope, rope_cos_sin
from tests.conftest import make_model


def _textbook(x, positions, rd, theta):
    inv = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    f = positions.float()[..., None] * inv
    cos, sin = torch.cat([f, f], -1).cos()[:, :, None], torch.cat([f, f], -1).sin()[:, :, None]
    xr, xp = x[..., :rd], x[..., rd:]
    rot = torch.cat([-xr[..., rd // 2:], xr[..., :rd // 2]], -1)
    return torch.cat([xr * cos + rot * sin, xp], -1)


@pytest.mark.parametrize("T", [5, 40])  # 2 x 5 rows: the gather form; 2 x 40: the sliced form
def test_rope_equals_rotate_half(T):
    torch.manual_seed(0)
    x = torch.randn(2, T, 3, 10)
    pos = torch.randint(0, 2000, (2, T))
    assert torch.allclose(apply_rope(x, rope_cos_sin(pos, 6, 10, 10000.0, torch.float32)),
                          _textbook(x, pos, 6, 10000.0), atol=1e-6)


def test_rope_tables_from_inference_mode_train_later():
    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.inference_mode():
        model(ids)
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_fused_qkv_weight_follows_marked_in_place_updates_and_replacement():
    """The engine's cached fused weights follow every way of changing a weight once the model is told
    (mark_weights_changed); a replaced Parameter object is noticed on its own."""
    model = make_model()
    attn = model.model.layers[0].self_attn
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.inference_mode():
        before = model(ids)
    changes = [lambda: attn.k_proj.weight.mul_(1.5),  # in place (an optimizer step)
               lambda: attn.k_proj.weight.data.copy_(attn.k_proj.weight * 0.7),  # no version bump
               lambda: setattr(attn.v_proj.weight, "data", attn.v_proj.weight.detach() * 1.3)]  # new storage
    for change in changes:
        with torch.no_grad():
            change()
        model.mark_weights_changed()
        with torch.inference_mode():
            after = model(ids)
        with torch.no_grad():
            expected = model(ids)  # no cache outside inference_mode
        # the cached path multiplies by a transposed copy (x @ W^T), the uncached one runs F.linear: equal up
        # to float rounding, while a stale weight moves the logits by far more
        assert (after - before).abs().max() > 1e-2 and torch.allclose(after, expected, atol=1e-5)
        before = after
    attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight.detach() * 0.5)  # replaced
    with torch.inference_mode():
        after2 = model(ids)
    with torch.no_grad():
        assert (after2 - before).abs().max() > 1e-2 and torch.allclose(after2, model(ids), atol=1e-5)


def test_linear_weights_cache_a_transposed_copy_only_under_inference_mode_on_cpu():
    from mimo.model.layers import LinearWeights

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(3, 4))
    lw = LinearWeights(torch.cat)
    x = torch.randn(2, 4)
    ref = torch.nn.functional.linear(x, torch.cat([a, b]))
    with torch.no_grad():
        assert torch.equal(lw.linear(x, a, b), ref) and lw._value is None  # F.linear, nothing kept
    with torch.inference_mode():
        y = lw.linear(x, a, b)
    kept = lw._value
    assert kept.shape == (4, 9) and kept.is_contiguous() and torch.allclose(y, ref, atol=1e-6)


def test_rmsnorm_small_batch_form_equals_written_out_form():
    from mimo.model.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(1, 3, 48) * 5
    with torch.no_grad():
        small = norm(x)  # layer_norm over [x, -x]
        norm.SMALL_ROWS = 0
        written = norm(x)
    assert torch.allclose(small, written, atol=1e-5, rtol=1e-5)
    assert not torch.equal(norm.weight, torch.ones(48))


def test_model_built_under_inference_mode_runs_there():
    with torch.inference_mode():
        model = make_model()  # its parameters are inference tensors (no version counter)
        ids = torch.randint(0, model.config.vocab_size, (1, 5))
        first = model(ids)
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)  # allowed in place here, and must be seen
        second = model(ids)
    assert not torch.equal(first, second)
