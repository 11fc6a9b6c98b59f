"""A GRPO update on fixed rollouts under torchrun (2 ranks, FSDP2 over gloo) equals the 1-process update; `mimo rl`
runs end to end under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("two_process_step.py")


def _run(cmd, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_process_rl_step_matches_one(tmp_path):
    one = _run([sys.executable, str(SCRIPT)], tmp_path / "one.pt")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT)],
               tmp_path / "two.pt")
    m1, m2 = one["metrics"], two["metrics"]
    assert "skipped" not in m1
    for key in ("loss", "pg_loss", "grad_norm", "entropy", "masked_fraction"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    assert m2["mtp_loss"] == pytest.approx(m1["mtp_loss"], rel=1e-4)
    moved = 0
    for name, w in one["state"].items():
        # the SGD update lr * g (two_process_step.py, up to ~3e-5 per element) compared as an update; atol is
        # the float32 rounding of weights of magnitude ~0.5 (ulp 6e-8)
        torch.testing.assert_close(two["state"][name] - one["init"][name], w - one["init"][name], rtol=1e-3,
                                   atol=6e-8, msg=name)
        moved += int(not torch.equal(w, one["init"][name]))
    assert moved > len(one["state"]) // 2  # the update moved most tensors


def test_mimo_rl_runs_under_torchrun(tmp_path):
    """`mimo rl` end to end on 2 ranks: each rank rolls out its prompts with its own engine, which takes the
    gathered full weights after every update; the run checkpoints, logs every step and moves the weights.
    (Its rollouts need not equal a 1-process run's: the engine's adaptive drafting depends on the batch, and
    speculative sampling is exact in distribution, not in the sample path.)"""
    from safetensors.torch import load_file

    from mimo.engine.config import DEFAULT_MODEL
    from mimo.train.loop import read_metrics

    out = tmp_path / "rl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mimo.cli",
           "rl", "--preset", "debug", "--domains", "sort", "--steps", "3", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["flops"] > 0 for r in rows)
    assert any("loss" in r for r in rows)
    after = load_file(out / "checkpoints" / "step_000003" / "model.safetensors")
    before = load_file(DEFAULT_MODEL / "model.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in before)
