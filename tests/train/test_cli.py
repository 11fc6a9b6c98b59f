"""Training commands: bad input gives one `error:` line, exit code 2, and leaves existing files untouched;
`mimo eval` reports per-task accuracy with a progress bar; 2 processes under torchrun match 1 process."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mimo.cli import main
from mimo.model import ModelConfig
from mimo.train import run
from mimo.train.loop import read_metrics


def snapshot(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.fixture
def trained(debug_cfg):
    """A debug run stopped after 3 steps (one checkpoint)."""
    run(debug_cfg, stop_after=3)
    return debug_cfg


def test_unknown_recipe(tmp_path, capsys):
    assert main(["pretrain", "--recipe", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown recipe 'nope'" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_stage_missing_from_recipe(tmp_path, capsys):
    assert main(["sft", "--recipe", "debug", "--stage", "sft2", "--out", str(tmp_path / "x")]) == 2
    assert "recipe 'debug' has no stage 'sft2'" in one_error_line(capsys)


def test_stage_of_another_kind(tmp_path, capsys):
    assert main(["pretrain", "--recipe", "sft-start", "--stage", "think", "--out", str(tmp_path / "x")]) == 2
    assert "is a 'sft' stage: run it with 'mimo sft'" in one_error_line(capsys)


def test_recipe_of_independent_stages(tmp_path, capsys):
    assert main(["recipe", "--recipe", "teacher-sft", "--out", str(tmp_path / "x")]) == 2
    assert "this recipe's stages are independent, run one with --stage" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_missing_corpus_directory(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus"
    assert main(["pretrain", "--recipe", "debug", "--out", str(tmp_path / "x"), "--corpus", str(missing)]) == 2
    assert "corpus directory not found" in one_error_line(capsys)


def test_corrupt_checkpoint_on_resume(trained, tokenizer_dir, capsys):
    out = trained.out
    (Path(out) / "checkpoints" / "step_000003" / "train_state.pt").write_bytes(b"not a checkpoint")
    before = snapshot(Path(out))
    rc = main(["pretrain", "--recipe", "debug", "--out", out, "--resume", out, "--tokenizer", str(tokenizer_dir),
                        "--no-progress"])
    assert rc == 2
    assert "corrupt checkpoint" in one_error_line(capsys)
    assert snapshot(Path(out)) == before


def test_mismatched_checkpoint_on_resume(trained, tokenizer_dir, capsys):
    before = snapshot(Path(trained.out))
    rc = main(["pretrain", "--recipe", "debug", "--model", "tiny", "--out", trained.out, "--resume", trained.out,
                        "--no-progress"])
    assert rc == 2
    line = one_error_line(capsys)
    assert "does not match this run" in line and "vocab_size" in line
    assert snapshot(Path(trained.out)) == before


def test_fresh_run_refuses_an_out_dir_with_checkpoints(trained, tokenizer_dir, capsys):
    before = snapshot(Path(trained.out))
    rc = main(["pretrain", "--recipe", "debug", "--out", trained.out, "--tokenizer", str(tokenizer_dir)])
    assert rc == 2
    assert "already holds checkpoints" in one_error_line(capsys)
    assert snapshot(Path(trained.out)) == before


def test_model_vocab_smaller_than_tokenizer(tmp_path, tokenizer_dir, capsys):
    model_dir = tmp_path / "small-vocab"
    ModelConfig.from_preset("debug").replace(vocab_size=300).save(model_dir)
    rc = main(["pretrain", "--recipe", "debug", "--model", str(model_dir), "--out", str(tmp_path / "x"),
                        "--tokenizer", str(tokenizer_dir)])
    assert rc == 2
    assert "vocab_size 300 is smaller than the tokenizer's vocabulary" in one_error_line(capsys)


def test_sft_then_eval_reports_task_accuracy(trained, tmp_path, capsys):
    """SFT from a pretrain checkpoint runs through the CLI; eval prints an accuracy in [0, 1] per task."""
    out = str(tmp_path / "sft")
    rc = main(["sft", "--recipe", "debug", "--init-from", trained.out, "--out", out, "--steps", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert len(rows[0]["mtp_loss"]) == 3  # head 0 copied to 3 heads, all trained on assistant tokens
    capsys.readouterr()
    ck = f"{out}/checkpoints/step_000002"
    assert main(["eval", "--model", ck, "--tasks", "add,sort", "--n", "2", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "eval" in captured.err and "4/4" in captured.err  # the progress bar over 2 tasks x 2 examples
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert set(res["accuracy"]) == {"add", "sort"}
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    assert main(["eval", "--model", str(tmp_path), "--no-progress"]) == 2
    assert "has no tokenizer" in one_error_line(capsys)


def test_torchrun_two_processes_match_one(tmp_path, tokenizer_dir):
    """FSDP2 over gloo with 2 ranks gives the single-process losses for the same global batch."""
    common = ["--recipe", "debug", "--steps", "3", "--tokenizer", str(tokenizer_dir), "--no-progress"]
    assert main(["pretrain", *common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mimo.cli", "pretrain", *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r for r in read_metrics(tmp_path / "one") if "loss" in r]
    two = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-4)
        assert b["load_max_mean"] == a["load_max_mean"]
