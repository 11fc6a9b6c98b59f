"""Block-wise FP8 (DeepSeek-V3 style) as used by the official MiMo-V2-Flash checkpoint (spec §7.3).

A quantised weight `W` [rows, cols] is stored as `float8_e4m3fn` next to a float32 `W_scale_inv` grid, and
`W[r, c] = W_fp8[r, c] * scale_inv[block(r), c // 128]` (despite the name, the scale is a multiplier).

The row blocks come in two layouts:
- uniform: 128-row tiles over the whole tensor, `scale_rows == ceil(rows / 128)`;
- per head segment: the tensor is split into `n_segments` equal row segments (KV heads of a GA `k_proj`,
  e.g. 4 heads x 192 rows) and each segment is tiled with its own 128-row blocks, so a 192-row head has a
  128-row block and a 64-row block and `scale_rows == n_segments * ceil(rows / n_segments / 128)`.
The header shape alone cannot always tell them apart; the loader rule is: uniform when the count matches
`ceil(rows / 128)`, otherwise per segment with the caller's segment count, which must then match exactly.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
BLOCK = 128
SCALE_SUFFIX = "_scale_inv"


class FP8FormatError(ValueError):
    """A scale grid does not fit its weight under either tiling."""


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def _row_blocks(rows: int, n_segments: int, block: int) -> torch.Tensor:
    """Scale-row index of every weight row, [rows] int64, for `n_segments` independently tiled segments."""
    seg = rows // n_segments
    per_seg = math.ceil(seg / block)
    r = torch.arange(rows)
    return (r // seg) * per_seg + (r % seg) // block


def row_block_index(rows: int, scale_rows: int, n_segments: int | None = None, block: int = BLOCK,
                    *, name: str = "weight") -> torch.Tensor:
    """Map each weight row to its scale row, following the loader rule of spec §7.3."""
    if scale_rows == math.ceil(rows / block):
        return torch.arange(rows) // block
    if n_segments is None or n_segments <= 1:
        raise FP8FormatError(
            f"{name}: scale grid has {scale_rows} row blocks but {rows} rows need ceil({rows}/{block}) = "
            f"{math.ceil(rows / block)} under uniform tiling, and no head-segment count is known for it")
    if rows % n_segments:
        raise FP8FormatError(f"{name}: {rows} rows do not split into {n_segments} equal head segments")
    expect = n_segments * math.ceil(rows // n_segments / block)
    if scale_rows != expect:
        raise FP8FormatError(
            f"{name}: scale grid has {scale_rows} row blocks; uniform tiling needs {math.ceil(rows / block)} "
            f"and {n_segments} head segments of {rows // n_segments} rows need {expect}")
    return _row_blocks(rows, n_segments, block)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, n_segments: int | None = None,
               dtype: torch.dtype = torch.float32, *, block: int = BLOCK,
               name: str = "weight") -> torch.Tensor:
    """FP8 weight [rows, cols] + float32 scale grid [scale_rows, ceil(cols/128)] -> `dtype` [rows, cols]."""
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise FP8FormatError(f"{name}: block FP8 needs a 2-D weight and a 2-D scale grid, got "
                             f"{list(weight.shape)} and {list(scale_inv.shape)}")
    rows, cols = weight.shape
    if scale_inv.shape[1] != math.ceil(cols / block):
        raise FP8FormatError(f"{name}: scale grid has {scale_inv.shape[1]} column blocks, {cols} columns "
                             f"need ceil({cols}/{block}) = {math.ceil(cols / block)}")
    ridx = row_block_index(rows, scale_inv.shape[0], n_segments, block, name=name)
    # expand the grid to one scale per (row, column block), then per column, in float32
    s = scale_inv.float()[ridx]  # [rows, col_blocks]
    s = s.repeat_interleave(block, dim=1)[:, :cols]  # [rows, cols]
    return (weight.float() * s).to(dtype)


def quantize(weight: torch.Tensor, n_segments: int | None = None, *,
             block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [rows, cols] -> (float8_e4m3fn [rows, cols], float32 scale_inv grid).

    With `n_segments` the rows are tiled per equal segment (the per-KV-head layout); otherwise uniformly.
    Each block's scale maps its absolute maximum to the FP8 maximum (448).
    """
    rows, cols = weight.shape
    n = n_segments or 1
    if rows % n:
        raise FP8FormatError(f"{rows} rows do not split into {n} equal segments")
    ridx = _row_blocks(rows, n, block)
    n_rb = int(ridx[-1]) + 1 if rows else 0
    n_cb = math.ceil(cols / block)
    cidx = torch.arange(cols) // block
    w = weight.float().abs()
    flat = (ridx[:, None] * n_cb + cidx[None, :]).reshape(-1)  # block id of every element
    amax = torch.zeros(n_rb * n_cb).scatter_reduce_(0, flat, w.reshape(-1), reduce="amax")
    scale = (amax / FP8_MAX).clamp_min(1e-12).reshape(n_rb, n_cb)  # [row blocks, col blocks]
    q = (weight.float() / scale[ridx][:, cidx]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
