"""Sequence: one request's state as the scheduler and block manager see it; plain data, torch-free.

Token and position bookkeeping (vLLM's convention):
- `all_token_ids` = prompt + output; token i sits at position i.
- `num_computed_tokens` (n) = positions whose KV is written and committed (accepted). In decode the last
  token (the one just sampled, at position n) is *pending*: its KV is computed by the next step, so
  `num_tokens == n + 1` between decode steps. Speculative drafts are never part of `all_token_ids`; they
  live only inside one step, and rejecting them just means n does not advance over them.
- After (re)admission everything in `all_token_ids` must be prefilled: `num_prefill_tokens` is set to
  `num_tokens` then, so a preempted sequence recomputes its generated tokens as part of its prompt.

Example: prompt [5, 6, 7], nothing generated: num_tokens 3, n 0, prefilling. After a one-step prefill of 3
tokens that samples 9: tokens [5, 6, 7, 9], n 3 (positions 0..2 cached), pending token 9 at position 3.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from mimo.engine.config import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"  # emitted a stop token (EOS or stop_token_ids)
    FINISHED_LENGTH = "finished_length"  # hit max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style finish_reason: "stop", "length", "abort" or None while unfinished."""
        return _FINISH_REASON.get(self)


_FINISHED = {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED}
_FINISH_REASON = {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length",
                  SequenceStatus.FINISHED_ABORTED: "abort"}


@dataclass(eq=False)  # identity semantics: a sequence is a mutable object, two requests are never "equal"
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    # drafts per decode step for this request; None = the engine default (set by Scheduler.add)
    num_speculative_tokens: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # which of the request's n samples this is (SamplingParams.n); request_id is then unique per sample
    index: int = 0

    output_token_ids: list[int] = field(default_factory=list)
    # per output token, whatever the sampler returned for it (e.g. TokenLogprobs); only when requested
    output_logprobs: list[Any] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_prefill_tokens: int = 0
    # admission order, set by the scheduler; preemption picks the running sequence with the largest
    arrival_order: int = -1
    # token that ended generation with FINISHED_STOPPED
    stop_token_id: int | None = None
    # ids that end generation (stop_token_ids + EOS unless ignore_eos); set by the scheduler
    stop_ids: frozenset[int] = frozenset()

    # KV block tables (owned by the block manager). full: logical block j -> block id, for positions
    # [j * block_size, (j + 1) * block_size). sliding: the same logical indexing, None once freed.
    full_block_table: list[int] = field(default_factory=list)
    sliding_block_table: list[int | None] = field(default_factory=list)
    # number of leading None entries in sliding_block_table (everything before it is freed)
    sliding_freed_upto: int = 0

    # counters
    num_draft_tokens: int = 0  # drafts proposed for verification
    num_accepted_tokens: int = 0  # drafts accepted
    num_verify_steps: int = 0  # decode steps that verified at least one draft
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # queue time = first_scheduled_time - arrival_time
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"prompt_token_ids of request {self.request_id!r} must not be empty")
        if not all(isinstance(t, int) and t >= 0 for t in self.prompt_token_ids):
            raise ValueError(f"prompt_token_ids of request {self.request_id!r} must be non-negative integers")
        if self.num_speculative_tokens is not None and (
                not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 0):
            raise ValueError(f"num_speculative_tokens must be None or an integer >= 0, "
                             f"got {self.num_speculative_tokens!r}")
        if self.num_prefill_tokens == 0:
            self.num_prefill_tokens = len(self.prompt_token_ids)

    # ---- token views ---------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    # ---- state -----------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prefill(self) -> bool:
        """Still computing the tokens it was (re)admitted with; the step that finishes them samples."""
        return self.num_computed_tokens < self.num_prefill_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop all KV state; generated tokens become part of what is prefilled."""
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_prefill_tokens = self.num_tokens
        self.full_block_table = []
        self.sliding_block_table = []
        self.sliding_freed_upto = 0
        self.num_preemptions += 1
