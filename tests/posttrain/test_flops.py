"""The analytic FLOP ledger agrees with torch's FlopCounterMode on a small model: a token-by-token decode of the
main model and of an MTP block over a dense cache (every query sees exactly its causal keys), a training
step's backward costing twice its forward, and a MOPD teacher's scoring forward (lm_head at response rows)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mimo.model.attention import DenseKVCache
from mimo.posttrain import flops, mopd
from mimo.posttrain.flops import FlopLedger
from tests.conftest import make_model


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.fixture(scope="module")
def model():
    # a window longer than the sequence: the dense reference cache then computes exactly the causal keys
    return make_model(sliding_window=64)


def test_main_model_decode_matches_flop_counter(model):
    cfg, T = model.config, 20
    x = torch.randint(0, cfg.vocab_size, (1, T))

    def decode():
        cache = DenseKVCache()
        with torch.no_grad():
            for t in range(T):
                h = model.forward_hidden(x[:, t:t + 1], torch.tensor([[t]]), cache)
                if t >= 12:  # logits for the last 8 rows only
                    model.logits(h)

    assert flops.forward_flops(cfg, 0, T, logit_rows=8) == _counted(decode)
    # the part from position 5 on is the difference of two prefixes
    assert flops.forward_flops(cfg, 5, 15) == flops.forward_flops(cfg, 0, 20) - flops.forward_flops(cfg, 0, 5)


def test_mtp_block_decode_matches_flop_counter(model):
    cfg, T = model.config, 12
    x = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad():
        h = model.forward_hidden(x)

    def decode():
        cache = DenseKVCache()
        with torch.no_grad():
            for t in range(T):
                model.mtp_forward(1, h[:, t:t + 1], x[:, t:t + 1], torch.tensor([[t]]), cache)

    assert flops.mtp_flops(cfg, 0, T) == _counted(decode)


def test_sliding_window_caps_the_keys():
    """W = 9: a query at position p sees min(p + 1, 9) keys in sliding layers, p + 1 in full ones."""
    cfg = make_model().config
    per_key = {t: 2 * cfg.attn_shape(t)[0] * (cfg.attn_shape(t)[2] + cfg.attn_shape(t)[3]) for t in ("full", "sliding")}
    n_full = sum(t == "full" for t in cfg.layer_types)
    step = flops.forward_flops(cfg, 30, 1) - flops.forward_flops(cfg, 29, 1)  # one more key in full layers only
    assert step == n_full * per_key["full"]


def test_training_step_is_three_forwards(model):
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (2, 16))

    def fwd():
        with torch.no_grad():
            model(x, return_mtp=True)

    def fwd_bwd():
        logits, mtp = model(x, return_mtp=True)
        (logits.sum() + sum(m.sum() for m in mtp)).backward()

    counted_fwd, counted_all = _counted(fwd), _counted(fwd_bwd)
    assert counted_all - counted_fwd == pytest.approx(2 * counted_fwd, rel=0.02)
    ours_fwd, ours_bwd = flops.training_flops(cfg, 2, 16, model.n_mtp)
    assert ours_bwd == 2 * ours_fwd
    # the training forward's attention runs dense over each chunk, so it counts more than the causal keys
    assert ours_fwd <= counted_fwd <= 1.2 * ours_fwd


def test_teacher_scoring_matches_flop_counter(model):
    """A teacher's forward over [B, T] rows with logits at the N response rows: each response row more costs
    exactly one lm_head row; the rest is the main model's forward (dense chunked attention, as in training)."""
    cfg = model.config
    B, T = 2, 16
    teacher = mopd.Teacher("t", ("sort",), model)
    x = torch.randint(0, cfg.vocab_size, (B, T))

    def scored(n_prompt: int) -> tuple[int, int]:
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, n_prompt:] = True
        batch = mopd.MOPDBatch(x, x, mask, domains=("sort",) * B)
        out: list[int] = []
        counted = _counted(lambda: out.append(mopd.teacher_logprobs(teacher, batch)[2]))
        return out[0], counted

    ours, counted = scored(6)
    assert ours == flops.scoring_flops(cfg, B, T, B * (T - 6))
    assert ours <= counted <= 1.2 * ours
    ours_more, counted_more = scored(2)  # 8 more response rows
    assert counted_more - counted == ours_more - ours == 8 * flops.lm_head_flops(cfg)
    with torch.no_grad():  # every row scored = the plain forward
        assert scored(0)[1] == _counted(lambda: model(x))


def test_ledger_adds_by_kind_and_round_trips():
    led = FlopLedger()
    led.add("rollout", 10)
    led.add("backward", 5)
    assert led.total == 15
    other = FlopLedger()
    other.load_state_dict(led.state_dict())
    assert other.flops == led.flops
    with pytest.raises(KeyError, match="unknown ledger entry"):
        led.add("optimizer", 1)
