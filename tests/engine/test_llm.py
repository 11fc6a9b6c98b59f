"""Engine vs reference: greedy identity (batching, chunked prefill, preemption, window), MTP on == off,
draft consistency, exact sampled distribution, seeds, and bad input."""

import itertools
import math

import pytest
import torch
from tests.conftest import make_model
from tests.engine.helpers import drive, oracle_drafts

from mimo.engine import LLM, SamplingParams
from mimo.engine import llm as llm_mod
from mimo.engine.runner import PROBE_EVERY, MTPState
from mimo.model import generate
from mimo.model.transformer import filter_logits

GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def model():
    return make_model()


def _engine(model, **kw):
    base = dict(max_model_len=128, max_num_seqs=8, block_size=4, max_num_batched_tokens=16)
    base.update(kw)
    return LLM(model, **base)


def _prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_greedy_matches_reference_with_staggered_arrivals_and_chunked_prefill(model):
    """Prompts of 3..40 tokens (window 9, budget 16 tokens/step) join at different steps."""
    llm = _engine(model, num_speculative_tokens=0)
    prompts = _prompts(model, (3, 40, 11, 25))
    toks, reason = {}, {}

    def collect():
        for d in llm.step():
            toks.setdefault(d.request_id, []).extend(d.new_token_ids)
            assert d.num_output_tokens == len(toks[d.request_id])
            if d.finished:
                reason[d.request_id] = d.finish_reason

    rid = llm.add_request("a", prompts[0], GREEDY)
    for i, p in enumerate(prompts[1:], 1):
        collect()
        llm.add_request(str(i), p, GREEDY)
    while llm.has_unfinished_requests():
        collect()
    ids = [rid] + [str(i) for i in range(1, 4)]
    for r, p in zip(ids, prompts):
        assert toks[r] == generate(model, p, 24), r
        assert reason[r] == "length"


def _check_speculation_did_work(llm, commits, k, window):
    """Drafts were accepted (so equality is not trivially true), steps committed 2..k+1 tokens, also beyond
    the sliding window, and every acceptance length 0..k was seen."""
    st = llm.stats()
    assert st["accepted_tokens"] >= st["drafted_tokens"] // 3 > 0, st
    sizes = {n for _, n in commits}
    assert set(range(1, k + 2)) <= sizes, sizes
    assert any(n >= 2 and pos > window for pos, n in commits), "no multi-token commit past the window"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_mtp_on_equals_off(model, k):
    """Prompts below, at and beyond the window (9); drafts from the reference continuation with errors."""
    prompts = _prompts(model, (5, 30, 12), seed=1)
    off = _engine(model, num_speculative_tokens=0).generate(prompts, GREEDY)
    llm = _engine(model, num_speculative_tokens=k)
    oracle_drafts(llm, {tuple(p): o.token_ids for p, o in zip(prompts, off)})
    on, commits = drive(llm, prompts, GREEDY)
    assert on == [o.token_ids for o in off]
    _check_speculation_did_work(llm, commits, k, model.config.sliding_window)


def test_adaptive_drafting_off_verifies_every_draft():
    """The bundled model's heads: adaptive drafting proposes fewer drafts than k per step; with it off every
    verify step carries all k, and greedy output is the same either way."""
    prompt = [[5, 9, 14, 3, 7, 7, 21, 30]]
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = {a: LLM(num_speculative_tokens=3, adaptive_drafting=a).generate(prompt, sp)[0] for a in (True, False)}
    assert outs[True].token_ids == outs[False].token_ids
    fixed, adaptive = outs[False].metrics, outs[True].metrics
    # every verify step carries all 3, but for the last ones, capped by the tokens left in the budget
    assert 3 * fixed.num_verify_steps - 3 <= fixed.num_drafted <= 3 * fixed.num_verify_steps
    assert adaptive.num_drafted < 3 * adaptive.num_verify_steps


def test_calibration_learns_the_outcome_of_drafts_that_were_cut(monkeypatch):
    """Greedy acceptance is agreement with the model's next tokens, so a draft the policy computed and cut
    still gets its outcome once its position is committed. Each outcome the calibration receives is checked
    against the final output, walking each chain as verification would (until its first mismatch), and some
    are of drafts that were computed but not proposed."""
    calls, proposed = [], {}  # proposed: first position of a chain -> how many of its drafts were proposed
    resolve = MTPState.resolve

    def spy(self, seq):
        chains = list(self.made)
        out = resolve(self, seq)
        calls.append((chains, seq.num_tokens, out))
        return out

    monkeypatch.setattr(MTPState, "resolve", spy)
    llm = LLM(num_speculative_tokens=3)
    draft = llm.runner.draft

    def draft_spy(seqs, states, *args):
        draft(seqs, states, *args)
        for seq, st in zip(seqs, states):
            if st.made and st.made[-1][0] == seq.num_computed_tokens + 1:
                proposed[st.made[-1][0]] = len(st.drafts)

    llm.runner.draft = draft_spy
    prompt = [5, 9, 14, 3, 7, 7, 21, 30]
    out = llm.generate([prompt], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))[0]
    tokens = prompt + out.token_ids
    cut = []
    for chains, end, got in calls:
        want = []
        for first, toks, probs, j in chains:
            while j < len(toks) and first + j < end:
                want.append((j, probs[j], tokens[first + j] == toks[j]))
                cut.append(j >= proposed[first])
                j = j + 1 if want[-1][2] else len(toks)
        assert got == want
    assert any(cut) and not all(cut), cut
    outcomes = [ok for _, _, got in calls for _, _, ok in got]
    assert any(outcomes) and not all(outcomes)


def test_generate_drafts_only_for_requests_that_can_shorten_the_batch():
    """In `generate` (its caller waits for every request) a request whose remaining budget fits within the
    steps another still needs does not draft; through the step API (a server: each request's own latency
    counts) it does, and greedy output is the same either way. Equal budgets all draft."""
    llm = LLM()
    prompt = llm.tokenizer.encode("def read_lines(path):\n    with open(path) as f:\n")
    short, long_ = (SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (8, 48))
    outs = llm.generate([prompt, prompt], [short, long_])
    toks, _ = drive(llm, [prompt], short)
    assert outs[0].token_ids == toks[0] == outs[1].token_ids[:8]
    assert outs[0].metrics.num_drafted == 0 < outs[1].metrics.num_drafted
    assert llm.generate([prompt], short)[0].metrics.num_drafted > 0  # alone it is the batch's last request
    ids = [llm.add_request(None, prompt, sp) for sp in (short, long_)]
    drafted = dict.fromkeys(ids, 0)
    while llm.has_unfinished_requests():
        for d in llm.step():
            if d.finished:
                drafted[d.request_id] = d.metrics.num_drafted
    assert drafted[ids[0]] > 0 and drafted[ids[1]] > 0
    assert all(o.metrics.num_drafted > 0 for o in llm.generate([prompt, prompt], [short, short]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_preemption_by_tiny_pool_keeps_greedy_output(model, k):
    """A full pool that holds ~2 long requests forces recompute preemption of younger ones mid-speculation."""
    llm = _engine(model, num_speculative_tokens=k, num_full_blocks=34, max_model_len=64, max_num_seqs=4)
    prompts = _prompts(model, (20, 22, 18, 21), seed=2)
    params = SamplingParams(max_tokens=40, temperature=0)
    refs = [generate(model, p, 40) for p in prompts]
    oracle_drafts(llm, {tuple(p): r for p, r in zip(prompts, refs)})
    outs, commits = drive(llm, prompts, params)
    assert llm.stats()["preemptions"] > 0
    assert outs == refs
    _check_speculation_did_work(llm, commits, k, model.config.sliding_window)
    assert llm.block_manager.usage().full_used == 0 and llm.block_manager.usage().sliding_used == 0


def _drafts_from_scratch(model, tokens, n_drafts, vocab=None):
    """Non-chain drafting by the definition: block k at t reads (h_t, x_{t+k+1}), drafts appended in turn;
    with `vocab`, each head's argmax is taken among those ids only."""
    n = len(tokens) - 1
    with torch.no_grad():
        h = model.forward_hidden(torch.tensor([tokens[:n]]))
        ext = list(tokens)
        for k in range(n_drafts):
            toks = ext[k + 1:n + k + 1]
            logits = model.mtp_forward(k, h, torch.tensor([toks]))[0, -1]
            ext.append(int(logits.argmax()) if vocab is None else vocab[int(logits[vocab].argmax())])
    return ext[n + 1:]


# floors per step: 0 drafts every head, 2 skips the round (no estimate reaches it) but for the probe after
# PROBE_EVERY dry steps; runs of skipped steps longer than the window (9) make the blocks catch up from a
# window back
FLOORS = [0.0] * 3 + [2.0] * 20 + [0.0] + [2.0] * 3 + [0.0] * 2 + [2.0]


@pytest.mark.parametrize("draft_vocab", [None, 200])
def test_mtp_drafts_equal_recomputation_from_scratch(model, monkeypatch, draft_vocab):
    """The incremental MTP caches (window, re-extension after rejections, catch-up after rounds the adaptive
    policy skipped) give the drafts the definition does; also with a reduced draft vocabulary."""
    steps = itertools.count()
    floor = [0.0]
    monkeypatch.setattr(llm_mod, "draft_floor", lambda batch: floor[0])
    llm = _engine(model, num_speculative_tokens=3, max_model_len=200, draft_vocab_size=draft_vocab)
    monkeypatch.setattr(llm._guard, "mode", lambda batch: True)  # the floors alone decide here
    vocab = None if draft_vocab is None else list(range(draft_vocab))
    prompt = _prompts(model, (13,), seed=3)[0]
    llm.add_request("x", prompt, SamplingParams(max_tokens=120, temperature=0))
    checked = skipped = probes = 0
    while llm.has_unfinished_requests():
        floor[0] = FLOORS[next(steps) % len(FLOORS)]
        llm.step()
        seq = llm.scheduler.get("x")
        if seq is None or seq.is_prefill:
            continue
        drafts = llm._mtp["x"].drafts
        if floor[0] == 0.0:
            assert drafts == _drafts_from_scratch(model, seq.all_token_ids, 3, vocab)
            checked += 1
        else:  # nothing pays; every PROBE_EVERY dry steps the first draft is proposed anyway
            assert len(drafts) <= 1
            if drafts:
                assert drafts == _drafts_from_scratch(model, seq.all_token_ids, 1, vocab)
            skipped += not drafts
            probes += bool(drafts)
    assert checked >= 10 and skipped >= 30 and probes >= 2


def test_no_probe_in_a_requests_last_probe_interval(model, monkeypatch):
    """A request whose drafts never pay still probes every PROBE_EVERY dry steps, but not once fewer tokens are
    left than a probe interval: what a probe learns pays only over the tokens after it."""
    monkeypatch.setattr(llm_mod, "draft_floor", lambda batch: 2.0)  # no estimate ever pays
    llm = _engine(model, num_speculative_tokens=3, max_model_len=200)
    monkeypatch.setattr(llm._guard, "mode", lambda batch: True)
    every = PROBE_EVERY[0]
    max_tokens = 3 * every
    llm.add_request("x", _prompts(model, (13,), seed=3)[0], SamplingParams(max_tokens=max_tokens, temperature=0))
    left_at_probes = []
    while llm.has_unfinished_requests():
        llm.step()
        seq = llm.scheduler.get("x")
        if seq is not None and not seq.is_prefill and llm._mtp["x"].drafts:
            left_at_probes.append(max_tokens - seq.num_output_tokens)
    # dry steps reach the interval at about every + 1 and 2 * every + 2 tokens: only the first probe is left
    assert left_at_probes and all(left > every for left in left_at_probes), left_at_probes


def test_reduced_draft_vocabulary_drafts_only_its_ids_and_keeps_greedy_output(model):
    """FR-Spec: heads draft among the first ids only (the full head verifies); the output is unchanged."""
    prompts = _prompts(model, (5, 30), seed=7)
    off = _engine(model, num_speculative_tokens=0).generate(prompts, GREEDY)
    llm = _engine(model, num_speculative_tokens=3, draft_vocab_size=64)
    proposed = []
    real = llm.runner.draft

    def spy(seqs, states, nds, floors=None, private=None):
        real(seqs, states, nds)  # the whole chain, so every head's pick is seen
        proposed.extend(t for st in states for t in st.drafts)

    llm.runner.draft = spy
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [o.token_ids for o in off]
    assert proposed and all(t < 64 for t in proposed)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        _engine(model, draft_vocab_size=0)


def _exact_joint(model, prompt, length, temperature, top_k=None, top_p=None):
    """Exact probability of every continuation of `length` tokens: [V ** length], by enumerating prefixes
    (full forwards and the model package's filter, as the reference `generate` samples)."""
    V = model.config.vocab_size
    joint = torch.ones(1)
    prefixes = [[]]
    with torch.no_grad():
        for _ in range(length):
            logits = model(torch.tensor([prompt + p for p in prefixes]))[:, -1]
            step = torch.softmax(filter_logits(logits / temperature, top_k, top_p, reference=True), -1)  # [P, V]
            joint = (joint[:, None] * step).reshape(-1)
            prefixes = [p + [a] for p in prefixes for a in range(V)]
    return joint


def _empirical(llm, prompt, n, length, temperature, top_k=None, top_p=1.0):
    outs = llm.generate([prompt] * n, [SamplingParams(max_tokens=length, temperature=temperature, top_k=top_k,
                                                      top_p=top_p, seed=s) for s in range(n)])
    V = llm.model.config.vocab_size
    counts = torch.zeros(V ** length)
    for o in outs:
        idx = 0
        for t in o.token_ids:
            idx = idx * V + t
        counts[idx] += 1
    return counts


def _chi2_pvalue_ok(counts, probs, min_expected=5.0):
    """Pearson chi-square over cells with enough expected mass (the rest pooled); True if p > 1e-3."""
    n = counts.sum()
    exp = probs * n
    big = exp >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    ex = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = ex > 0
    stat = float(((obs[keep] - ex[keep]) ** 2 / ex[keep]).sum())
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty normal approximation of the chi-square tail
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return z < 3.1, stat, dof


def test_sampled_mtp_matches_model_distribution_and_broken_rule_fails(monkeypatch):
    """Four sampled tokens with temperature, top-k and top-p (the second step verifies drafts) follow the exact
    filtered model distribution; an always-accept rule, and verification that forgets top-k / top-p, do not."""
    model = make_model(vocab_size=4, seed=5)
    prompt = [1, 2, 3, 0, 1]
    T, K, P, N, L = 1.3, 3, 0.9, 2500, 4
    exact = _exact_joint(model, prompt, L, T, K, P)
    assert int((exact == 0).sum()) > 0, "the filter removes nothing: the test would not see it ignored"
    def run():
        # the random heads' drafts would not pay: adaptive drafting off, so every step verifies 3 drafts
        llm = _engine(model, num_speculative_tokens=3, max_num_seqs=64, max_num_batched_tokens=512,
                      adaptive_drafting=False)
        return llm, _chi2_pvalue_ok(_empirical(llm, prompt, N, L, T, K, P), exact)

    llm, (ok, stat, dof) = run()
    assert ok, (stat, dof)
    st = llm.stats()
    assert 0 < st["accepted_tokens"] < st["drafted_tokens"]  # both branches of the rule were exercised

    def always_accept(drafts, draft_probs, target_probs, generator=None):
        return list(drafts) + [int(torch.multinomial(target_probs[-1], 1, generator=generator))]

    real_probs = llm_mod.probs_from_logits
    for name, patch in (("accept_sampled", always_accept),
                        ("probs_from_logits", lambda x, t, k, p, m: real_probs(x, t, None, None, m))):
        with monkeypatch.context() as m:
            m.setattr(llm_mod, name, patch)
            _, (ok, stat, dof) = run()
        assert not ok, (name, stat, dof)


def test_same_seed_same_output_whatever_the_batch(model):
    p = _prompts(model, (9,), seed=4)[0]
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    alone = _engine(model).generate([p], sp)[0].token_ids
    others = _prompts(model, (5, 17, 3), seed=6)
    crowd = _engine(model).generate(others[:2] + [p] + others[2:],
                                    [SamplingParams(max_tokens=12, temperature=1.0, seed=i) for i in range(2)]
                                    + [sp] + [SamplingParams(max_tokens=5, temperature=0.7)])
    assert crowd[2].token_ids == alone


def test_sliding_pool_usage_stays_bounded_past_many_windows(model):
    llm = _engine(model, num_speculative_tokens=3, max_model_len=200)
    llm.add_request("long", [1, 2, 3], SamplingParams(max_tokens=150, temperature=0))
    peak = 0
    while llm.has_unfinished_requests():
        llm.step()
        peak = max(peak, llm.block_manager.usage().sliding_used)
    # window 9 + margin (3 drafts + 3 heads + 1) + a 4-token step, in 4-token blocks
    bound = llm.block_manager.sliding_bound(1 + 3)
    assert 0 < peak <= bound < 150 // 4


@pytest.mark.parametrize("call,param", [
    (lambda llm: llm.add_request(None, [], GREEDY), "empty"),
    (lambda llm: llm.add_request(None, [1, 10_000], GREEDY), "token ids"),
    (lambda llm: llm.add_request(None, list(range(1, 200)), GREEDY), "max_model_len"),
    (lambda llm: llm.add_request(None, [1], SamplingParams(max_tokens=0)), "max_tokens"),
    (lambda llm: llm.add_request(None, [1], SamplingParams(temperature=-1)), "temperature"),
    (lambda llm: llm.add_request(None, [1], SamplingParams(top_p=1.5)), "top_p"),
    (lambda llm: llm.add_request(None, [1], GREEDY, num_speculative_tokens=9), "num_speculative_tokens"),
])
def test_bad_input_is_rejected_and_engine_keeps_serving(model, call, param):
    llm = _engine(model)
    llm.add_request("ok", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match=param):
        call(llm)
    outs = []
    while llm.has_unfinished_requests():
        outs += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in outs] == ["ok"] and outs[0].num_output_tokens == 24


def test_too_many_drafts_for_the_model():
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(make_model(), num_speculative_tokens=4)


def test_small_steps_run_on_one_thread_while_it_times_faster_and_the_count_is_restored(model):
    """Steps of at most ONE_THREAD_ROWS query rows run on one intra-op thread first (dispatch-bound decode),
    then on whichever the engine's timing guard finds faster; a long prefill chunk runs on the caller's count,
    and every step (one that raises included) restores it."""
    seen = []
    hook = model.model.embed_tokens.register_forward_pre_hook(  # every main-model forward: input ids [1, N]
        lambda m, a: seen.append((a[0].shape[1], torch.get_num_threads())))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        llm = _engine(model, num_speculative_tokens=0, max_num_batched_tokens=64)
        llm.generate([_prompts(model, (40,))[0]], SamplingParams(max_tokens=4, temperature=0))
        assert torch.get_num_threads() == 2
        rows = [r for r, _ in seen]
        assert rows[0] == 40 and rows[1:] == [1, 1, 1], rows
        assert [n for _, n in seen] == [2, 1, 1, 1]  # the guard measures one thread first
        # three 1-row steps of 1 request, the first after a switch of thread count not timed
        assert sum(m[2] for m in llm._threads.stats[1, 1].values()) == 2
        llm._threads.mode = lambda rows: False  # two threads timed faster
        seen.clear()
        llm.generate([_prompts(model, (40,))[0]], SamplingParams(max_tokens=3, temperature=0))
        assert [n for _, n in seen] == [2, 2, 2] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), llm_mod.intra_op_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(before)
