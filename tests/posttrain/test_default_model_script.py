"""experiments/default_model.py on a debug MOPD run (its figures mean nothing here): the shipped directory is
the student with new MTP heads only, and its card states the figures it measured and the run it came from."""

import json

import pytest
import torch
from experiments import default_model as exp
from safetensors.torch import load_file

from mimo.engine.config import DEFAULT_MODEL
from mimo.posttrain import mopd
from mimo.posttrain.loop import run
from mimo.train import checkpoint as ckpt_io


def test_student_ships_with_new_heads_and_a_true_card(tmp_path):
    student = tmp_path / "mopd"
    run(mopd.preset("debug", init_from=str(DEFAULT_MODEL), out=str(student), domains=("add",),
                    teachers=(("add", "self"),), progress=False))
    out, docs = tmp_path / "mimo-tiny", tmp_path / "docs"
    figures = exp.main(["--student", str(student), "--out", str(out), "--distill-steps", "2",
                        "--distill-batch-size", "4", "--generated", "0", "--eval-n", "2", "--al-n", "2",
                        "--docs", str(docs)])
    assert not out.with_name(out.name + ".tmp").exists()
    before = load_file(ckpt_io.find_checkpoint(student) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.mtp.") for k in changed)  # heads only: outputs unchanged
    assert (out / "tokenizer.json").is_file()
    assert json.loads((docs / "default-model.json").read_text()) == json.loads(json.dumps(figures))
    assert (docs / "al-entropy.png").is_file()
    assert json.loads((docs / "al-entropy.json").read_text())["model"] == str(out)
    card = (out / "README.md").read_text()
    acc, al = figures["accuracy"], figures["acceptance_length"]
    assert "code" in al  # code continuations always decode
    for t in ("add", "reverse", "sort", "code"):
        cells = f"| {acc['heldout'][t]:.3f} | {acc['ood'][t]:.3f} |" if t != "code" else "| | |"
        assert f"| {t} {cells} {f'{al[t]:.2f}' if t in al else '-'} |" in card
    assert f"**{figures['code_val_loss']:.3f}**" in card
    assert f"--init-from {DEFAULT_MODEL} --teacher add=self --alpha 0.5" in card and "--steps 2 " in card
    assert "--generated 0.0 --batch-size 4 --threads 1" in card

    with pytest.raises(SystemExit):  # not a MOPD run: refused before anything is written
        exp.main(["--student", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"), "--docs", str(docs)])
    assert not (tmp_path / "x").exists()


def test_start_evals_lists_the_student_start_stages_up_to_the_mopd_start(tmp_path):
    for i, (_, _, _, _, js) in enumerate(exp.START_STAGES):
        (tmp_path / js.split("/")[-1]).write_text(json.dumps({"n_per_task": 3, "accuracy": {"add": i}}))
    assert exp.start_evals("models/sft-start", tmp_path) == []
    assert [e["accuracy"]["add"] for e in exp.start_evals("models/student-start", tmp_path)] == [0]
    assert [e["accuracy"]["add"] for e in exp.start_evals("models/student-mix5", tmp_path)] == [0, 1]
