"""EngineConfig and SamplingParams: small dataclasses validated on construction; torch-free.

Every ValueError names the offending field first, so a server can map it to the request parameter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

# The bundled default model lives inside the package, so a plain (non-editable) `pip install .` ships it;
# the repository's `models/mimo-tiny` is a link to it. Defined here, torch-free, so the CLI can name it cheaply.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "mimo-tiny"

# bytes per stored KV element; kept here (not torch dtypes) so the planner and the config stay torch-free
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

# temperatures below this are treated as greedy (argmax), as vLLM does: dividing logits by ~0 overflows
GREEDY_EPS = 1e-5

# vLLM's rejection sampler caps the speculative length at 32; nothing here needs more
MAX_SPECULATIVE_TOKENS = 32

_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu|meta)(:\d+)?$")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Per-request decoding settings (the vLLM / OpenAI subset the engine implements).

    - max_tokens: generate at most this many tokens; None = until `max_model_len`.
    - temperature: 0 (below 1e-5) = greedy argmax; otherwise logits are divided by it.
    - top_p: nucleus mass in (0, 1]; 1 = off.
    - top_k: keep the k most likely tokens; None, -1 or 0 = off (stored as None).
    - min_p: in [0, 1]; drop tokens less likely than min_p times the most likely one (0 = off).
    - seed: seeds a generator used by this request only, so its tokens do not depend on the batch.
    - stop: stop strings; matched on text by the detokenizing layer (the engine only sees ids).
    - stop_token_ids: generation ends after emitting any of these (the token is kept in the output).
    - logprobs: None = none; n >= 0 = the chosen token's log-probability plus the n most likely alternatives.
    - ignore_eos: do not stop at the model's EOS token (benchmarks with fixed output lengths).
    - n: independent samples of the prompt (sample i uses seed + i when seeded).
    - min_tokens: EOS and stop_token_ids cannot be sampled before this many output tokens.
    - repetition_penalty: > 0; logits of tokens seen in the prompt or the output are divided by it when positive
      and multiplied by it when negative (1 = off; CTRL / vLLM semantics).
    - presence_penalty / frequency_penalty: in [-2, 2]; subtracted once per token present in the output /
      once per occurrence (OpenAI semantics).
    - logprobs_mode: "raw" = log-softmax of the model's logits; "processed" = log of the distribution actually
      sampled from (after penalties, temperature, top-k, top-p): the one an importance ratio needs.
    - routed_experts: return the MoE experts chosen at every position the model ran over (prompt and output,
      accepted tokens only) with the finished output, for Rollout Routing Replay; off = serving pays nothing.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    n: int = 1
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs_mode: str = "raw"
    routed_experts: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None:
            if not _is_int(self.top_k) or self.top_k < -1:
                raise ValueError(f"top_k must be None, -1 or 0 (off), or a positive integer, got {self.top_k!r}")
            if self.top_k <= 0:
                self.top_k = None
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            ids = list(self.stop_token_ids)
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
            self.stop_token_ids = ids
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        rp = self.repetition_penalty
        if not _is_real(rp) or not math.isfinite(rp) or rp <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if self.logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {self.logprobs_mode!r}")
        if not isinstance(self.routed_experts, bool):
            raise ValueError(f"routed_experts must be a bool, got {self.routed_experts!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide limits and KV pool sizes.

    - max_num_seqs: running sequences at most (the decode batch size).
    - max_num_batched_tokens: query tokens per step over all sequences (decode tokens, drafts and prefill
      chunks together).
    - max_model_len: prompt + output tokens of one request at most.
    - block_size: tokens per KV block, the same for both pools.
    - num_full_blocks / num_sliding_blocks: pool sizes in blocks. Give both, or give `kv_cache_bytes` and let
      `mimo.engine.planner.resolve_num_blocks` split the bytes, or give neither and the planner sizes the
      pools so that `max_num_seqs` requests of `max_model_len` tokens fit at once (no preemption).
    - num_speculative_tokens: drafts per decode step (k); a decode step then has 1 + k query tokens.
    - enable_chunked_prefill: split long prompts over steps; off = a prompt is prefilled in one step, which
      needs max_num_batched_tokens >= max_model_len.
    - sliding_window_margin: keep this many extra positions behind the window in the sliding pool. 0 is
      exact when every future query is at a position >= the committed length; a runner that queries at
      committed - 1 in a later step (e.g. MTP drafting from h_{n-1} as its own step) needs 1.
    - dtype: KV element type name (a key of DTYPE_BYTES); device: where the KV tensors live.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    block_size: int = 16
    num_full_blocks: int | None = None
    num_sliding_blocks: int | None = None
    kv_cache_bytes: int | None = None
    num_speculative_tokens: int = 0
    enable_chunked_prefill: bool = True
    sliding_window_margin: int = 0
    dtype: str = "bfloat16"
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("num_full_blocks", "num_sliding_blocks", "kv_cache_bytes"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {v!r}")
        counts_given = self.num_full_blocks is not None or self.num_sliding_blocks is not None
        if self.kv_cache_bytes is not None and counts_given:
            raise ValueError("kv_cache_bytes cannot be combined with num_full_blocks / num_sliding_blocks; "
                             "give either the budget or the block counts")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 0 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an integer in [0, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {k!r}")
        if self.max_num_batched_tokens < 1 + k:
            raise ValueError(f"max_num_batched_tokens must be >= 1 + num_speculative_tokens = {1 + k} so one "
                             f"decode step fits, got {self.max_num_batched_tokens}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (one prompt token and one output token), "
                             f"got {self.max_model_len}")
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                             f"({self.max_model_len}) when enable_chunked_prefill is off, or a long prompt "
                             "could never be scheduled")
        if not _is_int(self.sliding_window_margin) or self.sliding_window_margin < 0:
            raise ValueError(f"sliding_window_margin must be an integer >= 0, got {self.sliding_window_margin!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must look like 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]
