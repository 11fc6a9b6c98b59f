"""The compiled engine step (`LLM(compile=True)`) against the eager one it must agree with.

Compiling is slow on a small CPU (about 30 s per graph of the default model here), so `make test` runs the
plain decode graph of the small test model only; the slow test covers the default model's verify steps and
drafting blocks."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from tests.conftest import make_model

from mimo.engine import LLM, SamplingParams, runner

CODE = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n"]
SP = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _compare(prompts, k, model=None):
    """Greedy tokens of the compiled engine equal the eager engine's; returns (compiled calls of the step and
    of the drafting blocks, the compiled engine's stats). Compiled calls run on the caller's thread count:
    dynamo guards on it, and the engine's one-thread timing of small steps made every switch recompile."""
    # every step drafts its k (adaptive drafting off): how many blocks run must not hang on the policy
    kw = dict(num_speculative_tokens=k, max_model_len=256, adaptive_drafting=False)
    ref = [o.token_ids for o in LLM(model, **kw).generate(prompts, SP)]
    llm = LLM(model, compile=True, **kw)
    calls = {"step": 0, "block": 0}
    r = llm.runner
    threads = torch.get_num_threads()

    def counted(name, fn):
        def call(*a, **kw):
            calls[name] += 1
            assert torch.get_num_threads() == threads
            return fn(*a, **kw)
        return call

    r._hidden, r._mtp_hidden = counted("step", r._hidden), counted("block", r._mtp_hidden)
    assert [o.token_ids for o in llm.generate(prompts, SP)] == ref
    return calls, llm.stats()


def test_compiled_decode_matches_eager():
    """A 20-token prompt (its prefill is a long segment: eager), then 23 compiled decode steps, with two
    intra-op threads (where the engine would time one-thread steps). Each step is one graph (`fullgraph`: a
    graph break fails it; the one DerivedWeights.caches had made compiled steps slower than eager ones)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = make_model()
        prompt = torch.randint(0, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(0)).tolist()
        calls, _ = _compare([prompt], 0, model)
    finally:
        torch.set_num_threads(before)
    assert calls["step"] == SP.max_tokens - 1, calls


def test_compiled_step_reads_weights_changed_in_place():
    """The compiled graphs keep no guards on the model's modules (runner._compiled): after update_weights they
    must compute with the new weights, as an eager engine given the same weights does."""
    torch.manual_seed(0)
    model, new = make_model(), make_model(seed=1)
    prompt = [5, 9, 12, 7]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm = LLM(model, compile=True, num_speculative_tokens=0, max_model_len=64)
    before = llm.generate([prompt], sp)[0].token_ids
    llm.update_weights(new.state_dict())
    after = llm.generate([prompt], sp)[0].token_ids
    ref = LLM(new, num_speculative_tokens=0, max_model_len=64).generate([prompt], sp)[0].token_ids
    assert after == ref
    assert after != before  # the two models disagree, so stale weights would show


@pytest.mark.slow
def test_compiled_verify_and_drafting_match_eager_with_drafts_accepted():
    """Three prompts of different lengths (the one-length grid and the padded attention path), one draft per
    step: the compiled verify steps and drafting blocks ran, and drafts were accepted."""
    calls, st = _compare(CODE, 1)
    assert calls["step"] >= 10 and calls["block"] >= 10, calls
    assert st["accepted_tokens"] > 0, st


def test_kinds_of_step_beyond_the_recompile_limit_run_eager():
    """With fullgraph a step that would need one graph more than dynamo's recompile limit raises; the engine
    runs such steps eager instead (here the limit is 1: decode steps of one and of two requests need two)."""
    model = make_model()
    prompts = [[5, 9, 12, 7], [3, 8]]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = [o.token_ids for o in LLM(model, num_speculative_tokens=0, max_model_len=64).generate(prompts, sp)]
    llm = LLM(model, compile=True, num_speculative_tokens=0, max_model_len=64)
    torch._dynamo.reset()
    with mock.patch.object(runner, "RECOMPILE_LIMIT", 1):
        assert [o.token_ids for o in llm.generate(prompts[:1], sp)] == ref[:1]
        assert [o.token_ids for o in llm.generate(prompts, sp)] == ref


def test_two_compiled_engines_whose_models_differ_in_a_module_attribute_each_match_eager():
    """Dynamo keeps its graphs per code object, and the engine drops the guards on the model's modules: two
    compiled engines in one process whose models differ only in a module's plain attribute (the router's
    scaling, a Python float in the graph) must still each compute their own model."""
    prompt = [5, 9, 12, 7, 3, 8]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    models = [make_model(), make_model(routed_scaling_factor=2.5)]
    refs = [LLM(m, num_speculative_tokens=0, max_model_len=64).generate([prompt], sp)[0].token_ids for m in models]
    assert refs[0] != refs[1]
    engines = [LLM(m, compile=True, num_speculative_tokens=0, max_model_len=64) for m in models]
    for _ in range(2):  # alternating, each engine after the other's graph exists
        assert [e.generate([prompt], sp)[0].token_ids for e in engines] == refs
