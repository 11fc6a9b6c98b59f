"""LLM: the engine facade (vLLM-like). Token ids in, token ids out; text only through an optional tokenizer.

    llm = LLM()                                   # the bundled default model, MTP drafts = all heads
    outs = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=32, temperature=0))

Lower level, for a server: `add_request(request_id, prompt, params)`, `step() -> [RequestOutput]` (requests
that made progress this step), `abort(request_id)`, `has_unfinished_requests()`, `stats()`.

One step: schedule -> one flattened main-model forward over every scheduled token (prefill chunks, pending
tokens and their drafts) -> sample / verify -> commit -> one MTP drafting round for the decoding requests.
Bad input raises ValueError naming the parameter before anything is scheduled.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimo.engine.config import EngineConfig, SamplingParams
from mimo.engine.kv_cache import KVCache
from mimo.engine.planner import build_block_manager
from mimo.engine.runner import ModelRunner, MTPState
from mimo.engine.sampler import compute_logprobs, make_generator, probs_from_logits, sample
from mimo.engine.scheduler import ScheduledSeq, Scheduler
from mimo.engine.sequence import Sequence, SequenceStatus
from mimo.engine.speculative import accept_greedy, accept_sampled

DEFAULT_MODEL = Path(__file__).resolve().parents[3] / "models" / "mimo-tiny"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_drafted: int
    num_accepted: int
    num_verify_steps: int

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
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    logprobs: list[Any] | None = None


@dataclass
class EngineStats:
    num_steps: int = 0
    num_finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
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


class LLM:
    def __init__(self, model: Any = None, num_speculative_tokens: int | None = None, max_num_seqs: int = 64,
                 max_model_len: int | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
                 tokenizer: Any = None, max_num_batched_tokens: int = 1024, block_size: int = 16,
                 num_full_blocks: int | None = None, num_sliding_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, seed: int = 0):
        model, tok = _load(model, dtype, device)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer if tokenizer is not None else tok
        cfg = self.model.config
        n_mtp = self.model.n_mtp
        if num_speculative_tokens is None:
            num_speculative_tokens = n_mtp
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
        self.runner = ModelRunner(self.model, self.cache, device)
        self._rng = torch.Generator().manual_seed(seed)
        self._gens: dict[str, torch.Generator | None] = {}
        self._mtp: dict[str, MTPState] = {}
        self._prompts: dict[str, str | None] = {}
        self._ids = itertools.count()
        self._stats = EngineStats()
        # hidden states kept per request: a window plus the positions a drafting round may re-extend
        self._h_keep = cfg.sliding_window + 2 * (num_speculative_tokens + n_mtp + 1)

    # ---- requests ----------------------------------------------------------------------------------------
    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is a string but the engine has no tokenizer; pass token ids")
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
                    sampling_params: SamplingParams | None = None,
                    num_speculative_tokens: int | None = None) -> str:
        """Validate and queue one request; returns its id. Raises ValueError before scheduling anything."""
        return self._add(request_id, prompt, self._encode(prompt), sampling_params, num_speculative_tokens)

    def _add(self, request_id, prompt, ids, sampling_params, num_speculative_tokens) -> str:
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        k = num_speculative_tokens
        if k is not None and (not isinstance(k, int) or not 0 <= k <= self.config.num_speculative_tokens):
            raise ValueError(f"num_speculative_tokens must be in [0, {self.config.num_speculative_tokens}], "
                             f"got {k!r}")
        seq = Sequence(rid, ids, params, num_speculative_tokens=k)
        self.scheduler.add(seq)
        self._gens[rid] = make_generator(params.seed)
        self._mtp[rid] = MTPState()
        self._prompts[rid] = prompt if isinstance(prompt, str) else None
        self._stats.prompt_tokens += len(ids)
        return rid

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        self._forget(request_id)
        return seq is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def _forget(self, rid: str) -> None:
        self._gens.pop(rid, None)
        self._mtp.pop(rid, None)
        self._prompts.pop(rid, None)

    # ---- one step --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self._stats.preemptions += len(out.preempted)
        for seq in out.preempted:
            self._mtp[seq.request_id] = MTPState()
        if out.is_empty:
            return []
        self._stats.num_steps += 1
        items, row_of, drafts_of = [], [], []
        row = 0
        for it in out.items:
            st = self._mtp[it.seq.request_id]
            toks = it.input_token_ids
            drafts = [] if it.is_prefill else st.drafts[:it.num_draft_slots]
            items.append((it.seq, it.start_pos, toks + drafts))
            row_of.append(row)
            drafts_of.append(drafts)
            row += len(toks) + len(drafts)
        hidden = self.runner.forward(items)

        # rows that need logits: the last of a sampling prefill chunk, all 1 + drafts of a decode item
        need: list[int] = []
        for it, r, (_, _, toks) in zip(out.items, row_of, items):
            if it.is_prefill:
                if it.samples:
                    need.append(r + len(toks) - 1)
            else:
                need += range(r, r + len(toks))
        logits = self.runner.logits(hidden[need]) if need else None
        results = self._sample(out.items, items, drafts_of, logits)

        touched = []
        for it, r, (_, _, toks), drafts, (tokens, lps) in zip(out.items, row_of, items, drafts_of, results):
            seq = it.seq
            n_before = seq.num_computed_tokens
            self.scheduler.update(it, tokens, num_drafts=len(drafts), logprobs=lps)
            if not it.is_prefill:
                self._stats.decode_steps += 1
                if drafts:
                    self._stats.drafted_tokens += len(drafts)
                    self._stats.accepted_tokens += len(tokens) - 1
                    self._stats.verify_steps += 1
            if seq.is_finished:
                touched.append(seq)
                continue
            # keep the hidden states of the newly committed positions for the MTP blocks
            n_new = len(toks) if it.is_prefill else len(tokens)
            self._mtp[seq.request_id].append(n_before, hidden[r:r + n_new], seq.num_computed_tokens - self._h_keep)
            if tokens:
                touched.append(seq)
        self._apply_stop_strings(touched)
        self._draft([s for s in touched if not s.is_finished])
        outputs = [self._output(seq) for seq in touched]
        for seq in touched:
            if seq.is_finished:
                self._stats.num_finished += 1
                self._stats.generated_tokens += seq.num_output_tokens
                self._forget(seq.request_id)
        return outputs

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
            if n == 1:
                single.append(i)
                single_rows.append(lrow)
            lrow += n
        if single:
            seqs = [sched[i].seq for i in single]
            so = sample(logits[single_rows], [s.sampling_params for s in seqs],
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
                probs = probs_from_logits(rows, sp.temperature, sp.top_k, sp.top_p)
                toks = accept_sampled(drafts, None, probs, self._gens.get(it.seq.request_id) or self._rng)
            lps = None
            if sp.logprobs is not None:
                lps = compute_logprobs(rows[:len(toks)], toks, sp.logprobs)
            results[i] = (toks, lps)
        return results

    def _draft(self, candidates: list[Sequence]) -> None:
        seqs, states, nds = [], [], []
        for seq in candidates:
            k = seq.num_speculative_tokens or 0
            # drafting needs the pending token's predecessor hidden state: only sequences past their prefill
            if k > 0 and not seq.is_prefill and seq.num_tokens == seq.num_computed_tokens + 1:
                seqs.append(seq)
                states.append(self._mtp[seq.request_id])
                nds.append(min(k, self.model.n_mtp))
        if seqs:
            self.runner.draft(seqs, states, nds)

    def _apply_stop_strings(self, seqs: list[Sequence]) -> None:
        if self.tokenizer is None:
            return
        for seq in seqs:
            stops = seq.sampling_params.stop
            if not stops or seq.is_finished:
                continue
            text = self.tokenizer.decode(seq.output_token_ids)
            if any(s in text for s in stops):
                self.scheduler.abort(seq.request_id)
                seq.status = SequenceStatus.FINISHED_STOPPED

    def _output(self, seq: Sequence) -> RequestOutput:
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            for s in seq.sampling_params.stop or ():
                if s in text:
                    text = text[:text.index(s)]
        m = RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time, seq.num_draft_tokens,
                           seq.num_accepted_tokens, seq.num_verify_steps)
        return RequestOutput(seq.request_id, self._prompts.get(seq.request_id), list(seq.prompt_token_ids),
                             list(seq.output_token_ids), text, seq.is_finished, seq.finish_reason, m,
                             list(seq.output_logprobs) if seq.sampling_params.logprobs is not None else None)

    # ---- batch API -------------------------------------------------------------------------------------------
    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 num_speculative_tokens: int | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. All prompts are validated before any is queued."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = [self._encode(p) for p in prompts]
        bad = [sp for sp in params if sp is not None and not isinstance(sp, SamplingParams)]
        if bad:
            raise ValueError(f"sampling_params must be SamplingParams, got {type(bad[0]).__name__}")
        rids = [self._add(None, p, i, sp, num_speculative_tokens) for p, i, sp in zip(prompts, ids, params)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(rids):
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[r] for r in rids]

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {"num_steps": s.num_steps, "num_finished": s.num_finished, "prompt_tokens": s.prompt_tokens,
                "generated_tokens": s.generated_tokens, "drafted_tokens": s.drafted_tokens,
                "accepted_tokens": s.accepted_tokens, "verify_steps": s.verify_steps,
                "decode_steps": s.decode_steps, "preemptions": s.preemptions,
                "mean_acceptance_length": s.mean_acceptance_length, "acceptance_rate": s.acceptance_rate,
                "kv_usage": self.block_manager.usage().fraction, "kv_cache_bytes": self.cache.nbytes(),
                "running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting}
