"""The `mimo` command line as a new user meets it: help on stdout, unknown commands, fast answers (no torch
before a command runs), one `error:` line and exit 2 for every kind of bad input, and the commands themselves
(kv-plan, params, generate)."""

import json
import subprocess
import sys
import time

import pytest

from mimo.cli import main

COMMANDS = ("generate", "kv-plan", "params", "pretrain", "sft", "eval", "recipe", "export", "distill-mtp", "rl",
            "mopd", "serve", "chat", "bench-serve")


def mimo(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`mimo ARGV` in a fresh interpreter (`python -m mimo.cli`, what torchrun runs too)."""
    return subprocess.run([sys.executable, "-m", "mimo.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_help_speaks_to_a_user_on_stdout():
    proc = mimo("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    first = proc.stdout.splitlines()[0]
    assert first.startswith("mimo: ") and "MiMo-V2-Flash" in first
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS)


def test_unknown_command_names_itself_and_lists_the_commands():
    proc = mimo("bogus")
    assert proc.returncode == 2 and proc.stdout == ""
    first, listing = proc.stderr.strip().splitlines()
    assert first == "error: unknown command 'bogus'"
    assert all(c in listing for c in COMMANDS)
    assert "did you mean 'generate'" in mimo("generat").stderr


def test_help_and_flag_errors_answer_fast():
    for argv, rc in ((["--help"], 0), (["generate", "--help"], 0), (["pretrain", "--help"], 0),
                     (["serve", "--help"], 0), (["eval", "--model", "m", "--n", "-3"], 2)):
        t0 = time.perf_counter()
        proc = mimo(*argv)
        assert time.perf_counter() - t0 < 2.0, argv
        assert proc.returncode == rc, (argv, proc.stderr)


def test_no_torch_before_a_command_runs():
    """Building every command's parser, and the torch-free modules, import no torch (torch alone takes seconds)."""
    code = ("import sys, mimo, mimo.engine.scheduler, mimo.engine.block_manager, mimo.engine.config, "
            "mimo.engine.planner, mimo.model.config, mimo.model.params, mimo.tasks, mimo.train.recipes\n"
            "from mimo.cli import commands, parser\n"
            "[parser(c) for c in commands().values()]\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_lazy_public_names():
    import mimo

    assert set(mimo.__all__) == {"CheckpointError", "LLM", "ModelConfig", "SamplingParams", "Transformer",
                                 "count_parameters", "load_model", "save_model"}
    assert all(getattr(mimo, name).__module__.startswith("mimo.") for name in mimo.__all__)
    from mimo.engine import LLM
    from mimo.engine.llm import LLM as llm_class

    assert mimo.LLM is LLM is llm_class and "LLM" in dir(mimo)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mimo.nope  # noqa: B018


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--model", "m", "--n", "-3"], "--n"),
    (["eval", "--model", "m", "--n", "0"], "--n"),
    (["eval", "--model", "m", "--tasks", "add,nope"], "--tasks"),
    (["distill-mtp", "--model", "m", "--out", "o", "--steps", "0"], "--steps"),
    (["distill-mtp", "--model", "m", "--out", "o", "--steps", "-4"], "--steps"),
    (["distill-mtp", "--model", "m", "--out", "o", "--generated", "1.5"], "--generated"),
    (["kv-plan", "--preset", "tiny", "--drafts", "-60"], "--drafts"),
    (["kv-plan", "--preset", "tiny", "--context", "abc"], "--context"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["pretrain", "--steps", "two"], "--steps"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["bench-serve", "--request-rate", "0"], "--request-rate"),
    (["bench-serve", "--prompts", "missing.jsonl"], "--prompts"),
])
def test_bad_flags_name_themselves(argv, flag):
    assert f"argument {flag}:" in one_error_line(mimo(*argv))


def test_a_missing_required_flag_is_named():
    assert "required: --prompt" in one_error_line(mimo("generate"))


def test_models_the_cli_cannot_tokenise_say_so(tmp_path):
    line = one_error_line(mimo("generate", "--model", "tiny", "--prompt", "x"))
    assert "'tiny' is a preset" in line and "tokenizer" in line
    (tmp_path / "config.json").write_text("{}")
    line = one_error_line(mimo("eval", "--model", str(tmp_path)))
    assert "has no tokenizer" in line
    line = one_error_line(mimo("distill-mtp", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)))
    assert "model directory not found" in line
    distill = ("distill-mtp", "--model", "models/mimo-tiny", "--out", str(tmp_path))
    line = one_error_line(mimo(*distill, "--generated-tasks", "0.5"))
    assert "--generated-tasks" in line and "needs --generated" in line
    line = one_error_line(mimo(*distill, "--generated", "0.5", "--generated-tasks", "0.001", "--generated-rows", "10"))
    assert "makes no task row" in line
    line = one_error_line(mimo(*distill, "--generated", "0.25", "--generated-tasks", "0.1", "--batch-size", "16"))
    assert "makes no task row" in line and "0 a batch" in line
    for command in ("serve", "chat"):
        assert "'debug' is a preset" in one_error_line(mimo(command, "--model", "debug"))


def test_limits_are_errors_naming_the_flag_and_the_limit():
    line = one_error_line(mimo("generate", "--prompt", "x", "--max-tokens", "9000"))
    assert "--max-tokens must be at most" in line and "8192 tokens" in line
    line = one_error_line(mimo("generate", "--prompt", "x", "--drafts", "5"))
    assert "--drafts 5 is more than the model's 3 MTP heads" in line
    assert "unknown preset 'nope'" in one_error_line(mimo("kv-plan", "--preset", "nope"))


def test_kv_plan_real_model_against_all_global(capsys):
    assert main(["kv-plan", "--preset", "mimo-v2-flash", "--context", "262144"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.strip().startswith("262,144")][0]
    assert "6.04 GB" in row and "32.21 GB" in row and "5.31x" in row


def test_params_of_the_released_model(capsys):
    assert main(["params", "--preset", "mimo-v2-flash"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert round(counts["total_no_mtp"] / 1e9) == 309 and round(counts["active_no_mtp_no_embedding"] / 1e9) == 15


def test_generate_streams_the_engine_text_with_the_default_model(capsys):
    from mimo.engine import LLM, SamplingParams

    assert main(["generate", "--chat", "--prompt", "sort 5 3 9 1", "--prompt", "def add(a, b):",
                 "--max-tokens", "8"]) == 0
    cap = capsys.readouterr()
    llm = LLM()
    chats = [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in ("sort 5 3 9 1", "def add(a, b):")]
    ref = llm.generate(chats, SamplingParams(max_tokens=8, temperature=0))
    assert cap.out == f">>> sort 5 3 9 1\n{ref[0].text}\n>>> def add(a, b):\n{ref[1].text}\n"
    assert len(cap.err.strip().splitlines()) == 2 and "tokens/s" in cap.err


def test_eval_pass_at_k_on_the_ood_split(capsys):
    assert main(["eval", "--model", "models/mimo-tiny", "--tasks", "sort", "--n", "3", "--split", "ood",
                 "--pass-k", "1,2", "--samples", "2", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "ood" and set(out["pass_at_k"]["sort"]) == {"pass@1", "pass@2", "greedy"}
    assert 0.0 <= out["pass_at_k"]["sort"]["pass@1"] <= out["pass_at_k"]["sort"]["pass@2"] <= 1.0
    assert "--samples" in one_error_line(mimo("eval", "--model", "models/mimo-tiny", "--pass-k", "9"))
