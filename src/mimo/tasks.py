"""Three verifiable toy tasks used for SFT, RL, distillation and evaluation. Torch-free.

Formats (fixed; the prompt is the whole user message, the answer the whole assistant message):

| task | prompt | answer | operands |
|---|---|---|---|
| add | `add 382 47` | `429` | two integers in [0, 999] |
| reverse | `reverse hello` | `olleh` | 3-12 lowercase ASCII letters |
| sort | `sort 5 3 9 1` | `1 3 5 9` | 3-10 digits, space-separated, ascending |

`add` and `reverse` are posed with thinking on (`THINKING`): the prompt ends inside the think block, the model
writes a worked trace (`trace`), closes the block, and the answer is what follows the last `</think>`
(`answer_text`). A trace turns each task into steps a small transformer does at fixed relative offsets
(`trace` has worked examples): BPE writes `382` or `hello` as one or two tokens, so reading digits or letters
from the prompt is the hard part, and the trace does it once, one character per token. `sort` is answered
directly (thinking off, the template's empty think block), as it is learned without a trace.

Train/held-out split: a prompt is held out when h mod 100 < `HELDOUT_PERCENT` (10), h being the first 8 bytes
of sha256(prompt) read as a big-endian integer (`is_heldout`). Membership depends on the prompt alone, so
the two splits never share a prompt for any seed or count, and a prompt's split never changes.

Out-of-distribution split (`ood`): the same formats with longer inputs than any train or held-out prompt,
so it is disjoint from both by construction (no hashing), and `solve` rejects its prompts (`solve_ood`
parses them):

| task | operands |
|---|---|
| add | two integers in [1000, 9999] |
| reverse | 13-16 lowercase ASCII letters |
| sort | 11-14 digits |
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TASKS = ("add", "reverse", "sort")
THINKING = frozenset({"add", "reverse"})
# the generation budget that fits every split's longest trace and answer (ood reverse: 16 letters + the 4
# tokens of `\n</think>\n\n` + 16 + <|im_end|> = 37 tokens)
MAX_NEW_TOKENS = 48
SPLITS = ("train", "heldout", "ood")
HELDOUT_PERCENT = 10
_NUMBERS = frozenset(str(i) for i in range(1000))
_LETTERS = frozenset(string.ascii_lowercase)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def is_heldout(prompt: str) -> bool:
    """Whether `prompt` belongs to the held-out split (a pure function of the prompt text)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h % 100 < HELDOUT_PERCENT


def solve(prompt: str) -> Example:
    """Parse a prompt in one of the task formats and return it with its answer; ValueError if malformed."""
    task, _, rest = prompt.partition(" ")
    args = rest.split(" ")
    # Canonical numbers only: "007" or "1000" are not prompts the generator can produce.
    if task == "add" and len(args) == 2 and all(a in _NUMBERS for a in args):
        return Example(task, prompt, str(int(args[0]) + int(args[1])))
    if task == "reverse" and 3 <= len(rest) <= 12 and set(rest) <= _LETTERS:
        return Example(task, prompt, rest[::-1])
    if task == "sort" and 3 <= len(args) <= 10 and all(len(a) == 1 and a in string.digits for a in args):
        return Example(task, prompt, " ".join(sorted(args)))
    raise ValueError(f"not a valid task prompt: {prompt!r}")


def solve_ood(prompt: str) -> Example:
    """`solve` for the out-of-distribution split's prompts (longer inputs); ValueError for anything else,
    in-distribution prompts included."""
    task, _, rest = prompt.partition(" ")
    args = rest.split(" ")
    if task == "add" and len(args) == 2 and all(a.isascii() and a.isdigit() and len(a) == 4 and a[0] != "0"
                                                  for a in args):
        return Example(task, prompt, str(int(args[0]) + int(args[1])))
    if task == "reverse" and 13 <= len(rest) <= 16 and set(rest) <= _LETTERS:
        return Example(task, prompt, rest[::-1])
    if task == "sort" and 11 <= len(args) <= 14 and all(len(a) == 1 and a in string.digits for a in args):
        return Example(task, prompt, " ".join(sorted(args)))
    raise ValueError(f"not a valid out-of-distribution task prompt: {prompt!r}")


def _sample_prompt(task: str, rng: random.Random) -> str:
    if task == "add":
        return f"add {rng.randint(0, 999)} {rng.randint(0, 999)}"
    if task == "reverse":
        return "reverse " + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12)))
    return "sort " + " ".join(rng.choices(string.digits, k=rng.randint(3, 10)))


def _sample_ood_prompt(task: str, rng: random.Random) -> str:
    if task == "add":
        return f"add {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}"
    if task == "reverse":
        return "reverse " + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(13, 16)))
    return "sort " + " ".join(rng.choices(string.digits, k=rng.randint(11, 14)))


def generate_examples(task: str, n: int, split: str = "train", seed: int = 0) -> list[Example]:
    """`n` distinct examples of `task` from `split`, the same list for the same arguments.

    Prompts are drawn from the task's distribution and rejected when they belong to the other split or were
    already drawn, so the held-out split (~10% of the prompt space) costs ~10 draws per example. The `ood`
    split draws from its own, longer distribution and only rejects repeats.
    """
    _check_task(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A string seed is hashed with sha512 by `random`, so the stream is the same on every run and platform.
    rng = random.Random(f"mimo.tasks/{task}/{split}/{seed}")
    want_heldout = split == "heldout"
    seen: set[str] = set()
    out: list[Example] = []
    budget = 1000 + 200 * n
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"could not draw {n} distinct {split} prompts for {task!r}")
        if split == "ood":
            prompt = _sample_ood_prompt(task, rng)
            if prompt not in seen:
                seen.add(prompt)
                out.append(solve_ood(prompt))
            continue
        prompt = _sample_prompt(task, rng)
        if prompt in seen or is_heldout(prompt) != want_heldout:
            continue
        seen.add(prompt)
        out.append(solve(prompt))
    return out


def mixed_examples(
    n_per_task: int, split: str = "train", seed: int = 0, tasks: Sequence[str] = TASKS
) -> list[Example]:
    """`n_per_task` examples of each task, interleaved task by task (add, reverse, sort, add, ...)."""
    per_task = [generate_examples(t, n_per_task, split, seed) for t in tasks]
    return [ex for group in zip(*per_task) for ex in group]


def trace(example: Example) -> str | None:
    """The worked reasoning of a thinking task (None for the others).

    add: both operands and the sum written least significant digit first, zero-padded to a common width
    (3 digits, or the operands' length if longer) and the sum one digit wider, so digit i of the sum sits
    at a fixed distance after digit i of each operand and the carry comes from the column just before:
    `add 382 47` -> `283+740=9240` (answer `429`); `add 5 5` -> `500+500=0100` (answer `10`).
    reverse: the word spelled forward one letter per token, which the answer then mirrors:
    `reverse hello` -> `hello` (answer `olleh`).
    """
    if example.task == "add":
        a, b = example.prompt.split(" ")[1:]
        w = max(3, len(a), len(b))
        return f"{a.zfill(w)[::-1]}+{b.zfill(w)[::-1]}={example.answer.zfill(w + 1)[::-1]}"
    if example.task == "reverse":
        return example.prompt.partition(" ")[2]
    return None


def answer_text(task: str, completion: str) -> str:
    """The answer part of a completion (the assistant output, `</think>` kept): for a thinking task what
    follows the last `</think>` ("" when the think block never closes), else the whole completion."""
    _check_task(task)
    if task not in THINKING:
        return completion
    _, sep, tail = completion.rpartition("</think>")
    return tail if sep else ""


def check(task: str, completion: str, answer: str) -> bool:
    """Exact match of the completion's answer part after stripping surrounding whitespace; anything else in
    it fails."""
    return answer_text(task, completion).strip() == answer.strip()


def reward(example: Example, completion: str) -> float:
    """1.0 when `completion` is correct for `example`, else 0.0 (the RL outcome reward)."""
    return 1.0 if check(example.task, completion, example.answer) else 0.0


def to_messages(example: Example, with_answer: bool = True, reasoning: bool = False) -> Messages:
    """Chat messages for `example`: the user prompt, then (if `with_answer`) the answer as assistant turn,
    with the task's trace as its `reasoning_content` when `reasoning` and the task thinks."""
    messages: Messages = [{"role": "user", "content": example.prompt}]
    if with_answer:
        messages.append({"role": "assistant", "content": example.answer})
        if reasoning and example.task in THINKING:
            messages[-1]["reasoning_content"] = trace(example)
    return messages


def prompt_ids(tokenizer, example: Example, thinking: bool = True) -> list[int]:
    """The chat-rendered prompt of `example`, thinking on for a thinking task unless `thinking` is False (the
    server's default is off): what evaluation and rollouts feed the model (`tokenizer` is a
    `mimo.data.Tokenizer`)."""
    return tokenizer.encode_chat(to_messages(example, with_answer=False), add_generation_prompt=True,
                                 enable_thinking=thinking and example.task in THINKING)


def completion_text(tokenizer, ids: Sequence[int]) -> str:
    """Generated ids -> the assistant output up to the first `<|im_end|>` (`</think>` is not special, so it
    stays for `answer_text`)."""
    ids = list(ids)
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def evaluate(
    generate_fn: Callable[[list[Example]], list[str]],
    tasks: Sequence[str] = TASKS,
    n_per_task: int = 100,
    seed: int = 0,
    split: str = "heldout",
) -> dict[str, float]:
    """Accuracy per task on `n_per_task` examples of `split`.

    `generate_fn` receives every example in one list, so an engine can batch them all, renders each prompt
    (`prompt_ids`) and returns one completion per example: the assistant output up to the stop token, think
    block included (`check` takes the answer part).
    """
    examples = [ex for t in tasks for ex in generate_examples(t, n_per_task, split, seed)]
    completions = generate_fn(examples)
    if len(completions) != len(examples):
        raise ValueError(f"generate_fn returned {len(completions)} completions for {len(examples)} prompts")
    correct = dict.fromkeys(tasks, 0)
    for ex, completion in zip(examples, completions):
        correct[ex.task] += check(ex.task, completion, ex.answer)
    return {t: correct[t] / n_per_task if n_per_task else 0.0 for t in tasks}
