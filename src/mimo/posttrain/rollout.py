"""Rollouts through the engine: G samples per prompt with per-sample seeds, MTP speculation on, the sampler's
processed log-probs and the routed experts of every position; and the training batch built from them.

Row layout of one sample (prompt p_0..p_{P-1}, response y_0..y_{O-1}, y_{O-1} = <|im_end|> unless cut by
max_tokens): the token row is p + y (P + O tokens); the training inputs are its first P + O - 1 tokens and the
labels the last P + O - 1, so label column t predicts token t + 1 and the response occupies label columns
P - 1 .. P + O - 2. E.g. P = 3, O = 2: row [p0 p1 p2 y0 y1], inputs [p0 p1 p2 y0], labels [p1 p2 y0 y1],
mask [0 0 1 1]. The engine's routed experts are exactly the inputs' rows ([P + O - 1, L, K]). Rows are
right-padded to the longest in the batch (pad positions masked, their routed experts 0: causal attention
keeps pads from touching real positions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mimo import tasks as task_lib
from mimo.engine import LLM, SamplingParams
from mimo.train.data import Batch

from .rewards import score


@dataclass
class Rollout:
    """One sample."""

    example: task_lib.Example
    prompt_ids: list[int]
    token_ids: list[int]  # the response, ending with <|im_end|> unless cut by max_tokens
    logprobs: list[float]  # the sampler's (processed) log-prob of each response token
    routed_experts: torch.Tensor | None  # [P + O - 1, n_moe_layers, K] int16
    text: str
    num_drafted: int = 0
    num_accepted: int = 0
    reward: float = 0.0


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]  # G consecutive samples per prompt
    group_size: int
    seconds: float = 0.0
    engine: dict[str, float] = field(default_factory=dict)  # engine counter deltas over this batch

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([r.reward for r in self.rollouts], dtype=torch.float32)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rollouts)


def generate_rollouts(llm: LLM, tokenizer, examples: list[task_lib.Example], group_size: int, seeds: list[int],
                      max_tokens: int, temperature: float = 1.0, drafts: int | None = None) -> RolloutBatch:
    """`group_size` samples of each example (sample j of example i seeded seeds[i] + j), scored; `drafts`
    overrides the engine's MTP drafts per step (0 = plain decoding)."""
    keys = ("prompt_tokens", "generated_tokens", "drafted_tokens", "accepted_tokens", "verify_steps")
    before = llm.stats()
    t0 = time.perf_counter()
    ids = [task_lib.prompt_ids(tokenizer, ex) for ex in examples]
    params = [SamplingParams(n=group_size, seed=s, temperature=temperature, max_tokens=max_tokens, logprobs=0,
                             logprobs_mode="processed", routed_experts=True) for s in seeds]
    outs = llm.generate(ids, params, num_speculative_tokens=drafts)
    seconds = time.perf_counter() - t0
    after = llm.stats()
    rollouts = []
    for i, o in enumerate(outs):
        ex = examples[i // group_size]
        text = task_lib.completion_text(tokenizer, o.token_ids)
        rollouts.append(Rollout(ex, o.prompt_token_ids, o.token_ids, [lp.logprob for lp in o.logprobs],
                                o.routed_experts, text, o.metrics.num_drafted, o.metrics.num_accepted,
                                score(ex, text)))
    return RolloutBatch(rollouts, group_size, seconds, {k: after[k] - before[k] for k in keys})


def build_batch(rollouts: list[Rollout], advantages: torch.Tensor, pad_id: int) -> Batch:
    """The training rows of the module docstring, with advantages [B], the sampler's log-probs at the
    response labels, loss weights 1 / |y_i| and the routed experts."""
    B = len(rollouts)
    T = max(len(r.prompt_ids) + len(r.token_ids) - 1 for r in rollouts)
    ids = torch.full((B, T + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    old = torch.zeros(B, T, dtype=torch.float32)
    routed = None
    if all(r.routed_experts is not None for r in rollouts):
        L, K = rollouts[0].routed_experts.shape[1:]
        routed = torch.zeros(B, T, L, K, dtype=torch.int16)
    for i, r in enumerate(rollouts):
        P, O = len(r.prompt_ids), len(r.token_ids)
        ids[i, :P + O] = torch.tensor(r.prompt_ids + r.token_ids)
        mask[i, P - 1:P + O - 1] = True
        old[i, P - 1:P + O - 1] = torch.tensor(r.logprobs)
        if routed is not None:
            routed[i, :P + O - 1] = r.routed_experts
    lengths = torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.float32)
    return Batch(ids[:, :-1], ids[:, 1:], mask, advantages.float(), old, 1.0 / lengths.clamp_min(1), routed)
