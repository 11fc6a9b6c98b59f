"""Checkpoint load/save: official names, shards, MTP, meta-device load, dtypes, FP8 grids, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mimo.checkpoint import CheckpointError, fp8, load_model, save_model
from mimo.checkpoint.io import parse_size
from mimo.model import ModelConfig, Transformer
from tests.conftest import make_model

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))  # 24 > window 9


def keys_of(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_model(model, d)
    return d


def test_round_trip_official_names_and_logits(model, saved):
    keys = keys_of(saved / "model.safetensors")
    E = model.config.n_experts
    # experts one tensor each, MTP blocks, sinks, router weight + bias, untied head
    for e in range(E):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{proj}.weight" in keys
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.1.self_attn.attention_sink_bias", "model.mtp.layers.2.eh_proj.weight",
            "model.mtp.layers.0.pre_mlp_layernorm.weight", "lm_head.weight"} <= keys
    assert "model.layers.0.self_attn.attention_sink_bias" not in keys  # full layer: no sink
    assert not list(saved.glob("*.tmp"))  # atomic writes leave nothing behind
    cfg_json = json.loads((saved / "config.json").read_text())
    assert cfg_json["hybrid_layer_pattern"] and cfg_json["layer_types"]  # hub + native spellings

    loaded = load_model(saved)
    assert loaded.n_mtp == 3
    with torch.no_grad():
        a, am = model(IDS, return_mtp=True)
        b, bm = loaded(IDS, return_mtp=True)
    assert torch.equal(a, b)
    assert len(am) == len(bm) == 3 and all(torch.equal(x, y) for x, y in zip(am, bm))


def test_meta_device_load_leaves_nothing_on_meta(saved):
    loaded = load_model(saved)
    tensors = [*loaded.named_parameters(), *loaded.named_buffers()]
    assert tensors and not [n for n, t in tensors if t.is_meta or t.device.type != "cpu"]
    assert all(p.requires_grad for p in loaded.parameters())
    # the stacked experts are filled from the per-expert tensors, in order: gate rows, then up rows
    raw = load_file(saved / "model.safetensors")
    gate_up = loaded.model.layers[2].mlp.experts.gate_up_proj[5]
    I = gate_up.shape[0] // 2
    assert torch.equal(gate_up[:I], raw["model.layers.2.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(gate_up[I:], raw["model.layers.2.mlp.experts.5.up_proj.weight"])


def test_sharded_round_trip_and_layout_switch(model, tmp_path):
    save_model(model, tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == nbytes
    loaded = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(IDS), loaded(IDS))
    save_model(model, tmp_path)  # back to one file: the stale shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert parse_size("2GiB") == 2 * 1024**3 and parse_size("5GB") == 5 * 10**9 and parse_size(77) == 77


def test_mtp_count_comes_from_the_tensors(model, tmp_path):
    save_model(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    # keep blocks 0 and 1 only: config.json still says 3, the checkpoint decides
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.mtp.layers.2.")},
              tmp_path / "model.safetensors")
    two = load_model(tmp_path)
    assert two.n_mtp == 2 and two.config.n_mtp_layers == 2
    with torch.no_grad():
        _, ref = model(IDS, return_mtp=True)
        _, got = two(IDS, return_mtp=True)
    assert len(got) == 2 and all(torch.equal(x, y) for x, y in zip(ref[:2], got))
    no_mtp = {k: v for k, v in tensors.items() if not k.startswith("model.mtp.")}
    save_file(no_mtp, tmp_path / "model.safetensors")
    assert load_model(tmp_path).n_mtp == 0


def test_dtype_cast_keeps_router_fp32_and_tied_head(tmp_path):
    tied = make_model(tie_word_embeddings=True, n_mtp_layers=1)
    save_model(tied, tmp_path, dtype=torch.bfloat16)
    raw = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in raw
    assert raw["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert raw["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert raw["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    m = load_model(tmp_path)  # default: the checkpoint's dtype
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied after assignment
    m32 = load_model(tmp_path, dtype=torch.float32)
    assert m32.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32
    assert m32.model.layers[1].mlp.gate.weight.dtype == torch.float32
    # the fp32 reload is the original model with its non-router weights rounded to bf16
    rounded = copy.deepcopy(tied)
    with torch.no_grad():
        for name, t in rounded.state_dict().items():
            if ".mlp.gate." not in name:
                t.copy_(t.bfloat16().float())
        assert (m32(IDS) - rounded(IDS)).abs().max() < 1e-5
        assert m(IDS).isfinite().all()


def test_preset_gives_a_random_model():
    m = load_model("test", dtype=torch.bfloat16)
    assert isinstance(m, Transformer) and m.config == ModelConfig.from_preset("test")
    assert m.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert m.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert m.model.layers[1].self_attn.q_proj.weight.std() > 0
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a preset"):
        load_model("no-such-preset")


# ---- FP8 grids ------------------------------------------------------------------------------------------

def test_fp8_uniform_and_per_head_grids():
    w = torch.randn(384, 160)
    w8, s = fp8.quantize(w)
    assert w8.dtype == torch.float8_e4m3fn and list(s.shape) == [3, 2]
    assert (fp8.dequantize(w8, s) - w).abs().max() < w.abs().max() / 8
    # per KV head (2 heads x 192 rows): 2 row blocks per head, rows 0-127 and 128-191 of each head
    w8h, sh = fp8.quantize(w, n_segments=2)
    assert list(sh.shape) == [4, 2]
    assert (fp8.dequantize(w8h, sh, n_segments=2) - w).abs().max() < w.abs().max() / 8
    row = fp8.row_block_index(384, 4, 2)
    assert row[127] == 0 and row[128] == 1 and row[191] == 1 and row[192] == 2 and row[383] == 3
    with pytest.raises(fp8.FP8FormatError, match="head segments"):
        fp8.dequantize(w8h, sh, n_segments=3)
    with pytest.raises(fp8.FP8FormatError, match="no head-segment count"):
        fp8.dequantize(w8h, sh)
    with pytest.raises(fp8.FP8FormatError, match="column blocks"):
        fp8.dequantize(w8, s[:, :1])


# ---- errors: one per kind -------------------------------------------------------------------------------

@pytest.fixture
def broken(saved, tmp_path):
    """A writable copy of the saved checkpoint: (dir, tensors) to edit and rewrite."""
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    return tmp_path, load_file(saved / "model.safetensors")


def _write(d, tensors):
    save_file(tensors, d / "model.safetensors")


def test_error_missing_tensor(broken):
    d, t = broken
    del t["model.layers.3.self_attn.v_proj.weight"]
    _write(d, t)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.3\.self_attn\.v_proj\.weight' "
                                              r"\(expected shape \[32, 64\]"):
        load_model(d)


def test_error_missing_expert(broken):
    d, t = broken
    del t["model.layers.2.mlp.experts.6.down_proj.weight"]
    _write(d, t)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.6\.down_proj"
                                              r"\.weight' \(expected shape \[64, 32\]"):
        load_model(d)


def test_error_unexpected_tensor(broken):
    d, t = broken
    t["model.layers.1.self_attn.q_norm.weight"] = torch.ones(24)
    _write(d, t)
    with pytest.raises(CheckpointError,
                       match=r"unexpected tensor 'model\.layers\.1\.self_attn\.q_norm\.weight'"):
        load_model(d)


def test_error_unexpected_extra_expert(broken):
    d, t = broken
    t["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.zeros(32, 64)
    _write(d, t)
    with pytest.raises(CheckpointError, match=r"unexpected tensor .*experts\.8\.up_proj.*8 routed experts"):
        load_model(d)


def test_error_wrong_shape(broken):
    d, t = broken
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    _write(d, t)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' .* has shape "
                                              r"\[48, 64\], but the model needs \[24, 64\]"):
        load_model(d)


def test_error_wrong_dtype(broken):
    d, t = broken
    t["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    _write(d, t)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' .* has dtype I32, .* floating-point"):
        load_model(d)


def test_error_fp8_without_scale(broken):
    d, t = broken
    name = "model.layers.1.self_attn.q_proj.weight"
    t[name] = t[name].to(torch.float8_e4m3fn)
    _write(d, t)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight' .* no scale grid"):
        load_model(d)


def test_error_bad_fp8_grid(broken):
    d, t = broken
    w8, _ = fp8.quantize(t["model.layers.1.self_attn.q_proj.weight"])
    t["model.layers.1.self_attn.q_proj.weight"] = w8
    t["model.layers.1.self_attn.q_proj.weight_scale_inv"] = torch.ones(5, 1)
    _write(d, t)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight: scale grid has 5 row blocks"):
        load_model(d)


def test_error_truncated_file(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    data = (saved / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*model\.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*model\.safetensors"):
        load_model(tmp_path)


def test_error_index_names_missing_shard(model, tmp_path):
    save_model(model, tmp_path, max_shard_size="300KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match=r"lists shard 'model-00001-of-.*does not exist"):
        load_model(tmp_path)
