"""Scheduler: continuous batching, chunked prefill, speculative slots, preemption, abort, stop handling.

The simulation drives the scheduler with a fake model whose "true" next token is a fixed function of
(request, position). Its fake KV cache stores (request, position, token) in every slot it writes, and every
query checks that all keys it may read (all earlier positions in the full pool, the window in the sliding pool)
still hold exactly that sequence's committed tokens. So a block freed too early, shared by two sequences, or
a rejected draft left visible, fails the run. Since the fake model is deterministic, every request's output
must equal the plain one-token-at-a-time reference, whatever the batching, chunking, acceptance or preemption.
"""

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mimo.engine.block_manager import KVBlockManager, cdiv, sliding_blocks_bound, slots
from mimo.engine.config import EngineConfig, SamplingParams
from mimo.engine.scheduler import Scheduler
from mimo.engine.sequence import Sequence, SequenceStatus

VOCAB = 50
EOS = 49


def true_token(rid: int, pos: int) -> int:
    """The fake model's next token at `pos` (never EOS, so EOS only appears when a test plants it)."""
    return (rid * 7919 + pos * 104729 + (pos * pos) % 13) % (VOCAB - 1)


def reference_output(rid, prompt_len, sp: SamplingParams, max_model_len, plant_eos_at=None):
    out = []
    pos = prompt_len
    while True:
        t = EOS if plant_eos_at == pos else true_token(rid, pos)
        out.append(t)
        pos += 1
        if t == EOS and not sp.ignore_eos or t in (sp.stop_token_ids or ()):
            return out
        if (sp.max_tokens is not None and len(out) >= sp.max_tokens) or pos >= max_model_len:
            return out


@dataclass
class Req:
    rid: int
    prompt_len: int
    sp: SamplingParams
    arrival_step: int = 0
    k: int | None = None
    abort_step: int | None = None
    plant_eos_at: int | None = None


@dataclass
class SimResult:
    seqs: dict = field(default_factory=dict)
    steps: int = 0
    preemptions: int = 0
    max_batch: int = 0
    mixed_steps: int = 0  # steps with decode and prefill items together


def make_scheduler(cfg: EngineConfig, window: int, has_full=True, has_sliding=True, extra_full=0,
                   extra_sliding=0, eos=EOS):
    B = cfg.block_size
    step = min(cfg.max_num_batched_tokens, cfg.max_model_len)
    nf = cdiv(cfg.max_model_len, B) + extra_full
    ns = sliding_blocks_bound(window, B, step, cfg.sliding_window_margin) + extra_sliding
    bm = KVBlockManager(B, nf, ns, window, has_full, has_sliding, cfg.sliding_window_margin)
    return Scheduler(cfg, bm, eos_token_id=eos)


def simulate(sched: Scheduler, reqs: list[Req], rng: random.Random, draft_hit=0.6, max_steps=3000) -> SimResult:
    cfg, bm = sched.config, sched.block_manager
    W, margin = bm.sliding_window, bm.margin
    kv_full: dict[int, tuple] = {}
    kv_slide: dict[int, tuple] = {}
    res = SimResult()
    rid_of = {}
    pending = sorted(reqs, key=lambda r: r.arrival_step)
    step = 0
    while pending or sched.has_unfinished():
        assert step < max_steps, "no progress: the scheduler stalled"
        while pending and pending[0].arrival_step <= step:
            r = pending.pop(0)
            seq = Sequence(f"r{r.rid}", [(r.rid + i) % (VOCAB - 1) for i in range(r.prompt_len)], r.sp,
                           num_speculative_tokens=r.k)
            sched.add(seq)
            res.seqs[r.rid] = seq
            rid_of[seq.request_id] = r
        for r in reqs:
            if r.abort_step == step and r.rid in res.seqs and not res.seqs[r.rid].is_finished:
                seq = sched.abort(f"r{r.rid}")
                assert seq.status is SequenceStatus.FINISHED_ABORTED
                assert not seq.full_block_table and not any(seq.sliding_block_table)
        out = sched.schedule()
        res.preemptions += len(out.preempted)
        step += 1
        res.steps = step
        # ---- step invariants
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(out.items) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
        assert len({id(it.seq) for it in out.items}) == len(out.items)
        if not out.items:
            assert not sched.running and not sched.waiting, "idle step with work left"
            continue
        res.max_batch = max(res.max_batch, len(out.items))
        res.mixed_steps += any(it.is_prefill for it in out.items) and any(not it.is_prefill for it in out.items)
        for p in out.preempted:
            assert p.status is SequenceStatus.WAITING and not p.full_block_table
            assert p.num_prefill_tokens == p.num_tokens  # generated tokens are recomputed as prompt
        assert all(sched.waiting[i] is p for i, p in enumerate(sorted(out.preempted,
                                                                       key=lambda s: s.arrival_order)))
        check_block_ownership(sched)
        # ---- the fake runner: write every query position, then read every key the queries may read
        inputs, B = {}, bm.block_size
        for it in out.items:
            seq = it.seq
            assert seq.status is SequenceStatus.RUNNING and it.num_tokens >= 1
            assert it.end_pos <= cfg.max_model_len - 1
            r = rid_of[seq.request_id]
            if it.is_prefill:
                assert it.num_draft_slots == 0 and it.end_pos <= seq.num_prefill_tokens
                assert it.samples == (it.end_pos == seq.num_prefill_tokens)
                toks = it.input_token_ids
                n_drafts = 0
            else:
                assert it.num_tokens == 1 + it.num_draft_slots <= 1 + seq.num_speculative_tokens
                assert it.start_pos == seq.num_tokens - 1 and it.input_token_ids == [seq.last_token_id]
                n_drafts = rng.randint(0, it.num_draft_slots)  # the runner may propose fewer drafts
                drafts = [next_token(r, it.start_pos + 1 + i) if rng.random() < draft_hit
                          else (next_token(r, it.start_pos + 1 + i) + 1) % (VOCAB - 1) for i in range(n_drafts)]
                # unused draft slots get garbage: it must never become visible
                toks = it.input_token_ids + drafts + [VOCAB + 7] * (it.num_draft_slots - n_drafts)
            live = bm.num_live_sliding_blocks(seq)
            assert live <= bm.sliding_bound(max(it.num_tokens, 1 + seq.num_speculative_tokens))
            for i, p in enumerate(range(it.start_pos, it.end_pos)):
                cell = (seq.request_id, p, toks[i])
                if bm.has_full:
                    kv_full[slots(seq.full_block_table, p, p + 1, B)[0]] = cell
                if bm.has_sliding:
                    kv_slide[slots(seq.sliding_block_table, p, p + 1, B)[0]] = cell
            inputs[id(seq)] = (toks, n_drafts)
        for it in out.items:
            seq = it.seq
            toks, _ = inputs[id(seq)]

            def expect(p, seq=seq, it=it, toks=toks):
                tok = seq.all_token_ids[p] if p < it.start_pos else toks[p - it.start_pos]
                return (seq.request_id, p, tok)

            if bm.has_full:  # queries at start..end-1 read every key below end
                for p in range(it.end_pos):
                    assert kv_full[slots(seq.full_block_table, p, p + 1, B)[0]] == expect(p), "full KV lost"
            if bm.has_sliding:  # and the window (+ margin) behind the first query
                for p in range(max(0, it.start_pos - W + 1 - margin), it.end_pos):
                    assert kv_slide[slots(seq.sliding_block_table, p, p + 1, B)[0]] == expect(p), "sliding KV lost"
        # ---- results: greedy acceptance against the fake model
        results, nds = [], []
        for it in out.items:
            seq = it.seq
            r = rid_of[seq.request_id]
            toks, n_drafts = inputs[id(seq)]
            if it.is_prefill:
                results.append([next_token(r, it.end_pos)] if it.samples else [])
            else:
                emitted = []
                for i in range(n_drafts):
                    t = next_token(r, it.start_pos + 1 + i)
                    emitted.append(t)
                    if toks[1 + i] != t:
                        break
                else:
                    emitted.append(next_token(r, it.start_pos + 1 + n_drafts))
                results.append(emitted)
            nds.append(n_drafts)
        finished = sched.postprocess(out, results, num_drafts=nds)
        for seq in finished:
            assert seq.is_finished and not seq.full_block_table and not any(seq.sliding_block_table)
        for seq in sched.running:
            if not seq.is_prefill:
                assert seq.num_computed_tokens == seq.num_tokens - 1
        check_block_ownership(sched)
    u = bm.usage()
    assert u.full_used == 0 and u.sliding_used == 0, "blocks leaked after all requests ended"
    assert not sched.running and not sched.waiting
    for r in reqs:
        seq = res.seqs[r.rid]
        assert seq.is_finished
        ref = reference_output(r.rid, r.prompt_len, r.sp, cfg.max_model_len, r.plant_eos_at)
        if seq.status is SequenceStatus.FINISHED_ABORTED:
            assert seq.output_token_ids == ref[:seq.num_output_tokens]
        else:
            assert seq.output_token_ids == ref
            assert seq.finish_reason == ("stop" if ref[-1] in seq.stop_ids else "length")
            assert seq.first_token_time is not None and seq.finish_time is not None
    return res


def next_token(r: Req, pos: int) -> int:
    return EOS if r.plant_eos_at == pos else true_token(r.rid, pos)


def check_block_ownership(sched: Scheduler):
    bm = sched.block_manager
    for s in sched.waiting:
        assert not s.full_block_table and not any(b is not None for b in s.sliding_block_table)
    for pool, tables in ((bm.full_pool, [s.full_block_table for s in sched.running]),
                         (bm.sliding_pool, [s.sliding_block_table for s in sched.running])):
        owned = [b for t in tables for b in t if b is not None]
        assert len(owned) == len(set(owned)), "block owned twice"
        assert len(owned) == pool.num_used, "leaked block (used, owned by no running sequence)"
        assert all(not pool.is_free(b) for b in owned)


# ---- property test over random workloads -----------------------------------------------------------------------
@st.composite
def workloads(draw):
    B = draw(st.sampled_from([1, 2, 3, 4, 8]))
    W = draw(st.integers(1, 12))
    K = draw(st.integers(0, 3))
    margin = draw(st.integers(0, 1))
    max_model_len = draw(st.integers(8, 48))
    chunked = draw(st.booleans())
    budget = draw(st.integers(1 + K, 24))
    if not chunked:
        budget = max(budget, max_model_len)
    cfg = EngineConfig(max_num_seqs=draw(st.integers(1, 4)), max_num_batched_tokens=budget,
                       max_model_len=max_model_len, block_size=B, num_speculative_tokens=K,
                       enable_chunked_prefill=chunked, sliding_window_margin=margin)
    kinds = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
    extra = (draw(st.sampled_from([0, 0, 1, 3, 8])), draw(st.sampled_from([0, 0, 1, 3, 8])))  # small pools preempt
    reqs = []
    for rid in range(draw(st.integers(1, 6))):
        plen = draw(st.integers(1, max_model_len - 1))
        sp = SamplingParams(max_tokens=draw(st.one_of(st.none(), st.integers(1, 30))),
                            stop_token_ids=draw(st.sampled_from([None, [true_token(rid, plen + 2)]])),
                            ignore_eos=draw(st.booleans()))
        eos_at = draw(st.one_of(st.none(), st.integers(plen, plen + 8)))
        reqs.append(Req(rid, plen, sp, arrival_step=draw(st.integers(0, 8)), k=draw(st.integers(0, K)),
                        abort_step=draw(st.one_of(st.none(), st.integers(0, 15))), plant_eos_at=eos_at))
    return cfg, W, kinds, extra, reqs, draw(st.integers(0, 2**16))


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_finish_correctly_without_leaks(wl):
    """Random arrivals, aborts, preemptions (small pools), chunking, per-request k and acceptance: every
    request ends with the reference output, budgets hold, KV reads always see the right tokens, no leaks."""
    cfg, W, (has_full, has_sliding), (xf, xs), reqs, seed = wl
    sched = make_scheduler(cfg, W, has_full, has_sliding, xf, xs)
    simulate(sched, reqs, random.Random(seed))


# ---- targeted scenarios ------------------------------------------------------------------------------------------
def test_preemption_with_tiny_pool_and_preempted_request_completes():
    """Two long requests, a full pool for ~1.3 of them: the younger is preempted, recomputed, and finishes."""
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4,
                       num_speculative_tokens=2)
    sched = make_scheduler(cfg, window=5, extra_full=5, extra_sliding=0)
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    reqs = [Req(0, 20, sp), Req(1, 20, sp, arrival_step=1)]
    res = simulate(sched, reqs, random.Random(1), draft_hit=0.9)
    assert res.preemptions >= 1
    assert res.seqs[1].num_preemptions >= 1 and res.seqs[0].num_preemptions == 0
    assert all(res.seqs[i].num_output_tokens == 40 for i in (0, 1))


def test_decodes_and_prefill_chunks_share_a_step():
    """Decodes are scheduled first; a long prompt's chunk fills the rest of the token budget."""
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=128, block_size=4,
                       num_speculative_tokens=2)
    sched = make_scheduler(cfg, window=6, extra_full=64, extra_sliding=16)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    sched.add(a)
    out = sched.schedule()
    sched.postprocess(out, [[5]])
    b = Sequence("b", list(range(30)), SamplingParams(max_tokens=5))
    sched.add(b)
    out = sched.schedule()
    kinds = [(it.seq.request_id, it.is_prefill, it.num_tokens, it.samples) for it in out.items]
    assert kinds == [("a", False, 3, True), ("b", True, 5, False)]
    assert out.num_batched_tokens == 8
    sched.postprocess(out, [[7, 8], []], num_drafts=[2, None])
    assert a.output_token_ids == [5, 7, 8] and a.num_computed_tokens == 5 and a.num_accepted_tokens == 1
    assert b.num_computed_tokens == 5 and b.is_prefill and not b.output_token_ids


def test_chunked_prefill_samples_only_on_last_chunk():
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=7, max_model_len=64, block_size=4)
    sched = make_scheduler(cfg, window=4, extra_full=20, extra_sliding=10)
    seq = Sequence("p", list(range(20)), SamplingParams(max_tokens=3))
    sched.add(seq)
    chunks = []
    while seq.is_prefill:
        out = sched.schedule()
        (it,) = out.items
        chunks.append((it.start_pos, it.num_tokens, it.samples))
        sched.update(it, [11] if it.samples else [])
    assert chunks == [(0, 7, False), (7, 7, False), (14, 6, True)]
    assert seq.output_token_ids == [11] and seq.num_computed_tokens == 20
    with pytest.raises(ValueError, match="must return 0 tokens"):
        seq2 = Sequence("q", list(range(20)))
        sched.add(seq2)
        out = sched.schedule()
        sched.update(out.items[-1], [1])


def test_without_chunked_prefill_prompts_are_whole():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=32, block_size=4,
                       enable_chunked_prefill=False)
    sched = make_scheduler(cfg, window=4, extra_full=20, extra_sliding=10)
    for i, n in enumerate([20, 20]):
        sched.add(Sequence(f"s{i}", list(range(n))))
    out = sched.schedule()
    assert [(it.seq.request_id, it.num_tokens) for it in out.items] == [("s0", 20)]  # s1 does not fit the rest


def test_stop_token_inside_an_accepted_run_truncates():
    """Several tokens accepted in one step: output ends at the first stop token, the rest is dropped."""
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, block_size=4,
                       num_speculative_tokens=3)
    sched = make_scheduler(cfg, window=8, extra_full=8, extra_sliding=8)
    seq = Sequence("s", [1, 2], SamplingParams(max_tokens=20, stop_token_ids=[42]))
    sched.add(seq)
    sched.postprocess(sched.schedule(), [[3]])
    out = sched.schedule()
    assert out.items[0].num_draft_slots == 3
    appended = sched.update(out.items[0], [4, 42, 5, 6])
    assert appended == [4, 42]
    assert seq.output_token_ids == [3, 4, 42] and seq.status is SequenceStatus.FINISHED_STOPPED
    assert seq.stop_token_id == 42 and seq.finish_reason == "stop"
    assert sched.block_manager.usage().full_used == 0 and not sched.has_unfinished()


def test_eos_stops_unless_ignore_eos():
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, block_size=4)
    sched = make_scheduler(cfg, window=8, extra_full=8, extra_sliding=8)
    a = Sequence("a", [1], SamplingParams(max_tokens=5))
    b = Sequence("b", [1], SamplingParams(max_tokens=5, ignore_eos=True))
    sched.add(a)
    sched.add(b)
    sched.postprocess(sched.schedule(), [[EOS], [EOS]])
    assert a.finish_reason == "stop" and b.status is SequenceStatus.RUNNING


def test_max_tokens_and_max_model_len_cap_drafts_and_output():
    """Drafts are clamped so one step cannot overshoot max_tokens or max_model_len."""
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=12, block_size=4,
                       num_speculative_tokens=4)
    sched = make_scheduler(cfg, window=8, extra_full=8, extra_sliding=8)
    a = Sequence("a", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    b = Sequence("b", list(range(8)), SamplingParams(max_tokens=None, ignore_eos=True))
    sched.add(a)
    sched.add(b)
    sched.postprocess(sched.schedule(), [[5], [6]])
    out = sched.schedule()
    slots = {it.seq.request_id: it.num_draft_slots for it in out.items}
    assert slots == {"a": 1, "b": 2}  # a: 2 tokens left -> 1 draft; b: 9 tokens, 3 left before 12 -> 2 drafts
    sched.postprocess(out, [[7, 8], [9, 10, 11]])
    assert a.finish_reason == "length" and a.output_token_ids == [5, 7, 8]
    assert b.finish_reason == "length" and b.num_tokens == 12


def test_mixed_speculation_per_request():
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, block_size=4,
                       num_speculative_tokens=3)
    sched = make_scheduler(cfg, window=8, extra_full=8, extra_sliding=8)
    a = Sequence("a", [1], SamplingParams(max_tokens=9), num_speculative_tokens=0)
    b = Sequence("b", [1], SamplingParams(max_tokens=9))
    sched.add(a)
    sched.add(b)
    sched.postprocess(sched.schedule(), [[2], [2]])
    out = sched.schedule()
    assert [(it.num_tokens, it.num_draft_slots) for it in out.items] == [(1, 0), (4, 3)]
    with pytest.raises(ValueError, match="exceeds"):
        sched.add(Sequence("c", [1], num_speculative_tokens=4))


def test_abort_frees_everything():
    cfg = EngineConfig(max_num_seqs=1, max_num_batched_tokens=16, max_model_len=64, block_size=4)
    sched = make_scheduler(cfg, window=8, extra_full=8, extra_sliding=8)
    a, b = Sequence("a", list(range(10))), Sequence("b", list(range(10)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [it.seq for it in out.items] == [a]  # max_num_seqs = 1
    assert sched.block_manager.usage().full_used > 0
    assert sched.abort("b") is b and b.finish_reason == "abort"
    assert sched.abort("a") is a and sched.abort("a") is None
    assert sched.update(out.items[0], [1]) == []  # result of an aborted request is dropped
    u = sched.block_manager.usage()
    assert u.full_used == 0 and u.sliding_used == 0
    assert not sched.has_unfinished() and sched.schedule().is_empty


def test_add_and_constructor_validation():
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=16, block_size=4)
    sched = make_scheduler(cfg, window=8)
    sched.add(Sequence("a", [1]))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(Sequence("a", [2]))
    with pytest.raises(ValueError, match="no room"):
        sched.add(Sequence("b", list(range(16))))
    with pytest.raises(ValueError, match="num_full_blocks"):
        Scheduler(cfg, KVBlockManager(4, 3, 100, 8))
    with pytest.raises(ValueError, match="num_sliding_blocks"):
        Scheduler(cfg, KVBlockManager(4, 100, 3, 8))
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(cfg, KVBlockManager(8, 100, 100, 8))


def test_decode_update_rejects_too_many_tokens():
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, block_size=4,
                       num_speculative_tokens=2)
    sched = make_scheduler(cfg, window=8, extra_full=8, extra_sliding=8)
    seq = Sequence("a", [1], SamplingParams(max_tokens=20))
    sched.add(seq)
    sched.postprocess(sched.schedule(), [[2]])
    out = sched.schedule()
    with pytest.raises(ValueError, match="1..2"):
        sched.update(out.items[0], [1, 2, 3], num_drafts=1)
    with pytest.raises(ValueError, match="1..3"):
        sched.update(out.items[0], [])


def test_many_requests_batch_up_to_max_num_seqs():
    """Continuous batching: with 12 requests and max_num_seqs 4, steps run 4 sequences and all finish."""
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=40, block_size=4,
                       num_speculative_tokens=1)
    sched = make_scheduler(cfg, window=6, extra_full=40, extra_sliding=20)
    reqs = [Req(i, 3 + i, SamplingParams(max_tokens=6 + i % 3, ignore_eos=True), arrival_step=i // 3)
            for i in range(12)]
    res = simulate(sched, reqs, random.Random(3))
    assert res.max_batch == 4 and res.mixed_steps > 0 and res.preemptions == 0


def test_preemption_victim_is_the_most_recent_arrival():
    """Out of full blocks, the youngest running sequence is preempted (recompute), not the one asking."""
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=16, block_size=4)
    sched = make_scheduler(cfg, window=4, extra_full=0, extra_sliding=20)
    seqs = [Sequence(f"s{i}", [1, 2, 3, 4], SamplingParams(max_tokens=8, ignore_eos=True)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [it.seq for it in out.items] == seqs  # 3 of the 4 full blocks
    sched.postprocess(out, [[5], [5], [5]])
    out = sched.schedule()  # each decode at position 4 needs a second block; only one is free
    assert [it.seq for it in out.items] == seqs[:2] and out.preempted == [seqs[2]]
    assert seqs[2].status is SequenceStatus.WAITING and sched.waiting[0] is seqs[2]
    assert seqs[2].num_prefill_tokens == 5 and seqs[2].output_token_ids == [5]  # output kept, recomputed
    assert sched.block_manager.full_pool.num_free == 0
