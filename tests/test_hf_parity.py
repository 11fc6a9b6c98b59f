"""Conformance with transformers 5.24 `MiMoV2FlashForCausalLM` (float32, eager attention), both directions.

Each case respects transformers' hard-coded layout rules (sliding layers have 2x the KV heads of full layers,
the same query heads and one head_dim for both types) and differs from the others in window, explicit layer
pattern, head counts/dims, experts, top-k, grouped routing and dense/MoE pattern. Sequences are longer than
the window, so the sliding mask and the sinks matter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

# transformers is a dev dependency: without it this file must fail (make test), not skip silently
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

from mimo.checkpoint import fp8, load_model, save_model
from mimo.checkpoint.hf_adapter import to_checkpoint
from mimo.model import ModelConfig, Transformer, init_weights
from tests.conftest import randomize_extras

ATOL = 1e-4
T = 16  # > every window below

CASES = {
    # explicit pattern with a second full layer, 1 KV head in full layers, v dim < qk dim
    "window5_full_swa_swa_full": dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=18, v_head_dim=8, sliding_window=5,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], intermediate_size=64,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2),
    # sliding first, a dense layer in the middle, grouped routing (4 groups of 2, keep 2), other thetas
    "window7_grouped_routing": dict(
        vocab_size=200, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
        head_dim=24, v_head_dim=16, sliding_window=7,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["sparse", "dense", "sparse"], intermediate_size=80, moe_intermediate_size=24,
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0,
                                  "partial_rotary_factor": 0.5}}),
    # default pattern, qk dim == v dim, top-1, unnormalised weights with a routed scaling factor
    "window3_top1_unnormalised": dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, v_head_dim=32, sliding_window=3, intermediate_size=96, moe_intermediate_size=16,
        n_routed_experts=6, num_experts_per_tok=1, norm_topk_prob=False, routed_scaling_factor=2.5),
    # sliding only, v dim > qk dim, all MoE, 16 experts in 4 groups keep 1, tied embedding
    "window2_all_sliding_tied": dict(
        vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=12, v_head_dim=20, sliding_window=2,
        layer_types=["sliding_attention", "sliding_attention"], mlp_layer_types=["sparse", "sparse"],
        intermediate_size=48, moe_intermediate_size=8, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=1, tie_word_embeddings=True),
}


def hf_config(case: dict) -> MiMoV2FlashConfig:
    return MiMoV2FlashConfig(**case, max_position_embeddings=256, attn_implementation="eager")


@torch.no_grad()
def randomize_hf(model: torch.nn.Module, seed: int) -> None:
    """transformers zero-initialises the router bias and draws sinks with std 0.02; make everything matter."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t, s: torch.randn(t.shape, generator=g) * s  # noqa: E731
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + rnd(p, 0.1))
        elif name.endswith("sinks"):
            p.copy_(rnd(p, 1.0))
        elif name.endswith("mlp.gate.weight"):
            p.copy_(rnd(p, 0.3))
        else:
            p.copy_(rnd(p, 0.1))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(rnd(b, 0.3))


def random_mimo(cfg: ModelConfig, seed: int) -> Transformer:
    model = Transformer(cfg)
    init_weights(model, std=0.1, seed=seed)
    randomize_extras(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape))
            if name.endswith("mlp.gate.weight"):
                p.mul_(3.0)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_mimo(case, tmp_path):
    torch.manual_seed(1)
    hf = MiMoV2FlashForCausalLM(hf_config(CASES[case]))
    randomize_hf(hf, seed=len(case))
    hf.eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.n_mtp == 0  # transformers writes no MTP blocks
    ids = torch.randint(0, hf.config.vocab_size, (2, T))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    d = max_diff(ref, out)
    print(f"hf->mimo {case}: max |logit diff| = {d:.2e}")
    assert d < ATOL
    # the comparison is sharp enough to see a window that is off by one key
    for layer in model.model.layers:
        if layer.self_attn.window is not None:
            layer.self_attn.window += 1
    with torch.no_grad():
        assert max_diff(ref, model(ids)) > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_mimo_to_hf(case, tmp_path):
    torch.manual_seed(2)
    cfg = ModelConfig.from_json_dict(hf_config(CASES[case]).to_dict())
    model = random_mimo(cfg, seed=len(case))
    save_model(model, tmp_path)
    hf = MiMoV2FlashForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.layer_types == [{"full": "full_attention", "sliding": "sliding_attention"}[t]
                                     for t in cfg.layer_types]
    assert hf.config.sliding_window == cfg.sliding_window
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    d = max_diff(ref, out)
    print(f"mimo->hf {case}: max |logit diff| = {d:.2e}")
    assert d < ATOL


def test_native_state_dict_names_load(tmp_path):
    """transformers' in-memory names (fused gate_up_proj [E, 2I, D], sinks) load directly."""
    case = CASES["window5_full_swa_swa_full"]
    hf = MiMoV2FlashForCausalLM(hf_config(case))
    randomize_hf(hf, seed=7)
    hf.eval()
    sd = hf.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in sd) and any(k.endswith(".sinks") for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    hf.config.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, case["vocab_size"], (2, T))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids)) < ATOL


# ---- hub-spelled config + FP8 block-quantised weights -----------------------------------------------------

HUB_CONFIG = {
    "architectures": ["MiMoV2FlashForCausalLM"],
    "model_type": "mimo_v2_flash",
    "vocab_size": 192,
    "hidden_size": 160,  # two column blocks: 128 + a partial 32
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GA k_proj rows = 2 heads x 192 = 384: per-head grid 2 x 2 = 4 row blocks
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 4,
    "head_dim": 192,
    "v_head_dim": 64,
    "swa_head_dim": 192,
    "swa_v_head_dim": 64,
    "partial_rotary_factor": 0.334,
    "rope_theta": 5000000.0,
    "swa_rope_theta": 10000.0,
    "sliding_window": 4,  # legacy key, not used when sliding_window_size is present
    "sliding_window_size": 4,  # -> sliding_window 5
    "hybrid_layer_pattern": [0, 1, 1],
    "moe_layer_freq": [0, 1, 1],
    "add_swa_attention_sink_bias": True,
    "add_full_attention_sink_bias": False,
    "attention_value_scale": 0.707,
    "layernorm_epsilon": 1e-5,
    "intermediate_size": 96,
    "moe_intermediate_size": 48,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": None,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": None,
    "tie_word_embeddings": False,
    "max_position_embeddings": 1024,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}

_QUANTISED = (".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
              ".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight", "_proj.weight")


def _quantised(name: str) -> bool:
    return name.endswith(_QUANTISED) and not name.endswith((".o_proj.weight", ".eh_proj.weight"))


def _reference_dequant(w8: torch.Tensor, s: torch.Tensor, seg_rows: int) -> torch.Tensor:
    """Plain loop: rows restart their 128-row tiling every `seg_rows` rows."""
    out = torch.empty(w8.shape)
    per_seg = math.ceil(seg_rows / 128)
    for r in range(w8.shape[0]):
        br = (r // seg_rows) * per_seg + (r % seg_rows) // 128
        for c0 in range(0, w8.shape[1], 128):
            out[r, c0:c0 + 128] = w8[r, c0:c0 + 128].float() * s[br, c0 // 128]
    return out


def test_hub_config_fp8_checkpoint_matches_dequantised_weights(tmp_path):
    cfg = ModelConfig.from_json_dict(HUB_CONFIG)
    assert cfg.sliding_window == 5 and cfg.routed_scaling_factor == 1.0
    assert cfg.layer_types == ("full", "sliding", "sliding") and cfg.mlp_types == ("dense", "moe", "moe")
    model = random_mimo(cfg.replace(n_mtp_layers=1), seed=3)
    fp8_dir, float_dir, ref_dir = tmp_path / "fp8", tmp_path / "float", tmp_path / "ref"
    for d in (fp8_dir, float_dir):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(HUB_CONFIG))

    q_tensors: dict[str, torch.Tensor] = {}
    f_tensors: dict[str, torch.Tensor] = {}
    per_head_seen = False
    for name, t in model.state_dict().items():
        for ck, piece in to_checkpoint(name, t):
            piece = piece.contiguous().clone()
            if not _quantised(ck):
                q_tensors[ck] = f_tensors[ck] = piece
                continue
            ga_k = ck == "model.layers.0.self_attn.k_proj.weight"
            n_seg = cfg.n_kv_heads if ga_k else None
            w8, s = fp8.quantize(piece, n_seg)
            if ga_k:
                assert list(s.shape) == [4, 2]  # per-KV-head grid: not ceil(384 / 128) = 3
                per_head_seen = True
                # a uniform reading of the 4-row grid (96-row blocks, as transformers' Fp8Dequantize does)
                # would scale rows differently: the test can tell the layouts apart
                uniform96 = w8.float() * s.repeat_interleave(96, 0).repeat_interleave(128, 1)[:, :160]
                assert not torch.allclose(uniform96, _reference_dequant(w8, s, 192))
            q_tensors[ck], q_tensors[ck + "_scale_inv"] = w8, s
            f_tensors[ck] = _reference_dequant(w8, s, 192 if ga_k else piece.shape[0])
            assert (f_tensors[ck] - piece).abs().max() <= piece.abs().max() / 8  # e4m3: 3 mantissa bits
    assert per_head_seen
    save_file(q_tensors, fp8_dir / "model.safetensors")
    save_file(f_tensors, float_dir / "model.safetensors")

    m8 = load_model(fp8_dir, dtype=torch.float32)
    mf = load_model(float_dir, dtype=torch.float32)
    assert m8.n_mtp == 1
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        a, (a_mtp,) = m8(ids, return_mtp=True)
        b, (b_mtp,) = mf(ids, return_mtp=True)
    d = max_diff(a, b)
    print(f"fp8 vs dequantised float: max |logit diff| = {d:.2e}, mtp {max_diff(a_mtp, b_mtp):.2e}")
    assert d < 1e-5 and max_diff(a_mtp, b_mtp) < 1e-5
    # the hub config asks for bfloat16: without `dtype` FP8 weights dequantise to it, the router stays fp32
    mb = load_model(fp8_dir)
    assert mb.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    assert mb.model.layers[1].mlp.gate.weight.dtype == torch.float32

    # and transformers agrees on the dequantised weights (same layout: full first, 2x KV heads in SWA)
    save_model(mf, ref_dir)
    hf = MiMoV2FlashForCausalLM.from_pretrained(ref_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        d_hf = max_diff(hf(ids).logits, a)
    print(f"fp8 (mimo) vs transformers on dequantised weights: {d_hf:.2e}")
    assert d_hf < ATOL
