"""Task accuracy of a model directory: exact match per task on the held-out split, greedy decoding.

The prompt is rendered with the chat template (thinking off), so the model sees exactly the SFT prompt; the
completion is decoded up to the first `<|im_end|>`. Decoding is pluggable: `generate_fn(prompt_ids,
max_new_tokens, eos_id) -> new ids`; the default is the model's slow reference `generate` (no cache), and the
engine can pass its own faster path with the same greedy semantics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mimo import tasks as task_lib
from mimo.data import Tokenizer
from mimo.model.transformer import generate

GenerateFn = Callable[[list[int], int, int], list[int]]


def reference_generate_fn(model) -> GenerateFn:
    def fn(prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
        return generate(model, prompt_ids, max_new_tokens, temperature=0.0, eos_token_id=eos_id)

    return fn


def completion_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def evaluate_tasks(model, tokenizer: Tokenizer, tasks: Sequence[str] = task_lib.TASKS, n_per_task: int = 100,
                   seed: int = 0, max_new_tokens: int = 24, generate_fn: GenerateFn | None = None,
                   split: str = "heldout", progress: Callable[[int], object] | None = None) -> dict[str, float]:
    """Exact-match accuracy per task (mimo.tasks.evaluate with chat rendering and greedy decoding);
    `progress(1)` is called after each example (e.g. a tqdm bar's `update`)."""
    gen = generate_fn or reference_generate_fn(model)

    def batch_fn(conversations):
        out = []
        with torch.no_grad():
            for messages in conversations:
                ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
                out.append(completion_text(tokenizer, gen(ids, max_new_tokens, tokenizer.eos_id)))
                if progress is not None:
                    progress(1)
        return out

    return task_lib.evaluate(batch_fn, tasks=tasks, n_per_task=n_per_task, seed=seed, split=split)


def load_for_eval(model_dir: str | Path):
    from mimo.checkpoint import load_model

    model = load_model(model_dir, dtype=torch.float32).eval()
    return model, Tokenizer.from_pretrained(model_dir)
