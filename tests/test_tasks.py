"""Tasks: exact formats, deterministic seeded generation, disjoint splits, strict checkers, evaluate()."""

import re

import pytest

from mimo import tasks
from mimo.tasks import (
    TASKS,
    Example,
    check,
    evaluate,
    generate_examples,
    is_heldout,
    reward,
    solve,
    to_messages,
)

FORMATS = {
    "add": (r"add (0|[1-9]\d{0,2}) (0|[1-9]\d{0,2})", r"0|[1-9]\d{0,3}"),
    "reverse": (r"reverse [a-z]{3,12}", r"[a-z]{3,12}"),
    "sort": (r"sort \d( \d){2,9}", r"\d( \d){2,9}"),
}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_formats_and_answers(task, split):
    """Every prompt and answer matches its fixed format, and the answer is right."""
    prompt_re, answer_re = FORMATS[task]
    for ex in generate_examples(task, 200, split, seed=3):
        assert ex.task == task
        assert re.fullmatch(prompt_re, ex.prompt), ex.prompt
        assert re.fullmatch(answer_re, ex.answer), ex.answer
        args = ex.prompt.split(" ")[1:]
        if task == "add":
            assert int(ex.answer) == int(args[0]) + int(args[1])
        elif task == "reverse":
            assert ex.answer == args[0][::-1]
        else:
            assert ex.answer.split(" ") == sorted(args)


def test_documented_examples():
    """The examples in the task spec solve to the documented answers."""
    assert solve("add 382 47") == Example("add", "add 382 47", "429")
    assert solve("reverse hello").answer == "olleh"
    assert solve("sort 5 3 9 1").answer == "1 3 5 9"


@pytest.mark.parametrize(
    "prompt",
    [
        "add 1000 1",
        "add 007 1",
        "add 1",
        "reverse ab",
        "reverse Hello",
        "sort 1 2",
        "sort 12 3 4",
        "mul 2 3",
        "reverse hello world",
        "add -1 2",
    ],
)
def test_solve_rejects_malformed(prompt):
    """Prompts outside the formats are rejected."""
    with pytest.raises(ValueError):
        solve(prompt)


@pytest.mark.parametrize("task", TASKS)
def test_generation_is_deterministic_and_distinct(task):
    """Same seed, same list; another seed, another list; no repeated prompt within a list."""
    a = generate_examples(task, 300, seed=1)
    assert a == generate_examples(task, 300, seed=1)
    assert a != generate_examples(task, 300, seed=2)
    assert len({ex.prompt for ex in a}) == 300
    assert generate_examples(task, 50, seed=1) == a[:50]


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint(task):
    """Train and held-out never share a prompt, whatever the seeds; membership follows is_heldout."""
    train = {ex.prompt for s in (0, 1) for ex in generate_examples(task, 1500, "train", seed=s)}
    held = {ex.prompt for s in (0, 1) for ex in generate_examples(task, 300, "heldout", seed=s)}
    assert not train & held
    assert not any(is_heldout(p) for p in train) and all(is_heldout(p) for p in held)


def test_heldout_share_is_about_ten_percent():
    """The hash rule holds out ~HELDOUT_PERCENT of the prompt space ('add' prompts with operands < 100)."""
    prompts = [f"add {a} {b}" for a in range(100) for b in range(100)]
    share = sum(map(is_heldout, prompts)) / len(prompts)
    assert abs(share - tasks.HELDOUT_PERCENT / 100) < 0.01


@pytest.mark.parametrize("completion", ["283+740=9240\n</think>\n\n429", "</think>429", "x</think>y</think> 429\n"])
def test_check_takes_the_answer_after_the_think_block(completion):
    assert check("add", completion, "429")


@pytest.mark.parametrize(
    "completion", ["429", "", "</think>42", "</think>4290", "</think>429.", "</think>429 430", "</think>answer: 429",
                   "</think>4 29", "</think>429<|im_end|>", "</think><think>429", "429</think>"]
)
def test_check_rejects_everything_else(completion):
    """A thinking task's answer must follow a closed think block; a bare answer or one inside it fails."""
    assert not check("add", completion, "429")


@pytest.mark.parametrize("completion", ["1 3 5 9", " 1 3 5 9", "1 3 5 9\n", "\n\t 1 3 5 9  \n"])
def test_check_accepts_surrounding_whitespace(completion):
    assert check("sort", completion, "1 3 5 9")


def test_traces():
    """The documented traces; every add trace's columns sum right, LSB first, and a reverse trace spells the
    word; sort has none."""
    assert tasks.trace(solve("add 382 47")) == "283+740=9240"
    assert tasks.trace(solve("add 5 5")) == "500+500=0100"
    assert tasks.trace(solve("add 999 999")) == "999+999=8991"
    assert tasks.trace(solve("reverse hello")) == "hello"
    assert tasks.trace(solve("sort 5 3 9 1")) is None
    for ex in generate_examples("add", 300, seed=4) + generate_examples("add", 50, "ood", seed=4):
        a, rest = tasks.trace(ex).split("+")
        b, s = rest.split("=")
        assert len(a) == len(b) == len(s) - 1 >= 3
        assert int(a[::-1]) + int(b[::-1]) == int(s[::-1]) == int(ex.answer)
    assert set(tasks.THINKING) < set(TASKS)


def test_check_is_exact_for_sort_and_reverse():
    """Inner spacing and case matter."""
    assert check("sort", " 1 3 5 9\n", "1 3 5 9")
    assert not check("sort", "1  3 5 9", "1 3 5 9") and not check("sort", "1359", "1 3 5 9")
    assert not check("sort", "</think>1 3 5 9", "1 3 5 9")  # sort answers directly: no think block
    assert not check("reverse", "</think>Olleh", "olleh")
    with pytest.raises(ValueError):
        check("mul", "6", "6")


def test_reward_and_messages():
    ex = Example("reverse", "reverse hello", "olleh")
    assert reward(ex, "hello\n</think>\n\n olleh\n") == 1.0 and reward(ex, "</think>hello") == 0.0
    assert to_messages(ex) == [
        {"role": "user", "content": "reverse hello"},
        {"role": "assistant", "content": "olleh"},
    ]
    assert to_messages(ex, reasoning=True)[1] == {"role": "assistant", "content": "olleh",
                                                  "reasoning_content": "hello"}
    assert to_messages(ex, with_answer=False) == [{"role": "user", "content": "reverse hello"}]
    assert "reasoning_content" not in to_messages(solve("sort 2 1 3"), reasoning=True)[1]


def test_evaluate_with_fake_generator():
    """evaluate() hands the examples to generate_fn once and scores per task."""
    calls = []

    def generate_fn(batch):
        calls.append(batch)
        return [f"{tasks.trace(ex)}\n</think>\n\n{ex.answer}\n" if ex.task != "sort" else "wrong" for ex in batch]

    acc = evaluate(generate_fn, n_per_task=20, seed=0)
    assert acc == {"add": 1.0, "reverse": 1.0, "sort": 0.0}
    assert len(calls) == 1 and len(calls[0]) == 60
    assert all(is_heldout(ex.prompt) for ex in calls[0])
    with pytest.raises(ValueError):
        evaluate(lambda batch: [], n_per_task=2)


def test_tasks_module_is_torch_free():
    """mimo.tasks imports nothing from torch (servers and RL workers use it without a model)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(tasks))
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("torch" in (m or "") for m in names | modules)


OOD_FORMATS = {
    "add": (r"add [1-9]\d{3} [1-9]\d{3}", r"[1-9]\d{3,4}"),
    "reverse": (r"reverse [a-z]{13,16}", r"[a-z]{13,16}"),
    "sort": (r"sort \d( \d){10,13}", r"\d( \d){10,13}"),
}


@pytest.mark.parametrize("task", TASKS)
def test_ood_lengths_and_answers(task):
    """OOD prompts are longer than any training prompt, cover their whole length range, and solve right."""
    prompt_re, answer_re = OOD_FORMATS[task]
    examples = generate_examples(task, 300, "ood", seed=0)
    assert len({ex.prompt for ex in examples}) == 300
    for ex in examples:
        assert re.fullmatch(prompt_re, ex.prompt), ex.prompt
        assert re.fullmatch(answer_re, ex.answer), ex.answer
        assert tasks.solve_ood(ex.prompt) == ex
        args = ex.prompt.split(" ")[1:]
        if task == "add":
            assert int(ex.answer) == int(args[0]) + int(args[1])
        elif task == "reverse":
            assert ex.answer == args[0][::-1]
        else:
            assert ex.answer.split(" ") == sorted(args)
    sizes = {len(ex.prompt.split(" ")[1]) if task == "reverse" else len(ex.prompt.split(" ")) - 1
             for ex in examples}
    assert sizes == {"add": {2}, "reverse": {13, 14, 15, 16}, "sort": {11, 12, 13, 14}}[task]
    if task == "add":
        assert {len(a) for ex in examples for a in ex.prompt.split(" ")[1:]} == {4}


@pytest.mark.parametrize("task", TASKS)
def test_ood_is_disjoint_from_training(task):
    """No OOD prompt is a valid in-distribution prompt, so none can be in train or held-out; and the other
    way round: solve() rejects OOD prompts and solve_ood() rejects training prompts."""
    ood = generate_examples(task, 500, "ood", seed=1)
    train = generate_examples(task, 500, "train", seed=1) + generate_examples(task, 100, "heldout", seed=1)
    assert not {ex.prompt for ex in ood} & {ex.prompt for ex in train}
    for ex in ood:
        with pytest.raises(ValueError):
            solve(ex.prompt)
    for ex in train:
        with pytest.raises(ValueError):
            tasks.solve_ood(ex.prompt)


def test_ood_generation_is_deterministic():
    a = generate_examples("sort", 50, "ood", seed=4)
    assert a == generate_examples("sort", 50, "ood", seed=4) != generate_examples("sort", 50, "ood", seed=5)


@pytest.mark.parametrize("prompt", ["add 0999 1000", "add 10000 1000", "add 999 1000", "reverse abcdefghijklmnopq",
                                    "sort 1 2 3 4 5 6 7 8 9 0", "sort 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5",
                                    "add ١٢٣٤ 1000"])
def test_solve_ood_rejects_malformed(prompt):
    with pytest.raises(ValueError):
        tasks.solve_ood(prompt)


def test_ood_verifier():
    """check/reward score OOD completions with the same exact match."""
    ex = tasks.solve_ood("add 9393 4638")
    assert ex.answer == "14031"
    assert tasks.trace(ex) == "3939+8364=13041"
    assert reward(ex, "</think> 14031\n") == 1.0 and reward(ex, "</think>1403") == 0.0
    assert reward(ex, "3939+8364=13041\n</think>\n\n14031 ") == 1.0
    assert evaluate(lambda batch: [("</think>" if ex.task in tasks.THINKING else "") + ex.answer for ex in batch],
                    n_per_task=5, split="ood") == dict.fromkeys(TASKS, 1.0)
