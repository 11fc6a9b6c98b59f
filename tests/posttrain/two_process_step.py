"""One GRPO update on fixed rollouts, in one process or under torchrun (FSDP2, gloo); writes the initial and
the updated full weights and the step's metrics to argv[1]. Driven by test_two_process.py.

Rollouts: 4 prompts x G = 4 samples from a seeded test model through the engine (rank 0 makes them and
broadcasts them), with fixed rewards; rank r of W trains on prompts [r * 4 / W, (r + 1) * 4 / W).
"""

import sys

import torch

from mimo.engine import LLM, SamplingParams
from mimo.model import ModelConfig, Transformer, init_weights
from mimo.posttrain.loop import RLConfig, update_on_rollouts
from mimo.posttrain.rollout import Rollout, RolloutBatch
from mimo.tasks import Example
from mimo.train import parallel
from mimo.train.optim import param_groups

G, N_PROMPTS = 4, 4
REWARDS = [1, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0]  # every group has variance


def rollouts(model) -> list[Rollout]:
    llm = LLM(model, num_speculative_tokens=2, max_model_len=64, max_num_seqs=16, block_size=4)
    prompts = [[3 + i, 17, 40 + 2 * i, 9, 11 + i][: 3 + i % 3] for i in range(N_PROMPTS)]
    sp = [SamplingParams(n=G, seed=100 * i, max_tokens=6 + i, ignore_eos=True, logprobs=0, logprobs_mode="processed",
                         routed_experts=True) for i in range(N_PROMPTS)]
    ex = Example("sort", "sort 1", "1")
    return [Rollout(ex, o.prompt_token_ids, o.token_ids, [lp.logprob for lp in o.logprobs], o.routed_experts, "",
                    reward=float(r)) for o, r in zip(llm.generate(prompts, sp), REWARDS)]


def main(out: str) -> None:
    info = parallel.init_distributed()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("test"))
    init_weights(model, seed=0, std=0.1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    rs = parallel.broadcast_object(rollouts(model) if info.is_main else None)
    per = N_PROMPTS // info.world_size * G
    mine = RolloutBatch(rs[info.rank * per:(info.rank + 1) * per], G)
    model = parallel.apply_parallelism(model, info.world_size)
    cfg = RLConfig(lr=1e-3, mtp_weight=0.1)
    # SGD: the update is lr times the (clipped) gradient, so equal updates mean equal gradients. AdamW's first
    # step lr * g / (|g| + eps) is ill-conditioned where a gradient cancels to about eps: there the ranks'
    # summation order moved weights by up to 1.4e-5 of a 1e-3 step on one machine and not on another.
    opt = torch.optim.SGD(param_groups(model, 0.0), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metrics, _ = update_on_rollouts(model, opt, sched, mine, cfg, 0, 0, info.world_size)
    state = parallel.full_model_state(model)
    if info.is_main:
        torch.save({"init": init, "state": state, "metrics": metrics}, out)
    parallel.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
