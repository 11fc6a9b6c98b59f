"""MTP head self-distillation: train the MTP heads to predict what the main model itself predicts.

Speculative decoding accepts a draft when it equals the main model's own choice, so the heads are most useful
when they imitate the main model rather than the data (EAGLE-style draft training). With the trunk, embedding
and lm_head frozen, head k at position t (inputs h_t and x_{t+k+1}) is trained with cross-entropy against the
main model's distribution for position t+k+2, i.e. softmax(main logits at row t+k+1), on packed code + chat
task data. The main model's outputs do not change (only `model.mtp.*` is updated), so engine output is the
same; only the acceptance length moves.

With `--generated F`, a fraction F of every batch is the model's own greedy continuations of training-split
code (prompt: a random 32-token span of a training file), generated once up front with the engine: the text
the heads must draft at serving time (greedy decoding) rather than human-written code, as EAGLE and
Medusa-2 train their draft heads on the target model's own outputs. With `--generated-tasks G`, a share G of
those generated rows are instead the model's own greedy answers to training-split chat task prompts, packed
end to end (prompt, answer, next prompt, ...): what the heads draft when the model serves its tasks.

The step is the shared trainer's (`step.forward_backward` with `distill_objective`, `step.optimizer_step`).

    mimo distill-mtp --model models/mimo-tiny --out models/mimo-tiny --steps 200
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import Batch
from .step import LossOutput, forward_backward, optimizer_step

GENERATED_PROMPT_LEN = 32  # tokens of training text each generated row continues


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


def distill_objective(model, batch) -> LossOutput:
    """`distill_loss` on a packed batch's inputs, as a loss function for `step.forward_backward`."""
    loss, agree = distill_loss(model, batch.input_ids)
    return LossOutput(loss, {"loss": loss.detach(), **{f"agree{k}": torch.tensor(a) for k, a in enumerate(agree)}})


def generated_rows(model, tok, texts: list[str], n_rows: int, length: int, prompt_len: int = GENERATED_PROMPT_LEN,
                   seed: int = 0) -> torch.Tensor:
    """[n_rows, length] token rows: a random prompt_len-token span of a random text, then the model's own
    greedy continuation (engine, no drafts, end-of-sequence ignored)."""
    from mimo.engine import LLM, SamplingParams

    g = torch.Generator().manual_seed(seed)
    encoded: dict[int, list[int]] = {}  # a text drawn twice is tokenised once
    prompts = []
    while len(prompts) < n_rows:
        i = int(torch.randint(len(texts), (1,), generator=g))
        ids = encoded[i] if i in encoded else encoded.setdefault(i, tok.encode(texts[i]))
        if len(ids) > prompt_len:
            a = int(torch.randint(len(ids) - prompt_len, (1,), generator=g))
            prompts.append(ids[a:a + prompt_len])
    llm = LLM(model, num_speculative_tokens=0, max_num_seqs=64, max_model_len=length + 1,
              max_num_batched_tokens=2048)
    sp = SamplingParams(max_tokens=length - prompt_len, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, sp)
    return torch.tensor([o.prompt_token_ids + o.token_ids for o in outs])


def task_rows(model, tok, n_rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """[n_rows, length] token rows: training-split chat task prompts (every task in turn), each followed by the
    model's own greedy answer up to its end-of-turn token, packed end to end; a conversation that does not fit
    a row's end continues on the next row."""
    from mimo import tasks as task_lib
    from mimo.engine import LLM, SamplingParams

    # ~60 tokens a conversation (prompt ~25, answer with its think block ~35): enough for n_rows at 30
    examples = task_lib.mixed_examples(n_rows * length // (30 * len(task_lib.TASKS)) + 1, "train", seed)
    prompts = [task_lib.prompt_ids(tok, e) for e in examples]
    llm = LLM(model, num_speculative_tokens=0, max_num_seqs=64,
              max_model_len=max(map(len, prompts)) + task_lib.MAX_NEW_TOKENS, max_num_batched_tokens=2048)
    outs = llm.generate(prompts, SamplingParams(max_tokens=task_lib.MAX_NEW_TOKENS, temperature=0,
                                                stop_token_ids=[tok.eos_id]))
    stream = [t for o in outs for t in o.prompt_token_ids + o.token_ids]
    if len(stream) < n_rows * length:
        raise ValueError(f"{len(outs)} task conversations gave {len(stream)} tokens, fewer than {n_rows} rows "
                         f"of {length}")
    return torch.tensor(stream[:n_rows * length]).view(n_rows, length)


def run(model_dir: str, out: str, steps: int, batch_size: int = 16, seq_len: int = 256, lr: float = 1e-3,
        task_mix: float = 0.3, seed: int = 0, log_every: int = 20, generated: float = 0.0,
        generated_rows_n: int = 512, generated_tasks: float = 0.0) -> dict:
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
    n_gen = round(generated * batch_size)
    if n_gen:
        t = time.perf_counter()
        n_tasks = round(generated_tasks * generated_rows_n)
        gen = torch.cat([generated_rows(model, tok, corpus.texts("train"), n, seq_len, seed=seed)
                         if code else task_rows(model, tok, n, seq_len, seed=seed)
                         for code, n in ((True, generated_rows_n - n_tasks), (False, n_tasks)) if n])
        print(json.dumps({"generated_rows": gen.shape[0], "tokens": gen.numel(),
                          "seconds": round(time.perf_counter() - t, 1)}), file=sys.stderr)
        gen_val = generated_rows(model, tok, corpus.texts("val"), batch_size, seq_len, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)

    def batch() -> Batch:
        rows = next(train)
        if n_gen:  # a generated row of `seq_len` tokens is a packed row's inputs
            rows[:n_gen, :-1] = gen[torch.randint(gen.shape[0], (n_gen,), generator=g)]
        return Batch.from_packed(rows)
    for p in model.parameters():
        p.requires_grad_(False)
    heads = [p for p in model.model.mtp.parameters()]
    for p in heads:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(heads, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - 0.9 * s / steps))

    def agreement(batches) -> list[float]:
        model.eval()
        with torch.no_grad():
            per = [distill_loss(model, b)[1] for b in batches]
        model.train()
        return [round(sum(a[k] for a in per) / len(per), 4) for k in range(model.n_mtp)]

    before = agreement(val_batches)
    before_gen = agreement([gen_val]) if n_gen else None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        m = forward_backward(model, batch(), distill_objective).metrics
        optimizer_step(model, opt, sched, float(m["loss"]), 1.0, step - 1)
        if step % log_every == 0 or step == steps:
            agree = [round(float(m[f"agree{k}"]), 3) for k in range(model.n_mtp)]
            print(json.dumps({"step": step, "loss": round(float(m["loss"]), 4), "agree": agree,
                              "seconds": round(time.perf_counter() - t0, 1)}), file=sys.stderr)
    after = agreement(val_batches)
    model.eval()
    save_model(model, out)
    if Path(out).resolve() != Path(model_dir).resolve():
        tok.save(out, model_max_length=model.config.max_position_embeddings)
    res = {"steps": steps, "val_agreement_before": before, "val_agreement_after": after,
           "seconds": round(time.perf_counter() - t0, 1)}
    if n_gen:  # on greedy continuations of held-out files: what the engine's drafts face
        res.update(generated_fraction=generated, generated_rows=generated_rows_n, generated_tasks=generated_tasks,
                   val_generated_agreement_before=before_gen,
                   val_generated_agreement_after=agreement([gen_val]))
    return res

