"""Rollout Routing Replay: the training forward over engine rollouts (MTP drafts on, sampled, groups with
per-sample seeds) chooses exactly the rollout's experts and reproduces the sampler's log-probs to fp32 noise;
when the trainer's router drifts, replay still uses the rollout's experts while fresh routing does not."""

import pytest
import torch

from mimo import tasks as task_lib
from mimo.checkpoint import load_model
from mimo.engine import LLM, SamplingParams
from mimo.engine.config import DEFAULT_MODEL
from mimo.posttrain import grpo
from mimo.posttrain.loop import moe_layer_ids
from mimo.posttrain.rollout import Rollout, build_batch
from mimo.train.loop import RoutingRecord

EX = task_lib.Example("sort", "sort 1", "1")


@pytest.fixture
def model():
    """The bundled trained model: its MTP heads draft well enough that verification accepts and rejects."""
    return load_model(DEFAULT_MODEL, dtype=torch.float32).eval()


def _rollouts(model):
    # replay must hold across accepted and rejected drafts: every step proposes all 3 (adaptive drafting,
    # which would draft little on these prompts, off)
    llm = LLM(model, num_speculative_tokens=3, max_model_len=64, max_num_seqs=8, block_size=4,
              max_num_batched_tokens=32, adaptive_drafting=False)
    prompts = [[5, 9, 14, 3], [7, 7, 21, 30, 2, 11]]
    # temperature 0.8: sharp enough that verification accepts some drafts and rejects others
    sp = [SamplingParams(n=4, seed=10 * i, temperature=0.8, max_tokens=12, ignore_eos=True, logprobs=0,
                         logprobs_mode="processed", routed_experts=True) for i in range(len(prompts))]
    outs = llm.generate(prompts, sp)
    st = llm.stats()
    assert 0 < st["accepted_tokens"] < st["drafted_tokens"]
    return [Rollout(EX, o.prompt_token_ids, o.token_ids, [lp.logprob for lp in o.logprobs], o.routed_experts, "")
            for o in outs]


def _forward(model, batch, replay):
    layers = moe_layer_ids(model)
    routing = grpo.replay_routing(batch, layers) if replay else RoutingRecord()
    with torch.no_grad():
        logits = model(batch.input_ids, routing=routing)
    used = torch.stack([routing.ids[l].view(*batch.input_ids.shape, -1) for l in layers], 2)  # [B, T, L, K]
    return grpo.token_logprobs(logits, batch.labels, 0.8), used


def test_replayed_forward_reproduces_the_rollout(model):
    rollouts = _rollouts(model)
    batch = build_batch(rollouts, torch.zeros(len(rollouts)), 0)
    logp, used = _forward(model, batch, replay=True)
    real = torch.zeros_like(batch.mask)  # positions the engine ran over (prompt and response, no padding)
    for i, r in enumerate(rollouts):
        real[i, :len(r.prompt_ids) + len(r.token_ids) - 1] = True
    assert torch.equal(used[real], batch.routed_experts.long()[real])
    torch.testing.assert_close(logp[batch.mask], batch.old_logprobs[batch.mask], rtol=0, atol=2e-5)
    # and the engine's experts are what the trainer's own router picks on these weights
    _, fresh = _forward(model, batch, replay=False)
    assert torch.equal(fresh[real], used[real])


def test_replay_holds_the_rollout_experts_when_the_trainer_router_drifts(model):
    """A small change to the selection bias (as an aux-free balancing update would make) flips some choices
    of fresh routing; replay keeps the rollout's, and replaying wrong experts changes the log-probs."""
    rollouts = _rollouts(model)
    batch = build_batch(rollouts, torch.zeros(len(rollouts)), 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.add_(0.05 * torch.randn(m.e_score_correction_bias.shape, generator=g))
    real = batch.mask.clone()
    _, replayed = _forward(model, batch, replay=True)
    _, fresh = _forward(model, batch, replay=False)
    assert torch.equal(replayed[real], batch.routed_experts.long()[real])
    assert not torch.equal(fresh[real], replayed[real])
    wrong = build_batch(rollouts, torch.zeros(len(rollouts)), 0)
    wrong.routed_experts = (wrong.routed_experts + 1) % model.config.n_experts
    lp_wrong, _ = _forward(model, wrong, replay=True)
    lp_right, _ = _forward(model, batch, replay=True)
    assert (lp_wrong - lp_right)[batch.mask].abs().max() > 1e-3
