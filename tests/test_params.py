"""count_parameters: the published 309B / 15B numbers, and agreement with real models' numel."""

from __future__ import annotations

import pytest
import torch

from mimo.model import ModelConfig, Transformer
from mimo.model.params import count_parameters, format_count


def test_mimo_v2_flash_headline_numbers():
    c = count_parameters(ModelConfig.from_preset("mimo-v2-flash"))
    # spec §3: ~308.8B total without MTP ("309B"); 14.8B active, +0.6B with the embedding ("15B")
    assert 308.5e9 < c["total_no_mtp"] < 309.1e9
    assert 14.7e9 < c["active_no_mtp_no_embedding"] < 14.9e9
    assert 15.3e9 < c["active_no_mtp"] < 15.5e9
    assert c["embedding"] == c["lm_head"] == 152576 * 4096  # 625M each
    # one MTP block: eh_proj 33.6M + SWA attention 94.4M + dense FFN 201.3M = 329M ("0.33B")
    assert 329.2e6 < c["mtp_per_layer"] < 329.4e6
    assert c["n_mtp_layers"] == 3 and c["total"] == c["total_no_mtp"] + 3 * c["mtp_per_layer"]
    assert c["active"] == c["active_no_mtp"] + c["mtp"]
    assert c["expert"] == 3 * 4096 * 2048
    assert format_count(c["total_no_mtp"]) == "308.78B"


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


@pytest.mark.parametrize("overrides", [
    {},  # preset "test": 3 MTP blocks, untied, sinks on sliding layers only
    {"tie_word_embeddings": True, "n_mtp_layers": 0},
    {"full_attention_sink": True, "swa_attention_sink": False, "n_mtp_layers": 1},
    {"mlp_types": ("dense",) * 6, "n_mtp_layers": 2},
    {"n_layers": 3, "layer_types": ("sliding",) * 3, "mlp_types": ("moe",) * 3, "n_experts": 16,
     "n_active_experts": 5, "head_dim": 30, "swa_head_dim": 30, "v_head_dim": 40, "swa_v_head_dim": 12},
])
def test_counts_equal_numel_of_a_real_model(overrides):
    cfg = ModelConfig.from_preset("test").replace(**overrides)
    model = _meta_model(cfg)
    c = count_parameters(cfg)
    named = dict(model.named_parameters())  # tied weights once
    numel = lambda pred: sum(p.numel() for n, p in named.items() if pred(n))  # noqa: E731
    is_mtp = lambda n: n.startswith("model.mtp.")  # noqa: E731
    is_emb = lambda n: n == "model.embed_tokens.weight"  # noqa: E731
    assert c["total"] == numel(lambda n: True)
    assert c["total_no_mtp"] == numel(lambda n: not is_mtp(n))
    assert c["total_no_embedding"] == numel(lambda n: not is_emb(n))
    assert c["total_no_mtp_no_embedding"] == numel(lambda n: not is_mtp(n) and not is_emb(n))
    assert c["mtp"] == numel(is_mtp) and c["mtp_per_layer"] * cfg.n_mtp_layers == c["mtp"]
    assert c["router_bias"] == sum(b.numel() for n, b in model.named_buffers()
                                   if n.endswith("e_score_correction_bias"))
    # active: every routed expert tensor counts K/E of its experts; everything else counts fully
    experts = numel(lambda n: ".mlp.experts." in n)
    assert c["moe_experts"] == experts
    E, K = cfg.n_experts, cfg.n_active_experts
    assert c["active"] * E == (c["total"] - experts) * E + experts * K
    assert c["active_no_mtp_no_embedding"] == c["active"] - c["mtp"] - c["embedding"]
