"""MTP acceptance length against the main model's next-token entropy (issue 10 §3; the report fits
AL = 4 (1 - a H^b) with a = 0.58, b = 0.58, R^2 0.995 over its benchmarks).

    python -m experiments.al_entropy --model models/mimo-tiny --out docs/results [--n 64] [--group 16]

Outputs: greedy, through the engine with every MTP head drafting at every step (adaptive drafting off: the
report's AL is that of 3 MTP layers, not of a policy that drafts less where heads are weak). Points: the
held-out prompts of each task (as evaluation poses them, `mimo.tasks.prompt_ids`; up to
`mimo.tasks.MAX_NEW_TOKENS` tokens) and held-out stdlib code (48-token prefixes of validation files, 64 new
tokens, end of text ignored), `n` prompts per domain in groups of `group`: one point per group (none for a
group whose outputs all ended at their first token: no decode step), AL = 1 + accepted / verify steps over
the group, H = the main model's mean next-token entropy (nats, temperature 1) over the positions that
predicted the group's output tokens.

Fit: log(1 - AL/4) = log a + b log H by least squares (points with AL >= 4 or H = 0 dropped); R^2 in AL.
Writes OUT/al-entropy.json and OUT/al-entropy.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mimo import tasks as task_lib
from mimo.checkpoint import load_model
from mimo.data.corpus import load_corpus
from mimo.engine import LLM, SamplingParams
from mimo.train.data import load_tokenizer

REPORT_A, REPORT_B = 0.58, 0.58
CODE_PREFIX, CODE_NEW = 48, 64


def domain_prompts(tok, domain: str, n: int, corpus=None) -> tuple[list[list[int]], SamplingParams]:
    if domain != "code":
        exs = task_lib.generate_examples(domain, n, "heldout", 0)
        return ([task_lib.prompt_ids(tok, e) for e in exs],
                SamplingParams(max_tokens=task_lib.MAX_NEW_TOKENS, temperature=0))
    rng = random.Random("mimo.al_entropy/code")
    docs = [ids for ids in (tok.encode(t) for t in corpus.texts("val")) if len(ids) > CODE_PREFIX + CODE_NEW]
    out = []
    for _ in range(n):
        ids = rng.choice(docs)
        start = rng.randrange(len(ids) - CODE_PREFIX - CODE_NEW)
        out.append(ids[start:start + CODE_PREFIX])
    return out, SamplingParams(max_tokens=CODE_NEW, temperature=0, ignore_eos=True)


@torch.no_grad()
def output_entropy(model, prompt: list[int], output: list[int]) -> tuple[float, int]:
    """(sum of next-token entropies at the positions predicting `output`, their count). Row r of the logits
    of prompt + output predicts token r + 1, so the output's tokens are predicted by rows P-1 .. P+O-2."""
    ids = torch.tensor([prompt + output[:-1]])
    logits = model(ids)[0, len(prompt) - 1:].float()
    logp = F.log_softmax(logits, -1)
    return float(-(logp.exp() * logp).sum(-1).sum()), logits.shape[0]


def fit(points: list[dict[str, float]]) -> dict[str, float]:
    use = [p for p in points if p["al"] < 4 and p["entropy"] > 0]
    x = np.log([p["entropy"] for p in use])
    y = np.log([1 - p["al"] / 4 for p in use])
    b, log_a = np.polyfit(x, y, 1)
    a = math.exp(log_a)
    al = np.array([p["al"] for p in points])
    pred = np.array([4 * (1 - a * p["entropy"] ** b) for p in points])
    r2 = 1 - float(((al - pred) ** 2).sum()) / float(((al - al.mean()) ** 2).sum())
    report = np.array([4 * (1 - REPORT_A * p["entropy"] ** REPORT_B) for p in points])
    r2_report = 1 - float(((al - report) ** 2).sum()) / float(((al - al.mean()) ** 2).sum())
    return {"a": a, "b": float(b), "r2": r2, "points_used": len(use), "r2_of_report_curve": r2_report}


def measure(model_dir: str, n: int, group: int) -> dict[str, Any]:
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    llm = LLM(model, tokenizer=tok, max_model_len=256, adaptive_drafting=False)
    corpus = load_corpus(max_bytes=2_000_000)
    points, no_step = [], 0
    for domain in (*task_lib.TASKS, "code"):
        prompts, sp = domain_prompts(tok, domain, n, corpus)
        for g in range(0, n, group):
            outs = llm.generate(prompts[g:g + group], sp)
            acc = sum(o.metrics.num_accepted for o in outs)
            steps = sum(o.metrics.num_verify_steps for o in outs)
            if not steps:  # every output ended at its first token (prefill only): no AL to measure
                no_step += 1
                continue
            ent = [output_entropy(model, o.prompt_token_ids, o.token_ids) for o in outs if o.token_ids]
            points.append({"domain": domain, "al": 1 + acc / steps, "entropy": sum(e for e, _ in ent) /
                           sum(c for _, c in ent), "tokens": sum(len(o.token_ids) for o in outs)})
    return {"model": model_dir, "drafts": model.n_mtp, "points": points, "groups_without_a_step": no_step,
            "fit": fit(points)}


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for d in dict.fromkeys(p["domain"] for p in res["points"]):
        pts = [p for p in res["points"] if p["domain"] == d]
        ax.scatter([p["entropy"] for p in pts], [p["al"] for p in pts], label=d)
    h = np.linspace(1e-3, max(p["entropy"] for p in res["points"]) * 1.1, 200)
    f = res["fit"]
    ax.plot(h, 4 * (1 - f["a"] * h ** f["b"]), "k-",
            label=f"fit a={f['a']:.2f} b={f['b']:.2f} R²={f['r2']:.3f}")
    ax.plot(h, 4 * (1 - REPORT_A * h ** REPORT_B), "k--", lw=0.8, label="report a=0.58 b=0.58")
    ax.set_xlabel("mean next-token entropy of the main model (nats)")
    ax.set_ylabel(f"acceptance length ({res['drafts']} drafts)")
    ax.set_ylim(1, 4)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--n", type=int, default=64, help="prompts per domain")
    p.add_argument("--group", type=int, default=16, help="prompts per point")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = measure(args.model, args.n, args.group)
    (out / "al-entropy.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, out / "al-entropy.png")
    return res


if __name__ == "__main__":
    main()
