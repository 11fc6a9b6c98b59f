"""experiments/al_entropy.py: the fit recovers a known law and rejects a flat one; a small measurement on the
bundled model gives one point per group with AL in [1, 1 + drafts] and the entropy of the main model."""

import math

import pytest
import torch
from experiments import al_entropy as ale

from mimo.checkpoint import load_model
from mimo.engine.config import DEFAULT_MODEL


def test_fit_recovers_the_law_and_not_a_flat_cloud():
    pts = [{"al": 4 * (1 - 0.4 * h ** 0.7), "entropy": h} for h in (0.1, 0.3, 0.6, 1.0, 1.5, 2.2)]
    f = ale.fit(pts)
    assert f["a"] == pytest.approx(0.4, rel=1e-6) and f["b"] == pytest.approx(0.7, rel=1e-6)
    assert f["r2"] == pytest.approx(1.0)
    flat = [{"al": 2.0 + (0.3 if i % 2 else -0.3), "entropy": h} for i, h in enumerate((0.1, 0.3, 0.6, 1.0))]
    assert ale.fit(flat)["r2"] < 0.5


def test_output_entropy_is_the_predicting_rows():
    model = load_model(DEFAULT_MODEL, dtype=torch.float32).eval()
    prompt, out = [5, 9, 14], [3, 7]
    total, n = ale.output_entropy(model, prompt, out)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + out]))[0].float(), -1)
    want = sum(float(-(logp[r].exp() * logp[r]).sum()) for r in (2, 3))  # rows predicting out[0], out[1]
    assert n == 2 and total == pytest.approx(want, rel=1e-4)


def test_small_measurement():
    res = ale.measure(str(DEFAULT_MODEL), n=4, group=2)
    # the bundled model ends some thinking-task groups at their first token: those give no point
    domains = [p["domain"] for p in res["points"]]
    assert domains == sorted(domains, key=["add", "reverse", "sort", "code"].index)
    assert domains.count("sort") == domains.count("code") == 2 and len(domains) + res["groups_without_a_step"] == 8
    for p in res["points"]:
        assert 1.0 <= p["al"] <= 1 + res["drafts"] and p["entropy"] > 0 and p["tokens"] > 0
    assert math.isfinite(res["fit"]["r2"])
