"""`mimo rl` end to end on the bundled model (debug preset: seconds): rollouts, updates, eval, the logged
metrics, checkpoints and exact resume; bad input as one error line (or a logged event) that loses nothing."""

import hashlib
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimo.cli import main
from mimo.engine.config import DEFAULT_MODEL
from mimo.posttrain import loop as rl_loop
from mimo.posttrain import rewards
from mimo.posttrain.loop import preset, run
from mimo.train import TrainingDiverged
from mimo.train import checkpoint as ckpt_io
from mimo.train.loop import read_metrics

LOGGED = ("reward", "accuracy", "entropy", "masked_fraction", "grad_norm", "rollout_tok_per_s", "acceptance_length",
          "flops", "mtp_loss", "kl_sampler_trainer")


def _cfg(tmp_path, name="run", **kw):
    return preset("debug", init_from=str(DEFAULT_MODEL), out=str(tmp_path / name), domains=("sort",),
                  progress=False, **kw)


def _argv(tmp_path, name="run", *extra):
    return ["rl", "--preset", "debug", "--init-from", str(DEFAULT_MODEL), "--out", str(tmp_path / name),
            "--domains", "sort", "--no-progress", *extra]


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_debug_run_end_to_end(tmp_path, monkeypatch):
    """Two steps of rollouts + update, a greedy eval, every metric logged and finite, curves and a loadable
    checkpoint; the trainer moved the weights, and the FLOP ledger only grows."""
    # rollouts with every draft proposed (adaptive drafting off), so the acceptance metric has drafts to count
    monkeypatch.setattr("mimo.engine.llm.draft_floor", lambda batch: 0.0)
    res = run(_cfg(tmp_path))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    updated = [r for r in rows if "skipped" not in r]
    assert updated, "the bundled model's sort samples differ within a group"
    for key in LOGGED:
        values = updated[0][key] if isinstance(updated[0][key], list) else [updated[0][key]]
        assert all(math.isfinite(x) for x in values), key
    assert 0 <= updated[0]["masked_fraction"] < 0.05  # on-policy with replay: trainer = sampler up to fp32
    assert updated[0]["acceptance_length"] > 1.0
    assert rows[0]["flops"] < rows[1]["flops"] and rows[1]["flops_by_kind"]["eval"] > 0
    assert set(rows[-1]["eval_accuracy"]) == {"sort"}
    assert (tmp_path / "run" / "curves.png").is_file()
    ck = Path(res["checkpoint"])
    after, before = load_file(ck / "model.safetensors"), load_file(DEFAULT_MODEL / "model.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert json.loads((ck / rl_loop.CONFIG_FILE).read_text())["domains"] == ["sort"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = _cfg(tmp_path, "full", steps=3)
    part = _cfg(tmp_path, "part", steps=3)
    run(full)
    run(part, stop_after=1)
    run(part, resume=part.out)
    drop = ("time", "rollout_tok_per_s")
    a = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(full.out)]
    b = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(part.out)]
    assert len(a) == 3 and a == b
    wa = load_file(ckpt_io.find_checkpoint(full.out) / "model.safetensors")
    wb = load_file(ckpt_io.find_checkpoint(part.out) / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_zero_reward_variance_skips_the_update(tmp_path, monkeypatch):
    """A verifier that rewards everything: no group has variance, every step is skipped with its reason,
    nothing is NaN, the weights stay the initial ones."""
    monkeypatch.setitem(rewards.VERIFIERS, "sort", lambda ex, completion: 1.0)
    res = run(_cfg(tmp_path))
    rows = read_metrics(tmp_path / "run")
    assert all("zero reward variance" in r["skipped"] for r in rows)
    assert all("loss" not in r and r["reward"] == 1.0 for r in rows)
    after = load_file(Path(res["checkpoint"]) / "model.safetensors")
    before = load_file(DEFAULT_MODEL / "model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_verifier_that_raises_is_one_error_line_and_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    def flaky(ex, completion):
        calls["n"] += 1
        if calls["n"] > 8:  # step 1 (2 prompts x 4 samples) scores fine
            raise KeyError("no answer key")
        return rewards.task_lib.reward(ex, completion)

    monkeypatch.setitem(rewards.VERIFIERS, "sort", flaky)
    assert main(_argv(tmp_path)) == 1
    line = one_error_line(capsys)
    assert "sort verifier raised KeyError" in line and "prompt 'sort" in line
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]
    assert ckpt_io.find_checkpoint(tmp_path / "run").name == "step_000001"


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = rl_loop.update_on_rollouts

    def poisoned(model, *args, **kw):
        if args[4] == 1:  # 0-based step index: the 2nd step
            with torch.no_grad():
                model.lm_head.weight[:] = float("nan")
        return real(model, *args, **kw)

    monkeypatch.setattr(rl_loop, "update_on_rollouts", poisoned)
    # rewards 0, 1, 0, 1, ...: variance in every group, so step 2 does reach the update
    alternate = itertools.cycle([0.0, 1.0])
    monkeypatch.setitem(rewards.VERIFIERS, "sort", lambda ex, completion: next(alternate))
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 2.*last good checkpoint"):
        run(_cfg(tmp_path))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]
    assert ckpt_io.find_checkpoint(tmp_path / "run").name == "step_000001"


def test_unknown_domain_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # a flag error: argparse exits before the command runs
        main(["rl", "--domains", "add,mul", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "argument --domains: unknown domain 'mul'; known domains: add,reverse,sort" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_checkpoint_with_another_tokenizer_is_refused(tmp_path, capsys):
    run(_cfg(tmp_path, steps=1))
    ck = ckpt_io.find_checkpoint(tmp_path / "run")
    other = tmp_path / "other-model"
    shutil.copytree(DEFAULT_MODEL, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    before = snapshot(tmp_path / "run")
    rc = main(["rl", "--preset", "debug", "--init-from", str(other), "--out", str(tmp_path / "run"), "--resume",
               str(ck), "--no-progress"])
    assert rc == 2
    assert "was written with a different tokenizer" in one_error_line(capsys)
    assert snapshot(tmp_path / "run") == before


def test_fresh_run_refuses_an_out_dir_with_checkpoints(tmp_path, capsys):
    run(_cfg(tmp_path, steps=1))
    before = snapshot(tmp_path / "run")
    assert main(_argv(tmp_path)) == 2
    assert "already holds checkpoints" in one_error_line(capsys)
    assert snapshot(tmp_path / "run") == before
