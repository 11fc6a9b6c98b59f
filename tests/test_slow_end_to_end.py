"""Slow end-to-end runs (`make test-slow`): the whole debug recipe, and the engine under load on the default
model."""

import json

import pytest

import mimo
from mimo.model import generate


@pytest.mark.slow
def test_debug_recipe_runs_every_stage_and_evaluates(tmp_path, capsys):
    from mimo.cli import main

    assert main(["recipe", "--recipe", "debug", "--out", str(tmp_path), "--no-progress", "--eval-n", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["task_accuracy"]) == {"add", "reverse", "sort"}
    for stage in ("pretrain", "mtp", "sft"):
        assert (tmp_path / stage / "metrics.jsonl").exists()


@pytest.mark.slow
def test_default_model_many_requests_match_reference():
    llm = mimo.LLM(max_model_len=512, max_num_seqs=16, max_num_batched_tokens=64)
    tok = llm.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": q}])
               for q in ("add 12 30", "sort 4 1 3", "reverse abc", "add 999 1")] * 5
    prompts += [tok.encode(c) for c in ("def f(x):\n", "import re\n", "class A:\n", "for i in range(3):\n")]
    outs = llm.generate(prompts, mimo.SamplingParams(max_tokens=40, temperature=0))
    for o, p in zip(outs, prompts):
        assert o.token_ids == generate(llm.model, p, 40, eos_token_id=tok.eos_id)
