"""Task accuracy through a server (`mimo eval --url`) equals the in-process evaluation on the same prompts."""

import json
import socket

import httpx
import openai
import pytest

from mimo import tasks as task_lib
from mimo.cli import main
from mimo.serve.parsers import ReasoningParser
from mimo.train.eval import (
    connect,
    evaluate_tasks,
    evaluate_tasks_via_server,
    reference_generate_fn,
    server_completions,
)

N, SEED = 8, 4  # the bundled model gets 7 of these 8 held-out add prompts right, 7 reverse and 6 sort


def answers(examples, completions):
    return [task_lib.answer_text(ex.task, c).strip() for ex, c in zip(examples, completions, strict=True)]


def test_accuracy_and_answers_through_the_server_equal_in_process(idle):
    model, tok = idle.llm.model, idle.llm.tokenizer
    client, name = connect(idle.url + "/v1/")
    assert name == "mimo-tiny"
    examples = [ex for t in task_lib.TASKS for ex in task_lib.generate_examples(t, N, "heldout", SEED)]
    served = server_completions(client, name, examples)

    generate, local = reference_generate_fn(model), []

    def recording(ids, max_new_tokens, eos_id):
        out = generate(ids, max_new_tokens, eos_id)
        local.append(task_lib.completion_text(tok, out))
        return out

    in_process = evaluate_tasks(model, tok, task_lib.TASKS, N, SEED, generate_fn=recording)
    assert evaluate_tasks_via_server(client, name, task_lib.TASKS, N, SEED) == in_process
    assert in_process["add"] == 0.875  # one wrong answer, so a scoring difference would show
    assert answers(examples, served) == answers(examples, local)


# What a model may write after the generation prompt of `add 382 47` (thinking on, so the output starts inside
# the think block): a trace and the answer, no trace, no framing newlines, a block closed twice, one never closed,
# a wrong answer.
OUTPUTS = ["283+740=9240\n</think>\n\n429", "\n</think>\n\n429", "283+740=9240</think>429",
           "x\n</think>\n\n1</think>429", "283+740=9240", "283+740=9240\n</think>\n\n428"]


def fake_server(parse: bool):
    """An OpenAI client of a fake server that answers each `add 382 47` request with the next of OUTPUTS, its think
    block split off by the server's reasoning parser (`parse`) or left in the content (a server without one)."""
    outputs = iter(OUTPUTS)

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["chat_template_kwargs"] == {"enable_thinking": True}
        assert body["temperature"] == 0 and body["max_tokens"] == task_lib.MAX_NEW_TOKENS
        text = next(outputs)
        message = {"role": "assistant", "content": text}
        if parse:
            p = ReasoningParser(thinking=True)
            (r1, c1), (r2, c2) = p.push(text), p.finish()
            # as `mimo serve` does: an empty reasoning is null
            message = {"role": "assistant", "content": c1 + c2, "reasoning_content": (r1 + r2) or None}
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                         "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

    return openai.OpenAI(base_url="http://fake/v1", api_key="none", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize("parse", [True, False])
def test_a_reasoning_parser_and_raw_text_score_as_in_process(parse):
    examples = [task_lib.solve("add 382 47")] * len(OUTPUTS)
    completions = server_completions(fake_server(parse), "m", examples, concurrency=1)
    assert answers(examples, completions) == answers(examples, OUTPUTS) == ["429", "429", "429", "429", "", "428"]


def test_cli_eval_through_the_server(idle, capsys):
    assert main(["eval", "--url", idle.url, "--tasks", "add", "--n", str(N), "--seed", str(SEED),
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "mimo-tiny" and out["url"] == idle.url and out["accuracy"] == {"add": 0.875}


def eval_error(capsys, *argv: str) -> str:
    try:
        rc = main(["eval", *argv])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
    return lines[0]


def test_cli_eval_needs_one_of_model_and_url_and_a_server_that_answers(capsys):
    assert "one of the arguments --model --url is required" in eval_error(capsys)
    assert "not allowed with argument" in eval_error(capsys, "--model", "models/mimo-tiny", "--url", "http://x")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert f"cannot reach {url}" in eval_error(capsys, "--url", url)
