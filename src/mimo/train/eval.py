"""Task accuracy of a model directory: exact match per task on a split (held-out by default), greedy
decoding or pass@k of temperature sampling; and the pretrain validation loss on held-out code.

The prompt is rendered with the chat template (`mimo.tasks.prompt_ids`: thinking on for the tasks that
think), so the model sees exactly the SFT prompt; the completion is decoded up to the first `<|im_end|>`
and its answer part (after `</think>` for a thinking task) is checked. Decoding is pluggable:
`generate_fn(prompt_ids, max_new_tokens, eos_id) -> new ids`; the default is the model's slow reference
`generate` (no cache), and the engine can pass its own faster path with the same greedy semantics.

`sample_tasks` / `evaluate_pass_at_k` decode every (prompt, sample) pair as one engine request
(`mimo.engine.LLM`, all requests batched), each with its own seed, so a sample's tokens do not depend on the
batch it ran in and a rerun reproduces them exactly.
"""

from __future__ import annotations

import hashlib
import math
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


def evaluate_tasks(model, tokenizer: Tokenizer, tasks: Sequence[str] = task_lib.TASKS, n_per_task: int = 100,
                   seed: int = 0, max_new_tokens: int = task_lib.MAX_NEW_TOKENS, generate_fn: GenerateFn | None = None,
                   split: str = "heldout", progress: Callable[[int], object] | None = None) -> dict[str, float]:
    """Exact-match accuracy per task (mimo.tasks.evaluate with chat rendering and greedy decoding);
    `progress(1)` is called after each example (e.g. a tqdm bar's `update`)."""
    gen = generate_fn or reference_generate_fn(model)

    def batch_fn(examples):
        out = []
        with torch.no_grad():
            for ex in examples:
                ids = task_lib.prompt_ids(tokenizer, ex)
                out.append(task_lib.completion_text(tokenizer, gen(ids, max_new_tokens, tokenizer.eos_id)))
                if progress is not None:
                    progress(1)
        return out

    return task_lib.evaluate(batch_fn, tasks=tasks, n_per_task=n_per_task, seed=seed, split=split)


def load_for_eval(model_dir: str | Path):
    from mimo.checkpoint import load_model

    model = load_model(model_dir, dtype=torch.float32).eval()
    return model, Tokenizer.from_pretrained(model_dir)


def code_validation(model, tokenizer: Tokenizer, recipe: str = "tiny", task_fraction: float | None = None
                    ) -> dict[str, float]:
    """Validation loss and top-1 accuracy of the main head on the pretrain stage's validation batches of
    `recipe` (held-out code files mixed with held-out task examples; the figure its model card reports).
    `task_fraction=0.0` measures held-out code alone."""
    from mimo.train.recipes import get_stage

    from .data import build_corpus, packed_val_batches
    from .loop import evaluate

    cfg = get_stage(recipe, "pretrain")
    if task_fraction is not None:
        cfg = cfg.replace(task_fraction=task_fraction)
    batches = packed_val_batches(cfg, tokenizer, build_corpus(cfg))
    return evaluate(model, batches, 0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al. 2021, the Codex paper):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn without replacement include a
    correct one. Computed as a product, which stays exact in floating point for any n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _sample_seed(seed: int, prompt: str, j: int) -> int:
    # a function of the prompt text, not its position, so a prompt's samples are the same in any task list
    digest = hashlib.sha256(f"{seed}/{prompt}/{j}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def engine_completions(model, tokenizer: Tokenizer, examples: Sequence[task_lib.Example], n_samples: int = 1,
                       temperature: float = 1.0, seed: int = 0, max_new_tokens: int = task_lib.MAX_NEW_TOKENS,
                       max_num_seqs: int = 128) -> list[list[str]]:
    """`n_samples` completions per example (chat-rendered prompt, text up to `<|im_end|>`), every one an engine
    request of its own with a seed derived from (seed, prompt, sample index); temperature 0 is greedy."""
    from mimo.engine import LLM, SamplingParams

    prompts, params = [], []
    for ex in examples:
        ids = task_lib.prompt_ids(tokenizer, ex)
        for j in range(n_samples):
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                         seed=_sample_seed(seed, ex.prompt, j)))
    if not prompts:
        return [[] for _ in examples]
    llm = LLM(model, tokenizer=tokenizer, max_num_seqs=max_num_seqs, max_num_batched_tokens=4096, seed=seed)
    texts = [task_lib.completion_text(tokenizer, o.token_ids) for o in llm.generate(prompts, params)]
    return [texts[i * n_samples:(i + 1) * n_samples] for i in range(len(examples))]


def correct_counts(examples: Sequence[task_lib.Example], completions: Sequence[Sequence[str]]
                   ) -> dict[str, list[int]]:
    """Per task, the number of correct completions of each of its examples (in order)."""
    counts: dict[str, list[int]] = {}
    for ex, texts in zip(examples, completions, strict=True):
        counts.setdefault(ex.task, []).append(sum(task_lib.check(ex.task, t, ex.answer) for t in texts))
    return counts


def mean_pass_at_k(counts: Sequence[int], n: int, k: int) -> float:
    """pass@k of a task: the mean over its examples of the unbiased estimate from `n` samples each."""
    return sum(pass_at_k(n, c, k) for c in counts) / len(counts) if counts else 0.0


def evaluate_pass_at_k(model, tokenizer: Tokenizer, tasks: Sequence[str] = task_lib.TASKS,
                       n_per_task: int = 100, n_samples: int = 8, ks: Sequence[int] = (1, 8),
                       temperature: float = 1.0, split: str = "heldout", seed: int = 0,
                       max_new_tokens: int = task_lib.MAX_NEW_TOKENS) -> dict[str, dict[str, float]]:
    """Per task, on `n_per_task` examples of `split`: pass@k for each k in `ks` from `n_samples` samples at
    `temperature`, and greedy exact-match accuracy ("greedy"), all decoded by the engine."""
    if any(not 1 <= k <= n_samples for k in ks):
        raise ValueError(f"every k must be in [1, n_samples={n_samples}], got {list(ks)}")
    examples = [ex for t in tasks for ex in task_lib.generate_examples(t, n_per_task, split, seed)]
    sampled = correct_counts(examples, engine_completions(model, tokenizer, examples, n_samples, temperature,
                                                          seed, max_new_tokens))
    greedy = correct_counts(examples, engine_completions(model, tokenizer, examples, 1, 0.0, seed,
                                                         max_new_tokens))
    out: dict[str, dict[str, float]] = {}
    for t in tasks:
        out[t] = {f"pass@{k}": mean_pass_at_k(sampled.get(t, []), n_samples, k) for k in ks}
        out[t]["greedy"] = mean_pass_at_k(greedy.get(t, []), 1, 1)
    return out
