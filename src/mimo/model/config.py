"""ModelConfig: every MiMo-V2-Flash hyperparameter, validated on construction, with presets in code.

Three spellings of `config.json` are read:
- the official hub spelling (`hybrid_layer_pattern`, `moe_layer_freq`, `swa_*`, `sliding_window_size`, ...),
- the transformers-native spelling (`layer_types`, `mlp_layer_types`, `rope_parameters`, `rms_norm_eps`),
- this project's own field names (the dataclass fields below).

`to_json_dict()` writes the hub and native spellings side by side, so transformers >= 5.24, the hub-style
readers (SGLang, vLLM) and this project all load the same file.

Window semantics: `sliding_window` counts the keys a query sees *including itself*: query i attends keys j
with i - sliding_window < j <= i. A hub `sliding_window_size: 128` means `sliding_window = 129`, as in
transformers 5.24 and SGLang.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL, SLIDING = "full", "sliding"
DENSE, MOE = "dense", "moe"


class ConfigError(ValueError):
    """A config field has an invalid value; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 152576
    dim: int = 4096
    n_layers: int = 48
    # per layer: "full" (global causal) or "sliding" (window + sink)
    layer_types: tuple[str, ...] = ()
    # per layer: "dense" (SwiGLU of intermediate_size) or "moe"
    mlp_types: tuple[str, ...] = ()
    # global-attention layers
    n_heads: int = 64
    n_kv_heads: int = 4
    head_dim: int = 192
    v_head_dim: int = 128
    rope_theta: float = 5_000_000.0
    # sliding-window layers (and the MTP blocks)
    swa_n_heads: int = 64
    swa_n_kv_heads: int = 8
    swa_head_dim: int = 192
    swa_v_head_dim: int = 128
    swa_rope_theta: float = 10_000.0
    sliding_window: int = 129
    partial_rotary_factor: float = 0.334
    full_attention_sink: bool = False
    swa_attention_sink: bool = True
    attention_value_scale: float = 0.707
    # FFN / MoE
    intermediate_size: int = 16384
    moe_intermediate_size: int = 2048
    n_experts: int = 256
    n_active_experts: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # multi-token prediction blocks
    n_mtp_layers: int = 3
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.n_layers))
        if not self.mlp_types:
            object.__setattr__(self, "mlp_types", (DENSE,) + (MOE,) * max(self.n_layers - 1, 0))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_types", tuple(self.mlp_types))
        self._validate()

    # ---- validation -------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"ModelConfig.{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "v_head_dim",
                     "swa_n_heads", "swa_n_kv_heads", "swa_head_dim", "swa_v_head_dim", "sliding_window",
                     "intermediate_size", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 "must be a positive integer")
        need(len(self.layer_types) == self.n_layers, "layer_types",
             f"needs one entry per layer (n_layers={self.n_layers}), has {len(self.layer_types)}")
        bad = [t for t in self.layer_types if t not in (FULL, SLIDING)]
        need(not bad, "layer_types", f"unknown attention type {bad[:1]}; use 'full' or 'sliding'")
        need(len(self.mlp_types) == self.n_layers, "mlp_types",
             f"needs one entry per layer (n_layers={self.n_layers}), has {len(self.mlp_types)}")
        bad = [t for t in self.mlp_types if t not in (DENSE, MOE)]
        need(not bad, "mlp_types", f"unknown FFN type {bad[:1]}; use 'dense' or 'moe'")
        need(self.n_heads % self.n_kv_heads == 0, "n_heads",
             f"must be divisible by n_kv_heads={self.n_kv_heads}")
        need(self.swa_n_heads % self.swa_n_kv_heads == 0, "swa_n_heads",
             f"must be divisible by swa_n_kv_heads={self.swa_n_kv_heads}")
        need(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor", "must be in (0, 1]")
        for name in ("head_dim", "swa_head_dim"):
            rd = int(getattr(self, name) * self.partial_rotary_factor)
            need(rd >= 2 and rd % 2 == 0, name, f"rotary dim int({name} * partial_rotary_factor) = {rd} "
                 "must be even and >= 2")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(self.swa_rope_theta > 0, "swa_rope_theta", "must be positive")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.n_mtp_layers >= 0, "n_mtp_layers", "must be >= 0")
        if MOE in self.mlp_types:
            need(self.n_experts > 0, "n_experts", "must be positive when any layer is MoE")
            need(0 < self.n_active_experts <= self.n_experts, "n_active_experts",
                 f"top-k must be in [1, n_experts={self.n_experts}]")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            need(self.n_group > 0 and self.n_experts % self.n_group == 0, "n_group",
                 f"must divide n_experts={self.n_experts}")
            need(0 < self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
            need(self.n_group == 1 or self.n_experts // self.n_group >= 2, "n_group",
                 "group-limited routing needs at least 2 experts per group")
            need(self.topk_group * (self.n_experts // self.n_group) >= self.n_active_experts, "topk_group",
                 "the kept groups must hold at least n_active_experts experts")

    # ---- derived ----------------------------------------------------------------------------------------
    def attn_shape(self, layer_type: str) -> tuple[int, int, int, int]:
        """(n_heads, n_kv_heads, qk head dim, v head dim) of one attention type."""
        if layer_type == SLIDING:
            return self.swa_n_heads, self.swa_n_kv_heads, self.swa_head_dim, self.swa_v_head_dim
        return self.n_heads, self.n_kv_heads, self.head_dim, self.v_head_dim

    def rotary_dim(self, layer_type: str) -> int:
        return int(self.attn_shape(layer_type)[2] * self.partial_rotary_factor)

    def theta(self, layer_type: str) -> float:
        return self.swa_rope_theta if layer_type == SLIDING else self.rope_theta

    def has_sink(self, layer_type: str) -> bool:
        return self.swa_attention_sink if layer_type == SLIDING else self.full_attention_sink

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ---- presets and files ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no config.json at {p}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
        return cls.from_json_dict(d)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read any of the three spellings (own, hub, transformers-native)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw: dict[str, Any] = {}
        get = d.get
        n_layers = get("n_layers", get("num_hidden_layers"))
        kw["n_layers"] = n_layers
        kw["vocab_size"] = get("vocab_size")
        kw["dim"] = get("dim", get("hidden_size"))
        # attention layout: own > native > hub
        if "layer_types" in d:
            kw["layer_types"] = tuple(_NATIVE_ATTN.get(t, t) for t in d["layer_types"])
        elif "hybrid_layer_pattern" in d:
            kw["layer_types"] = tuple(SLIDING if int(x) == 1 else FULL for x in d["hybrid_layer_pattern"])
        if "mlp_types" in d:
            kw["mlp_types"] = tuple(d["mlp_types"])
        elif "mlp_layer_types" in d:
            kw["mlp_types"] = tuple(MOE if t == "sparse" else t for t in d["mlp_layer_types"])
        elif "moe_layer_freq" in d and isinstance(d["moe_layer_freq"], list):
            kw["mlp_types"] = tuple(MOE if int(x) else DENSE for x in d["moe_layer_freq"])
        kw["n_heads"] = get("n_heads", get("num_attention_heads"))
        kw["n_kv_heads"] = get("n_kv_heads", get("num_key_value_heads"))
        kw["head_dim"] = get("head_dim")
        kw["v_head_dim"] = get("v_head_dim")
        kw["swa_n_heads"] = get("swa_n_heads", get("swa_num_attention_heads", kw["n_heads"]))
        if "swa_n_kv_heads" in d or "swa_num_key_value_heads" in d:
            kw["swa_n_kv_heads"] = get("swa_n_kv_heads", get("swa_num_key_value_heads"))
        elif kw["n_kv_heads"] is not None:
            kw["swa_n_kv_heads"] = 2 * kw["n_kv_heads"]  # transformers' hard-coded rule
        kw["swa_head_dim"] = get("swa_head_dim", kw["head_dim"])
        kw["swa_v_head_dim"] = get("swa_v_head_dim", kw["v_head_dim"])
        rp = d.get("rope_parameters") or {}
        full_rp, swa_rp = rp.get("full_attention", {}), rp.get("sliding_attention", {})
        kw["rope_theta"] = get("rope_theta", full_rp.get("rope_theta"))
        kw["swa_rope_theta"] = get("swa_rope_theta", swa_rp.get("rope_theta"))
        kw["partial_rotary_factor"] = get("partial_rotary_factor", full_rp.get("partial_rotary_factor"))
        if d.get("sliding_window_size") is not None:
            kw["sliding_window"] = int(d["sliding_window_size"]) + 1
        else:
            kw["sliding_window"] = get("sliding_window")
        kw["full_attention_sink"] = get("full_attention_sink", get("add_full_attention_sink_bias"))
        kw["swa_attention_sink"] = get("swa_attention_sink", get("add_swa_attention_sink_bias"))
        kw["attention_value_scale"] = get("attention_value_scale")
        kw["intermediate_size"] = get("intermediate_size")
        kw["moe_intermediate_size"] = get("moe_intermediate_size")
        kw["n_experts"] = get("n_experts", get("n_routed_experts"))
        kw["n_active_experts"] = get("n_active_experts", get("num_experts_per_tok"))
        kw["n_group"] = get("n_group")
        kw["topk_group"] = get("topk_group")
        kw["norm_topk_prob"] = get("norm_topk_prob")
        kw["routed_scaling_factor"] = get("routed_scaling_factor")
        if kw["routed_scaling_factor"] is None and "routed_scaling_factor" in d:
            kw["routed_scaling_factor"] = 1.0  # hub stores null
        kw["n_mtp_layers"] = get("n_mtp_layers", get("num_nextn_predict_layers"))
        kw["rms_norm_eps"] = get("rms_norm_eps", get("layernorm_epsilon"))
        for k in ("tie_word_embeddings", "max_position_embeddings", "initializer_range",
                  "bos_token_id", "eos_token_id", "pad_token_id"):
            kw[k] = get(k)
        if isinstance(kw["eos_token_id"], list):
            kw["eos_token_id"] = kw["eos_token_id"][0] if kw["eos_token_id"] else None
        kw = {k: v for k, v in kw.items() if v is not None or k.endswith("token_id")}
        kw = {k: v for k, v in kw.items() if k in own}
        # token ids may legitimately be null; everything else missing falls back to the dataclass default
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k in kw and kw[k] is None and k not in d:
                del kw[k]
        if "layer_types" not in kw and n_layers is not None:
            kw["layer_types"] = default_layer_types(n_layers)
        if "mlp_types" not in kw and n_layers is not None:
            kw["mlp_types"] = (DENSE,) + (MOE,) * (n_layers - 1)
        return cls(**kw)

    def to_json_dict(self) -> dict[str, Any]:
        """Hub spelling plus transformers-native spelling plus this project's extra keys."""
        rope = lambda theta: {"rope_type": "default", "rope_theta": theta,  # noqa: E731
                              "partial_rotary_factor": self.partial_rotary_factor}
        return {
            "architectures": ["MiMoV2FlashForCausalLM"],
            "model_type": "mimo_v2_flash",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "swa_num_attention_heads": self.swa_n_heads,
            "swa_num_key_value_heads": self.swa_n_kv_heads,
            "swa_head_dim": self.swa_head_dim,
            "swa_v_head_dim": self.swa_v_head_dim,
            "rope_theta": self.rope_theta,
            "swa_rope_theta": self.swa_rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_parameters": {"full_attention": rope(self.rope_theta),
                                "sliding_attention": rope(self.swa_rope_theta)},
            "hybrid_layer_pattern": [1 if t == SLIDING else 0 for t in self.layer_types],
            "layer_types": [_TO_NATIVE_ATTN[t] for t in self.layer_types],
            "moe_layer_freq": [1 if t == MOE else 0 for t in self.mlp_types],
            "mlp_layer_types": ["sparse" if t == MOE else "dense" for t in self.mlp_types],
            "sliding_window": self.sliding_window,
            "sliding_window_size": self.sliding_window - 1,
            "add_full_attention_sink_bias": self.full_attention_sink,
            "add_swa_attention_sink_bias": self.swa_attention_sink,
            "attention_value_scale": self.attention_value_scale,
            "attention_bias": False,
            "hidden_act": "silu",
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "n_routed_experts": self.n_experts,
            "num_experts_per_tok": self.n_active_experts,
            "n_shared_experts": None,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "num_nextn_predict_layers": self.n_mtp_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "layernorm_epsilon": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def save(self, path: str | Path) -> None:
        p = Path(path)
        if p.suffix != ".json":
            p = p / "config.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")


_NATIVE_ATTN = {"full_attention": FULL, "sliding_attention": SLIDING}
_TO_NATIVE_ATTN = {FULL: "full_attention", SLIDING: "sliding_attention"}


def default_layer_types(n_layers: int) -> tuple[str, ...]:
    """Global attention at layer 0 and wherever (i + 1) % 6 == 0 (MiMo-V2-Flash: 0, 5, 11, ..., 47)."""
    return tuple(FULL if i == 0 or (i + 1) % 6 == 0 else SLIDING for i in range(n_layers))


def _small(**kw: Any) -> dict[str, Any]:
    base = dict(
        vocab_size=512, dim=64, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=24, v_head_dim=16,
        swa_n_heads=4, swa_n_kv_heads=2, swa_head_dim=24, swa_v_head_dim=16, sliding_window=9,
        partial_rotary_factor=0.334, rope_theta=640_000.0, swa_rope_theta=10_000.0,
        intermediate_size=128, moe_intermediate_size=32, n_experts=8, n_active_experts=2,
        n_mtp_layers=3, max_position_embeddings=4096, initializer_range=0.02,
    )
    base.update(kw)
    return base


PRESETS: dict[str, dict[str, Any]] = {
    # the released 309B model, exactly (architecture-spec.md §2)
    "mimo-v2-flash": dict(
        vocab_size=152576, dim=4096, n_layers=48, n_heads=64, n_kv_heads=4, head_dim=192, v_head_dim=128,
        swa_n_heads=64, swa_n_kv_heads=8, swa_head_dim=192, swa_v_head_dim=128, sliding_window=129,
        partial_rotary_factor=0.334, rope_theta=5_000_000.0, swa_rope_theta=10_000.0,
        intermediate_size=16384, moe_intermediate_size=2048, n_experts=256, n_active_experts=8,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, n_mtp_layers=3,
        rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=262144,
        attention_value_scale=0.707,
    ),
    # unit tests: 6 layers (global at 0 and 5), tiny everything
    "test": _small(),
    # the debug training recipe: seconds on a CPU
    "debug": _small(vocab_size=1024, dim=64, n_layers=6, sliding_window=33, max_position_embeddings=2048),
    # the shipped default model (models/mimo-tiny): 7.0M parameters + 0.5M per MTP head, 8 layers (global at 0, 5; dense
    # FFN at 0, MoE after); 8 rather than 12 layers trains ~1.8x faster, which the one-hour CPU budget needs
    "tiny": _small(
        vocab_size=4096, dim=192, n_layers=8, n_heads=6, n_kv_heads=1, head_dim=48, v_head_dim=32,
        swa_n_heads=6, swa_n_kv_heads=2, swa_head_dim=48, swa_v_head_dim=32, sliding_window=65,
        partial_rotary_factor=0.334, intermediate_size=512, moe_intermediate_size=128, n_experts=8,
        n_active_experts=2, max_position_embeddings=8192,
    ),
}

