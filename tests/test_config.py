"""ModelConfig: the three config.json spellings, presets, window semantics, validation errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mimo.model.config import PRESETS, ConfigError, ModelConfig, default_layer_types

HUB = {  # hub (legacy) spelling only, as the official config.json (spec §2.1), 6 layers
    "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
    "num_key_value_heads": 1, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "head_dim": 24,
    "v_head_dim": 16, "swa_head_dim": 24, "swa_v_head_dim": 8, "rope_theta": 5e6, "swa_rope_theta": 1e4,
    "partial_rotary_factor": 0.334, "sliding_window": 128, "sliding_window_size": 128,
    "hybrid_layer_pattern": [1, 0, 1, 1, 0, 1], "moe_layer_freq": [0, 1, 1, 0, 1, 1],
    "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False,
    "attention_value_scale": 0.707, "layernorm_epsilon": 1e-6, "intermediate_size": 128,
    "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": None,
    "n_group": 2, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": None,
    "eos_token_id": [7, 8],
}


def test_hub_spelling():
    c = ModelConfig.from_json_dict(HUB)
    assert c.layer_types == ("sliding", "full", "sliding", "sliding", "full", "sliding")
    assert c.mlp_types == ("dense", "moe", "moe", "dense", "moe", "moe")
    assert (c.swa_n_kv_heads, c.swa_v_head_dim, c.n_kv_heads) == (4, 8, 1)  # not transformers' 2x rule
    assert c.rms_norm_eps == 1e-6 and c.routed_scaling_factor == 1.0  # hub null -> 1.0
    assert c.swa_attention_sink and not c.full_attention_sink
    assert (c.n_group, c.topk_group, c.eos_token_id) == (2, 1, 7)


def test_native_spelling_and_swa_kv_rule():
    native = {
        "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 12, "v_head_dim": 8, "sliding_window": 5,
        "layer_types": ["full_attention", "sliding_attention", "full_attention"],
        "mlp_layer_types": ["sparse", "dense", "sparse"], "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 300.0, "partial_rotary_factor": 0.5}},
    }
    c = ModelConfig.from_json_dict(native)
    assert c.layer_types == ("full", "sliding", "full") and c.mlp_types == ("moe", "dense", "moe")
    assert (c.rope_theta, c.swa_rope_theta, c.partial_rotary_factor) == (1e6, 300.0, 0.5)
    assert c.swa_n_kv_heads == 4 and c.swa_n_heads == 4  # transformers' rule when no swa_* keys
    assert (c.swa_head_dim, c.swa_v_head_dim) == (12, 8)


def test_own_spelling_and_round_trip(tmp_path):
    c = ModelConfig.from_preset("tiny").replace(n_layers=12, layer_types=("sliding",) * 11 + ("full",),
                                                 mlp_types=(), n_mtp_layers=2, sliding_window=17, eos_token_id=5)
    d = c.to_json_dict()
    assert ModelConfig.from_json_dict(d) == c
    # each spelling alone still describes the same model
    hub_only = {k: v for k, v in d.items() if k not in ("layer_types", "mlp_layer_types", "rope_parameters",
                                                        "rms_norm_eps")}
    native_only = {k: v for k, v in d.items() if k not in ("hybrid_layer_pattern", "moe_layer_freq",
                                                           "sliding_window_size", "layernorm_epsilon")}
    assert ModelConfig.from_json_dict(hub_only) == c == ModelConfig.from_json_dict(native_only)
    own = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "extra"}
    assert ModelConfig.from_json_dict(own) == c
    c.save(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path) == c


def test_presets():
    for name in PRESETS:
        assert ModelConfig.from_preset(name).n_layers == len(ModelConfig.from_preset(name).layer_types)
    f = ModelConfig.from_preset("mimo-v2-flash")
    assert [i for i, t in enumerate(f.layer_types) if t == "full"] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert f.mlp_types[0] == "dense" and set(f.mlp_types[1:]) == {"moe"}
    assert (f.n_kv_heads, f.swa_n_kv_heads, f.head_dim, f.v_head_dim) == (4, 8, 192, 128)
    assert f.rotary_dim("full") == f.rotary_dim("sliding") == 64
    assert (f.theta("full"), f.theta("sliding"), f.sliding_window) == (5e6, 1e4, 129)
    assert f.has_sink("sliding") and not f.has_sink("full")
    assert default_layer_types(12) == f.layer_types[:12]
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*mimo-v2-flash"):
        ModelConfig.from_preset("nope")


def test_window_semantics():
    # hub sliding_window_size counts previous tokens: +1 for the query itself; the legacy key is ignored
    assert ModelConfig.from_json_dict(HUB).sliding_window == 129
    # native / own `sliding_window` already includes the query
    no_size = {k: v for k, v in HUB.items() if k != "sliding_window_size"} | {"sliding_window": 129}
    assert ModelConfig.from_json_dict(no_size).sliding_window == 129
    d = ModelConfig.from_preset("test").replace(sliding_window=129).to_json_dict()
    assert (d["sliding_window"], d["sliding_window_size"]) == (129, 128)
    # transformers 5.24 reads the written file the same way
    transformers = pytest.importorskip("transformers")
    assert transformers.MiMoV2FlashConfig(**d).sliding_window == 129


BAD = {
    "layer_types length": (dict(layer_types=("full",) * 5), "layer_types.*one entry per layer"),
    "unknown layer type": (dict(layer_types=("full",) * 5 + ("local",)), "unknown attention type"),
    "unknown mlp type": (dict(mlp_types=("dense",) * 5 + ("sparse",)), "unknown FFN type"),
    "heads not divisible": (dict(n_kv_heads=3), "n_heads: must be divisible by n_kv_heads"),
    "swa heads not divisible": (dict(swa_n_kv_heads=3), "swa_n_heads: must be divisible"),
    "odd rotary dim": (dict(head_dim=16), "head_dim: rotary dim int.* = 5 must be even"),
    "rotary factor": (dict(partial_rotary_factor=1.5), "partial_rotary_factor: must be in"),
    "non-positive size": (dict(dim=0), "dim: must be a positive integer"),
    "top-k > experts": (dict(n_active_experts=9), "n_active_experts: top-k must be in"),
    "n_group must divide": (dict(n_group=3), "n_group: must divide n_experts"),
    "topk_group > n_group": (dict(n_group=2, topk_group=3), "topk_group: must be in"),
    "kept groups too small": (dict(n_group=4, topk_group=1, n_active_experts=3), "kept groups"),
    "negative mtp": (dict(n_mtp_layers=-1), "n_mtp_layers: must be >= 0"),
    "theta": (dict(swa_rope_theta=0.0), "swa_rope_theta: must be positive"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_validation_errors(kind):
    overrides, pattern = BAD[kind]
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_preset("test").replace(**overrides)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HUB | {"hybrid_layer_pattern": [1, 0]}))
    with pytest.raises(ConfigError, match="layer_types.*one entry per layer"):
        ModelConfig.from_pretrained(tmp_path)
