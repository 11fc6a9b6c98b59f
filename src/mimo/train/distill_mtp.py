"""MTP head self-distillation: train the MTP heads to predict what the main model itself predicts.

Speculative decoding accepts a draft when it equals the main model's own choice, so the heads are most useful
when they imitate the main model rather than the data (EAGLE-style draft training). With the trunk, embedding
and lm_head frozen, head k at position t (inputs h_t and x_{t+k+1}) is trained with cross-entropy against the
main model's distribution for position t+k+2, i.e. softmax(main logits at row t+k+1), on packed code + chat
task data. The main model's outputs do not change (only `model.mtp.*` is updated), so engine output is the
same; only the acceptance length moves.

    python -m mimo.train.cli distill-mtp --model models/mimo-tiny --out models/mimo-tiny --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def distill_loss(model, x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """x [B, T] tokens -> (mean soft cross-entropy over heads, per-head agreement with the main argmax)."""
    T = x.shape[1]
    with torch.no_grad():
        h = model.forward_hidden(x)  # [B, T, D], pre-final-norm
        target = torch.softmax(model.logits(h).float(), -1)  # row s: main model's distribution for token s+1
    losses, agree = [], []
    for k in range(model.n_mtp):
        q = model.mtp_forward(k, h[:, : T - k - 1], x[:, k + 1:]).float()  # row t predicts token t+k+2
        p = target[:, k + 1:]  # the main model's distribution for token t+k+2
        losses.append(-(p * F.log_softmax(q, -1)).sum(-1).mean())
        agree.append(float((q.argmax(-1) == p.argmax(-1)).float().mean()))
    return torch.stack(losses).mean(), agree


def run(model_dir: str, out: str, steps: int, batch_size: int = 16, seq_len: int = 256, lr: float = 1e-3,
        task_mix: float = 0.3, seed: int = 0, log_every: int = 20) -> dict:
    from mimo.checkpoint import load_model, save_model
    from mimo.data import Tokenizer
    from mimo.data.corpus import load_corpus, mixed_documents
    from mimo.data.loader import PackedStream

    torch.manual_seed(seed)
    model = load_model(model_dir, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(model_dir)
    corpus = load_corpus()
    train = PackedStream(mixed_documents(corpus.texts("train"), mix=task_mix, seed=seed), tok, batch_size,
                         seq_len, seed=seed)
    val = PackedStream(mixed_documents(corpus.texts("val"), mix=task_mix, task_split="heldout", seed=seed), tok,
                       batch_size, seq_len, seed=seed, shuffle=False)
    val_batches = [next(val)[:, :-1] for _ in range(4)]
    for p in model.parameters():
        p.requires_grad_(False)
    heads = [p for p in model.model.mtp.parameters()]
    for p in heads:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(heads, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - 0.9 * s / steps))

    def agreement() -> list[float]:
        model.eval()
        with torch.no_grad():
            per = [distill_loss(model, b)[1] for b in val_batches]
        model.train()
        return [round(sum(a[k] for a in per) / len(per), 4) for k in range(model.n_mtp)]

    before = agreement()
    t0 = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        loss, agree = distill_loss(model, next(train)[:, :-1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "agree": [round(a, 3) for a in agree],
                              "seconds": round(time.perf_counter() - t0, 1)}), file=sys.stderr)
    after = agreement()
    model.eval()
    save_model(model, out)
    if Path(out).resolve() != Path(model_dir).resolve():
        tok.save(out)
    return {"steps": steps, "val_agreement_before": before, "val_agreement_after": after,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mimo distill-mtp", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model).is_dir():
        print(f"error: model directory not found: {args.model}", file=sys.stderr)
        return 2
    print(json.dumps(run(args.model, args.out, args.steps, args.batch_size, args.seq_len, args.lr)))
    return 0
