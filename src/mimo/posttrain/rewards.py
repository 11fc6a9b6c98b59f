"""Outcome rewards from the exact-match verifiers of `mimo.tasks`, and the RL prompt mixture. Torch-free.

A domain is a task name (add, reverse, sort). Prompts of step s are a pure function of (seed, s, domains):
`step_examples` draws them afresh for every step from the train split, domains interleaved in a shuffled
order, so a resumed run sees exactly the prompts the uninterrupted one saw and no sampler state needs saving.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from mimo import tasks as task_lib

DOMAINS = task_lib.TASKS
Verifier = Callable[[task_lib.Example, str], float]
# the outcome reward of each domain: 1.0 for an exact match, else 0.0
VERIFIERS: dict[str, Verifier] = dict.fromkeys(DOMAINS, task_lib.reward)


class RewardError(RuntimeError):
    """A verifier raised or returned something that is not a finite number."""


def parse_domains(text: str | Sequence[str]) -> tuple[str, ...]:
    """"add,sort" -> ("add", "sort"); ValueError naming the first unknown domain."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [t for t in names if t]
    if not names:
        raise ValueError(f"no domain given; known domains: {','.join(DOMAINS)}")
    bad = [t for t in names if t not in DOMAINS]
    if bad:
        raise ValueError(f"unknown domain {bad[0]!r}; known domains: {','.join(DOMAINS)}")
    return tuple(dict.fromkeys(names))


def step_examples(domains: Sequence[str], n: int, seed: int, step: int, split: str = "train"
                  ) -> list[task_lib.Example]:
    """The `n` prompts of optimizer step `step`: domains round-robin over a shuffled order, e.g. domains
    (add, sort), n 5 -> [sort, add, sort, add, sort] or [add, sort, add, sort, add]; each domain's examples
    come from `mimo.tasks.generate_examples` with a seed derived from (seed, step)."""
    rng = random.Random(f"mimo.posttrain/{seed}/{step}")
    order = list(domains)
    rng.shuffle(order)
    per = {d: sum(1 for i in range(n) if order[i % len(order)] == d) for d in order}
    drawn = {d: iter(task_lib.generate_examples(d, per[d], split, seed=seed * 1_000_003 + step)) for d in order}
    return [next(drawn[order[i % len(order)]]) for i in range(n)]


def score(example: task_lib.Example, completion: str) -> float:
    """The domain verifier's reward for one completion; RewardError (one line, naming the prompt) if it
    raises or returns a non-finite value."""
    try:
        r = float(VERIFIERS[example.task](example, completion))
    except Exception as e:  # noqa: BLE001 - any verifier failure is reported the same way
        raise RewardError(f"the {example.task} verifier raised {type(e).__name__}: {e} "
                          f"(prompt {example.prompt!r}, completion {completion!r})") from None
    if not math.isfinite(r):
        raise RewardError(f"the {example.task} verifier returned {r} (prompt {example.prompt!r})")
    return r
