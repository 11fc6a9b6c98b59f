"""The engine as an RL rollout worker: routed experts returned with the output (accepted positions only, across
drafts and preemption) equal a plain forward's; update_weights gives a freshly built engine's output for every
way of changing the weights, with requests in flight."""

import pytest
import torch
from tests.conftest import make_model
from tests.engine.helpers import oracle_drafts

from mimo.engine import LLM, SamplingParams
from mimo.model import generate
from mimo.model.moe import MoE, Routing


@pytest.fixture(scope="module")
def model():
    return make_model()


def _engine(model, **kw):
    base = dict(max_model_len=96, max_num_seqs=4, block_size=4, max_num_batched_tokens=16)
    return LLM(model, **{**base, **kw})


def _prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def plain_routing(model, tokens) -> torch.Tensor:
    """[len(tokens), n_moe_layers, top_k]: the experts a plain full forward over `tokens` chooses."""
    r = Routing(record=True)
    with torch.no_grad():
        model.forward_hidden(torch.tensor([tokens]), routing=r)
    layers = sorted(m.layer_id for m in model.modules() if isinstance(m, MoE))
    return torch.stack([r.ids[l] for l in layers], 1)


@pytest.mark.parametrize("k,pool", [(0, None), (3, None), (2, 34)])
def test_routed_experts_equal_a_plain_forward(model, k, pool):
    """Prompt and output positions, rejected drafts dropped (oracle drafts: every acceptance length occurs),
    and with a tiny pool, across preemptions (the recomputed prefill replaces the old rows)."""
    llm = _engine(model, num_speculative_tokens=k, num_full_blocks=pool, max_model_len=64)
    prompts = _prompts(model, (20, 22, 18, 21) if pool else (5, 17, 9), seed=k)
    n_out = 30
    refs = [generate(model, p, n_out) for p in prompts]
    if k:
        oracle_drafts(llm, {tuple(p): r for p, r in zip(prompts, refs)})
    outs = llm.generate(prompts, SamplingParams(max_tokens=n_out, temperature=0, routed_experts=True))
    st = llm.stats()
    if k:
        assert 0 < st["accepted_tokens"] < st["drafted_tokens"]
    if pool:
        assert st["preemptions"] > 0
    n_moe = sum(isinstance(m, MoE) for m in model.modules())
    for p, ref, o in zip(prompts, refs, outs):
        assert o.token_ids == ref
        tokens = p + o.token_ids[:-1]
        assert o.routed_experts.shape == (len(tokens), n_moe, model.config.n_active_experts)
        assert o.routed_experts.dtype == torch.int16
        assert torch.equal(o.routed_experts.long(), plain_routing(model, tokens))


def test_routed_experts_are_opt_in(model):
    out = _engine(model).generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.routed_experts is None


def test_routed_experts_of_sampled_groups_follow_each_sample(model):
    """n samples of one prompt with per-sample seeds: each sample's rows are those of its own tokens."""
    p = [4, 5, 6, 7]
    outs = _engine(model, num_speculative_tokens=2).generate(
        [p], SamplingParams(max_tokens=12, temperature=1.0, seed=3, n=3, routed_experts=True))
    assert len({tuple(o.token_ids) for o in outs}) > 1
    for o in outs:
        assert torch.equal(o.routed_experts.long(), plain_routing(model, p + o.token_ids[:-1]))


# ---- update_weights ---------------------------------------------------------------------------------------------

def _new_state(model, seed):
    return make_model(seed=seed).state_dict()


def _change_load_state_dict(llm, state):
    llm.model.load_state_dict(state)
    llm.update_weights()


def _change_data_copy(llm, state):
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            p.data.copy_(state[name])
        for name, b in llm.model.named_buffers():
            b.copy_(state[name])
    llm.update_weights(llm.model)


def _change_data_assign(llm, state):
    for name, p in llm.model.named_parameters():
        p.data = state[name].clone()
    for name, b in llm.model.named_buffers():
        b.data = state[name].clone()
    llm.update_weights()


def _change_module(llm, state):
    other = make_model()
    other.load_state_dict(state)
    llm.update_weights(other)


def _change_state_dict(llm, state):
    llm.update_weights(state)


@pytest.mark.parametrize("change", [_change_load_state_dict, _change_data_copy, _change_data_assign, _change_module,
                                    _change_state_dict])
def test_update_weights_equals_a_fresh_engine_with_requests_in_flight(change):
    """Requests part-way through (some decoding, one still prefilling, one waiting) continue under the new
    weights exactly as a fresh engine on the new weights continues their tokens so far."""
    model = make_model()  # the engine's own copy: the changes below write into it
    llm = _engine(model, num_speculative_tokens=2, max_num_batched_tokens=12)
    prompts = _prompts(model, (6, 9, 30, 4), seed=5)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ids = [llm.add_request(None, p, greedy) for p in prompts]
    toks = {i: [] for i in ids}
    for _ in range(3):
        for d in llm.step():
            toks[d.request_id] += d.new_token_ids
    assert llm.scheduler.num_running > 0 and any(toks.values()) and not all(toks.values())
    before = {i: list(t) for i, t in toks.items()}
    state = _new_state(model, seed=7)
    change(llm, state)
    while llm.has_unfinished_requests():
        for d in llm.step():
            toks[d.request_id] += d.new_token_ids
    fresh_model = make_model()
    fresh_model.load_state_dict(state)
    for i, p in zip(ids, prompts):
        so_far = before[i]
        expected = generate(fresh_model, p + so_far, 16 - len(so_far))
        assert toks[i] == so_far + expected, change.__name__
    # and a new request equals a freshly built engine's output
    fresh = _engine(fresh_model, num_speculative_tokens=2).generate([prompts[0]], greedy)[0].token_ids
    assert llm.generate([prompts[0]], greedy)[0].token_ids == fresh
