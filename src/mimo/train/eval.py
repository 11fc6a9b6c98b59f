"""Task accuracy of a model directory: exact match per task on a split (held-out by default), greedy
decoding or pass@k of temperature sampling; and the pretrain validation loss on held-out code.

The prompt is rendered with the chat template (`mimo.tasks.prompt_ids`: thinking on for the tasks that
think), so the model sees exactly the SFT prompt; the completion is decoded up to the first `<|im_end|>`
and its answer part (after `</think>` for a thinking task) is checked. Decoding is pluggable:
`generate_fn(prompt_ids, max_new_tokens, eos_id) -> new ids`; the default is the model's slow reference
`generate` (no cache), and the engine can pass its own faster path with the same greedy semantics.

`evaluate_tasks_via_server` measures the same accuracy through a running OpenAI-compatible server (`mimo serve`
or another; `connect`): each prompt is the same conversation as a chat completion, greedy, with the same token
budget, and the reply is scored by the same verifier.

`sample_tasks` / `evaluate_pass_at_k` decode every (prompt, sample) pair as one engine request
(`mimo.engine.LLM`, all requests batched), each with its own seed, so a sample's tokens do not depend on the
batch it ran in and a rerun reproduces them exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from mimo import tasks as task_lib
from mimo.data import Tokenizer
from mimo.data.tokenizer import THINK_END
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


@contextmanager
def _server_errors(url) -> Iterator[None]:
    """The client's failures as ConnectionError (nothing answers at `url`) or ValueError (it answered an error)."""
    import openai

    try:
        yield
    except openai.APIConnectionError as e:
        raise ConnectionError(f"cannot reach {url}: {e.__cause__ or e}") from e
    except openai.APIStatusError as e:
        raise ValueError(f"{url}: {e.message}") from e


def connect(url: str, api_key: str | None = None):
    """An `openai.OpenAI` client of the server at `url` (with or without its /v1) and the first model the server
    lists (GET /v1/models). ConnectionError when nothing answers there, ValueError when it answers an error or
    lists no model."""
    try:
        import openai
    except ImportError as e:
        raise ImportError("evaluating through a server needs the openai package (pip install openai)") from e

    client = openai.OpenAI(base_url=url.rstrip("/").removesuffix("/v1") + "/v1", api_key=api_key or "none")
    with _server_errors(url):
        # an unreachable server is reported at once, not after the client's retries with backoff
        models = client.with_options(max_retries=0).models.list().data
    if not models:
        raise ValueError(f"{url} lists no model (GET /v1/models)")
    return client, models[0].id


def _reasoning(message) -> str | None:
    # the reasoning parser's field; some servers name it `reasoning`
    for name in ("reasoning_content", "reasoning"):
        if (text := getattr(message, name, None)) is not None:
            return text
    return None


def server_completions(client, model: str, examples: Sequence[task_lib.Example],
                       max_new_tokens: int = task_lib.MAX_NEW_TOKENS, concurrency: int = 16,
                       progress: Callable[[int], object] | None = None) -> list[str]:
    """Greedy chat completions of the examples' prompts, `concurrency` requests in flight, each returned as
    in-process evaluation sees its output (think block included, up to the stop token).

    The server renders the conversation with its chat template; `chat_template_kwargs.enable_thinking` (sent for
    every task: servers differ in their default) makes it the prompt `prompt_ids` renders. A server whose reasoning
    parser moved a think block into `reasoning_content` gets it put back in front of `</think>`, so `check` sees
    the same text as from a server without a parser, whose content is the whole output."""
    def complete(ex: task_lib.Example):
        with _server_errors(client.base_url):
            r = client.chat.completions.create(
                model=model, messages=task_lib.to_messages(ex, with_answer=False), temperature=0,
                max_tokens=max_new_tokens,
                extra_body={"chat_template_kwargs": {"enable_thinking": ex.task in task_lib.THINKING}})
        return r.choices[0].message

    messages = []
    with ThreadPoolExecutor(concurrency) as pool:
        for message in pool.map(complete, examples):
            messages.append(message)
            if progress is not None:
                progress(1)
    # A parser returns an empty reasoning as null, the same as a server without one: whether the server parses
    # is read off the other thinking replies, else a reply that skipped its trace would lose its `</think>`.
    parses = any(_reasoning(m) is not None for m, ex in zip(messages, examples) if ex.task in task_lib.THINKING)
    out = []
    for m, ex in zip(messages, examples):
        reasoning, content = _reasoning(m), m.content or ""
        split_off = reasoning is not None or (parses and ex.task in task_lib.THINKING)
        out.append(f"{reasoning or ''}\n{THINK_END}\n\n{content}" if split_off else content)
    return out


def evaluate_tasks_via_server(client, model: str, tasks: Sequence[str] = task_lib.TASKS, n_per_task: int = 100,
                              seed: int = 0, max_new_tokens: int = task_lib.MAX_NEW_TOKENS, split: str = "heldout",
                              progress: Callable[[int], object] | None = None, concurrency: int = 16
                              ) -> dict[str, float]:
    """`evaluate_tasks` through the server of `client` (`connect`), asking for `model`: the same examples and
    verifier, greedy decoding by the server (`server_completions`)."""
    return task_lib.evaluate(lambda examples: server_completions(client, model, examples, max_new_tokens,
                                                                 concurrency, progress),
                             tasks=tasks, n_per_task=n_per_task, seed=seed, split=split)


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
