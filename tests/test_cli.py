"""The `mimo` command line: kv-plan and params from a config alone, generate through the engine, bad input."""

import json

from mimo.cli import main


def test_kv_plan_real_model_against_all_global(capsys):
    assert main(["kv-plan", "--preset", "mimo-v2-flash", "--context", "262144"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.strip().startswith("262,144")][0]
    assert "6.04 GB" in row and "32.21 GB" in row and "5.31x" in row


def test_params_of_the_released_model(capsys):
    assert main(["params", "--preset", "mimo-v2-flash"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert round(counts["total_no_mtp"] / 1e9) == 309 and round(counts["active_no_mtp_no_embedding"] / 1e9) == 15


def test_generate_with_the_default_model(capsys):
    assert main(["generate", "--chat", "--prompt", "sort 5 3 9 1", "--max-tokens", "8"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["prompt"] == "sort 5 3 9 1" and line["tokens"] >= 1


def test_bad_input_gives_one_error_line(capsys):
    assert main(["kv-plan", "--preset", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown preset 'nope'" in err[0]
    assert main(["generate", "--prompt", "x", "--max-tokens", "0"]) == 1
    assert "max_tokens" in capsys.readouterr().err
    assert main(["distill-mtp", "--model", "models/mimo-tiny", "--out", "unused", "--generated", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--generated must be in [0, 1]" in err[0]
