"""MOPD on hand-built log-probs (worked numbers, teacher = student, alpha 0 / 0.5, special tokens), through the
shared objective (value and gradient), routing of rows to their domain's teacher, start-up errors (another
tokenizer, another vocabulary, a domain without a teacher) and `mimo mopd` end to end with exact resume, and
under torchrun."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimo import tasks as task_lib
from mimo.checkpoint import load_model, save_model
from mimo.cli import main
from mimo.engine.config import DEFAULT_MODEL
from mimo.posttrain import grpo, mopd
from mimo.posttrain.loop import run
from mimo.posttrain.mopd import MOPDBatch, Teacher, TeacherRoutingError
from mimo.posttrain.rollout import Rollout, RolloutBatch, build_batch
from mimo.train import checkpoint as ckpt_io
from mimo.train.loop import read_metrics
from mimo.train.step import forward_backward
from tests.conftest import make_model
from tests.posttrain.test_rl_loop import one_error_line


def test_advantage_by_hand():
    """Teacher [-0.2, -0.5, -1.0], student [-1.0, -0.5, -0.3], the 3rd token special (not distilled),
    outcome advantage 1.5: alpha 0 -> [0.8, 0, 0]; alpha 0.5 -> [1.55, 0.75, 0.75]."""
    teacher = torch.tensor([[-0.2, -0.5, -1.0]])
    student = torch.tensor([[-1.0, -0.5, -0.3]])
    distilled = torch.tensor([[True, True, False]])
    outcome = torch.tensor([1.5])
    assert mopd.mopd_advantages(teacher, student, distilled, outcome, 0.0)[0].tolist() == pytest.approx([0.8, 0, 0])
    assert mopd.mopd_advantages(teacher, student, distilled, outcome, 0.5)[0].tolist() == pytest.approx(
        [1.55, 0.75, 0.75])
    # teacher = student: the teacher term is exactly 0, only the outcome term is left
    assert mopd.mopd_advantages(student, student, distilled, outcome, 0.0).tolist() == [[0.0, 0.0, 0.0]]
    assert mopd.mopd_advantages(student, student, distilled, outcome, 0.5).tolist() == [[0.75, 0.75, 0.75]]


def _rollout(tokens, P, task):
    ex = task_lib.Example(task, f"{task} 1", "1")
    return Rollout(ex, tokens[:P], tokens[P:], [0.0] * (len(tokens) - P), None, "")


def _rollouts(model, domains=("sort", "add", "add", "sort"), P=5, O=6, eos=2):
    """Rows of random tokens, each response ending with `eos`; the sampler's log-probs are the model's own
    (on-policy: every IS ratio is 1)."""
    g = torch.Generator().manual_seed(0)
    rs = []
    for i, d in enumerate(domains):
        toks = torch.randint(3, model.config.vocab_size, (P + O - i % 2,), generator=g).tolist()
        rs.append(_rollout(toks[:-1] + [eos], P, d))
    with torch.no_grad():
        b0 = build_batch(rs, torch.zeros(len(rs)), 0)
        logp = grpo.token_logprobs(model(b0.input_ids), b0.labels, 1.0)
    for r, row, m in zip(rs, logp, b0.mask):
        r.logprobs = row[m].tolist()
    return RolloutBatch(rs, 2)


OUTCOME = torch.tensor([1.0, -0.5, 2.0, -1.5])


def _mopd_step(model, teachers, rb, alpha):
    batch, _ = mopd.score_rollouts(teachers, rb, build_batch(rb.rollouts, OUTCOME, 0), torch.tensor([0, 1, 2]))
    model.zero_grad(set_to_none=True)
    loss_fn = grpo.grpo_objective(4, [], [], 0.5, 2.0, mtp_weight=0.0, replay=False,
                                  advantage=mopd.token_advantage(alpha, ("add", "sort")))
    out = forward_backward(model, batch, loss_fn)
    return batch, out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_objective_value_gradient_and_reverse_kl():
    """Through grpo_objective with on-policy ratios 1: the loss is -(1/B) sum_i mean_t A_t log pi(y_t) with
    A_t of the formula (the <|im_end|> label without the teacher term); `rkl` is sum (log pi - log pi_T) over
    the distilled tokens. With teacher = student the gradient is alpha times GRPO's."""
    model = make_model(n_mtp_layers=0)
    rb = _rollouts(model)
    teacher = make_model(n_mtp_layers=0, seed=1)
    batch, out, _ = _mopd_step(model, [Teacher("t", ("add", "sort"), teacher)], rb, 0.5)
    assert not batch.distill_mask[batch.labels == 2].any() and batch.distill_mask.sum() == batch.mask.sum() - 4
    with torch.no_grad():
        logp = grpo.token_logprobs(model(batch.input_ids), batch.labels, 1.0)
        t_lp = grpo.token_logprobs(teacher(batch.input_ids), batch.labels, 1.0)
    expect, rkl = 0.0, 0.0
    for i in range(4):
        m, d = batch.mask[i], batch.distill_mask[i]
        adv = torch.where(d, t_lp[i] - logp[i], 0.0) + 0.5 * OUTCOME[i]
        expect -= float((adv * logp[i])[m].mean()) / 4
        rkl += float((logp[i] - t_lp[i])[d].sum())
    assert float(out.metrics["pg"]) == pytest.approx(expect, rel=1e-5)
    assert float(out.metrics["rkl"]) == pytest.approx(rkl, rel=1e-5)
    assert float(out.metrics["distilled"]) == float(batch.distill_mask.sum())
    rkl_sort = sum(float((logp[i] - t_lp[i])[batch.distill_mask[i]].sum()) for i in (0, 3))
    assert float(out.metrics["rkl/sort"]) == pytest.approx(rkl_sort, rel=1e-5)

    self_teacher = Teacher("self", ("add", "sort"), make_model(n_mtp_layers=0))  # the same weights as `model`
    _, out_self, g_self = _mopd_step(model, [self_teacher], rb, 0.5)
    assert float(out_self.metrics["rkl"]) == 0.0
    model.zero_grad(set_to_none=True)
    grpo_fn = grpo.grpo_objective(4, [], [], 0.5, 2.0, mtp_weight=0.0, replay=False)
    forward_backward(model, build_batch(rb.rollouts, OUTCOME, 0), grpo_fn)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_self[n], 0.5 * p.grad, rtol=1e-5, atol=1e-9)
    _, _, g_zero = _mopd_step(model, [self_teacher], rb, 0.0)
    assert all(float(g.abs().max()) == 0.0 for g in g_zero.values())


def test_full_kl_term_worked_example():
    """V = 2, one distilled token of a one-token response: student [0.5, 0.5], teacher [0.9, 0.1] -> 0.511; a
    special (not distilled) or IS-dropped token adds nothing."""
    student = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    teacher = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1]]]))
    b = MOPDBatch(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                  torch.tensor([[True, True]]), loss_weights=torch.tensor([1.0]), teacher_logdist=teacher,
                  distill_mask=torch.tensor([[True, False]]), domains=("add",))
    term = mopd.full_kl_term(("add",))
    loss, m = term(b, student, torch.tensor([[True, True]]))
    assert float(loss) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), abs=1e-6)
    assert float(m["rkl"]) == pytest.approx(float(loss)) and float(m["distilled"]) == 1
    assert float(term(b, student, torch.tensor([[False, True]]))[0]) == 0.0  # dropped by the IS mask


def _one_token_step(model, teacher, token, kl, P=5):
    """One row: a fixed prompt and the one-token response `token`, on-policy (IS ratio 1), alpha 0, no
    special tokens; the student's gradient under MOPD with `kl`."""
    prompt = torch.randint(3, model.config.vocab_size, (P,), generator=torch.Generator().manual_seed(1)).tolist()
    r = _rollout(prompt + [token], P, "add")
    with torch.no_grad():
        b0 = build_batch([r], torch.zeros(1), 0)
        r.logprobs = grpo.token_logprobs(model(b0.input_ids), b0.labels, 1.0)[b0.mask].tolist()
    rb = RolloutBatch([r], 1)
    batch, _ = mopd.score_rollouts([Teacher("t", ("add",), teacher)], rb, build_batch(rb.rollouts, torch.zeros(1), 0),
                                   torch.tensor([], dtype=torch.long), full=kl == "full")
    model.zero_grad(set_to_none=True)
    full = kl == "full"
    loss_fn = grpo.grpo_objective(1, [], [], 0.5, 2.0, mtp_weight=0.0, replay=False,
                                  advantage=mopd.token_advantage(0.0, ("add",), teacher_term=not full),
                                  extra=mopd.full_kl_term(("add",)) if full else None)
    out = forward_backward(model, batch, loss_fn)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, batch


def test_full_kl_gradient_is_the_expectation_of_the_sampled_terms():
    """kl="full" at a position = the sampled-token term averaged over every token the student could have
    sampled there, weighted by its probability (sum_v p(v) grad log p(v) = 0); the uniform average (a broken
    weighting) does not match. `reverse_kl` is then the exact KL."""
    model = make_model(n_mtp_layers=0, vocab_size=48)
    teacher = make_model(n_mtp_layers=0, vocab_size=48, seed=1)
    out_full, g_full, batch = _one_token_step(model, teacher, 7, "full")
    with torch.no_grad():
        pos = batch.mask[0].nonzero()[0, 0]
        p = torch.softmax(model(batch.input_ids)[0, pos].float(), -1)
        q = torch.softmax(teacher(batch.input_ids)[0, pos].float(), -1)
    assert float(out_full.metrics["rkl"]) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4)
    expected = {n: torch.zeros_like(g) for n, g in g_full.items()}
    uniform = {n: torch.zeros_like(g) for n, g in g_full.items()}
    for v in range(model.config.vocab_size):
        _, g, _ = _one_token_step(model, teacher, v, "sampled")
        for n in expected:
            expected[n] += float(p[v]) * g[n]
            uniform[n] += g[n] / model.config.vocab_size
    for n in g_full:
        torch.testing.assert_close(g_full[n], expected[n], rtol=1e-3, atol=1e-7)
    assert max(float((g_full[n] - uniform[n]).abs().max()) for n in g_full) > 1e-4


def test_rows_are_scored_by_their_domains_teacher():
    """Domains interleaved [sort, add, add, sort]: each row's log-probs are its own domain's teacher's (one
    forward per teacher); a teacher given a row of another domain raises, as does a row without a teacher."""
    student = make_model(n_mtp_layers=0)
    add_t = Teacher("add-dir", ("add",), make_model(n_mtp_layers=0, seed=1))
    sort_t = Teacher("sort-dir", ("sort",), make_model(n_mtp_layers=0, seed=2))
    rb = _rollouts(student)
    batch, spent = mopd.score_rollouts([add_t, sort_t], rb, build_batch(rb.rollouts, OUTCOME, 0),
                                       torch.tensor([0, 1, 2]))
    assert batch.domains == ("sort", "add", "add", "sort")
    with torch.no_grad():
        by = {d: grpo.token_logprobs(t.model(batch.input_ids), batch.labels, 1.0) for d, t in
              (("add", add_t), ("sort", sort_t))}
    for i, d in enumerate(batch.domains):
        m = batch.mask[i]
        torch.testing.assert_close(batch.teacher_logprobs[i][m], by[d][i][m], rtol=0, atol=1e-5)
        other = by["add" if d == "sort" else "sort"][i][m]
        assert (batch.teacher_logprobs[i][m] - other).abs().max() > 1e-2  # the teachers do differ
        assert not batch.teacher_logprobs[i][~m].any()
    assert spent > 0
    with pytest.raises(TeacherRoutingError, match="teacher add-dir .*domains sort,add"):
        mopd.teacher_logprobs(add_t, MOPDBatch(batch.input_ids[:2], batch.labels[:2], batch.mask[:2],
                                               domains=("sort", "add")))
    with pytest.raises(TeacherRoutingError, match="no teacher for domain 'sort'"):
        mopd.score_batch([add_t], batch)


# ---- start-up errors and end to end --------------------------------------------------------------------------

def perturbed_teacher(d: Path) -> Path:
    """A teacher that differs from the student: the bundled model with its weights perturbed, written to d."""
    model = load_model(DEFAULT_MODEL, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    save_model(model, d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEFAULT_MODEL / f, d / f)
    return d


@pytest.fixture(scope="module")
def sort_teacher(tmp_path_factory) -> Path:
    return perturbed_teacher(tmp_path_factory.mktemp("teacher") / "sort-teacher")


def _argv(out, *extra):
    return ["mopd", "--preset", "debug", "--init-from", str(DEFAULT_MODEL), "--out", str(out), "--no-progress",
            *extra]


def test_teacher_with_another_tokenizer_is_refused(tmp_path, sort_teacher, capsys):
    other = tmp_path / "other"
    shutil.copytree(sort_teacher, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert main(_argv(tmp_path / "run", "--teacher", "add=self", "--teacher", f"sort={other}")) == 2
    line = one_error_line(capsys)
    assert f"--teacher sort={other}: its tokenizer differs from the student's" in line
    assert not (tmp_path / "run").exists()


def test_teacher_with_another_vocabulary_is_refused(tmp_path, capsys):
    other = tmp_path / "other"
    save_model(make_model(vocab_size=5000), other)
    shutil.copy(DEFAULT_MODEL / "tokenizer.json", other / "tokenizer.json")
    assert main(_argv(tmp_path / "run", "--teacher", f"sort={other}")) == 2
    assert "vocabulary of 5000 ids, the student's has 4096" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_domain_without_a_teacher_is_refused(tmp_path, capsys):
    assert main(_argv(tmp_path / "run", "--domains", "add,sort", "--teacher", "sort=self")) == 2
    assert "domain 'add' of the prompt mixture has no teacher" in one_error_line(capsys)
    with pytest.raises(SystemExit) as e:
        main(_argv(tmp_path / "run", "--teacher", "mul=self"))
    assert e.value.code == 2
    assert "argument --teacher: unknown domain 'mul'" in one_error_line(capsys)
    with pytest.raises(SystemExit):
        main(_argv(tmp_path / "run"))  # --teacher is required
    assert "--teacher" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kl", ["sampled", "full"])
def test_debug_run_end_to_end(tmp_path, sort_teacher, kl):
    """`mimo mopd` with a self teacher (add) and another model (sort): two steps, eval, every metric logged;
    at step 1 the self teacher is the student (reverse KL 0 up to replay noise), the other one is not; the
    ledger counts the teachers' forwards; the run moved the weights and saved its teachers in the config."""
    out = tmp_path / "run"
    assert main(_argv(out, "--teacher", "add=self", "--teacher", f"sort={sort_teacher}", "--kl", kl)) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    assert all("skipped" not in r for r in rows)  # the teacher term teaches without reward variance too
    assert abs(first["reverse_kl_by_domain"]["add"]) < 1e-4
    assert first["reverse_kl_by_domain"]["sort"] > 1e-2
    for key in ("reverse_kl", "masked_fraction", "entropy", "grad_norm", "kl_sampler_trainer"):
        assert math.isfinite(first[key]), key
    assert set(first["accuracy_by_domain"]) == {"add", "sort"}
    assert set(rows[-1]["eval_accuracy"]) == {"add", "sort"}
    assert 0 < first["flops_by_kind"]["teacher"] < rows[1]["flops_by_kind"]["teacher"]
    assert (out / "curves.png").is_file()
    ck = ckpt_io.find_checkpoint(out)
    cfg = json.loads((ck / "rl_config.json").read_text())
    assert cfg["teachers"] == [["add", "self"], ["sort", str(sort_teacher)]] and cfg["alpha"] == 0.5
    assert cfg["kl"] == kl
    after, before = load_file(ck / "model.safetensors"), load_file(DEFAULT_MODEL / "model.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, sort_teacher):
    def cfg(name):
        return mopd.preset("debug", init_from=str(DEFAULT_MODEL), out=str(tmp_path / name), steps=3,
                           domains=("sort", "add"), teachers=(("sort", str(sort_teacher)), ("add", "self")),
                           progress=False)

    run(cfg("full"))
    run(cfg("part"), stop_after=1)
    run(cfg("part"), resume=tmp_path / "part")
    drop = ("time", "rollout_tok_per_s")
    a = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "full")]
    b = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "part")]
    assert len(a) == 3 and a == b
    wa = load_file(ckpt_io.find_checkpoint(tmp_path / "full") / "model.safetensors")
    wb = load_file(ckpt_io.find_checkpoint(tmp_path / "part") / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_mimo_mopd_runs_under_torchrun(tmp_path, sort_teacher):
    """2 ranks (FSDP2 over gloo): each scores its own rollouts with its own copy of the teachers; the
    per-domain sums behind the reverse KL and the teachers' FLOPs are global."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mimo.cli",
           *_argv(out, "--teacher", "add=self", "--teacher", f"sort={sort_teacher}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert set(rows[0]["reverse_kl_by_domain"]) == {"add", "sort"}
    assert abs(rows[0]["reverse_kl_by_domain"]["add"]) < 1e-4 < rows[0]["reverse_kl_by_domain"]["sort"]
    assert 0 < rows[0]["flops_by_kind"]["teacher"] < rows[1]["flops_by_kind"]["teacher"]
