"""GRPO pieces on hand-built examples: group advantages, zero-variance groups, the IS mask (masked tokens get
exactly zero gradient), per-sequence 1/|y| normalisation, the training rows built from rollouts."""

import math

import pytest
import torch

from mimo import tasks as task_lib
from mimo.posttrain import grpo
from mimo.posttrain.rewards import parse_domains, step_examples
from mimo.posttrain.rollout import Rollout, build_batch
from mimo.train.step import forward_backward
from tests.conftest import make_model


def test_group_advantages_by_hand():
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1]), 4)
    s = math.sqrt(0.25 * 0.75)
    assert adv[:4].tolist() == pytest.approx([0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s], rel=1e-5)
    assert adv[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: no signal, and no NaN
    assert adv[8:].tolist() == pytest.approx([-1, 1, -1, 1], rel=1e-5)
    assert grpo.zero_variance_groups(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]), 4).tolist() == [
        False, True, True]
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(torch.zeros(6), 4)


def test_is_weights_by_hand():
    """Band [0.5, 2]: log-ratios 0, 0.9, -1.0, 0.5 -> ratios 1, 2.46, 0.37, 1.65: the middle two are dropped;
    an unmasked (prompt / pad) position is dropped whatever its ratio."""
    logp = torch.tensor([[0.0, 0.9, -1.0, 0.5, 0.0]])
    old = torch.zeros(1, 5)
    mask = torch.tensor([[True, True, True, True, False]])
    w, kept = grpo.is_weights(logp, old, mask, 0.5, 2.0)
    assert kept.tolist() == [[True, False, False, True, False]]
    assert w[0].tolist() == pytest.approx([1.0, 0.0, 0.0, math.exp(0.5), 0.0])


def _rollout(prompt, response, logprobs, L=5, K=2):
    ex = task_lib.Example("sort", "sort 2 1 3", "1 2 3")
    n = len(prompt) + len(response) - 1
    routed = torch.arange(n * L * K, dtype=torch.int16).view(n, L, K) % 8
    return Rollout(ex, prompt, response, logprobs, routed, "")


def test_build_batch_layout_by_hand():
    """P = 3, O = 2: inputs [p0 p1 p2 y0], labels [p1 p2 y0 y1], mask [0 0 1 1]; a shorter row is padded
    (its last token then also appears as an input, at a position no label of it uses)."""
    a = _rollout([10, 11, 12], [20, 21], [-0.5, -0.25])
    b = _rollout([10, 11], [30], [-1.0])
    batch = build_batch([a, b], torch.tensor([1.0, -1.0]), pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20], [10, 11, 30, 0]]
    assert batch.labels.tolist() == [[11, 12, 20, 21], [11, 30, 0, 0]]
    assert batch.mask.tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch.old_logprobs.tolist() == [[0, 0, -0.5, -0.25], [0, -1.0, 0, 0]]
    assert batch.loss_weights.tolist() == [0.5, 1.0]
    assert torch.equal(batch.routed_experts[0], a.routed_experts)
    assert torch.equal(batch.routed_experts[1, :2], b.routed_experts)
    assert not batch.routed_experts[1, 2:].any()


def _batch(model, B=4, P=5, O=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for i in range(B):
        toks = torch.randint(0, model.config.vocab_size, (P + O - i % 2,), generator=g).tolist()
        rollouts.append(_rollout(toks[:P], toks[P:], [-2.0] * (len(toks) - P), L=5, K=2))
    with torch.no_grad():  # the sampler's log-probs = the model's own (on-policy), so every ratio is 1
        b0 = build_batch(rollouts, torch.zeros(B), 0)
        logp = grpo.token_logprobs(model(b0.input_ids), b0.labels, 1.0)
    for r, row, m in zip(rollouts, logp, b0.mask):
        r.logprobs = row[m].tolist()
    return build_batch(rollouts, torch.tensor([1.0, -0.5, 2.0, -1.5]), 0)


def _grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    loss_fn = grpo.grpo_objective(batch.input_ids.shape[0], [], [], 0.5, 2.0, mtp_weight=0.0, replay=False, **kw)
    out = forward_backward(model, batch, loss_fn)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tokens_outside_the_band_contribute_exactly_zero_gradient():
    """Pushing one response token's sampler log-prob far off (ratio 1e3) gives the gradient of the same batch
    with that token masked out; inside the band the ratio scales the token's gradient (not clipped)."""
    model = make_model(n_mtp_layers=0)
    batch = _batch(model)
    i, t = 2, int(batch.mask[2].nonzero()[1])
    poisoned = _batch(model)
    poisoned.old_logprobs[i, t] -= math.log(1e3)
    dropped = _batch(model)
    dropped.mask[i, t] = False
    out_p, gp = _grads(model, poisoned)
    _, gd = _grads(model, dropped)
    _, g0 = _grads(model, batch)
    assert int(out_p.metrics["kept"]) == int(batch.mask.sum()) - 1
    for n in gp:
        torch.testing.assert_close(gp[n], gd[n], rtol=0, atol=0)
    assert any(not torch.allclose(gp[n], g0[n]) for n in gp)


def test_per_sequence_normalisation_and_value():
    """With every ratio 1, the objective is -(1/B) sum_i A_i mean_t log pi(y_t) (1/|y_i| per sequence)."""
    model = make_model(n_mtp_layers=0)
    batch = _batch(model)
    out, _ = _grads(model, batch)
    with torch.no_grad():
        logp = grpo.token_logprobs(model(batch.input_ids), batch.labels, 1.0)
    per_seq = [(logp[i][batch.mask[i]]).mean() * batch.advantages[i] for i in range(4)]
    assert float(out.metrics["pg"]) == pytest.approx(-float(sum(per_seq)) / 4, rel=1e-5)
    assert int(out.metrics["kept"]) == int(batch.mask.sum())  # on-policy: nothing masked


def test_mtp_loss_trains_only_the_heads():
    """With the policy term at zero (advantages 0) the MTP loss moves only model.mtp.* (trunk detached)."""
    model = make_model()
    batch = _batch(model)
    batch.advantages.zero_()
    model.zero_grad(set_to_none=True)
    loss_fn = grpo.grpo_objective(4, [int(batch.mask[:, k + 1:].sum()) for k in range(model.n_mtp)], [], 0.5, 2.0,
                                  mtp_weight=1.0, replay=False)
    forward_backward(model, batch, loss_fn)
    for name, p in model.named_parameters():
        moved = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert moved == name.startswith("model.mtp."), name


def test_prompt_mixture_is_a_function_of_seed_and_step():
    a = step_examples(("add", "sort"), 5, seed=0, step=3)
    assert a == step_examples(("add", "sort"), 5, seed=0, step=3)
    assert a != step_examples(("add", "sort"), 5, seed=0, step=4)
    assert sorted(e.task for e in a).count("add") in (2, 3) and {e.task for e in a} == {"add", "sort"}
    assert parse_domains("sort,add,sort") == ("sort", "add")
    with pytest.raises(ValueError, match="unknown domain 'mul'; known domains: add,reverse,sort"):
        parse_domains("add,mul")


def test_updates_raise_the_reward_they_are_given():
    """Direction check end to end (engine rollouts -> advantages -> masked loss -> AdamW -> update_weights):
    rewarding an odd first response token moves the policy's first-token mass off the even tokens."""
    from mimo.engine import LLM, SamplingParams
    from mimo.posttrain.loop import RLConfig, update_on_rollouts
    from mimo.posttrain.rollout import RolloutBatch
    from mimo.train.optim import param_groups

    model = make_model(n_mtp_layers=0)
    llm = LLM(make_model(n_mtp_layers=0), max_model_len=32, max_num_seqs=32, block_size=4)
    llm.update_weights(model)
    prompts = [[5, 6, 7], [9, 3], [12, 1, 4, 4]]
    even = torch.arange(model.config.vocab_size) % 2 == 0

    def even_mass() -> float:
        with torch.no_grad():
            return sum(float(torch.softmax(model(torch.tensor([p]))[0, -1], -1)[even].sum()) for p in prompts) / 3

    cfg = RLConfig(group_size=8, lr=1e-2, mtp_weight=0.0)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=cfg.lr, betas=cfg.betas, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = even_mass()
    for step in range(8):
        sp = [SamplingParams(n=8, seed=100 * step + i, max_tokens=3, ignore_eos=True, logprobs=0,
                             logprobs_mode="processed", routed_experts=True) for i in range(len(prompts))]
        outs = llm.generate(prompts, sp)
        rs = [Rollout(task_lib.Example("sort", "sort 1", "1"), o.prompt_token_ids, o.token_ids,
                      [lp.logprob for lp in o.logprobs], o.routed_experts, "", reward=float(o.token_ids[0] % 2 == 1))
              for o in outs]
        m, _ = update_on_rollouts(model, opt, sched, RolloutBatch(rs, 8), cfg, step, 0)
        assert m["masked_fraction"] < 0.01  # the engine has the trainer's weights: on-policy
        llm.update_weights(model)
    assert even_mass() < before - 0.15  # measured: 0.50 -> 0.12
