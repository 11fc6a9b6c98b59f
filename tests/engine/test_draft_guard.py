"""DraftGuard: drafting is kept only while it measures faster than plain decoding (plain Python, no timing:
the steps' seconds are given)."""

from __future__ import annotations

from mimo.engine.runner import DraftGuard


def _run(guard, speed, steps, batch=16, tokens=10):
    """`steps` rounds at `batch` where a step of mode m takes tokens / speed[m] seconds; the modes chosen."""
    modes = []
    for _ in range(steps):
        m = guard.mode(batch)
        modes.append(m)
        guard.record(batch, m, tokens, tokens / speed[m])
    return modes


def test_guard_measures_both_modes_then_keeps_the_faster_and_explores_less_and_less():
    g = DraftGuard()
    modes = _run(g, {True: 100.0, False: 150.0}, 600)
    n = g.MIN_STEPS
    assert modes[:n] == [True] * n and modes[n:2 * n] == [False] * n  # the policy first, then plain decoding
    later = modes[100:]
    assert 0 < sum(later) <= 0.05 * len(later)  # mostly plain, with explorations of the policy
    assert g.interval[g.bucket(16)] == g.MAX_INTERVAL
    assert g.mode(1) is True  # another batch size is measured on its own


def test_guard_follows_a_change_of_which_mode_is_faster():
    g = DraftGuard()
    _run(g, {True: 100.0, False: 150.0}, 400)
    modes = _run(g, {True: 300.0, False: 150.0}, 1000)  # e.g. the requests turned into repetitive code
    e = g.EXPLORE_STEPS
    assert sum(modes[:100]) <= 2 * e and sum(modes[-300:]) >= 300 - 2 * e  # plain kept a while, then drafting
    modes = _run(g, {True: 100.0, False: 150.0}, 1000)
    assert sum(modes[-300:]) <= 2 * e


def test_guard_keeps_drafting_where_it_pays():
    modes = _run(DraftGuard(), {True: 160.0, False: 150.0}, 600)
    assert sum(modes[100:]) >= 0.95 * 500


def test_tuple_sizes_are_bucketed_element_by_element_and_judged_apart():
    """The engine's thread guard keys steps by (rows, sequences): one request's 4-row verify step and four
    requests' decode step share a row count but not a bucket, so each keeps its own faster mode."""
    from mimo.engine.runner import TimingGuard

    g = TimingGuard()
    assert g.bucket((4, 1)) == (3, 1) and g.bucket((5, 4)) == (3, 3) and g.bucket(16) == 5
    speeds = {(4, 1): {True: 150.0, False: 100.0}, (4, 4): {True: 100.0, False: 150.0}}
    modes = {k: [] for k in speeds}
    for _ in range(300):
        for key, speed in speeds.items():
            m = g.mode(key)
            modes[key].append(m)
            g.record(key, m, 10, 10 / speed[m])
    assert sum(modes[4, 1][100:]) >= 0.9 * 200 and sum(modes[4, 4][100:]) <= 0.1 * 200  # explorations aside


def test_a_compiled_engine_times_drafting_at_every_batch_size():
    """Below MIN_BATCH the eager engine trusts the policy's costs; a compiled engine's steps cost other
    proportions (its plain step shrank more than its drafting), so it asks the guard from one request on.
    The engine here is eager with the compiled flag set: the rule, not the compiler, is under test."""
    from tests.conftest import make_model

    from mimo.engine import LLM, SamplingParams

    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    asked = {}
    for compiled in (False, True):
        llm = LLM(make_model(), num_speculative_tokens=2, max_model_len=64)
        llm.runner.compiled = compiled
        llm.generate([[5, 9, 12, 7]], sp)
        asked[compiled] = dict(llm._guard.stats)
    assert asked[False] == {} and DraftGuard.bucket(1) in asked[True]
