"""experiments/teachers.py on a debug domain SFT run followed by a debug RL run (numbers mean nothing here): the
exported teacher is bf16 and loads, the report's figures are the exported model's own and the runs' own, the
curve joins the two stages, the command reproduces the run."""

import json

import torch
from experiments import teachers as rep

from mimo.checkpoint import load_model, save_model
from mimo.cli import main
from mimo.engine import LLM
from mimo.engine.config import DEFAULT_MODEL
from mimo.posttrain import loop
from mimo.train.data import load_tokenizer
from mimo.train.export import MODEL_FILES
from mimo.train.loop import read_metrics


def test_report_from_a_debug_run(tmp_path):
    sft_dir, run_dir = tmp_path / "sft-sort", tmp_path / "rl-sort"
    assert main(["sft", "--recipe", "debug", "--init-from", str(DEFAULT_MODEL), "--out", str(sft_dir), "--steps", "2",
                 "--no-progress"]) == 0
    assert main(["rl", "--preset", "debug", "--init-from", str(sft_dir), "--out", str(run_dir), "--domains",
                 "sort", "--lr", "3e-5", "--warmup-steps", "1", "--no-progress"]) == 0
    out, export = tmp_path / "docs", tmp_path / "teachers"
    report = rep.main(["--start", str(DEFAULT_MODEL), "--teacher", f"sort={run_dir}", "--sft", f"sort={sft_dir}",
                       "--export", str(export),
                       "--out", str(out), "--eval-n", "3", "--preset", "debug", "--rounds", "1"])

    teacher = load_model(export / "sort", dtype=None)
    assert teacher.model.embed_tokens.weight.dtype == torch.bfloat16
    tok = load_tokenizer(export / "sort")
    llm = LLM(load_model(export / "sort", dtype=torch.float32), tokenizer=tok, max_model_len=200)
    t = report["teachers"]["sort"]
    assert t["accuracy"]["heldout"] == loop.greedy_accuracy(llm, tok, ("add", "reverse", "sort"), 3, 0, 24)[0]
    evals = [r for r in read_metrics(run_dir) if "eval_accuracy" in r]
    assert t["rl_curve"]["step"] == [r["step"] for r in evals]
    assert t["rl_curve"]["accuracy"] == [r["eval_accuracy"]["sort"] for r in evals]
    sft = t["sft_curve"]
    assert sft["step"] == [2] and sft["flops"][0] > 0 and 0 <= sft["accuracy"][0] <= 1
    c = t["curve"]
    assert c["stage"] == ["start", "sft"] + ["rl"] * len(evals)
    assert c["accuracy"][0] == report["start"]["heldout"]["sort"]
    assert c["flops"][2:] == [sft["flops"][-1] + f for f in t["rl_curve"]["flops"]]
    assert t["command"].startswith(f"mimo rl --init-from {sft_dir} --domains sort")
    assert "--lr 3e-05 --warmup-steps 1" in t["command"]
    r = t["rollouts"]
    assert r["tok_per_s_mtp_on"] > 0 and r["tok_per_s_mtp_off"] > 0 and r["acceptance_length"] >= 1
    assert json.loads((out / rep.REPORT_JSON).read_text()) == json.loads(json.dumps(report))
    md = (out / rep.REPORT_MD).read_text()
    assert "| sort teacher |" in md and t["command"] in md and (out / rep.CURVES_PNG).stat().st_size > 1000
    card = (export / "sort" / "README.md").read_text()
    assert "from a domain SFT stage (debug stage `sort`: 2 steps on `sort` conversations" in card

    # again with the exported teacher instead of its runs: what only the runs could tell comes from the
    # previous report (same weights), the rest is measured again; other weights under the same name get none
    again = rep.main(["--start", str(DEFAULT_MODEL), "--teacher", f"sort={export / 'sort'}", "--out", str(out),
                      "--eval-n", "3", "--preset", "debug", "--rounds", "1"])["teachers"]["sort"]
    for k in ("run", "sft_run", "command", "sft_curve", "rl_curve", "curve", "accuracy", "weights_digest"):
        assert again[k] == json.loads(json.dumps(t[k])), k
    model = load_model(export / "sort", dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.01)
    save_model(model, tmp_path / "other", dtype=torch.bfloat16)
    for f in MODEL_FILES[2:]:  # the tokenizer files
        (tmp_path / "other" / f).write_bytes((export / "sort" / f).read_bytes())
    other = rep.main(["--start", str(DEFAULT_MODEL), "--teacher", f"sort={tmp_path / 'other'}", "--out", str(out),
                      "--eval-n", "3", "--preset", "debug", "--rounds", "1"])["teachers"]["sort"]
    assert other["command"] is other["rl_curve"] is other["sft_curve"] is None and "curve" not in other
    md = (out / rep.REPORT_MD).read_text()
    assert "| sort teacher |" in md and "its runs were not kept" in md and "| sort | " in md
