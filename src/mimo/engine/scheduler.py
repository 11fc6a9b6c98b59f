"""Continuous-batching scheduler with chunked prefill, speculative decode slots and preemption; torch-free.

One engine step:
1. `schedule()` picks the work, reserving KV slots for it, and returns a `SchedulerOutput` of `ScheduledSeq`s:
   a. decoding sequences first, oldest arrival first; each gets 1 + k query slots (the pending token and k
      drafts, k per request, clamped so the step can neither exceed max_tokens / max_model_len nor the token
      budget; dropped to 0 before anyone is preempted when memory is short);
   b. then running sequences still prefilling (a chunk of their remaining tokens, shrunk to what the pools can
      hold), then waiting sequences in FCFS order (admitted only if their whole chunk fits, and never in a
      step that preempted someone);
   c. when a running sequence cannot get even one query slot, the most recently arrived running sequence not
      yet scheduled this step (possibly itself) is preempted by recompute: all its blocks are freed and it goes
      back to the front of the waiting queue, its generated tokens kept and recomputed as prompt.
2. The runner executes the items; for every item that `samples` it returns the emitted tokens (1 for prefill,
   1..1+k for a verify step: accepted drafts plus the correction/bonus token).
3. `update(item, tokens)` (or `postprocess(out, tokens_per_item)`) advances the committed count, appends
   tokens up to the first stop token / max_tokens / max_model_len, frees finished sequences and frees
   out-of-window sliding blocks of the others.

Liveness: the constructor checks that one sequence of max_model_len tokens fits the pools alone, so the
oldest running sequence can always proceed once younger ones are preempted.

Differences from vLLM: no priorities, no prefix cache, no waiting-queue reordering; preemption is recompute
only (no swap); a prefill chunk of an already-running sequence shrinks to free memory instead of preempting.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field
from typing import Any

from mimo.engine.block_manager import KVBlockManager, cdiv
from mimo.engine.config import EngineConfig
from mimo.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: query positions [start_pos, start_pos + num_tokens).

    For a decode item the positions are the pending token at start_pos followed by `num_draft_slots` draft
    positions; the runner fills the drafts and may use fewer (then it reports `num_drafts`).
    `samples`: whether the runner must return emitted tokens for this item (every decode item, and the
    prefill chunk that completes the prefill).
    """

    seq: Sequence
    start_pos: int
    num_tokens: int
    is_prefill: bool
    num_draft_slots: int = 0
    samples: bool = True

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens

    @property
    def input_token_ids(self) -> list[int]:
        """The known tokens of the step (prefill chunk, or [pending token] in decode); drafts excluded."""
        return self.seq.token_ids_slice(self.start_pos, self.end_pos - self.num_draft_slots)


@dataclass
class SchedulerOutput:
    items: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: KVBlockManager, eos_token_id: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        bm = block_manager
        if bm.block_size != config.block_size:
            raise ValueError(f"block_size mismatch: config {config.block_size}, block manager {bm.block_size}")
        # one max_model_len request must fit alone, or it could be preempted forever
        need_full = cdiv(config.max_model_len, bm.block_size) if bm.has_full else 0
        if need_full > bm.full_pool.num_blocks:
            raise ValueError(f"num_full_blocks ({bm.full_pool.num_blocks}) must hold one request of max_model_len "
                             f"({config.max_model_len}) tokens: at least {need_full} blocks")
        step = min(config.max_num_batched_tokens, config.max_model_len)
        need_sliding = bm.sliding_bound(step) if bm.has_sliding else 0
        if need_sliding > bm.sliding_pool.num_blocks:
            raise ValueError(f"num_sliding_blocks ({bm.sliding_pool.num_blocks}) must hold one request's window "
                             f"plus a step of {step} tokens: at least {need_sliding} blocks")
        self.config = config
        self.block_manager = bm
        self.eos_token_id = eos_token_id
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # kept sorted by arrival_order
        self._requests: dict[str, Sequence] = {}
        self._arrivals = itertools.count()

    # ---- requests ----------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request (FCFS). Raises ValueError for a duplicate id or a prompt that cannot fit."""
        cfg = self.config
        if seq.request_id in self._requests:
            raise ValueError(f"request_id {seq.request_id!r} is already in use")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.output_token_ids:
            raise ValueError(f"request {seq.request_id!r} must be a fresh sequence")
        if seq.num_prompt_tokens >= cfg.max_model_len:
            raise ValueError(f"prompt of request {seq.request_id!r} has {seq.num_prompt_tokens} tokens; "
                             f"max_model_len {cfg.max_model_len} leaves no room for an output token")
        k = seq.num_speculative_tokens
        if k is None:
            seq.num_speculative_tokens = cfg.num_speculative_tokens
        elif k > cfg.num_speculative_tokens:
            raise ValueError(f"num_speculative_tokens of request {seq.request_id!r} ({k}) exceeds the engine's "
                             f"{cfg.num_speculative_tokens}")
        sp = seq.sampling_params
        stop = set(sp.stop_token_ids or ())
        if self.eos_token_id is not None and not sp.ignore_eos:
            stop.add(self.eos_token_id)
        seq.stop_ids = frozenset(stop)
        seq.arrival_order = next(self._arrivals)
        self._requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str, status: SequenceStatus = SequenceStatus.FINISHED_ABORTED) -> Sequence | None:
        """Finish a waiting or running request and free everything it holds; None if unknown.

        `status` is FINISHED_STOPPED when the text layer found a stop string (a stop, not an abort)."""
        if not status.is_finished:
            raise ValueError(f"abort needs a finished status, got {status}")
        seq = self._requests.get(request_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, status)
        return seq

    def get(self, request_id: str) -> Sequence | None:
        return self._requests.get(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- scheduling ----------------------------------------------------------------------------------------
    def remaining_tokens(self, seq: Sequence) -> int:
        """Tokens the sequence may still emit: min(max_tokens - generated, max_model_len - num_tokens)."""
        left = self.config.max_model_len - seq.num_tokens
        mt = seq.sampling_params.max_tokens
        return left if mt is None else min(left, mt - seq.num_output_tokens)

    def schedule(self) -> SchedulerOutput:
        cfg, bm = self.config, self.block_manager
        out = SchedulerOutput()
        budget = cfg.max_num_batched_tokens
        scheduled: set[int] = set()  # id() of sequences with an item this step

        def make_room(seq: Sequence) -> bool:
            """Preempt the youngest unscheduled running sequence; False once `seq` itself was preempted."""
            victim = max((s for s in self.running if id(s) not in scheduled), key=lambda s: s.arrival_order)
            self._preempt(victim)
            out.preempted.append(victim)
            return victim is not seq

        # a. decodes (1 + k query slots each)
        for seq in [s for s in self.running if not s.is_prefill]:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted above to make room for an older sequence
            if budget < 1:
                break
            start = seq.num_computed_tokens
            # a verify step emits up to 1 + k tokens, so k < tokens still allowed; e.g. max_tokens 3 with 1
            # generated leaves 2 -> at most 1 draft; max_model_len 12 with 9 tokens leaves 3 -> at most 2
            k = max(0, min(seq.num_speculative_tokens or 0, self.remaining_tokens(seq) - 1, budget - 1))
            while not bm.can_allocate(seq, start + 1 + k):
                if k > 0 and bm.can_allocate(seq, start + 1):
                    k = 0  # fewer drafts is cheaper than recomputing someone
                elif not make_room(seq):
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.allocate(seq, start + 1 + k)
            out.items.append(ScheduledSeq(seq, start, 1 + k, is_prefill=False, num_draft_slots=k))
            scheduled.add(id(seq))
            budget -= 1 + k

        # b. running sequences in the middle of a chunked prefill
        for seq in [s for s in self.running if s.is_prefill]:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if budget < 1:
                break
            start = seq.num_computed_tokens
            remaining = seq.num_prefill_tokens - start
            want = min(remaining, budget)
            if want < remaining and not cfg.enable_chunked_prefill:
                continue
            while True:
                if cfg.enable_chunked_prefill:
                    t = bm.max_allocatable(seq, start, want)
                else:
                    t = want if bm.can_allocate(seq, start + want) else 0
                if t > 0 or not make_room(seq):
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.allocate(seq, start + t)
            out.items.append(ScheduledSeq(seq, start, t, is_prefill=True, samples=t == remaining))
            scheduled.add(id(seq))
            budget -= t

        # c. admit waiting sequences (FCFS: stop at the first that does not fit)
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            remaining = seq.num_prefill_tokens
            want = min(remaining, budget)
            if want < remaining and not cfg.enable_chunked_prefill:
                break
            if not bm.can_allocate(seq, want):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            bm.allocate(seq, want)
            out.items.append(ScheduledSeq(seq, 0, want, is_prefill=True, samples=want == remaining))
            scheduled.add(id(seq))
            budget -= want

        self.running.sort(key=lambda s: s.arrival_order)
        return out

    def preempt_all(self) -> list[Sequence]:
        """Preempt every running sequence by recompute (their KV is no longer valid, e.g. new weights);
        returns them. They are re-admitted in their old order, ahead of the sequences already waiting."""
        seqs = sorted(self.running, key=lambda s: s.arrival_order)
        for seq in reversed(seqs):  # appendleft: the oldest ends up first
            self._preempt(seq)
        return seqs

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    # ---- results ---------------------------------------------------------------------------------------------
    def update(self, item: ScheduledSeq, token_ids: Iterable[int], *, num_drafts: int | None = None,
               logprobs: SequenceT[Any] | None = None) -> list[int]:
        """Apply one executed item; returns the tokens actually appended (after stop truncation).

        token_ids: [] for a prefill chunk that does not sample; [t] when the prefill completes; for decode the
        emitted run: accepted drafts then the correction/bonus token (1 .. 1 + num_drafts tokens).
        num_drafts: drafts the runner actually verified (default item.num_draft_slots), for the counters.
        logprobs: optional per-token payloads stored alongside the appended tokens.
        Items of sequences aborted after `schedule()` are ignored.
        """
        seq = item.seq
        if seq.status is not SequenceStatus.RUNNING:
            return []
        if seq.num_computed_tokens != item.start_pos:
            raise ValueError(f"stale item for {seq.request_id!r}: starts at {item.start_pos}, "
                             f"sequence has {seq.num_computed_tokens} computed tokens")
        tokens = list(token_ids)
        if logprobs is not None and len(logprobs) != len(tokens):
            raise ValueError(f"{len(logprobs)} logprobs for {len(tokens)} tokens of {seq.request_id!r}")
        if item.is_prefill:
            if len(tokens) != (1 if item.samples else 0):
                raise ValueError(f"prefill item of {seq.request_id!r} must return {int(item.samples)} tokens, "
                                 f"got {len(tokens)}")
            seq.num_computed_tokens += item.num_tokens
        else:
            nd = item.num_draft_slots if num_drafts is None else num_drafts
            if not 0 <= nd <= item.num_draft_slots:
                raise ValueError(f"num_drafts {nd} outside [0, {item.num_draft_slots}] for {seq.request_id!r}")
            if not 1 <= len(tokens) <= 1 + nd:
                raise ValueError(f"decode item of {seq.request_id!r} with {nd} drafts must return 1..{1 + nd} "
                                 f"tokens, got {len(tokens)}")
            # KV of the pending token and of every accepted draft is now valid; rejected slots are not counted
            # and get overwritten next step
            seq.num_computed_tokens += len(tokens)
            if nd > 0:
                seq.num_draft_tokens += nd
                seq.num_accepted_tokens += len(tokens) - 1
                seq.num_verify_steps += 1
        appended = self._append(seq, tokens, logprobs)
        if seq.status is SequenceStatus.RUNNING:
            self.block_manager.free_out_of_window(seq)
        else:
            self.running.remove(seq)
            self._finish(seq, seq.status)
        return appended

    def postprocess(self, out: SchedulerOutput, token_ids: SequenceT[Iterable[int]],
                    num_drafts: SequenceT[int | None] | None = None,
                    logprobs: SequenceT[SequenceT[Any] | None] | None = None) -> list[Sequence]:
        """update() every item of a step (lists aligned with out.items); returns the sequences that finished."""
        if len(token_ids) != len(out.items):
            raise ValueError(f"{len(token_ids)} results for {len(out.items)} scheduled items")
        finished = []
        for i, item in enumerate(out.items):
            was_running = item.seq.status is SequenceStatus.RUNNING
            self.update(item, token_ids[i], num_drafts=None if num_drafts is None else num_drafts[i],
                        logprobs=None if logprobs is None else logprobs[i])
            if was_running and item.seq.is_finished:
                finished.append(item.seq)
        return finished

    def _append(self, seq: Sequence, tokens: list[int], logprobs: SequenceT[Any] | None) -> list[int]:
        """Append tokens one at a time, stopping at the first that ends the request (kept in the output)."""
        mt = seq.sampling_params.max_tokens
        for i, t in enumerate(tokens):
            seq.output_token_ids.append(t)
            if logprobs is not None:
                seq.output_logprobs.append(logprobs[i])
            if seq.first_token_time is None:
                seq.first_token_time = self.clock()
            if t in seq.stop_ids:
                seq.status = SequenceStatus.FINISHED_STOPPED
                seq.stop_token_id = t
            elif (mt is not None and seq.num_output_tokens >= mt) or seq.num_tokens >= self.config.max_model_len:
                seq.status = SequenceStatus.FINISHED_LENGTH
            if seq.is_finished:
                return tokens[:i + 1]
        return tokens

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self.block_manager.free(seq)
        seq.status = status
        seq.finish_time = self.clock()
        del self._requests[seq.request_id]
