"""Sampler and config validation: the shared target distribution, seeded reproducibility, logprobs."""

import math

import pytest
import torch
from tests.conftest import make_model

from mimo.engine.config import EngineConfig, SamplingParams
from mimo.engine.sampler import compute_logprobs, make_generator, probs_from_logits, sample
from mimo.model.transformer import filter_logits


# ---- SamplingParams / EngineConfig validation ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"logprobs": -1}, "logprobs"),
    ({"seed": "7"}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_normalisation():
    sp = SamplingParams(top_k=-1, stop="###", stop_token_ids=(3, 4))
    assert sp.top_k is None and sp.stop == ["###"] and sp.stop_token_ids == [3, 4]
    assert SamplingParams(top_k=0).top_k is None and SamplingParams(top_k=5).top_k == 5
    assert SamplingParams(temperature=0).is_greedy and not SamplingParams(temperature=0.5).is_greedy
    assert SamplingParams(max_tokens=None).max_tokens is None


@pytest.mark.parametrize("kwargs,field", [
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
    ({"block_size": 0}, "block_size"),
    ({"num_speculative_tokens": -1}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 3, "max_num_batched_tokens": 3}, "max_num_batched_tokens"),
    ({"enable_chunked_prefill": False, "max_model_len": 4096, "max_num_batched_tokens": 512},
     "max_num_batched_tokens"),
    ({"kv_cache_bytes": 10**9, "num_full_blocks": 10}, "kv_cache_bytes"),
    ({"num_sliding_blocks": -1}, "num_sliding_blocks"),
    ({"dtype": "int4"}, "dtype"),
    ({"device": "gpu0"}, "device"),
    ({"sliding_window_margin": -1}, "sliding_window_margin"),
    ({"max_model_len": 1}, "max_model_len"),
])
def test_engine_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        EngineConfig(**kwargs)


# ---- probs_from_logits --------------------------------------------------------------------------------------
def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 1.0, 3.0):
        torch.testing.assert_close(probs_from_logits(logits, t), torch.softmax(logits / t, -1))


def test_top_p_worked_example():
    """probs [0.5, 0.3, 0.2], top_p 0.7: mass before each token [0, 0.5, 0.8] -> keep 2 -> [0.625, 0.375, 0]."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    torch.testing.assert_close(probs_from_logits(logits, 1.0, None, 0.7), torch.tensor([0.625, 0.375, 0.0]))
    # exactly reaching top_p with the first two tokens keeps two (0.5 + 0.3 >= 0.8)
    torch.testing.assert_close(probs_from_logits(logits, 1.0, None, 0.8), torch.tensor([0.625, 0.375, 0.0]))
    assert probs_from_logits(logits, 1.0, None, 0.01)[0] == 1.0  # the top token always survives


def test_top_k_then_top_p_per_row():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3))
    probs = probs_from_logits(logits, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2, 0, 3]),
                              torch.tensor([1.0, 0.6, 0.8]))
    expect = torch.tensor([[0.4 / 0.7, 0.3 / 0.7, 0, 0],  # top-k 2
                           [0.4 / 0.7, 0.3 / 0.7, 0, 0],  # top-p 0.6 keeps 0.4 + 0.3
                           [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0]])  # top-k 3, then top-p 0.8 keeps all 3:
    # top-p sees the top-k-renormalised mass, 0.444 + 0.333 = 0.778 < 0.8 before the third token
    torch.testing.assert_close(probs, expect)


def test_top_p_one_leaves_a_long_tail_untouched():
    """float rounding in the cumulative sum must not drop tiny tail tokens when top-p is off."""
    logits = torch.cat([torch.zeros(1), torch.full((9999,), -12.0)])
    torch.testing.assert_close(probs_from_logits(logits, 1.0, None, 1.0), torch.softmax(logits, -1))


def test_greedy_rows_are_a_point_mass_on_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [1.0, 0.0, 5.0]])
    probs = probs_from_logits(logits, torch.tensor([0.0, 1.0]))
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], -1))


# ---- sample ----------------------------------------------------------------------------------------------------
def test_seeded_request_is_reproducible_regardless_of_batch():
    """A seeded request's tokens depend only on its seed: alone, or at any row of a batch with seeded and
    unseeded neighbours, over several steps."""
    V, steps = 64, 6
    g = torch.Generator().manual_seed(123)
    logits_steps = [torch.randn(1, V, generator=g) for _ in range(steps)]
    sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7)

    def run(batch_builder):
        gens = {"me": make_generator(7), "other": make_generator(99), "free": None}
        out = []
        for s in range(steps):
            rows, params, gen_list = batch_builder(s, logits_steps[s], gens)
            res = sample(torch.cat(rows), params, gen_list, torch.Generator().manual_seed(1000 + s))
            out.append(res.token_ids[[p is sp for p in params].index(True)])
        return out

    alone = run(lambda s, lg, gens: ([lg], [sp], [gens["me"]]))
    other_sp = SamplingParams(temperature=1.0)
    noise = [torch.randn(1, V, generator=g) for _ in range(2 * steps)]

    def crowded(s, lg, gens):
        return ([noise[2 * s], lg, noise[2 * s + 1]], [other_sp, sp, SamplingParams(seed=99)],
                [gens["free"], gens["me"], gens["other"]])

    assert run(crowded) == alone
    assert len(set(alone)) > 1  # it really sampled


def test_greedy_rows_consume_no_randomness():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    logits = torch.randn(2, 10)
    sample(logits, [SamplingParams(temperature=0), SamplingParams(temperature=0)], [g1, g1])
    assert torch.equal(g1.get_state(), g2.get_state())
    assert sample(logits, [SamplingParams(temperature=0)] * 2).token_ids == logits.argmax(-1).tolist()


def test_sampled_frequencies_follow_the_distribution():
    """2,000 seeded draws from a 4-token distribution: every frequency within 5 sigma of its probability."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(2000, 4).contiguous()
    tokens = sample(logits, [SamplingParams()] * 2000, default_generator=torch.Generator().manual_seed(0)).token_ids
    n = len(tokens)
    for t, p in enumerate(probs.tolist()):
        assert abs(tokens.count(t) / n - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_logprobs_come_from_raw_logits():
    """Chosen-token logprob, rank and top-n use log_softmax of the raw logits, not the tempered ones."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    out = sample(logits, [SamplingParams(temperature=0, logprobs=2)])
    lp = torch.log_softmax(logits, -1)[0]
    (r,) = out.logprobs
    assert r.token_id == 0 and r.rank == 1 and math.isclose(r.logprob, lp[0].item(), rel_tol=1e-6)
    assert [t for t, _ in r.top] == [0, 2]
    hot = sample(logits, [SamplingParams(temperature=5.0, logprobs=0, seed=1)], [make_generator(1)])
    (h,) = hot.logprobs
    assert math.isclose(h.logprob, lp[h.token_id].item(), rel_tol=1e-6) and h.top == []
    rows = compute_logprobs(logits, [1], 3)
    assert rows[0].rank == 3 and [t for t, _ in rows[0].top] == [0, 2, 1]
    assert sample(logits, [SamplingParams()]).logprobs == [None]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    torch.testing.assert_close(probs_from_logits(logits, 1.0, None, None, 0.5), torch.tensor([0.625, 0.375, 0.0]))
    torch.testing.assert_close(probs_from_logits(logits, 1.0, None, None, 0.0), torch.tensor([0.5, 0.3, 0.2]))


# ---- one top-k / top-p definition: the model's filter_logits ---------------------------------------------------
def test_top_k_keeps_ties_with_the_kth_logit():
    """Ties at the k-th logit are all kept, whatever their order, so the law does not depend on token ids."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0], [2.0, 1.0, 0.0, 2.0]])
    torch.testing.assert_close(probs_from_logits(logits, 1.0, 1), torch.tensor([[0, 0.5, 0.5, 0], [0.5, 0, 0, 0.5]]))
    kept = ~filter_logits(logits, 3).isinf()
    assert kept.tolist() == [[True, True, True, False], [True, True, False, True]]


def test_per_row_filter_equals_scalar_filter_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g).round(decimals=1)  # rounding makes ties
    ks, ps = [0, 1, 5, 17, 49, 50], [1.0, 0.9, 0.5, 0.99, 0.2, 0.7]
    batched = filter_logits(logits, torch.tensor(ks), torch.tensor(ps))
    for i, (k, p) in enumerate(zip(ks, ps)):
        assert torch.equal(batched[i], filter_logits(logits[i], k, p)), i
    assert torch.equal(filter_logits(logits, None, None), logits)


def test_top_p_from_candidates_equals_sorting_the_vocabulary(monkeypatch):
    """The topk fast path of top-p gives the sort's result, row by row: rows it cannot be sure of (nucleus
    beyond the candidates, ties among them or at their edge) are sorted, and they do not send the rows it
    decided to the sort."""
    from mimo.model import transformer

    g = torch.Generator().manual_seed(0)
    V, C = 1000, 64
    monkeypatch.setattr(transformer, "NUCLEUS_CANDIDATES", (C // 4, C))
    peaked = torch.randn(8, V, generator=g) * 4  # nuclei of a few tokens: the fast path
    flat = torch.randn(8, V, generator=g) * 0.1  # nuclei of hundreds of tokens: beyond the candidates
    tied = peaked.clone()  # the two best tied: with top_p 0.5 the sort keeps the lower id alone
    tied[:, 7] = tied[:, 900] = tied.max(-1).values + 3
    edge = peaked.clone()
    edge[:, :2] = edge.topk(C, dim=-1).values[:, -1:]  # two more logits equal to the last candidate's
    mixed = torch.cat([peaked[:3], flat[:2], tied[:2], edge[:1]])[torch.randperm(8, generator=g)]
    for name, x in (("peaked", peaked), ("flat", flat), ("tied", tied), ("edge", edge), ("mixed", mixed)):
        for p in (0.5, 0.9, 0.95):
            fast, ref = transformer.filter_logits(x, None, p), transformer.filter_logits(x, None, p, reference=True)
            assert torch.equal(fast.isinf(), ref.isinf()), (name, p)
            assert torch.equal(fast[~fast.isinf()], ref[~ref.isinf()]), (name, p)
    # rows with top-k, with neither filter, with top-p alone (decided or not) in one batch
    ks = torch.tensor([0, 5, 0, 0, 3, 0, 0, 0])
    ps = torch.tensor([0.9, 1.0, 1.0, 0.9, 0.5, 0.95, 0.5, 0.9])
    fast, ref = transformer.filter_logits(mixed, ks, ps), transformer.filter_logits(mixed, ks, ps, reference=True)
    assert torch.equal(fast.isinf(), ref.isinf()) and torch.equal(fast[~fast.isinf()], ref[~ref.isinf()])
    assert torch.equal(fast[2], mixed[2])
    # the fast path decides the peaked rows; not the flat or tied ones; at the edge, the rows where the tie
    # reaches into the candidates (where it does not, the tied tokens are dropped with the last candidate)
    p8 = torch.full((8,), 0.9)
    assert bool(transformer._nucleus_of_candidates(peaked, p8, C)[1].all())
    for x in (flat, tied):
        assert not bool(transformer._nucleus_of_candidates(x, p8, C)[1].any())
    vals = edge.topk(C, dim=-1).values
    decided = transformer._nucleus_of_candidates(edge, p8, C)[1]
    assert torch.equal(decided, (vals[:, 1:] != vals[:, :-1]).all(-1)) and not bool(decided.all())


def test_draws_of_a_batch_equal_draws_row_by_row():
    """A batch draws each row from its own generator (shared ones in row order) and gives the tokens the rows
    drawn one at a time would: seeded requests' tokens do not depend on the batch."""
    from mimo.model.transformer import draw, draws

    probs = torch.softmax(torch.randn(12, 300, generator=torch.Generator().manual_seed(0)) * 2, -1)
    probs[3, 100:] = 0.0  # a row with zero tail mass
    shared = torch.Generator().manual_seed(9)
    gens = [torch.Generator().manual_seed(i) if i % 3 else shared for i in range(12)]
    states = [g.get_state() for g in gens]
    batched = draws(probs, gens)
    for g, st in zip(gens, states):
        g.set_state(st)
    shared.set_state(states[0])
    assert batched == [draw(probs[i], gens[i]) for i in range(12)]
    assert batched[3] < 100


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    from mimo.model.transformer import draw

    probs = torch.tensor([0.3, 0.0, 0.45, 0.0, 0.25]) * 2  # totals need not be 1
    g = torch.Generator().manual_seed(0)
    tokens = [draw(probs, g) for _ in range(4000)]
    assert tokens.count(1) == tokens.count(3) == 0
    for t, p in ((0, 0.3), (2, 0.45), (4, 0.25)):
        assert abs(tokens.count(t) / 4000 - p) < 5 * math.sqrt(p * (1 - p) / 4000)
    assert draw(torch.tensor([0.0, 0.0, 1.0, 0.0]), g) == 2


def test_engine_sampling_equals_the_reference_generate_with_top_k_and_top_p():
    """Same seed, same filter, one draw per token: the engine (MTP off) reproduces the model's slow `generate`."""
    from mimo.engine import LLM
    from mimo.model import generate

    model = make_model()
    llm = LLM(model, num_speculative_tokens=0, max_model_len=64, block_size=4)
    for i, (k, p) in enumerate([(5, 1.0), (None, 0.8), (20, 0.9)]):
        prompt = [3 + i, 7, 11, 2]
        ref = generate(model, prompt, 12, temperature=0.8, top_k=k, top_p=p, seed=i)
        out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.8, top_k=k, top_p=p, seed=i))
        assert out[0].token_ids == ref, (k, p)
