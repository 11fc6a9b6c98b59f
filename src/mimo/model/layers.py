"""Leaf modules (RMSNorm, partial NeoX RoPE, SwiGLU MLP) and DerivedWeights, the inference-time cache of
parameter-derived tensors."""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows (batch x tokens: decode steps, which are dispatch-bound) RMSNorm and RoPE take forms
# with fewer ops; beyond it, forms that are faster in bulk. Both forms give the same values.
SMALL_ROWS = 16


class DerivedWeights:
    """A tensor (or tuple of tensors) computed from parameters, e.g. several projection weights concatenated
    so the projections run as one GEMM; the parameters themselves stay as they are (the checkpoint's names).

    Under inference_mode (the engine) the result is kept until the parameters are replaced by other tensor
    objects or `invalidate()` is called: decode steps are dispatch-bound, and one linear instead of three is
    ~7% of a decode forward. Whoever changes weights in place says so through the model's explicit weights
    version (`Transformer.mark_weights_changed`, which the engine's `update_weights` calls), not through
    tensor version counters: `p.data.copy_()`, `p.data = t` and FSDP2's `_unsafe_preserve_version_counter`
    copies all leave a parameter's `_version` unchanged. Outside inference_mode it is computed per call
    (with autograd it is part of the graph)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self._ws: tuple[torch.Tensor, ...] = ()
        self._value = None

    def invalidate(self) -> None:
        self._ws, self._value = (), None

    @staticmethod
    def caches(ws: tuple[torch.Tensor, ...]) -> bool:
        """Whether a result from these parameters is kept: under inference_mode, not while compiling (a compiled
        graph computes it in the graph: the cache is Python state dynamo cannot trace), and not from
        parameters made under inference_mode (kept as they are: nothing may hold views of them outside).
        Asked ~100 times a decode step: plain loops, no generators (0.56 against 0.80 us a call)."""
        # is_compiling() first: dynamo folds it to True, while is_inference_mode_enabled() breaks the graph
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            return False
        for w in ws:
            if w.is_inference():
                return False
        return True

    def __call__(self, *ws: torch.Tensor):
        return self.kept(ws) if self.caches(ws) else self.fn(ws)

    def kept(self, ws: tuple[torch.Tensor, ...]):
        """The kept result, recomputed unless ws are the tensor objects it was computed from (held here, so
        none can be freed and its address reused)."""
        if self._value is None or len(ws) != len(self._ws) or not all(map(operator.is_, ws, self._ws)):
            with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, reusable outside
                self._value = self.fn(ws)
            self._ws = ws
        return self._value


def _only(ws: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ws[0]


class LinearWeights(DerivedWeights):
    """y = x W^T with the weight W [out, in] derived from parameters by `weight` (default: the one parameter
    given; e.g. `torch.cat` of q, k and v so the projections run as one GEMM), applied by `linear(x, *ws)`.

    On the CPU under inference_mode it keeps W^T contiguous ([in, out], a copy of the weights) and multiplies
    x @ W^T: MKL's sgemm is slow on a transposed operand with few rows (one thread, Xeon with AVX-512: lm_head
    [4, 192] x [192, 4096] 259 against 145 us, [1, 192] x [192, 448] 8.4 against 4.6 us, [16, 192] x
    [192, 256] 22 against 13; from 256 rows on both are within 2%). Training, compiled graphs and GPUs take
    F.linear on W."""

    def __init__(self, weight=_only) -> None:
        super().__init__(lambda ws: weight(ws).t().contiguous())
        self.weight = weight

    def linear(self, x: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and self.caches(ws):
            return x @ self.kept(ws)
        return F.linear(x, self.weight(ws))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, times `weight` (plain form, not 1 + weight).

    Written out rather than `F.rms_norm`, which on CPU is a composite of ~20 ops (dtype round trips
    included). For a handful of rows (decode steps, dispatch-bound) it runs as one layer_norm over [x, -x]:
    that vector has mean 0 and mean square mean(x^2), so its first half normalised is exactly the RMS-normed
    x (up to float rounding of the zero mean), in 4 ops instead of 6; for many rows the doubled width costs
    more than it saves (2,048 rows: 2.4x slower), so they take the written-out form."""

    SMALL_ROWS = SMALL_ROWS

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._weight2 = DerivedWeights(torch.cat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            D = x.shape[-1]
            if x.numel() <= self.SMALL_ROWS * D and not torch.is_grad_enabled():
                w2 = self._weight2(self.weight, self.weight)
                return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * D,), w2, None, self.eps)[..., :D]
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight
        xf = x.float()
        return self.weight * (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


@functools.lru_cache(maxsize=64)
def _rope_consts(rotary_dim: int, head_dim: int, theta: float, device: torch.device):
    """(inv_freq [D], sign [D], perm [D]) over the whole head: frequencies f_i = theta^(-2i / rd) repeated for
    both halves and 0 on the pass-through channels, the rotate-half sign (0 on pass-through), the partner
    channel of each channel."""
    half, rest = rotary_dim // 2, head_dim - rotary_dim
    # ordinary tensors even when first asked for under inference_mode: training may reuse them with autograd
    with torch.inference_mode(False):
        f = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
        zeros = torch.zeros(rest, device=device)
        inv_freq = torch.cat([f, f, zeros])
        sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device), zeros])
        perm = torch.cat([torch.arange(half, rotary_dim), torch.arange(half), torch.arange(rotary_dim, head_dim)])
        return inv_freq, sign, perm.to(device)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, head_dim: int, theta: float, dtype: torch.dtype) -> Rope:
    """RoPE tables for integer positions [B, T]: (cos, sin, perm, rotary_dim), cos/sin [B, T, 1, head_dim],
    perm [head_dim].

    NeoX pairs channel i with i + rd/2 (rd = rotary_dim), angle position * theta^(-2i / rd). For a few rows
    the rotation is one gather and two products over the whole head, x * cos + x[perm] * sin, with the
    rotate-half sign folded into sin and the pass-through channels at angle 0 (cos 1, sin 0, perm = identity); e.g.
    rd = 4, head_dim = 6: perm = [2, 3, 0, 1, 4, 5], sin = [-s0, -s1, s0, s1, 0, 0], cos = [c0, c1, c0, c1, 1, 1].
    These are exactly the textbook rotate-half values (sign flips and x * 1 + y * 0 are exact) in 4 ops
    instead of 12. Computed on the fly (constants cached), so the model has no buffers for a meta-device load
    to rebuild.
    """
    # a compiled graph computes the constants in the graph (what dynamo does with a cached function anyway;
    # calling the uncached one says so, and dynamo no longer warns about the cache at every compile)
    consts = _rope_consts.__wrapped__ if torch.compiler.is_compiling() else _rope_consts
    inv_freq, sign, perm = consts(rotary_dim, head_dim, float(theta), positions.device)
    angles = (positions.float().unsqueeze(-1) * inv_freq).unsqueeze(2)  # [B, T, 1, D]
    cos, sin = angles.cos(), angles.sin() * sign
    if dtype != torch.float32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin, perm, rotary_dim


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x [B, T, H, D] NeoX-style (see rope_cos_sin); the remaining
    channels pass through unchanged.

    A few rows (decode) take the 4-op gather form; many rows take slices, because a gather along the last dim
    is slow in bulk (2,048 x 6 heads x 96 channels: 4.7 ms against 0.9 ms). The values are the same."""
    cos, sin, perm, rd = rope
    if x.shape[0] * x.shape[1] <= SMALL_ROWS:
        return x * cos + torch.index_select(x, -1, perm) * sin
    x_rot = x[..., :rd]
    rotated = torch.cat([x_rot[..., rd // 2:], x_rot[..., :rd // 2]], dim=-1)  # sin carries the minus sign
    return torch.cat([x_rot * cos[..., :rd] + rotated * sin[..., :rd], x[..., rd:]], dim=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one GEMM."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self._gate_up = LinearWeights(torch.cat)
        self._down = LinearWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._gate_up.linear(x, self.gate_proj.weight, self.up_proj.weight).chunk(2, dim=-1)
        return self._down.linear(F.silu(gate) * up, self.down_proj.weight)
