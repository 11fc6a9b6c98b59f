"""Training loop: loss goes down, exact resume, atomic checkpoints, NaN stop, MTP head copy, losses."""

import math

import pytest
import torch

from mimo.checkpoint import load_model
from mimo.model import ModelConfig, Transformer, init_weights
from mimo.train import TrainingDiverged, copy_mtp_heads, loop, losses, run
from mimo.train import checkpoint as ckpt_io
from mimo.train.config import TrainConfig, TrainConfigError
from mimo.train.loop import read_metrics
from mimo.train.optim import lr_factor


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_loss_decreases_on_debug_recipe(debug_cfg):
    """30 steps of the debug recipe lower both the training and the validation loss."""
    cfg = debug_cfg.replace(steps=30, warmup_steps=3, eval_every=10, ckpt_every=30)
    run(cfg)
    rows = read_metrics(cfg.out)
    lm = [r["lm_loss"] for r in rows if "lm_loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(lm) == 30 and len(val) == 3
    assert sum(lm[-5:]) / 5 < sum(lm[:3]) / 3 - 0.5
    assert val[-1] < val[0] - 0.1
    assert (ckpt_io.find_checkpoint(cfg.out).parent.parent / "curves.png").is_file()


def test_resume_reproduces_uninterrupted_run(debug_cfg, tmp_path):
    """N steps + resume N steps gives the same losses as 2N steps in one go (fp32, CPU)."""
    full = debug_cfg.replace(out=str(tmp_path / "full"))
    part = debug_cfg.replace(out=str(tmp_path / "part"))
    run(full)
    run(part, stop_after=3)
    assert ckpt_io.find_checkpoint(part.out).name == "step_000003"
    run(part, resume=part.out)
    a, b = train_losses(full.out), train_losses(part.out)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    va = [r["val_loss"] for r in read_metrics(full.out) if "val_loss" in r]
    vb = [r["val_loss"] for r in read_metrics(part.out) if "val_loss" in r]
    assert va == pytest.approx(vb, abs=1e-6)


def test_failed_save_keeps_previous_checkpoint(debug_cfg, monkeypatch):
    """A crash half-way through writing a checkpoint leaves the previous one as the latest, loadable."""
    run(debug_cfg, stop_after=3)
    good = ckpt_io.find_checkpoint(debug_cfg.out)

    def boom(state, path):
        path.write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_io, "save_train_state", boom)
    with pytest.raises(OSError, match="simulated"):
        run(debug_cfg, resume=debug_cfg.out)
    assert ckpt_io.find_checkpoint(debug_cfg.out) == good
    root = good.parent
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003"]
    assert ckpt_io.load_train_state(good)["step"] == 3
    assert load_model(good).n_mtp == 1
    monkeypatch.undo()
    run(debug_cfg, resume=debug_cfg.out)
    assert ckpt_io.find_checkpoint(debug_cfg.out).name == "step_000006"


def test_nan_loss_stops_and_keeps_last_checkpoint(debug_cfg, monkeypatch):
    """A NaN loss at step 5 stops the run with a clear message; step 3's checkpoint stays the latest."""
    real = loop.train_step

    def poisoned(model, *args, **kw):
        if args[4] == 4:  # 0-based step index: the 5th step
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")
        return real(model, *args, **kw)

    monkeypatch.setattr(loop, "train_step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 5.*last good checkpoint"):
        run(debug_cfg)
    assert ckpt_io.find_checkpoint(debug_cfg.out).name == "step_000003"
    assert len(train_losses(debug_cfg.out)) == 4


def test_copy_mtp_heads_duplicates_head_zero():
    """Right after copying, all three heads give head 0's logits; the state dict names heads 0, 1, 2."""
    cfg = ModelConfig.from_preset("debug").replace(n_mtp_layers=1)
    model = Transformer(cfg)
    init_weights(model, seed=0)
    new = copy_mtp_heads(model, 3)
    assert new.n_mtp == 3
    names = new.state_dict().keys()
    for k in range(3):
        assert f"model.mtp.layers.{k}.eh_proj.weight" in names
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        h = new.forward_hidden(x)
        outs = [new.mtp_forward(k, h, x) for k in range(3)]
        ref = model.mtp_forward(0, model.forward_hidden(x), x)
    for o in outs:
        torch.testing.assert_close(o, ref, rtol=0, atol=0)
    # copies, not shared storage
    new.model.mtp.layers[1].eh_proj.weight.data.add_(1.0)
    assert not torch.equal(new.model.mtp.layers[0].eh_proj.weight, new.model.mtp.layers[1].eh_proj.weight)


def test_seq_aux_loss_is_one_under_perfect_balance_and_larger_when_skewed():
    """L = sum_e f_e P_e equals 1 for uniform routing and scores, E/K for all tokens on the same K experts."""
    B, T, E, K = 2, 8, 4, 2
    scores = torch.full((B * T, E), 0.5)
    ids = torch.tensor([[0, 1], [2, 3]] * (B * T // 2))
    assert float(losses.seq_aux_loss_sum(scores, ids, B, T)) == pytest.approx(B * 1.0)
    skew_scores = torch.tensor([[0.9, 0.9, 0.1, 0.1]]).expand(B * T, E)
    skew_ids = torch.tensor([[0, 1]]).expand(B * T, K)
    assert float(losses.seq_aux_loss_sum(skew_scores, skew_ids, B, T)) == pytest.approx(B * 0.9 * 2)


def test_router_bias_moves_towards_balance():
    """Overloaded experts get their bias lowered, underloaded raised, by exactly the rate."""
    router = torch.nn.Module()
    router.register_buffer("e_score_correction_bias", torch.zeros(4))
    counts = {1: torch.tensor([10, 2, 4, 4])}  # mean 5
    losses.update_router_bias({1: router}, counts, 0.01)
    assert router.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01], abs=1e-9)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=11, warmup_steps=2, lr=1.0, min_lr=0.1)
    f = [lr_factor(s, cfg) for s in range(11)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[2:], f[3:]))
    assert cfg.replace(mtp_weights=((0.0, 0.3), (0.5, 0.1))).mtp_weight(5) == 0.3
    assert cfg.replace(mtp_weights=((0.0, 0.3), (0.5, 0.1))).mtp_weight(6) == 0.1


def test_train_config_validates_on_construction():
    with pytest.raises(TrainConfigError, match="TrainConfig.min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(TrainConfigError, match="TrainConfig.stage"):
        TrainConfig(stage="rl")
    with pytest.raises(TrainConfigError, match="TrainConfig.mtp_weights"):
        TrainConfig(mtp_weights=((0.5, 0.1),))
    assert math.isclose(TrainConfig().to_json_dict()["betas"][1], 0.95)


def test_bf16_autocast_runs_and_keeps_fp32_master_weights(debug_cfg):
    """dtype=bfloat16 trains under CPU autocast; parameters and checkpoints stay float32."""
    cfg = debug_cfg.replace(dtype="bfloat16", steps=2, eval_every=2, ckpt_every=2)
    res = run(cfg)
    assert math.isfinite(res["val_loss"])
    assert all(p.dtype == torch.float32 for p in res["model"].parameters())
    assert load_model(ckpt_io.find_checkpoint(cfg.out)).model.embed_tokens.weight.dtype == torch.float32
