"""experiments/mopd.py on debug checkpoints only (its numbers mean nothing here): every arm runs, an
interrupted run is finished by resuming, a second invocation trains nothing and regenerates the same results."""

import json

import pytest
from experiments import mopd as exp

from mimo.engine.config import DEFAULT_MODEL
from mimo.train.loop import read_metrics
from tests.posttrain.test_mopd import perturbed_teacher
from tests.posttrain.test_rl_loop import snapshot


def test_arms_resume_and_results(tmp_path):
    teacher = perturbed_teacher(tmp_path / "sort-teacher")
    out = tmp_path / "exp"
    argv = ["--student", str(DEFAULT_MODEL), "--teacher", "add=self", "--teacher", f"sort={teacher}", "--out",
            str(out), "--preset", "debug", "--seeds", "0", "--docs", str(tmp_path / "docs")]
    teachers = (("add", "self"), ("sort", str(teacher)))
    spec = exp.arms(teachers)
    assert spec["wrong-teacher"]["teachers"] == (("add", str(teacher)), ("sort", "self"))
    base = {"student": str(DEFAULT_MODEL), "preset": "debug", "steps": None, "domains": ("add", "sort")}
    exp.run_arm(out, "mopd-a0", 0, spec["mopd-a0"], base, stop_after=1)  # interrupted after step 1
    assert [r["step"] for r in read_metrics(out / "mopd-a0" / "seed0")] == [1]

    with pytest.raises(SystemExit):  # an unknown arm is refused before anything runs
        exp.main([*argv, "--arms", "mopd-a0,nope"])
    results = exp.main(argv)
    assert set(results["arms"]) == {"mopd-a0", "mopd-a0.5", "mix-rl", "wrong-teacher"}
    for arm in results["arms"]:
        assert [r["step"] for r in read_metrics(out / arm / "seed0")] == [1, 2], arm
    assert results["arms"]["mix-rl"]["seeds"][0]["flops_by_kind"]["teacher"] == 0
    assert results["arms"]["mopd-a0"]["seeds"][0]["flops_by_kind"]["teacher"] > 0
    assert results["flop_budget"] == min(a["mean"]["flops"] for a in results["arms"].values())
    assert set(results["teacher_accuracy"]["0"]) == {"add", "sort"}
    # add's teacher is "self": the student's own start, evaluated on the same prompts
    assert results["start_accuracy"]["0"]["add"] == results["teacher_accuracy"]["0"]["add"]
    table = (out / exp.RESULTS_MD).read_text()
    assert all(f"| {arm} |" in table for arm in results["arms"]) and "| start (the student before training) |" in table
    assert (tmp_path / "docs" / "mopd.md").read_text().replace("mopd-curves.png", exp.CURVES_PNG) == table
    assert (tmp_path / "docs" / "mopd-curves.png").read_bytes() == (out / exp.CURVES_PNG).read_bytes()

    before = {arm: snapshot(out / arm) for arm in results["arms"]}
    again = exp.main(argv)  # everything finished: nothing trains, the same results are written
    assert {arm: snapshot(out / arm) for arm in results["arms"]} == before
    assert again == json.loads((out / exp.RESULTS_JSON).read_text()) == json.loads(json.dumps(results))
