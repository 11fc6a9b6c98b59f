"""Post-pretraining stages: SFT trains only on assistant tokens (main and MTP heads alike); the MTP stage
copies head 0 to three heads and, with the trunk frozen, changes nothing but the heads."""

import pytest
import torch
from safetensors.torch import load_file

from mimo import tasks as task_lib
from mimo.data import SFTLoader, Tokenizer
from mimo.train import checkpoint as ckpt_io
from mimo.train import losses, run
from mimo.train.data import Batch
from mimo.train.loop import read_metrics


def test_sft_batch_masks_everything_but_the_answer(tokenizer_dir):
    """Loss positions are exactly the answer tokens and <|im_end|>; MTP head k, which predicts k+1 tokens
    further ahead, trains on the same target tokens (its labels and mask are both shifted by k+1)."""
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    ex = task_lib.Example("reverse", "reverse hello", "olleh")
    loader = SFTLoader([task_lib.to_messages(ex)], tok, batch_size=1, shuffle=False)
    b = Batch.from_sft(next(loader))
    trained = b.labels[0][b.mask[0]].tolist()
    assert tok.decode(trained) == "olleh<|im_end|>"
    assert b.n_targets(0) == len(trained)
    # prompt positions carry no loss whatever the logits say
    logits = torch.randn(1, b.labels.shape[1], tok.vocab_size)
    poisoned = logits.clone()
    poisoned[0, ~b.mask[0]] = 1e4
    assert float(losses.masked_ce_sum(poisoned, b.labels, b.mask)) == pytest.approx(
        float(losses.masked_ce_sum(logits, b.labels, b.mask)), rel=1e-6)
    for k in range(3):
        lab, mask = losses.mtp_labels(b.labels, b.mask, k)
        assert lab[0][mask[0]].tolist() == trained


def test_mtp_stage_with_frozen_trunk_changes_only_the_heads(debug_cfg, tmp_path):
    """Stage 2 starts from a 1-head checkpoint, trains 3 heads; trunk tensors are bit-identical afterwards."""
    run(debug_cfg, stop_after=2)
    pre = ckpt_io.find_checkpoint(debug_cfg.out)
    mtp_cfg = debug_cfg.replace(stage="mtp", out=str(tmp_path / "mtp"), init_from=debug_cfg.out, n_mtp_heads=3,
                                freeze_trunk=True, steps=2, eval_every=2, ckpt_every=2, tokenizer=None)
    run(mtp_cfg)
    post = ckpt_io.find_checkpoint(mtp_cfg.out)
    a, b = load_file(pre / "model.safetensors"), load_file(post / "model.safetensors")
    for name, t in a.items():
        if ".mtp." not in name:
            assert torch.equal(t, b[name]), name
    heads = [n for n in b if n.startswith("model.mtp.layers.")]
    assert {n.split(".")[3] for n in heads} == {"0", "1", "2"}
    assert not torch.equal(a["model.mtp.layers.0.eh_proj.weight"], b["model.mtp.layers.0.eh_proj.weight"])
    ev = [r for r in read_metrics(mtp_cfg.out) if "val_mtp_acc" in r][-1]
    assert len(ev["val_mtp_acc"]) == 3 and all(0 <= x <= 1 for x in ev["val_mtp_acc"])
