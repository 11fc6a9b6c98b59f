"""Name and shape mapping between mimo's in-memory parameters and checkpoint tensor names.

mimo's parameter names are the official checkpoint names except the routed experts, which mimo stacks (the
layout of transformers' in memory, so its native names load as they are):

| mimo (in memory)                          | official checkpoint (one tensor per expert E)     |
|-------------------------------------------|---------------------------------------------------|
| `P.mlp.experts.gate_up_proj` [E, 2I, D]   | rows [0, I): `P.mlp.experts.E.gate_proj.weight` [I, D] |
|                                           | rows [I, 2I): `P.mlp.experts.E.up_proj.weight` [I, D]  |
| `P.mlp.experts.down_proj` [E, D, I]       | `P.mlp.experts.E.down_proj.weight` [D, I]         |

transformers' `P.self_attn.sinks` [H] is also accepted on load for `P.self_attn.attention_sink_bias`.

FP8 scale grids (`<weight>_scale_inv`) are attached to their weight here and dequantised by the loader.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .fp8 import SCALE_SUFFIX

_EXPERT_RE = re.compile(
    r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_SINK_RE = re.compile(r"^(?P<prefix>.+\.self_attn)\.sinks$")
_STACKED_RE = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_MTP_RE = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
_LAYER_RE = re.compile(r"^model\.(?:layers|mtp\.layers)\.(\d+)\.")

# Tensors that stay float32 whatever dtype the rest of the model is loaded or saved in (spec §7.1: the
# router weight and its correction bias are FP32 in the checkpoint and computed in fp32).
FP32_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")


def keep_fp32(name: str) -> bool:
    return name.endswith(FP32_SUFFIXES)


def expert_name(prefix: str, e: int, proj: str) -> str:
    return f"{prefix}.{e}.{proj}.weight"


def expert_pieces(name: str, shape: tuple[int, ...]) -> Iterator[tuple[str, int, str, slice]]:
    """Official (name, expert, projection, row range) of each piece of a stacked expert tensor: gate_up_proj [E, 2I, D]
    gives expert e's gate_proj (rows [0, I)) then up_proj (rows [I, 2I)); down_proj [E, D, I] one each."""
    m = _STACKED_RE.match(name)
    if m["proj"] == "down_proj":
        for e in range(shape[0]):
            yield expert_name(m["prefix"], e, "down_proj"), e, "down_proj", slice(None)
        return
    half = shape[1] // 2
    for e in range(shape[0]):
        yield expert_name(m["prefix"], e, "gate_proj"), e, "gate_proj", slice(0, half)
        yield expert_name(m["prefix"], e, "up_proj"), e, "up_proj", slice(half, None)


def to_checkpoint(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """mimo name + tensor -> official (name, tensor) pairs; a stacked expert tensor yields per-expert views."""
    if _STACKED_RE.match(name) is None:
        yield name, tensor
        return
    for ck, e, _, rows in expert_pieces(name, tuple(tensor.shape)):
        yield ck, tensor[e, rows]


def checkpoint_shapes(name: str, shape: tuple[int, ...]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Like `to_checkpoint` but for shapes only (used to plan shards without touching data)."""
    if _STACKED_RE.match(name) is None:
        yield name, shape
        return
    for ck, _, _, rows in expert_pieces(name, shape):
        yield ck, (len(range(shape[1])[rows]), *shape[2:])


def count_mtp_layers(names: list[str] | set[str]) -> int:
    """Number of MTP blocks in a checkpoint: 1 + the largest K of any `model.mtp.layers.K.*` tensor."""
    ks = [int(m.group(1)) for n in names if (m := _MTP_RE.match(n))]
    return max(ks) + 1 if ks else 0


@dataclass
class Source:
    """Where the tensor for one mimo name comes from.

    kind "whole": `names[0]` is the tensor itself; "experts": `experts[(e, proj)]` is expert e's [I, D] /
    [D, I] piece (proj gate_proj / up_proj / down_proj) of a stacked [E, ...] tensor.
    """

    kind: str
    names: list[str] = field(default_factory=list)
    experts: dict[tuple[int, str], str] = field(default_factory=dict)


def plan_sources(
    checkpoint_names: list[str],
) -> tuple[dict[str, Source], dict[str, str], list[tuple[str, str]]]:
    """Group checkpoint tensor names by the mimo name they feed.

    Returns (sources by mimo name, scale grid name by weight name, conflicts as (mimo name, reason)).
    Scale grids are not sources of their own; an orphan grid (no weight) is returned as a source of kind
    "whole" under its own name so the loader reports it as unexpected.
    """
    names = set(checkpoint_names)
    scales: dict[str, str] = {}
    sources: dict[str, Source] = {}
    conflicts: list[tuple[str, str]] = []

    def add_whole(target: str, ck: str) -> None:
        if target in sources:
            first = sources[target].names or "per-expert tensors"
            conflicts.append((target, f"given twice, by {first} and {ck!r}"))
            return
        sources[target] = Source("whole", [ck])

    for ck in sorted(names):
        if ck.endswith(SCALE_SUFFIX):
            w = ck[: -len(SCALE_SUFFIX)]
            if w in names:
                scales[w] = ck
                continue
            add_whole(ck, ck)  # orphan scale: reported as unexpected
            continue
        if m := _EXPERT_RE.match(ck):
            target = f"{m['prefix']}.{'down_proj' if m['proj'] == 'down_proj' else 'gate_up_proj'}"
            src = sources.setdefault(target, Source("experts"))
            if src.kind != "experts":
                conflicts.append((target, f"given both stacked ({src.names[0]!r}) and per expert ({ck!r})"))
                continue
            src.experts[(int(m["e"]), m["proj"])] = ck
        elif m := _SINK_RE.match(ck):
            add_whole(f"{m['prefix']}.attention_sink_bias", ck)
        else:
            if ck in sources and sources[ck].kind == "experts":
                conflicts.append((ck, f"given both stacked ({ck!r}) and per expert"))
                continue
            add_whole(ck, ck)
    return sources, scales, conflicts


def head_segments(name: str, layer_types: tuple[str, ...], n_layers: int, kv_heads: dict[str, int],
                  q_heads: dict[str, int]) -> int | None:
    """Number of per-head row segments a per-head FP8 scale grid of tensor `name` would use.

    k_proj / v_proj rows are n_kv heads of (qk or v) head dim; q_proj rows are n_heads heads. MTP blocks are
    sliding-window attention. Other tensors have no head structure (None).
    """
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    layer = int(m.group(1))
    if name.startswith("model.mtp."):
        lt = "sliding"
    elif layer < n_layers:
        lt = layer_types[layer]
    else:
        return None
    if name.endswith((".self_attn.k_proj.weight", ".self_attn.v_proj.weight")):
        return kv_heads[lt]
    if name.endswith(".self_attn.q_proj.weight"):
        return q_heads[lt]
    return None
