"""Task evaluation: the unbiased pass@k estimator, per-task aggregation, and engine decoding (greedy equal
to the reference decoder, seeded samples reproducible and independent of the batch)."""

from math import comb

import pytest
import torch

from mimo import tasks as task_lib
from mimo.engine.llm import DEFAULT_MODEL
from mimo.train.eval import (
    correct_counts,
    engine_completions,
    evaluate_pass_at_k,
    load_for_eval,
    mean_pass_at_k,
    pass_at_k,
    reference_generate_fn,
)


@pytest.mark.parametrize("n, c, k, want", [
    (5, 0, 1, 0.0),
    (5, 5, 1, 1.0),
    (10, 3, 1, 0.3),
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (8, 1, 4, 0.5),  # 1 - C(7,4)/C(8,4) = 1 - 35/70
    (8, 2, 8, 1.0),
    (8, 1, 8, 1.0),
    (8, 0, 8, 0.0),
    (3, 1, 3, 1.0),
    (6, 2, 3, 0.8),  # 1 - C(4,3)/C(6,3) = 1 - 4/20
])
def test_pass_at_k_known_values(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1.0 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)


def test_pass_at_k_is_not_the_biased_plug_in():
    """With n = 8, c = 1: pass@8 is exactly 1 (one of the 8 is right), while 1 - (1 - c/n)^k is 0.66."""
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 1, 2) == pytest.approx(0.25)  # 1 - C(7,2)/C(8,2) = 1 - 21/28


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_and_counts():
    examples = [task_lib.Example("add", "add 1 2", "3"), task_lib.Example("add", "add 2 2", "4"),
                task_lib.Example("sort", "sort 3 1 2", "1 2 3")]
    completions = [["</think>3", "</think> 3\n", "</think>4", "3"], ["</think>5"] * 4,
                   ["1 2 3", "1 2 3", "1 2 3", "1 3 2"]]
    counts = correct_counts(examples, completions)
    assert counts == {"add": [2, 0], "sort": [3]}
    # add: example 1 has pass@2 = 1 - C(2,2)/C(4,2) = 5/6, example 2 has 0
    assert mean_pass_at_k(counts["add"], 4, 2) == pytest.approx(5 / 12)
    assert mean_pass_at_k(counts["add"], 4, 1) == pytest.approx(0.25)
    assert mean_pass_at_k(counts["sort"], 4, 2) == 1.0
    assert mean_pass_at_k([], 4, 1) == 0.0
    with pytest.raises(ValueError):
        correct_counts(examples, completions[:2])


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return load_for_eval(DEFAULT_MODEL)


def _examples():
    return [ex for split in ("heldout", "ood") for t in task_lib.TASKS
            for ex in task_lib.generate_examples(t, 2, split, seed=0)]


def test_engine_greedy_equals_reference(shipped):
    """Greedy completions through the engine are the reference decoder's, in-distribution and OOD."""
    model, tok = shipped
    examples = _examples()
    got = engine_completions(model, tok, examples, n_samples=1, temperature=0.0, max_new_tokens=24)
    gen = reference_generate_fn(model)
    with torch.no_grad():
        for ex, (text,) in zip(examples, got):
            ids = task_lib.prompt_ids(tok, ex)
            assert text == task_lib.completion_text(tok, gen(ids, 24, tok.eos_id)), ex.prompt


def test_engine_samples_are_seeded_per_sample(shipped):
    """T = 1 samples: reproducible, different across sample indices and seeds, and a prompt's samples do not
    depend on which other prompts share the batch."""
    model, tok = shipped
    examples = _examples()
    a = engine_completions(model, tok, examples, n_samples=4, temperature=1.0, seed=3)
    assert a == engine_completions(model, tok, examples, n_samples=4, temperature=1.0, seed=3)
    assert engine_completions(model, tok, examples[4:5], n_samples=4, temperature=1.0, seed=3) == a[4:5]
    assert a != engine_completions(model, tok, examples, n_samples=4, temperature=1.0, seed=4)
    assert any(len(set(s)) > 1 for s in a)


def test_evaluate_pass_at_k_shape_and_bounds(shipped):
    model, tok = shipped
    res = evaluate_pass_at_k(model, tok, tasks=("sort", "add"), n_per_task=3, n_samples=4, ks=(1, 2, 4),
                             split="ood")
    assert set(res) == {"sort", "add"}
    for row in res.values():
        assert set(row) == {"pass@1", "pass@2", "pass@4", "greedy"}
        assert 0.0 <= row["pass@1"] <= row["pass@2"] <= row["pass@4"] <= 1.0
    with pytest.raises(ValueError):
        evaluate_pass_at_k(model, tok, n_per_task=1, n_samples=4, ks=(8,))

