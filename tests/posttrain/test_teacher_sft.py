"""Teacher-SFT (mopd.TeacherSFTConfig) on the RL loop: the objective on hand-built rows is cross-entropy on
the correct samples' response tokens only; a debug run samples from the domain's teacher, charges every
teacher sample to the ledger (the rejected ones too), takes exactly one plain SFT step on the kept rows, and
resumes exactly."""

import hashlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mimo import tasks as task_lib
from mimo.checkpoint import load_model
from mimo.engine.config import DEFAULT_MODEL
from mimo.posttrain import flops as flop_lib
from mimo.posttrain import loop, mopd, rewards
from mimo.posttrain.loop import RLConfigError
from mimo.posttrain.rollout import Rollout, RolloutBatch, build_batch
from mimo.train import checkpoint as ckpt_io
from mimo.train.data import load_tokenizer
from mimo.train.loop import read_metrics
from mimo.train.optim import param_groups
from mimo.train.step import forward_backward, optimizer_step
from tests.conftest import make_model
from tests.posttrain.test_mopd import perturbed_teacher

P = 4  # prompt tokens of the hand-built rows


def _hand_built(model, rewards_and_lengths):
    """Rollouts of random tokens (prompt P, response O) with the given rewards; the sampler's log-probs -1."""
    g = torch.Generator().manual_seed(0)
    ex = task_lib.Example("sort", "sort 2 1", "1 2")
    rs = []
    for reward, O in rewards_and_lengths:
        toks = torch.randint(3, model.config.vocab_size, (P + O,), generator=g).tolist()
        rs.append(Rollout(ex, toks[:P], toks[P:], [-1.0] * O, None, "", reward=reward))
    rb = RolloutBatch(rs, 2)
    return rb, mopd.correct_rows(rb, build_batch(rs, torch.zeros(len(rs)), 0))


def test_sft_objective_is_cross_entropy_on_the_correct_samples_only():
    """Rewards [1, 0, 0, 1]: the rows are samples 0 and 3, cut to the longer of their rows (the rejected
    6-token response is not trained on); the loss is the mean cross-entropy over their 3 + 4 response tokens,
    computed here from the raw token rows, with the same gradient; no importance ratio masks a token."""
    model = make_model(n_mtp_layers=0)
    rb, batch = _hand_built(model, [(1.0, 3), (0.0, 6), (0.0, 2), (1.0, 4)])
    kept = [rb.rollouts[0], rb.rollouts[3]]
    assert batch.input_ids.shape == (2, P + 4 - 1) and batch.routed_experts is None
    assert batch.input_ids[1].tolist() == (kept[1].prompt_ids + kept[1].token_ids)[:-1]

    out = forward_backward(model, batch, mopd.sft_objective(int(batch.mask.sum()), [], 0.0))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ce = []
    for r in kept:
        row = torch.tensor([r.prompt_ids + r.token_ids])
        logits = model(row[:, :-1])[0, P - 1:]  # the rows predicting the response tokens
        ce.append(F.cross_entropy(logits, row[0, P:], reduction="sum"))
    expect = sum(ce) / 7
    expect.backward()
    logp_sum = -float(sum(c.detach() for c in ce))
    assert float(out.loss) == pytest.approx(expect.item(), rel=1e-5)
    assert float(out.metrics["pg"]) == pytest.approx(expect.item(), rel=1e-5)
    assert float(out.metrics["tokens"]) == float(out.metrics["kept"]) == 7
    assert float(out.metrics["logp_diff"]) == pytest.approx(-7.0 - logp_sum, rel=1e-5)  # sampler's log-probs -1
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


def test_a_rank_without_a_correct_sample_joins_the_update_without_a_loss():
    """No correct sample on this rank: one row stays (every rank runs the forward/backward), none of its
    tokens trained: loss 0, gradient 0."""
    model = make_model(n_mtp_layers=0)
    _, batch = _hand_built(model, [(0.0, 3), (0.0, 5)])
    assert batch.input_ids.shape[0] == 1 and not batch.mask.any()
    out = forward_backward(model, batch, mopd.sft_objective(10, [], 0.0))
    assert float(out.loss) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_config_needs_a_teacher_per_domain():
    with pytest.raises(RLConfigError, match="domain 'sort' of the prompt mixture has no teacher"):
        mopd.TeacherSFTConfig(domains=("sort",))
    with pytest.raises(RLConfigError, match="TeacherSFTConfig.teachers: unknown domain 'mul'"):
        mopd.TeacherSFTConfig(domains=("sort",), teachers=(("mul", "self"),))


# ---- a debug run -----------------------------------------------------------------------------------------------

def _verifier(ex, completion: str) -> float:
    """'Correct' when the first byte of the completion's SHA-256 is even: a deterministic mix of kept and
    rejected samples whatever the model writes (at debug size the real verifiers accept nearly nothing)."""
    return float(hashlib.sha256(completion.encode()).digest()[0] % 2 == 0)


def _cfg(out: Path, teacher: Path, **kw) -> mopd.TeacherSFTConfig:
    return loop.preset("debug", mopd.TeacherSFTConfig, init_from=str(DEFAULT_MODEL), out=str(out), domains=("sort",),
                       teachers=(("sort", str(teacher)),), progress=False, **kw)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A 2-step teacher-SFT run from the bundled model with a perturbed sort teacher, and the same run
    interrupted after step 1 and resumed."""
    d = tmp_path_factory.mktemp("teacher-sft")
    teacher = perturbed_teacher(d / "teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(rewards.VERIFIERS, "sort", _verifier)
        full, part = _cfg(d / "full", teacher), _cfg(d / "part", teacher)
        loop.run(full)
        loop.run(part, stop_after=1)
        loop.run(part, resume=part.out)
        yield full, part, teacher


def test_samples_come_from_the_teacher_and_every_one_is_charged(sft_run, monkeypatch):
    """Step 1 regenerated from its prompts and seeds: the run's samples are the teacher's (not the student's),
    the ledger's rollout entry is the teacher generation of every sample, more than the kept ones alone, and
    the update is charged over the kept rows only."""
    monkeypatch.setitem(rewards.VERIFIERS, "sort", _verifier)
    cfg, _, teacher = sft_run
    tok = load_tokenizer(DEFAULT_MODEL)
    examples = rewards.step_examples(cfg.domains, cfg.prompts_per_step, cfg.seed, 0)
    seeds = [loop.sample_seed(cfg.seed, 0, i) for i in range(cfg.prompts_per_step)]

    def sample(model_dir):
        engine = loop.rollout_engine(load_model(model_dir, dtype=torch.float32), tok, cfg)
        return loop.routed_rollouts({"sort": engine}, tok, examples, cfg.group_size, seeds, cfg.max_new_tokens,
                                    cfg.temperature)

    rb, spent = sample(teacher)
    student_rb, _ = sample(DEFAULT_MODEL)
    assert [r.token_ids for r in rb.rollouts] != [r.token_ids for r in student_rb.rollouts]
    row = read_metrics(cfg.out)[0]
    n = len(rb.rollouts)
    assert row["accuracy"] == pytest.approx(float((rb.rewards >= 1).sum()) / n)
    assert row["response_tokens"] == pytest.approx(rb.num_tokens / n)
    assert 0 < row["accuracy"] < 1, "the verifier should keep some samples and reject others"

    mc = load_model(teacher, dtype=torch.float32).config
    kept = sum(flop_lib.rollout_flops(mc, len(r.prompt_ids), len(r.token_ids), r.num_drafted, r.num_accepted)
               for r in rb.rollouts if r.reward >= 1)
    assert row["flops_by_kind"]["rollout"] == spent > kept > 0
    batch = mopd.correct_rows(rb, build_batch(rb.rollouts, torch.zeros(n), tok.pad_id))
    fwd, bwd = flop_lib.training_flops(mc, *batch.input_ids.shape, load_model(DEFAULT_MODEL).n_mtp)
    assert (row["flops_by_kind"]["logprob"], row["flops_by_kind"]["backward"]) == (fwd, bwd)
    assert row["flops_by_kind"]["teacher"] == 0 and row["masked_fraction"] == 0.0
    assert all(math.isfinite(x) for x in [row["loss"], row["kl_sampler_trainer"], *row["mtp_loss"]])


def test_the_update_is_one_plain_sft_step_on_the_kept_rows(sft_run, monkeypatch):
    """The student after step 1 is the bundled model after one optimizer step (the config's AdamW, LR and
    warmup) of sft_objective on step 1's kept teacher samples."""
    monkeypatch.setitem(rewards.VERIFIERS, "sort", _verifier)
    cfg, _, teacher = sft_run
    tok = load_tokenizer(DEFAULT_MODEL)
    examples = rewards.step_examples(cfg.domains, cfg.prompts_per_step, cfg.seed, 0)
    seeds = [loop.sample_seed(cfg.seed, 0, i) for i in range(cfg.prompts_per_step)]
    engine = loop.rollout_engine(load_model(teacher, dtype=torch.float32), tok, cfg)
    rb, _ = loop.routed_rollouts({"sort": engine}, tok, examples, cfg.group_size, seeds, cfg.max_new_tokens,
                                 cfg.temperature)
    batch = mopd.correct_rows(rb, build_batch(rb.rollouts, torch.zeros(len(rb.rollouts)), tok.pad_id))

    model = load_model(DEFAULT_MODEL, dtype=torch.float32)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    n_mtp = [int(batch.mask[:, k + 1:].sum()) for k in range(model.n_mtp)]
    out = forward_backward(model, batch, mopd.sft_objective(int(batch.mask.sum()), n_mtp, cfg.mtp_weight))
    optimizer_step(model, opt, sched, float(out.loss), cfg.grad_clip, 0)

    step1 = load_model(Path(cfg.out) / ckpt_io.CKPT_DIR / ckpt_io.step_name(1), dtype=torch.float32).state_dict()
    start = load_model(DEFAULT_MODEL, dtype=torch.float32).state_dict()
    assert any(not torch.equal(step1[k], start[k]) for k in start)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(step1[k], v, rtol=1e-5, atol=1e-7)


def test_resume_reproduces_the_uninterrupted_run(sft_run):
    full, part, _ = sft_run
    drop = ("time", "rollout_tok_per_s")
    a = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(full.out)]
    b = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(part.out)]
    assert [r["step"] for r in a] == [1, 2] and a == b
    assert "eval_accuracy" in a[-1] and a[-1]["flops_by_kind"]["eval"] > 0
    wa = load_file(ckpt_io.find_checkpoint(full.out) / "model.safetensors")
    wb = load_file(ckpt_io.find_checkpoint(part.out) / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
