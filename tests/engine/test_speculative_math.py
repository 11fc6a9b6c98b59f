"""Acceptance math: greedy prefix acceptance and exact speculative sampling (Leviathan et al.).

The statistical tests run whole speculative generations on a toy Markov "model" over V = 5 tokens: the target
p(x_t | x_{t-1}) and a deliberately different draft q(x_t | x_{t-1}). The first two emitted tokens must be
distributed as p(a | x0) p(b | a); a chi-square test on the 25 cells (and on the 5 cells of the first token)
accepts the correct rule and must reject three broken ones with the same statistic. The threshold is a
p-value of 1e-7: a correct implementation fails it once in ten million seeds, and the seeds are fixed.
"""

import math
import random
from collections import Counter

import pytest
import torch

from mimo.engine.sampler import probs_from_logits, sample_from_probs
from mimo.engine.speculative import accept_greedy, accept_sampled

V, X0 = 5, 0
ALPHA = 1e-7


def chi2_pvalue(stat: float, df: int) -> float:
    """Upper tail of the chi-square distribution (regularised gamma series; fine for these sizes)."""
    if math.isinf(stat):
        return 0.0
    a, x = df / 2, stat / 2
    term = total = 1 / a
    n = 0
    while term > 1e-17 * total:
        n += 1
        term *= x / (a + n)
        total += term
    return max(0.0, 1 - math.exp(-x + a * math.log(x) - math.lgamma(a)) * total) if x > 0 else 1.0


def chi2_stat(counts: Counter, expected: dict) -> tuple[float, int]:
    """(statistic, degrees of freedom) over the cells of positive probability; inf if a cell of probability 0
    (a token top-k / top-p removed) was ever emitted."""
    n = sum(counts.values())
    if any(counts.get(c, 0) for c, p in expected.items() if p == 0):
        return math.inf, 1
    cells = [(counts.get(c, 0), p) for c, p in expected.items() if p > 0]
    return sum((o - n * p) ** 2 / (n * p) for o, p in cells), len(cells) - 1


def toy_models():
    g = torch.Generator().manual_seed(0)
    P = 0.75 * torch.softmax(2 * torch.randn(V, V, generator=g), -1) + 0.25 / V  # every entry >= 0.05
    Q = 0.6 * torch.eye(V).roll(1, dims=1) + 0.4 * torch.softmax(torch.randn(V, V, generator=g), -1)
    return P, Q


# ---- broken rules: the tests must be able to tell them apart ---------------------------------------------------
def always_accept(drafts, draft_probs, target_probs, generator):
    return list(drafts) + [sample_from_probs(target_probs[len(drafts)], generator)]


def resample_from_target(drafts, draft_probs, target_probs, generator):
    """Correct acceptance test, but on rejection resample from p instead of max(p - q, 0)."""
    out = []
    for i, d in enumerate(drafts):
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        if float(torch.rand((), generator=generator)) < float(target_probs[i, d]) / q_d:
            out.append(d)
            continue
        out.append(sample_from_probs(target_probs[i], generator))
        return out
    return out + [sample_from_probs(target_probs[len(drafts)], generator)]


def filtered(P: torch.Tensor, temperature=1.2, top_k=3, top_p=0.9) -> torch.Tensor:
    """The toy target as a request with temperature, top-k and top-p sees it (rows p(. | prev))."""
    return probs_from_logits(P.log(), temperature, top_k, top_p)


def simulate(accept, argmax_drafts: bool, n: int, seed: int, pass_q_for_argmax=False, k: int = 2,
             target: torch.Tensor | None = None) -> tuple[Counter, Counter]:
    """n generations from X0 until 2 tokens are emitted; returns (first token counts, first pair counts).
    target: the rows p(. | prev) verification uses (default the toy P)."""
    P, Q = toy_models()
    P = P if target is None else target
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    q_rows = Q.tolist()
    q_argmax = Q.argmax(-1).tolist()
    first, pairs = Counter(), Counter()
    for _ in range(n):
        emitted: list[int] = []
        while len(emitted) < 2:
            ctx = [emitted[-1] if emitted else X0]
            for _ in range(k):  # d_i drawn from q(. | previous token)
                prev = ctx[-1]
                ctx.append(q_argmax[prev] if argmax_drafts else rng.choices(range(V), q_rows[prev])[0])
            drafts = ctx[1:]
            target = P[ctx]  # row i: p(. | ctx[i]), predicting d_{i+1}; the last row is the bonus position
            draft_probs = None if argmax_drafts and not pass_q_for_argmax else Q[ctx[:-1]]
            emitted += accept(drafts, draft_probs, target, g)
        first[emitted[0]] += 1
        pairs[(emitted[0], emitted[1])] += 1
    return first, pairs


def pvalues(first: Counter, pairs: Counter, law: torch.Tensor | None = None) -> tuple[float, float]:
    """p-values of the first token and the first pair under the chain `law` (default the toy P)."""
    P = toy_models()[0] if law is None else law
    p1 = {a: P[X0, a].item() for a in range(V)}
    p2 = {(a, b): P[X0, a].item() * P[a, b].item() for a in range(V) for b in range(V)}
    return chi2_pvalue(*chi2_stat(first, p1)), chi2_pvalue(*chi2_stat(pairs, p2))


N = 3000


def test_chi2_helper_matches_known_quantiles():
    assert math.isclose(chi2_pvalue(9.488, 4), 0.05, rel_tol=1e-3)
    assert math.isclose(chi2_pvalue(36.415, 24), 0.05, rel_tol=1e-3)


@pytest.mark.parametrize("k", [1, 2])  # k = 1: the bonus token is the second token when d_1 is accepted
@pytest.mark.parametrize("argmax", [False, True])
def test_exact_sampling_matches_target(argmax, k):
    """Sampled drafts with their q, and argmax drafts as a point mass (draft_probs=None: accept with p(d),
    else sample p with d removed): first token and first two tokens follow the target."""
    first, pairs = simulate(accept_sampled, argmax_drafts=argmax, n=N, seed=1 + k + 2 * argmax, k=k)
    p_first, p_pairs = pvalues(first, pairs)
    assert p_first > ALPHA and p_pairs > ALPHA


@pytest.mark.parametrize("name,accept,argmax,pass_q", [
    ("always accept", always_accept, False, False),
    ("resample from p", resample_from_target, False, False),
    ("softmax q for argmax drafts", accept_sampled, True, True),
])
def test_the_statistic_detects_broken_rules(name, accept, argmax, pass_q):
    first, pairs = simulate(accept, argmax_drafts=argmax, n=N, seed=3, pass_q_for_argmax=pass_q)
    _, p_pairs = pvalues(first, pairs)
    assert p_pairs < ALPHA, f"the test cannot tell '{name}' from the correct rule"


@pytest.mark.parametrize("argmax", [False, True])
def test_exact_sampling_with_top_k_and_top_p_matches_the_filtered_target(argmax):
    """Verification against probs_from_logits with temperature 1.2, top-k 3, top-p 0.9 gives the filtered law:
    drafts of removed tokens (q puts mass there) are always rejected and the residual stays inside the filter."""
    law = filtered(toy_models()[0])
    assert int((law == 0).sum()) >= 2 * V, "the filter must remove tokens for this test to mean anything"
    first, pairs = simulate(accept_sampled, argmax_drafts=argmax, n=N, seed=7 + argmax, target=law)
    p_first, p_pairs = pvalues(first, pairs, law)
    assert p_first > ALPHA and p_pairs > ALPHA


def test_the_statistic_detects_verification_without_the_filter():
    """Broken: verify rows forget top-k / top-p (the raw tempered softmax) while the request asked for them."""
    P = toy_models()[0]
    law = filtered(P)
    first, pairs = simulate(accept_sampled, argmax_drafts=False, n=N, seed=9, target=filtered(P, top_k=None,
                                                                                              top_p=None))
    assert pvalues(first, pairs, law)[1] < ALPHA


def test_draft_equal_to_target_is_always_accepted():
    P, _ = toy_models()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ctx = [X0, 3, 1]
        out = accept_sampled(ctx[1:], P[ctx[:-1]], P[ctx], g)
        assert out[:2] == [3, 1] and len(out) == 3


def test_zero_target_probability_is_never_accepted():
    target = torch.tensor([[0.0, 0.5, 0.5], [1 / 3] * 3])
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        assert accept_sampled([0], None, target, g)[0] != 0
        assert accept_sampled([0], torch.tensor([[1.0, 0.0, 0.0]]), target, g)[0] != 0
        # a draft its own q gives no mass cannot have been drawn: rejected (one token, no bonus)
        assert len(accept_sampled([1], torch.tensor([[1.0, 0.0, 0.0]]), target, g)) == 1


def test_seeded_acceptance_is_reproducible():
    P, Q = toy_models()
    ctx = [X0, 1, 2]
    runs = [[accept_sampled(ctx[1:], Q[ctx[:-1]], P[ctx], g) for _ in range(30)]
            for g in (torch.Generator().manual_seed(9), torch.Generator().manual_seed(9))]
    assert runs[0] == runs[1]


def test_shape_errors():
    with pytest.raises(ValueError, match="k \\+ 1"):
        accept_sampled([1, 2], None, torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="draft_probs"):
        accept_sampled([1, 2], torch.full((2, 3), 1 / 3), torch.full((3, 4), 0.25))
    with pytest.raises(ValueError, match="k \\+ 1"):
        accept_greedy([1], torch.zeros(3, 4))


# ---- greedy ----------------------------------------------------------------------------------------------------
def test_accept_greedy_worked_examples():
    def logits_for(argmaxes):
        return torch.nn.functional.one_hot(torch.tensor(argmaxes), 10).float()

    assert accept_greedy([4, 7, 2], logits_for([4, 7, 5, 9])) == [4, 7, 5]
    assert accept_greedy([4, 7, 2], logits_for([4, 7, 2, 9])) == [4, 7, 2, 9]
    assert accept_greedy([4, 7, 2], logits_for([1, 7, 2, 9])) == [1]
    assert accept_greedy([], logits_for([6])) == [6]


def test_greedy_speculative_equals_greedy_plain():
    """On a toy Markov model with a sometimes-wrong draft, greedy speculation emits exactly the plain greedy
    chain, whatever the number of drafts."""
    g = torch.Generator().manual_seed(4)
    Vb = 11
    target = torch.randn(Vb, Vb, generator=g)
    draft = target + 1.5 * torch.randn(Vb, Vb, generator=g)  # agrees with the target on some rows only
    plain = [X0]
    for _ in range(40):
        plain.append(int(target[plain[-1]].argmax()))
    for k in range(0, 5):
        seq = [X0]
        steps = 0
        while len(seq) < 41:
            ctx = [seq[-1]]
            for _ in range(k):
                ctx.append(int(draft[ctx[-1]].argmax()))
            seq += accept_greedy(ctx[1:], target[ctx])
            steps += 1
        assert seq[:41] == plain
        if k:
            assert steps < 40  # some drafts were accepted


def test_verification_uses_the_plain_sampling_distribution():
    """Greedy rows of probs_from_logits are the point mass accept_greedy compares against; sampled rows are
    what plain sampling uses, so speculative sampling with temperature/top-k/top-p targets the same law."""
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    p = probs_from_logits(logits, 0.0)
    assert p.argmax(-1).tolist() == logits.argmax(-1).tolist() and torch.all(p.max(-1).values == 1)
    drafts = logits.argmax(-1)[:2].tolist()
    assert accept_greedy(drafts, logits) == logits.argmax(-1).tolist()
    # point-mass target (temperature 0) through accept_sampled behaves exactly like greedy acceptance
    g = torch.Generator().manual_seed(0)
    assert accept_sampled(drafts, None, p, g) == logits.argmax(-1).tolist()
