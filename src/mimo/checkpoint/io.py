"""Load and save models in the official MiMo-V2-Flash checkpoint format (spec §7).

On disk: `config.json` (hub + transformers-native spellings) and `model.safetensors`, or shards
`model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`. Tensor names are the official ones
(experts one tensor each, see `hf_adapter`); transformers-native names are accepted on load, and FP8 block
weights (`float8_e4m3fn` + `<name>_scale_inv`) are dequantised on load.

Loading builds the model on the meta device and then assigns each tensor as it is read, so the weights
exist once in memory (plus the one checkpoint tensor being read).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mimo.model.config import FULL, PRESETS, SLIDING, ModelConfig
from mimo.model.init import init_weights
from mimo.model.transformer import Transformer

from . import fp8
from .hf_adapter import (
    Source,
    checkpoint_shapes,
    count_mtp_layers,
    expert_pieces,
    head_segments,
    keep_fp32,
    plan_sources,
    to_checkpoint,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config describes; the message names the tensor / file."""


# ---- reading ---------------------------------------------------------------------------------------------

class _Reader:
    """Lazy access to the tensors of a checkpoint directory (single file, index + shards, or loose shards)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            weight_map, files = {}, [SINGLE_FILE]
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            weight_map = {}
            if not files:
                raise CheckpointError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in {directory}")
        self.handles: dict[str, Any] = {}
        self.file_of: dict[str, str] = {}
        for fname in files:
            fpath = directory / fname
            if not fpath.is_file():
                raise CheckpointError(f"{index}: lists shard {fname!r}, which does not exist in {directory}")
            try:
                h = safe_open(str(fpath), framework="pt", device="cpu")
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(
                    f"cannot read safetensors file {fpath}: {e} (truncated or corrupt?)") from None
            self.handles[fname] = h
            for k in keys:
                if k in self.file_of:
                    raise CheckpointError(f"tensor {k!r} is stored twice, in {self.file_of[k]} and {fname}")
                self.file_of[k] = fname
        for k, f in weight_map.items():
            if self.file_of.get(k) != f:
                raise CheckpointError(f"{index}: maps {k!r} to {f}, but that file does not hold it")
        self.names = list(self.file_of)

    def where(self, name: str) -> Path:
        return self.directory / self.file_of[name]

    def shape(self, name: str) -> list[int]:
        return list(self.handles[self.file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype | None:
        return _ST_DTYPES.get(self.handles[self.file_of[name]].get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.handles[self.file_of[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.where(name)}: {e}") from None


def _fmt_shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(str(x) for x in s) + "]"


class _Loader:
    """Turns checkpoint tensors into the tensors of one meta-built model, validating as it goes."""

    def __init__(self, model: nn.Module, reader: _Reader, dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.reader, self.dtype, self.device = model, reader, dtype, device
        cfg: ModelConfig = model.config
        self.cfg = cfg
        self.kv_heads = {t: cfg.attn_shape(t)[1] for t in (FULL, SLIDING)}
        self.q_heads = {t: cfg.attn_shape(t)[0] for t in (FULL, SLIDING)}

    def target_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if keep_fp32(name) else self.dtype

    def read(self, ck: str, scale: str | None, expected_shape: list[int], what: str) -> torch.Tensor:
        """One checkpoint tensor, its shape and dtype checked against `expected_shape`, dequantised (fp32)."""
        r = self.reader
        shape, dt = r.shape(ck), r.dtype(ck)
        if shape != expected_shape:
            raise CheckpointError(
                f"tensor {ck!r} in {r.where(ck)} has shape {_fmt_shape(shape)}, but the model needs "
                f"{_fmt_shape(expected_shape)} for {what!r}")
        if dt is None or not dt.is_floating_point:
            raw = r.handles[r.file_of[ck]].get_slice(ck).get_dtype()
            raise CheckpointError(
                f"tensor {ck!r} in {r.where(ck)} has dtype {raw}, but {what!r} needs a floating-point "
                f"tensor (float32/bfloat16/float16, or float8_e4m3fn with a {ck + fp8.SCALE_SUFFIX!r} grid)")
        t = r.get(ck)
        if dt in _FLOAT8:
            if scale is None:
                raise CheckpointError(f"tensor {ck!r} in {r.where(ck)} is {dt} but has no scale grid "
                                      f"{ck + fp8.SCALE_SUFFIX!r} to dequantise it with")
            segs = head_segments(ck, self.cfg.layer_types, self.cfg.n_layers, self.kv_heads, self.q_heads)
            try:
                t = fp8.dequantize(t, r.get(scale), segs, torch.float32, name=ck)
            except fp8.FP8FormatError as e:
                raise CheckpointError(f"{r.where(ck)}: {e}") from None
        elif scale is not None:
            raise CheckpointError(f"tensor {ck!r} in {r.where(ck)} has a scale grid {scale!r} but is {dt}, "
                                  "not float8")
        return t

    def materialise(self, name: str, src: Source, ref: torch.Tensor, scales: dict[str, str]) -> torch.Tensor:
        expected = list(ref.shape)
        out_dtype = self.target_dtype(name)
        if src.kind == "whole":
            ck = src.names[0]
            return self.read(ck, scales.get(ck), expected, name).to(device=self.device, dtype=out_dtype)
        # per-expert tensors -> one stacked [E, ...] tensor, filled piece by piece
        E = expected[0]
        extra = sorted(k for k in src.experts if k[0] >= E)
        if extra:
            ck = src.experts[extra[0]]
            raise CheckpointError(f"unexpected tensor {ck!r} in {self.reader.where(ck)}: the config has "
                                  f"{E} routed experts (0..{E - 1})")
        out = torch.empty(expected, dtype=out_dtype, device=self.device)
        for official, e, proj, rows in expert_pieces(name, tuple(expected)):
            piece = out[e, rows]
            ck = src.experts.get((e, proj))
            if ck is None:
                raise CheckpointError(
                    f"missing tensor {official!r} (expected shape {_fmt_shape(piece.shape)}, floating point) "
                    f"in {self.reader.directory}")
            piece.copy_(self.read(ck, scales.get(ck), list(piece.shape), name))
        return out


def _assign(model: nn.Module, names: list[str], tensor: torch.Tensor) -> None:
    """Point every alias in `names` (tied weights share one Parameter) at `tensor`, replacing meta tensors."""
    param: nn.Parameter | None = None
    for name in names:
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if leaf in mod._parameters:
            old = mod._parameters[leaf]
            if param is None:
                param = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
            mod._parameters[leaf] = param
        else:
            mod._buffers[leaf] = tensor


def _resolve_default_dtype(directory: Path, reader: _Reader) -> torch.dtype:
    """The dtype a checkpoint is meant to run in: config.json `dtype`/`torch_dtype`, else the embedding's."""
    try:
        d = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        d = {}
    name = d.get("dtype") or d.get("torch_dtype")
    if isinstance(name, str):
        dt = getattr(torch, name.removeprefix("torch."), None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point and dt not in _FLOAT8:
            return dt
    emb = "model.embed_tokens.weight"
    if emb in reader.file_of:
        dt = reader.dtype(emb)
        if dt is not None and dt.is_floating_point and dt not in _FLOAT8:
            return dt
    return torch.float32


def load_weights(model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint directory into `model` (typically built on the meta device), tensor by tensor.

    Every parameter and persistent buffer must be provided exactly once; extra tensors are an error, except
    `lm_head.weight` when the embedding is tied (it is then the same tensor).
    """
    directory = Path(directory)
    reader = _Reader(directory)
    return _load_from_reader(model, reader, dtype, device)


def _load_from_reader(model: nn.Module, reader: _Reader, dtype: torch.dtype | None,
                      device: str | torch.device) -> nn.Module:
    directory = reader.directory
    dtype = dtype or _resolve_default_dtype(directory, reader)
    device = torch.device(device)
    cfg: ModelConfig = model.config

    # aliases: tied weights appear under several names but are one Parameter
    groups: dict[int, list[str]] = {}
    refs: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        refs.setdefault(name, p)
    for name, b in model.named_buffers(remove_duplicate=False):
        mod_name, _, leaf = name.rpartition(".")
        if leaf in model.get_submodule(mod_name)._non_persistent_buffers_set:
            continue
        groups.setdefault(id(b), []).append(name)
        refs.setdefault(name, b)
    canonical = {names[0]: names for names in groups.values()}

    sources, scales, conflicts = plan_sources(reader.names)
    if conflicts:
        name, why = conflicts[0]
        raise CheckpointError(f"checkpoint in {directory}: tensor for {name!r} {why}")
    if cfg.tie_word_embeddings:
        # a tied head is the embedding itself; a stored copy (some exporters write one) is not read
        sources.pop("lm_head.weight", None)
    every_alias = {n for names in canonical.values() for n in names}
    unexpected = sorted(t for t in sources if t not in every_alias)
    if unexpected:
        src = sources[unexpected[0]]
        ck = src.names[0] if src.names else next(iter(src.experts.values()))
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor {ck!r} in {reader.where(ck)}{more}: the model built from "
                              f"{directory / CONFIG_FILE} has no parameter {unexpected[0]!r}")
    for name, names in canonical.items():
        if not any(n in sources for n in names):
            ref = refs[name]
            official, shape = next(iter(checkpoint_shapes(name, tuple(ref.shape))))
            want = "float32" if keep_fp32(name) else "floating point"
            raise CheckpointError(f"missing tensor {official!r} (expected shape {_fmt_shape(shape)}, {want}) "
                                  f"in {directory}")

    loader = _Loader(model, reader, dtype, device)
    with torch.no_grad():
        for name, names in canonical.items():
            src_name = next(n for n in names if n in sources)
            t = loader.materialise(name, sources[src_name], refs[name], scales)
            _assign(model, names, t)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"after loading {directory}, {left[0]!r} is still on the meta device")
    return model


def _cast_model(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    if dtype is None:
        return model
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not keep_fp32(name):
                t.data = t.data.to(dtype)
    return model


def load_model(path_or_preset: str | Path, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """A `Transformer` from a checkpoint directory, or randomly initialised from a preset name.

    Directory: config.json + safetensors (single or sharded). The number of MTP blocks is the number of
    `model.mtp.layers.K` found in the checkpoint (0 if none), whatever config.json says. `dtype` casts every
    floating tensor except the router weight/bias (fp32); by default the checkpoint's own dtype is used
    (config.json `dtype`/`torch_dtype`, else the embedding's) and FP8 weights are dequantised to it.
    """
    p = Path(path_or_preset)
    if p.is_dir():
        cfg_path = p / CONFIG_FILE
        if not cfg_path.is_file():
            raise CheckpointError(f"no {CONFIG_FILE} in {p}")
        cfg = ModelConfig.from_pretrained(cfg_path)
        reader = _Reader(p)
        cfg = cfg.replace(n_mtp_layers=count_mtp_layers(reader.names))
        with torch.device("meta"):
            model = Transformer(cfg)
        _load_from_reader(model, reader, dtype, device)
        model.eval()
        return model
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        cfg = ModelConfig.from_preset(path_or_preset)
        with torch.device(device):
            model = Transformer(cfg)
        init_weights(model)
        return _cast_model(model, dtype)
    raise FileNotFoundError(f"{str(path_or_preset)!r} is neither a checkpoint directory nor a preset name "
                            f"(presets: {', '.join(sorted(PRESETS))})")


# ---- writing ---------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB' (decimal units; 'iB' binary)."""
    if isinstance(size, int):
        return size
    m = _SIZE_RE.match(size)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '500MB', '2GiB'")
    base = 1024 if m.group(3) else 1000
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * base ** power)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def save_model(model: nn.Module, path: str | Path, max_shard_size: int | str | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` and safetensors with the official tensor names; returns the directory.

    Experts are split per expert; `lm_head.weight` is omitted when tied; the router weight and correction
    bias stay float32. One `model.safetensors` unless `max_shard_size` (bytes or '5GB') is exceeded, then
    `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` (a single tensor larger than the
    limit gets a shard of its own). Every file is written to a temp file and renamed into place; stale
    weight files of the other layout are removed afterwards.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    def out_dtype(name: str, t: torch.Tensor) -> torch.dtype:
        if keep_fp32(name):
            return torch.float32
        return dtype if (dtype is not None and t.is_floating_point()) else t.dtype

    # plan: (checkpoint name, mimo name, bytes), in model order
    plan: list[tuple[str, str, int]] = []
    for name, t in state.items():
        isz = _itemsize(out_dtype(name, t))
        for ck, shape in checkpoint_shapes(name, tuple(t.shape)):
            plan.append((ck, name, math.prod(shape) * isz))
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, _, nb) in enumerate(plan):
        if limit is not None and shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nb
    n = len(shards)
    total = sum(nb for _, _, nb in plan)

    written: set[str] = set()
    weight_map: dict[str, str] = {}
    for si, idxs in enumerate(shards):
        fname = SINGLE_FILE if n == 1 else f"model-{si + 1:05d}-of-{n:05d}.safetensors"
        wanted = {plan[i][0] for i in idxs}
        tensors: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(plan[i][1] for i in idxs):
            t = state[name]
            for ck, piece in to_checkpoint(name, t):
                if ck in wanted:
                    piece = piece.detach().to(device="cpu", dtype=out_dtype(name, t))
                    tensors[ck] = piece.contiguous().clone()
        _atomic_save_file(tensors, out / fname)
        written.add(fname)
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_bytes(out / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
        written.add(INDEX_FILE)
    for stale in out.iterdir():
        ours = stale.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(stale.name)
        if ours and stale.name not in written:
            stale.unlink()

    d = cfg.to_json_dict()
    d["num_nextn_predict_layers"] = sum(1 for _ in model.model.mtp.layers)
    floats = [t.dtype for n_, t in state.items() if t.is_floating_point() and not keep_fp32(n_)]
    main = dtype or (floats[0] if floats else torch.float32)
    d["dtype"] = str(main).removeprefix("torch.")
    _atomic_write_bytes(out / CONFIG_FILE, (json.dumps(d, indent=2) + "\n").encode())
    return out
