"""LLM: the engine facade (vLLM-like). Token ids in, token ids out; text only through an optional tokenizer.

    llm = LLM()                                   # the bundled default model, MTP drafts = all heads
    outs = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=32, temperature=0))

Lower level, for a server: `add_request(request_id, prompt, params)`, `step() -> [RequestDelta]` (the new
tokens of every request that made progress this step, and a final token-less delta for each sample an abort
ended), `abort(request_id)`, `has_unfinished_requests()`,
`stats()`, `update_weights(...)` (in-process weight sync between steps: RL). `add_request` and `abort` are
thread-safe: they validate, then post a command to an inbox that
`step()` drains before scheduling, so one engine thread can serve many clients and an abort never frees
blocks under a running step. Text (incremental detokenisation, stop strings) is not the step's business:
`mimo.data.detok.TextStream` does it above the engine (the server, and `generate` here).

One step: drain the inbox -> schedule -> one flattened main-model forward over every scheduled token (prefill
chunks, pending tokens and their drafts) -> penalties, sample / verify -> commit -> one MTP drafting round
for the decoding requests. Bad input raises ValueError naming the parameter before anything is queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimo.engine.config import DEFAULT_MODEL, EngineConfig, SamplingParams
from mimo.engine.kv_cache import KVCache, long_tensor
from mimo.engine.planner import build_block_manager
from mimo.engine.runner import SEEDED_BATCH, DraftGuard, ModelRunner, MTPState, TimingGuard, draft_floor
from mimo.engine.sampler import (
    TokenLogprobs,
    compute_logprobs,
    logprob_source,
    make_generator,
    penalize_,
    probs_from_logits,
    sample,
)
from mimo.engine.scheduler import ScheduledSeq, Scheduler
from mimo.engine.sequence import Sequence, SequenceStatus
from mimo.engine.speculative import accept_greedy, accept_sampled
from mimo.model.moe import MoE, Routing


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_drafted: int
    num_accepted: int
    num_verify_steps: int

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def total_time(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def acceptance_length(self) -> float | None:
        """Tokens emitted per verify step (bonus included)."""
        return None if not self.num_verify_steps else 1 + self.num_accepted / self.num_verify_steps


@dataclass
class RequestDelta:
    """What one step did for one sample of one request: only the new tokens, never the whole output."""

    request_id: str
    index: int  # which of the request's n samples
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None  # aligned with new_token_ids when the request asked for them
    finished: bool
    finish_reason: str | None  # "stop" (EOS / stop_token_ids) or "length"; None while running
    stop_token_id: int | None
    num_prompt_tokens: int
    num_output_tokens: int  # after this step
    time: float  # time.monotonic() when these tokens were committed (one step commits them together)
    metrics: RequestMetrics
    # on the final delta of a request with SamplingParams.routed_experts: see RequestOutput.routed_experts
    routed_experts: torch.Tensor | None = None


@dataclass
class RequestOutput:
    """The whole result of one sample, as `generate` returns it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    logprobs: list[Any] | None = None
    index: int = 0
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    # with SamplingParams.routed_experts: [P + O - 1, n_moe_layers, top_k] int16, the experts chosen at every
    # position the model ran over (prompt and output but the last token, whose successor is never computed):
    # exactly the inputs of a training forward over prompt + output[:-1]. MoE layers in layer order.
    routed_experts: torch.Tensor | None = None


@dataclass
class EngineStats:
    num_steps: int = 0
    num_finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0  # every token committed, also of requests aborted or stopped by a stop string
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    decode_steps: int = 0  # sequence-steps that emitted tokens after the prefill
    preemptions: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify step (1 when nothing is drafted)."""
        return 1.0 + self.accepted_tokens / self.verify_steps if self.verify_steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass
class _Request:
    """A request as the facade tracks it: its samples' sequence ids (one per SamplingParams.n)."""

    seq_ids: list[str]
    prompt: str | None
    live: set[str] = field(default_factory=set)


def _load(model, dtype, device):
    from mimo.checkpoint import load_model

    tok = None
    if model is None:
        model = DEFAULT_MODEL
        if not (DEFAULT_MODEL / "config.json").exists():
            raise FileNotFoundError(f"the bundled default model is missing ({DEFAULT_MODEL.name}); "
                                    "pass model=PATH or a preset name")
    if isinstance(model, torch.nn.Module):
        return model, None
    path = Path(str(model))
    m = load_model(str(model), dtype=dtype, device=device)
    if path.is_dir() and (path / "tokenizer.json").exists():
        from mimo.data.tokenizer import Tokenizer

        tok = Tokenizer.load(path)
    return m, tok


# Steps of at most this many query rows (decode and verify of a few requests) may run on one intra-op thread;
# whether they do is timed per engine (LLM._threads), because it depends on the machine. They are
# dispatch-bound: a second thread splits hardly any op's work, yet every parallel region of the step pays a
# fork and join. On a 2-vCPU AMD EPYC (AVX2), fastest of 12 interleaved rounds, one thread won: batch-1 decode
# forward + logits 5.46 ms at 2 threads, 5.14 at 1; `generate` MTP off, code 1 request 1.035x, 4 requests
# 1.064x, chat tasks 1.030x; prefill of one prompt 12 tokens 1.08x, 32 tokens 0.94x, 128 tokens 0.84x. On a
# 2-vCPU Xeon (AVX-512), paired in one process, 6 rounds, two threads won: batch-1 code MTP off 1.069x, three
# drafts 1.119x, 4 requests 1.113x (and 16 rows on one thread lost 0.86x). transformers' generate takes the
# same time at 1 and 2 threads, so the benchmark's baseline does not move.
ONE_THREAD_ROWS = 8


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """torch's intra-op threads set to n inside (None: as they are), restored after."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LLM:
    def __init__(self, model: Any = None, num_speculative_tokens: int | None = None, max_num_seqs: int = 64,
                 max_model_len: int | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
                 tokenizer: Any = None, max_num_batched_tokens: int = 1024, block_size: int = 16,
                 num_full_blocks: int | None = None, num_sliding_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, seed: int = 0, draft_vocab_size: int | None = None,
                 adaptive_drafting: bool = True, compile: bool = False):
        model, tok = _load(model, dtype, device)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer if tokenizer is not None else tok
        cfg = self.model.config
        n_mtp = self.model.n_mtp
        if num_speculative_tokens is None:
            num_speculative_tokens = n_mtp
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if not isinstance(num_speculative_tokens, int) or not 0 <= num_speculative_tokens <= n_mtp:
            raise ValueError(f"num_speculative_tokens must be an integer in [0, {n_mtp}] (the model has {n_mtp} "
                             f"MTP heads), got {num_speculative_tokens!r}")
        max_model_len = max_model_len or min(cfg.max_position_embeddings, 4096)
        kv_dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        self.config = EngineConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max(max_num_batched_tokens, 1 + num_speculative_tokens),

            max_model_len=max_model_len, block_size=block_size, num_full_blocks=num_full_blocks,
            num_sliding_blocks=num_sliding_blocks, kv_cache_bytes=kv_cache_bytes,
            num_speculative_tokens=num_speculative_tokens,
            # MTP block k re-extends from its first non-final position, up to k + drafts behind the
            # committed length (runner module docstring), so its keys reach that far back too
            sliding_window_margin=num_speculative_tokens + n_mtp + 1, dtype=kv_dtype, device=device)
        self.block_manager = build_block_manager(self.config, cfg.replace(n_mtp_layers=n_mtp))
        self.cache = KVCache(cfg, block_size, self.block_manager.full_pool.num_blocks,
                             self.block_manager.sliding_pool.num_blocks, n_mtp,
                             dtype=next(self.model.parameters()).dtype, device=device)
        eos = getattr(self.tokenizer, "eos_id", None) if self.tokenizer is not None else cfg.eos_token_id
        self.scheduler = Scheduler(self.config, self.block_manager, eos_token_id=eos)
        # draft_vocab_size: the MTP heads draft among this many most frequent ids (runner; None = its default)
        self.runner = ModelRunner(self.model, self.cache, device, draft_vocab_size, compile)
        # off: every decode step verifies all of its request's drafts (fixed-k speculation, the reference the
        # adaptive policy is measured against)
        self.adaptive_drafting = adaptive_drafting
        self._guard = DraftGuard()  # with adaptive drafting: whether drafting pays at all, timed
        self._threads = TimingGuard()  # whether small CPU steps run faster on one thread (ONE_THREAD_ROWS)
        self._threads_last: bool | None = None  # the last step's thread mode (None: not asked)
        self._round_start = 0.0  # when the last step's drafting round began (time.perf_counter)
        self._round_mode: bool | None = None  # the guard's mode in the last drafting round
        self._whole_batch = False  # inside `generate`: its caller waits for every request (_off_critical_path)
        self._rng = torch.Generator().manual_seed(seed)
        self._gens: dict[str, torch.Generator | None] = {}
        self._mtp: dict[str, MTPState] = {}
        # routed experts of the committed positions, per sequence that asked: chunks [n, n_moe_layers, top_k]
        # covering positions [0, sum of n) in order (a preemption restarts them at 0)
        self._routed: dict[str, list[torch.Tensor]] = {}
        self._moe_layers = sorted(m.layer_id for m in self.model.modules() if isinstance(m, MoE))
        self._weights_version = self.model.weights_version
        self._requests: dict[str, _Request] = {}  # by request id, until every sample has finished
        self._parent: dict[str, str] = {}  # sequence id -> request id
        self._inbox: deque[tuple] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stats = EngineStats()
        # hidden states kept per request: a window plus the positions a drafting round may re-extend
        self._h_keep = cfg.sliding_window + 2 * (num_speculative_tokens + n_mtp + 1)

    # ---- requests (any thread) -----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids, validated against the vocabulary and max_model_len (ValueError)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is a string but the model has no tokenizer (a model directory with "
                                 "tokenizer.json); pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        V = self.model.config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {V}), got {bad[0]!r}")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.config.max_model_len} "
                             "(prompt plus at least one output token)")
        return ids

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    sampling_params: SamplingParams | None = None, num_speculative_tokens: int | None = None,
                    arrival_time: float | None = None) -> str:
        """Validate and queue one request (its `n` samples); returns its id. Thread-safe.

        Raises ValueError before queuing anything. `arrival_time` (time.monotonic()) defaults to now, taken
        before tokenisation so queue time and TTFT include it."""
        arrival = time.monotonic() if arrival_time is None else arrival_time
        ids = self.encode(prompt)
        return self._add(request_id, prompt, ids, sampling_params, num_speculative_tokens, arrival)

    def _add(self, request_id, prompt, ids, sampling_params, num_speculative_tokens, arrival) -> str:
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        k = num_speculative_tokens
        if k is not None and (not isinstance(k, int) or not 0 <= k <= self.config.num_speculative_tokens):
            raise ValueError(f"num_speculative_tokens must be in [0, {self.config.num_speculative_tokens}], "
                             f"got {k!r}")
        if len(ids) + params.min_tokens > self.config.max_model_len:
            raise ValueError(f"min_tokens ({params.min_tokens}) does not fit: the prompt has {len(ids)} tokens "
                             f"and max_model_len is {self.config.max_model_len}")
        seqs = []
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._requests:
                raise ValueError(f"request_id {rid!r} is already in use")
            for i in range(params.n):
                sp = params
                if params.n > 1:
                    sp = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
                sid = rid if params.n == 1 else f"{rid}#{i}"
                seqs.append(Sequence(sid, ids, sp, num_speculative_tokens=k, arrival_time=arrival, index=i))
            req = _Request([s.request_id for s in seqs], prompt if isinstance(prompt, str) else None)
            req.live.update(req.seq_ids)
            self._requests[rid] = req
            self._parent.update((sid, rid) for sid in req.seq_ids)
            self._inbox.append(("add", seqs))
        return rid

    def abort(self, request_id: str, index: int | None = None, reason: str = "abort") -> bool:
        """Finish a request (or one of its samples) before the next step; False if unknown. Thread-safe.

        reason "stop" records a stop (the text layer found a stop string) rather than an abort."""
        if reason not in ("abort", "stop"):
            raise ValueError(f"reason must be 'abort' or 'stop', got {reason!r}")
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return False
            sids = req.seq_ids if index is None else [req.seq_ids[index]] if 0 <= index < len(req.seq_ids) else []
            sids = [s for s in sids if s in req.live]
            if not sids:
                return False
            self._inbox.append(("abort", sids, reason))
        return True

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests)

    def _drain(self) -> list[RequestDelta]:
        """Apply the posted commands; returns a final (token-less) delta for each sample they finished."""
        with self._lock:
            cmds, self._inbox = self._inbox, deque()
        done = []
        for cmd in cmds:
            if cmd[0] == "add":
                for seq in cmd[1]:
                    self.scheduler.add(seq)
                    self._gens[seq.request_id] = make_generator(seq.sampling_params.seed)
                    self._mtp[seq.request_id] = MTPState()
                    self._stats.prompt_tokens += seq.num_prompt_tokens
            else:
                status = SequenceStatus.FINISHED_STOPPED if cmd[2] == "stop" else SequenceStatus.FINISHED_ABORTED
                for sid in cmd[1]:
                    seq = self.scheduler.abort(sid, status)
                    if seq is not None:
                        self._stats.generated_tokens += seq.num_output_tokens
                        done.append(self._delta(seq, seq.num_output_tokens, time.monotonic()))
                    self._retire(sid)
        return done

    def _retire(self, sid: str) -> None:
        self._gens.pop(sid, None)
        self._mtp.pop(sid, None)
        self._routed.pop(sid, None)
        with self._lock:
            rid = self._parent.pop(sid, None)
            req = self._requests.get(rid) if rid is not None else None
            if req is not None:
                req.live.discard(sid)
                if not req.live:
                    del self._requests[rid]

    # ---- one step (the engine thread) -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestDelta]:
        t0 = time.perf_counter()
        ended = self._drain()
        if self.model.weights_version != self._weights_version:
            self._sync_weights()
        out = self.scheduler.schedule()
        self._stats.preemptions += len(out.preempted)
        for seq in out.preempted:
            self._mtp[seq.request_id] = MTPState()
            self._routed.pop(seq.request_id, None)
        if out.is_empty:
            return ended
        rows = sum(it.num_tokens for it in out.items)
        one = None  # a small CPU step: on one thread (True) or the caller's count, as the timing says
        # timed per (rows, sequences): one request's 4-row verify step (and its drafting round) and 4 requests'
        # decode step are different work; compared in one bucket, the guard judged one by the other's times
        key = (rows, len(out.items))
        # not with compiled steps: dynamo guards on the thread count, so each count needs graphs of its own
        # (switching once recompiled every graph until the recompile limit), and compiled, one thread gained
        # nothing (batch-1 code MTP off, interleaved: 2.10 against 2.19 ms/token on two)
        if (rows <= ONE_THREAD_ROWS and self.runner.device.type == "cpu" and torch.get_num_threads() > 1
                and not self.runner.compiled):
            one = self._threads.mode(key)
        with intra_op_threads(1 if one else None):
            deltas = self._run(out, ended, t0)
        # timed up to the drafting round, whose work varies with the drafting policy and not with the step's
        # size: counted, it made 1-row steps of MTP off and of skipped drafting look alike and the guard's
        # choice flip between rounds. The first step after a switch of thread count is left out: it pays the
        # switch (OpenMP's team is rebuilt), a cost of exploring; counted, it made the guard settle on one
        # thread for batch-1 verify steps, 0.88x of two
        if one is not None and one == self._threads_last:
            self._threads.record(key, one, 1, self._round_start - t0)
        self._threads_last = one
        return deltas

    def _run(self, out, ended: list[RequestDelta], t0: float) -> list[RequestDelta]:
        """The rest of `step` once something is scheduled: forward, sample / verify, commit, drafting."""
        self._stats.num_steps += 1
        now = time.monotonic()
        items, row_of, drafts_of = [], [], []
        row = 0
        for it in out.items:
            if it.seq.first_scheduled_time is None:
                it.seq.first_scheduled_time = now
            st = self._mtp[it.seq.request_id]
            toks = it.input_token_ids
            drafts = [] if it.is_prefill else st.drafts[:it.num_draft_slots]
            items.append((it.seq, it.start_pos, toks + drafts))
            row_of.append(row)
            drafts_of.append(drafts)
            row += len(toks) + len(drafts)
        routing = Routing(record=True) if any(it.seq.sampling_params.routed_experts for it in out.items) else None
        hidden = self.runner.forward(items, routing)
        # [N, n_moe_layers, top_k]: row i is the flattened query row i of this step (the layout of `hidden`)
        routed = torch.stack([routing.ids[l] for l in self._moe_layers], 1).to("cpu", torch.int16) \
            if routing is not None and self._moe_layers else None

        # rows that need logits: the last of a sampling prefill chunk, all 1 + drafts of a decode item
        need: list[int] = []
        for it, r, (_, _, toks) in zip(out.items, row_of, items):
            if it.is_prefill:
                if it.samples:
                    need.append(r + len(toks) - 1)
            else:
                need += range(r, r + len(toks))
        logits = None
        if need:  # every row of a pure decode / verify step needs its logits: no gather then
            rows = hidden if len(need) == hidden.shape[0] else hidden.index_select(0, long_tensor(need, hidden.device))
            logits = self.runner.logits(rows)
        results = self._sample(out.items, items, drafts_of, logits)

        touched: list[tuple[Sequence, int]] = []
        for it, r, (_, _, toks), drafts, (tokens, lps) in zip(out.items, row_of, items, drafts_of, results):
            seq = it.seq
            n_before, n_out = seq.num_computed_tokens, seq.num_output_tokens
            self.scheduler.update(it, tokens, num_drafts=len(drafts), logprobs=lps)
            # committed rows: the whole prefill chunk; of a verify item the pending token and the accepted
            # drafts (len(tokens) - 1 of them: the last token is the correction/bonus, computed next step).
            # E.g. pending p at position n, drafts d1 d2 d3, d1 d2 accepted, bonus b: rows of p, d1, d2 are
            # kept as positions n..n+2, d3's row is dropped.
            n_new = len(toks) if it.is_prefill else len(tokens)
            if routed is not None and seq.sampling_params.routed_experts:
                self._keep_routed(seq.request_id, n_before, routed[r:r + n_new])
            if not it.is_prefill:
                self._stats.decode_steps += 1
                if drafts:
                    self._stats.drafted_tokens += len(drafts)
                    self._stats.accepted_tokens += len(tokens) - 1
                    self._stats.verify_steps += 1
            if seq.is_finished:
                touched.append((seq, n_out))
                continue
            # keep the hidden states of the newly committed positions for the MTP blocks
            self._mtp[seq.request_id].append(n_before, hidden[r:r + n_new], seq.num_computed_tokens - self._h_keep)
            if tokens:
                touched.append((seq, n_out))
        t_round = self._round_start = time.perf_counter()
        mode = self._draft([s for s, _ in touched if not s.is_finished])
        if mode is not None:  # the guard's timing (DraftGuard): a step whole, or only its drafting round
            t1 = time.perf_counter()
            if any(it.is_prefill for it in out.items):
                self._guard.record(len(out.items), mode, 0, t1 - t_round)
            elif mode == self._round_mode:
                self._guard.record(len(out.items), mode, sum(len(t) for t, _ in results), t1 - t0)
        self._round_mode = mode
        now = time.monotonic()
        deltas = ended + [self._delta(seq, n_out, now) for seq, n_out in touched]
        for seq, _ in touched:
            if seq.is_finished:
                self._stats.num_finished += 1
                self._stats.generated_tokens += seq.num_output_tokens
                self._retire(seq.request_id)
        return deltas

    def _sample(self, sched: list[ScheduledSeq], items, drafts_of, logits):
        """Per item: (emitted tokens, logprobs or None)."""
        results: list[tuple[list[int], list | None]] = [([], None)] * len(sched)
        single, single_rows = [], []
        lrow = 0
        spans = []
        for i, (it, (_, _, toks)) in enumerate(zip(sched, items)):
            if it.is_prefill and not it.samples:
                spans.append(None)
                continue
            n = 1 if it.is_prefill else len(toks)
            spans.append((lrow, lrow + n))
            seq, sp = it.seq, it.seq.sampling_params
            if sp.has_penalties or sp.min_tokens > seq.num_output_tokens:
                penalize_(logits[lrow:lrow + n], sp, seq.prompt_token_ids, seq.output_token_ids, drafts_of[i],
                          seq.stop_ids)
            if n == 1:
                single.append(i)
                single_rows.append(lrow)
            lrow += n
        if single:
            seqs = [sched[i].seq for i in single]
            rows = logits if len(single_rows) == logits.shape[0] else \
                logits.index_select(0, long_tensor(single_rows, logits.device))
            so = sample(rows, [s.sampling_params for s in seqs],
                        [self._gens.get(s.request_id) for s in seqs], self._rng)
            for j, i in enumerate(single):
                lp = so.logprobs[j]
                results[i] = ([so.token_ids[j]], None if lp is None else [lp])
        for i, it in enumerate(sched):
            span = spans[i]
            if span is None or i in single:
                continue
            sp, drafts = it.seq.sampling_params, drafts_of[i]
            rows = logits[span[0]:span[1]]
            if sp.is_greedy:
                toks = accept_greedy(drafts, rows)
            else:
                probs = probs_from_logits(rows, sp.temperature, sp.top_k, sp.top_p, sp.min_p)
                toks = accept_sampled(drafts, None, probs, self._gens.get(it.seq.request_id) or self._rng)
            lps = None
            if sp.logprobs is not None:
                used = rows[:len(toks)]
                lps = compute_logprobs(logprob_source(used, [sp] * len(toks)), toks, sp.logprobs)
            results[i] = (toks, lps)
        return results

    def _draft(self, candidates: list[Sequence]) -> bool | None:
        """The drafting round after a step; returns the guard's mode (None: not asked, e.g. drafting off or
        every drafting request seeded and sampled)."""
        seqs, states, nds = [], [], []
        for seq in candidates:
            k = seq.num_speculative_tokens or 0
            # drafting needs the pending token's predecessor hidden state: only sequences past their prefill
            if k > 0 and not seq.is_prefill and seq.num_tokens == seq.num_computed_tokens + 1:
                seqs.append(seq)
                states.append(self._mtp[seq.request_id])
                nds.append(min(k, self.model.n_mtp))
        if not seqs:
            return None
        if not self.adaptive_drafting:
            self.runner.draft(seqs, states, nds)
            return None
        # adaptive: each request drafts while its drafts pay for their cost at this batch size, and only while
        # the guard measures that drafting pays at all; a seeded sampled request decides from its own history
        # only, so its tokens do not depend on the batch or on timing
        private = [s.sampling_params.seed is not None and not s.sampling_params.is_greedy for s in seqs]
        # a compiled engine is timed at every batch size: the policy's costs (draft_floor) are the eager
        # engine's, and compiled plain steps shrank more than drafting ones
        timed = len(seqs) >= DraftGuard.MIN_BATCH or self.runner.compiled
        mode = self._guard.mode(len(seqs)) if timed and not all(private) else None
        skip = [not p for p in private] if mode is False else self._off_critical_path(seqs, private)
        if any(skip):  # they skip the round whole (their last drafts' outcome is folded in later)
            for st, k in zip(states, skip):
                if k:
                    st.drafts = []
            keep = [i for i, k in enumerate(skip) if not k]
            seqs, states, nds, private = ([x[i] for i in keep] for x in (seqs, states, nds, private))
        if seqs:
            floors = [draft_floor(SEEDED_BATCH if p else len(seqs)) for p in private]
            self.runner.draft(seqs, states, nds, floors, private)
        return mode

    def _off_critical_path(self, seqs: list[Sequence], private: list[bool]) -> list[bool]:
        """Per drafting candidate: whether drafting cannot shorten the current `generate` call. That call
        returns when its last request does, so with nothing waiting for a slot a request gains the caller
        nothing by drafting when its remaining budget at one token a step fits within the steps another
        request still needs (its budget over the tokens per step it has made so far); its drafting round and
        verify rows would only slow every step. E.g. 4 chat requests of 16 tokens, three rejecting their
        drafts: the fourth, 8 tokens ahead, stops drafting (it drafted one token a step for 0.91x of MTP off).
        Ties draft, so requests that progress alike all draft. Remaining budgets are upper bounds (a request
        may stop earlier), and a request that stops drafting resumes once the others' horizon falls below its
        budget. Off in the step API (the server: each request's own latency counts) and for seeded sampled
        requests (their drafting must not depend on other requests)."""
        if not self._whole_batch or self.scheduler.num_waiting:
            return [False] * len(seqs)
        cap = self.config.max_model_len

        def remaining(s: Sequence) -> int:
            budget = s.sampling_params.max_tokens
            left = cap - s.num_tokens
            return left if budget is None else min(left, budget - s.num_output_tokens)

        first, second, who = 0.0, 0.0, None  # the two largest expected step counts, and whose is the first
        for s in self.scheduler.running:
            made = s.num_output_tokens
            steps = remaining(s) * (made - s.num_accepted_tokens) / made if made else float(remaining(s))
            if steps > first:
                first, second, who = steps, first, s
            elif steps > second:
                second = steps
        return [not p and remaining(s) < (second if s is who else first) for s, p in zip(seqs, private)]

    def _keep_routed(self, sid: str, start: int, rows: torch.Tensor) -> None:
        chunks = self._routed.setdefault(sid, [])
        if sum(c.shape[0] for c in chunks) != start:
            raise RuntimeError(f"routed experts of {sid!r}: rows for position {start} do not follow the "
                               f"{sum(c.shape[0] for c in chunks)} kept")
        chunks.append(rows)

    def _delta(self, seq: Sequence, n_out: int, now: float) -> RequestDelta:
        """The tokens appended since n_out; slices only the new tail (O(new tokens) per step)."""
        lps = seq.output_logprobs[n_out:] if seq.sampling_params.logprobs is not None else None
        routed = None
        if seq.is_finished and seq.sampling_params.routed_experts:
            chunks = self._routed.get(seq.request_id)
            shape = (0, len(self._moe_layers), self.model.config.n_active_experts)
            # a verify step can commit rows beyond a stop token: keep the inputs of prompt + output[:-1]
            routed = torch.cat(chunks)[:seq.num_tokens - 1] if chunks else torch.zeros(shape, dtype=torch.int16)
        return RequestDelta(self._parent[seq.request_id], seq.index, seq.output_token_ids[n_out:], lps,
                            seq.is_finished, seq.finish_reason, seq.stop_token_id, seq.num_prompt_tokens,
                            seq.num_output_tokens, now, _metrics(seq), routed)

    # ---- weights -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, weights: dict[str, torch.Tensor] | torch.nn.Module | None = None) -> int:
        """Take new weights between steps (in-process sync after an optimizer step); returns the model's new
        weights version. Call it from the thread that runs `step()`.

        `weights`: a state dict or a module to copy into the engine's model (same architecture, strict), or
        None / the engine's own model when the caller already changed that model's parameters in place
        (load_state_dict, `p.data.copy_`, `p.data = t`, an optimizer step). Either way the model's weights
        version moves, which drops every cached derived weight (fused q/k/v, gate/up, norms), and every
        request in flight is preempted by recompute: its KV and MTP hidden states came from the old weights,
        so its tokens so far are prefilled again under the new ones and it continues from there. (A caller
        that bumps the version itself, `model.mark_weights_changed()`, gets the same at the next step.)"""
        if weights is not None and weights is not self.model:
            state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
            self.model.load_state_dict(state, strict=True)
        self.model.mark_weights_changed()
        self._sync_weights()
        return self._weights_version

    def _sync_weights(self) -> None:
        self._weights_version = self.model.weights_version
        for seq in self.scheduler.preempt_all():
            self._stats.preemptions += 1
            self._mtp[seq.request_id] = MTPState()
            self._routed.pop(seq.request_id, None)

    # ---- batch API -------------------------------------------------------------------------------------------
    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 num_speculative_tokens: int | None = None) -> list[RequestOutput]:
        """RequestOutputs in prompt order (n consecutive ones per prompt when n > 1). All prompts are validated
        before any is queued. With a tokenizer, `text` is the detokenised output ended at the first stop
        string, and `token_ids` / `logprobs` are cut to the tokens that produced that text."""
        from mimo.data.detok import TextStream

        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        bad = [sp for sp in params if sp is not None and not isinstance(sp, SamplingParams)]
        if bad:
            raise ValueError(f"sampling_params must be SamplingParams, got {type(bad[0]).__name__}")
        params = [sp if sp is not None else SamplingParams() for sp in params]
        if any(sp.stop for sp in params) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        ids = [self.encode(p) for p in prompts]
        now = time.monotonic()
        rids = [self._add(None, p, i, sp, num_speculative_tokens, now) for p, i, sp in zip(prompts, ids, params)]
        acc: dict[tuple[str, int], dict] = {}
        for rid, p, i, sp in zip(rids, prompts, ids, params):
            for j in range(sp.n):
                stream = TextStream(self.tokenizer, sp.stop) if self.tokenizer is not None else None
                acc[rid, j] = dict(prompt=p if isinstance(p, str) else None, ids=i, toks=[], lps=[], stream=stream,
                                   done=None, routed=None, want_lps=sp.logprobs is not None)
        pending = len(acc)
        self._whole_batch = True
        try:
            while pending:
                for d in self.step():
                    a = acc[d.request_id, d.index]
                    if d.routed_experts is not None:
                        a["routed"] = d.routed_experts
                    if a["done"] is not None:
                        continue  # tokens committed in the step that drained our stop-string abort
                    a["toks"] += d.new_token_ids
                    a["lps"] += d.new_logprobs or []
                    stream, reason = a["stream"], d.finish_reason
                    if stream is not None:
                        stream.push(d.new_token_ids)
                        if stream.stopped is not None and not d.finished:
                            self.abort(d.request_id, d.index, reason="stop")
                    if stream is not None and stream.stopped is not None:
                        reason = "stop"
                    if d.finished or (stream is not None and stream.stopped is not None):
                        a["done"] = (reason, d.metrics, d.stop_token_id)
                        pending -= 1
        finally:
            self._whole_batch = False
        for d in self._drain():  # the stop-string aborts posted in the last step: only their routed experts
            if d.routed_experts is not None:
                acc[d.request_id, d.index]["routed"] = d.routed_experts
        outs = []
        for (rid, j), a in acc.items():
            reason, m, stop_id = a["done"]
            stream, toks, lps = a["stream"], a["toks"], a["lps"]
            text, stop_reason = "", stop_id
            if stream is not None:
                stream.finish()
                text, toks, lps = stream.text, toks[:stream.num_tokens], lps[:stream.num_tokens]
                stop_reason = stream.stopped if stream.stopped is not None else stop_id
            routed = a["routed"]
            if routed is not None:  # cut with the tokens (a stop string): the inputs of prompt + toks[:-1]
                routed = routed[:len(a["ids"]) + len(toks) - 1]
            outs.append(RequestOutput(rid, a["prompt"], a["ids"], toks, text, True, reason, m,
                                      lps if a["want_lps"] else None, j,
                                      stop_reason, routed))
        return outs

    def stats(self) -> dict[str, Any]:
        s = self._stats
        with self._lock:
            queued = sum(len(c[1]) for c in self._inbox if c[0] == "add")
        return {"num_steps": s.num_steps, "num_finished": s.num_finished, "prompt_tokens": s.prompt_tokens,
                "generated_tokens": s.generated_tokens, "drafted_tokens": s.drafted_tokens,
                "accepted_tokens": s.accepted_tokens, "verify_steps": s.verify_steps,
                "decode_steps": s.decode_steps, "preemptions": s.preemptions,
                "mean_acceptance_length": s.mean_acceptance_length, "acceptance_rate": s.acceptance_rate,
                "kv_usage": self.block_manager.usage().fraction, "kv_cache_bytes": self.cache.nbytes(),
                "running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting + queued}


def _metrics(seq: Sequence) -> RequestMetrics:
    return RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time, seq.finish_time,
                          seq.num_draft_tokens, seq.num_accepted_tokens, seq.num_verify_steps)
