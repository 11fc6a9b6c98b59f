"""experiments/mopd.py on debug checkpoints only (its numbers mean nothing here): every arm runs, an
interrupted run is finished by resuming, a second invocation trains nothing and regenerates the same results;
the weight-avg arm's model is the teachers' mean."""

import json
import shutil

import pytest
import torch
from experiments import mopd as exp

from mimo.checkpoint import load_model, save_model
from mimo.engine.config import DEFAULT_MODEL
from mimo.train.loop import TrainError, read_metrics
from tests.conftest import make_model
from tests.posttrain.test_mopd import perturbed_teacher
from tests.posttrain.test_rl_loop import snapshot

TRAINED = {"mopd-a0", "mopd-a0.5", "mopd-full-a0.5", "mix-rl", "wrong-teacher", "teacher-sft"}


def test_arms_resume_and_results(tmp_path):
    teacher = perturbed_teacher(tmp_path / "sort-teacher")
    out = tmp_path / "exp"
    costs = tmp_path / "teachers.json"  # experiments/teachers.py's report, curves only
    costs.write_text(json.dumps({"teachers": {d: {"sft_run": f"runs/sft-{d}", "sft_curve": {"flops": [1e9, 3e9]},
                                                  "rl_curve": {"flops": [2e9]}} for d in ("add", "sort")}}))
    argv = ["--student", str(DEFAULT_MODEL), "--teacher", "add=self", "--teacher", f"sort={teacher}", "--out",
            str(out), "--preset", "debug", "--seeds", "0", "--docs", str(tmp_path / "docs"),
            "--teacher-costs", str(costs)]
    teachers = (("add", "self"), ("sort", str(teacher)))
    spec = exp.arms(teachers)
    assert spec["wrong-teacher"]["teachers"] == (("add", str(teacher)), ("sort", "self"))
    base = {"student": str(DEFAULT_MODEL), "preset": "debug", "steps": None, "domains": ("add", "sort")}
    for arm in ("mopd-a0", "teacher-sft"):  # interrupted after step 1
        exp.run_arm(out, arm, 0, spec[arm], base, stop_after=1)
        assert [r["step"] for r in read_metrics(out / arm / "seed0")] == [1]

    with pytest.raises(SystemExit):  # an unknown arm is refused before anything runs
        exp.main([*argv, "--arms", "mopd-a0,nope"])
    results = exp.main(argv)
    assert set(results["arms"]) == TRAINED | {"weight-avg"}
    for arm in TRAINED:
        assert [r["step"] for r in read_metrics(out / arm / "seed0")] == [1, 2], arm
    arm_flops = {arm: a["seeds"][0]["flops_by_kind"] for arm, a in results["arms"].items()}
    assert arm_flops["mix-rl"]["teacher"] == 0
    assert arm_flops["mopd-a0"]["teacher"] > 0
    # teacher-sft: the teachers' generation is its rollout entry, no teacher scoring
    assert arm_flops["teacher-sft"]["rollout"] > 0 and arm_flops["teacher-sft"]["teacher"] == 0
    # weight-avg: one evaluation row at step 0, nothing but the evaluation charged, and no say in the budget
    avg_rows = read_metrics(out / "weight-avg" / "seed0")
    assert len(avg_rows) == 1 and avg_rows[0]["step"] == 0 and set(avg_rows[0]["eval_accuracy"]) == {"add", "sort"}
    assert arm_flops["weight-avg"]["eval"] == avg_rows[0]["flops"] > 0
    assert sum(arm_flops["weight-avg"].values()) == arm_flops["weight-avg"]["eval"]
    assert results["flop_budget"] == min(results["arms"][a]["mean"]["flops"] for a in TRAINED)
    assert results["arms"]["weight-avg"]["mean"]["flops"] < results["flop_budget"]
    assert results["arms"]["weight-avg"]["mean"]["at_budget"] == avg_rows[0]["eval_accuracy"]
    assert set(results["teacher_accuracy"]["0"]) == {"add", "sort"}
    # add's teacher is "self": the student's own start, evaluated on the same prompts
    assert results["start_accuracy"]["0"]["add"] == results["teacher_accuracy"]["0"]["add"]
    assert results["teacher_building_flops"] == 10e9  # (3e9 + 2e9) per teacher
    for arm, a in results["arms"].items():
        seed0 = a["seeds"][0]
        assert set(seed0["ood"]) == {"add", "sort"}
        assert json.loads((out / arm / "seed0" / exp.OOD_JSON).read_text()) == seed0["ood"]
        if seed0["flops_to_95"] is not None:
            assert seed0["flops_to_95_end_to_end"] == seed0["flops_to_95"] + (0 if arm == "mix-rl" else 10e9)
    table = (out / exp.RESULTS_MD).read_text()
    assert "| OOD add | OOD sort |" in table and "end to end (building the teachers included: 1e+10 FLOPs)" in table
    assert all(f"| {arm} |" in table for arm in results["arms"]) and "| start (the student before training) |" in table
    for arm, a in results["arms"].items():  # each seed's crossing, also where the mean is None
        assert f"- {arm}: " + ", ".join(f"seed {s} {exp._fmt(r['flops_to_95'])}"
                                        for s, r in zip(results["teacher_accuracy"], a["seeds"])) in table
    assert (tmp_path / "docs" / "mopd.md").read_text().replace("mopd-curves.png", exp.CURVES_PNG) == table
    assert (tmp_path / "docs" / "mopd-curves.png").read_bytes() == (out / exp.CURVES_PNG).read_bytes()

    before = {arm: snapshot(out / arm) for arm in results["arms"]}
    again = exp.main(argv)  # everything finished: nothing trains, the same results are written
    assert {arm: snapshot(out / arm) for arm in results["arms"]} == before
    assert again == json.loads((out / exp.RESULTS_JSON).read_text()) == json.loads(json.dumps(results))

    # a sweep: another finished experiment summarised next to this one, each with its own tables and curves
    shutil.copytree(out, tmp_path / "exp-b")
    for bad in (["--sweep", str(tmp_path / "exp-b")], ["--docs", str(tmp_path / "docs"), "--sweep", str(tmp_path)]):
        with pytest.raises(SystemExit):  # no --docs; not an experiment directory
            exp.main([a for a in argv if a not in ("--docs", str(tmp_path / "docs"))] + bad)
    exp.main([*argv, "--sweep", str(tmp_path / "exp-b")])
    doc = (tmp_path / "docs" / "mopd.md").read_text()
    assert "Summary over 2 experiments" in doc and "## exp\n" in doc and "## exp-b\n" in doc
    assert all(doc.count(f"| {arm} | exp") == 2 for arm in results["arms"])
    assert all((tmp_path / "docs" / f"mopd-curves-{n}.png").is_file() for n in ("exp", "exp-b"))
    assert "every run: init_from" in doc and "Reached 0.95 of every teacher on every seed:" in doc
    # experiments with other seeds: each section names its own
    res_b = json.loads((tmp_path / "exp-b" / exp.RESULTS_JSON).read_text())
    for key in ("teacher_accuracy", "start_accuracy"):
        res_b[key] = {"1": res_b[key]["0"]}
    (tmp_path / "exp-b" / exp.RESULTS_JSON).write_text(json.dumps(res_b))
    exp.write_docs(tmp_path / "docs", [out, tmp_path / "exp-b"])
    doc = (tmp_path / "docs" / "mopd.md").read_text()
    assert doc.startswith("# MOPD experiment (seeds per experiment;")
    assert "## exp (seeds 0)\n" in doc and "## exp-b (seeds 1)\n" in doc

    # weight-avg alone: no trained run, so its own FLOPs are the budget and no run settings are listed
    alone = exp.main([*argv, "--arms", "weight-avg"])
    assert set(alone["arms"]) == {"weight-avg"} and alone["flop_budget"] == arm_flops["weight-avg"]["eval"]
    assert "every run:" not in (out / exp.RESULTS_MD).read_text()


def test_teacher_building_flops(tmp_path):
    report = tmp_path / "teachers.json"
    sft = {"sft_run": "runs/sft-add", "sft_curve": {"flops": [1e9, 3e9]}, "rl_curve": {"flops": [2e9]}}
    grpo_only = {"sft_run": None, "sft_curve": None, "rl_curve": {"flops": [1e9, 4e9]}}  # as the sort teacher
    report.write_text(json.dumps({"teachers": {"add": sft, "sort": grpo_only}}))
    assert exp.teacher_building_flops(report, ["add", "sort"]) == 3e9 + 2e9 + 4e9
    assert exp.teacher_building_flops(report, ["add", "reverse"]) is None  # no reverse teacher
    report.write_text(json.dumps({"teachers": {"add": {**sft, "sft_curve": None}}}))
    assert exp.teacher_building_flops(report, ["add"]) is None  # an SFT run whose curve is missing


def test_weight_avg_is_the_teachers_mean(tmp_path):
    """Two distinct teachers (the student as `self`, and a perturbed copy): every tensor is their elementwise
    mean; a teacher used for two domains counts once; a teacher of another architecture is refused."""
    teacher = perturbed_teacher(tmp_path / "t")
    a = load_model(DEFAULT_MODEL, dtype=torch.float32).state_dict()
    b = load_model(teacher, dtype=torch.float32).state_dict()
    merged = exp.average_weights((("add", "self"), ("sort", str(teacher))), str(DEFAULT_MODEL)).state_dict()
    assert merged.keys() == a.keys()
    for k in a:
        torch.testing.assert_close(merged[k], (a[k] + b[k]) / 2)
    assert any(not torch.equal(merged[k], a[k]) and not torch.equal(merged[k], b[k]) for k in a)
    twice = exp.average_weights((("add", "self"), ("reverse", "self"), ("sort", str(teacher))), str(DEFAULT_MODEL))
    assert all(torch.equal(v, merged[k]) for k, v in twice.state_dict().items())

    other = tmp_path / "other"  # the test preset's model with the student's tokenizer
    save_model(make_model(), other)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEFAULT_MODEL / f, other / f)
    with pytest.raises(TrainError, match="--teacher sort=.*another architecture"):
        exp.average_weights((("add", "self"), ("sort", str(other))), str(DEFAULT_MODEL))


def test_compute_ratios_states_each_outcome():
    """Both reached: the ratio; only MOPD: mix-rl's whole budget as a multiple of MOPD's; MOPD never: said so."""
    means = {"mopd-a0": {"k": 2e12, "flops": 4e12}, "mopd-a0.5": {"k": None, "flops": 4e12},
             "mix-rl": {"k": 8e12, "flops": 9e12}, "teacher-sft": {"k": 1e12, "flops": 2e12}}
    assert exp.compute_ratios(means, "k") == [
        "- mopd-a0: 2e+12 FLOPs, mix-rl 8e+12: ratio 0.25",
        "- mopd-a0.5: did not reach 0.95 of every teacher within its 4e+12 FLOPs"]
    means["mix-rl"]["k"] = None
    assert exp.compute_ratios(means, "k")[0] == ("- mopd-a0: 2e+12 FLOPs; mix-rl did not reach it within its "
                                                 "9e+12 FLOPs (4.5x MOPD's)")


def test_report_names_each_seeds_crossing_and_the_ratio_where_both_got_there():
    """The mean over seeds is None once one seed never got there; the per-seed lines still say what each run
    did, and MOPD's ratio to mix-rl on the seeds where both crossed (seed 0 here: 2e12 / 8e12)."""
    acc = {"add": 0.9}
    seed = dict(accuracy=acc, recovery=acc, recovery_mean=1.0, recovery_min=1.0, at_budget=acc, flops=9e12,
                ood=None, flops_to_95_end_to_end=None)
    mean = dict(accuracy=acc, recovery_mean=1.0, recovery_min=1.0, at_budget=acc, flops_to_95=None,
                flops_to_95_end_to_end=None, flops=9e12, ood=None)
    def seeds(*fs):
        return [dict(seed, flops_to_95=f) for f in fs]

    results = {"teacher_accuracy": {"0": acc, "1": acc}, "start_accuracy": {}, "flop_budget": 9e12,
               "teacher_building_flops": None, "arms": {"mopd-a0.5": {"mean": mean, "seeds": seeds(2e12, 3e12)},
                                                        "mix-rl": {"mean": mean, "seeds": seeds(8e12, None)}}}
    lines = exp.report_lines(results)
    assert "- mopd-a0.5: seed 0 2e+12, seed 1 3e+12; against mix-rl on the same seed: seed 0 0.25" in lines
    assert "- mix-rl: seed 0 8e+12, seed 1 -" in lines
