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
those generated rows are instead the model's own greedy answers to training-split chat task prompts, one
conversation per row, right-padded with the padding out of the loss: what the heads draft when the model
serves its tasks. Packed end to end instead, the previous conversation sits in the row's context (and in the
MTP block's 64-token window), which the engine never shows the heads: 600 steps so trained raised the heads'
agreement with the main model on held-out packed conversations but lowered it on single ones for reverse
(head 0 0.845 -> 0.802, head 2 0.785 -> 0.658), and the engine's acceptance length on reverse fell 2.97 -> 2.66.

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


def distill_loss(model, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """x [B, T] tokens -> (mean soft cross-entropy over heads, per-head agreement with the main argmax).

    mask [B, T] (None: all True) marks real tokens; right padding is False. Head k's row t reads x_{t+k+1} and
    the main model's distribution at position t+k+1, so it counts where mask[:, t+k+1]: e.g. T = 6, 4 real
    tokens, head 0 rows t = 0..4 read positions 1..5 and count for t = 0, 1, 2."""
    T = x.shape[1]
    with torch.no_grad():
        h = model.forward_hidden(x)  # [B, T, D], pre-final-norm
        target = torch.softmax(model.logits(h).float(), -1)  # row s: main model's distribution for token s+1
    losses, agree = [], []
    for k in range(model.n_mtp):
        q = model.mtp_forward(k, h[:, : T - k - 1], x[:, k + 1:]).float()  # row t predicts token t+k+2
        p = target[:, k + 1:]  # the main model's distribution for token t+k+2
        ce, hit = -(p * F.log_softmax(q, -1)).sum(-1), (q.argmax(-1) == p.argmax(-1)).float()
        m = torch.ones_like(ce) if mask is None else mask[:, k + 1:].float()
        n = m.sum().clamp_min(1.0)
        losses.append((ce * m).sum() / n)
        agree.append(float((hit * m).sum() / n))
    return torch.stack(losses).mean(), agree


def distill_objective(model, batch, weight: float = 1.0) -> LossOutput:
    """`distill_loss` on a batch's inputs (and mask), times `weight`, as a loss function for
    `step.forward_backward`."""
    loss, agree = distill_loss(model, batch.input_ids, batch.mask)
    return LossOutput(loss * weight, {"loss": loss.detach(),
                                      **{f"agree{k}": torch.tensor(a) for k, a in enumerate(agree)}})


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


def task_rows(model, tok, n_rows: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [n_rows, L], mask [n_rows, L]): chat task prompts of `split` (every task in turn), each followed by
    the model's own greedy answer up to its end-of-turn token, one conversation per row, right-padded with
    the padding token to the longest (mask False there). A thinking task's prompt asks for thinking in every
    other conversation (as evaluation poses it, `mimo.tasks.prompt_ids`) and not in the others (the server's
    default): the heads draft both kinds of answer."""
    from mimo import tasks as task_lib
    from mimo.engine import LLM, SamplingParams

    examples = task_lib.mixed_examples(-(-n_rows // len(task_lib.TASKS)), split, seed)[:n_rows]
    prompts = [task_lib.prompt_ids(tok, e, thinking=i % 2 == 0) for i, e in enumerate(examples)]
    llm = LLM(model, num_speculative_tokens=0, max_num_seqs=64,
              max_model_len=max(map(len, prompts)) + task_lib.MAX_NEW_TOKENS, max_num_batched_tokens=2048)
    outs = llm.generate(prompts, SamplingParams(max_tokens=task_lib.MAX_NEW_TOKENS, temperature=0,
                                                stop_token_ids=[tok.eos_id]))
    convs = [o.prompt_token_ids + o.token_ids for o in outs]
    L = max(map(len, convs))
    rows = torch.tensor([c + [tok.pad_id] * (L - len(c)) for c in convs])
    mask = torch.tensor([[True] * len(c) + [False] * (L - len(c)) for c in convs])
    return rows, mask


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
    n_task = round(generated_tasks * n_gen)  # of the generated rows of a batch, task conversations
    n_code = n_gen - n_task
    if n_gen:
        t = time.perf_counter()
        n_task_rows = round(generated_tasks * generated_rows_n)
        if n_code:
            gen = generated_rows(model, tok, corpus.texts("train"), generated_rows_n - n_task_rows, seq_len,
                                 seed=seed)
        if n_task:
            tasks, tasks_mask = task_rows(model, tok, n_task_rows, seed=seed)
            val_tasks = task_rows(model, tok, 4 * batch_size, "heldout", seed=seed)
        print(json.dumps({"generated_rows": generated_rows_n, "task_rows": n_task_rows,
                          "seconds": round(time.perf_counter() - t, 1)}), file=sys.stderr)
        gen_val = generated_rows(model, tok, corpus.texts("val"), batch_size, seq_len, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)

    def batches() -> list[tuple[Batch, float]]:
        """This step's batches and their loss weights (their share of the batch's rows): the packed rows with
        the generated code rows in them, and the task conversations as a batch of their own (its own width)."""
        rows = next(train)[:batch_size - n_task]
        if n_code:  # a generated row of `seq_len` tokens is a packed row's inputs
            rows[:n_code, :-1] = gen[torch.randint(gen.shape[0], (n_code,), generator=g)]
        out = [(Batch.from_packed(rows), rows.shape[0] / batch_size)]
        if n_task:
            pick = torch.randint(tasks.shape[0], (n_task,), generator=g)
            out.append((Batch(tasks[pick], tasks[pick], tasks_mask[pick]), n_task / batch_size))
        return out
    for p in model.parameters():
        p.requires_grad_(False)
    heads = [p for p in model.model.mtp.parameters()]
    for p in heads:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(heads, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - 0.9 * s / steps))

    def agreement(batches, mask=None) -> list[float]:
        model.eval()
        with torch.no_grad():
            per = [distill_loss(model, b, mask)[1] for b in batches]
        model.train()
        return [round(sum(a[k] for a in per) / len(per), 4) for k in range(model.n_mtp)]

    before = agreement(val_batches)
    before_gen = agreement([gen_val]) if n_gen else None
    before_tasks = agreement([val_tasks[0]], val_tasks[1]) if n_task else None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ms = [(forward_backward(model, b, lambda mo, ba, w=w: distill_objective(mo, ba, w)).metrics, w)
              for b, w in batches()]
        m = {key: sum(float(x[key]) * w for x, w in ms) for key in ms[0][0]}
        optimizer_step(model, opt, sched, m["loss"], 1.0, step - 1)
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
        res.update(generated_fraction=generated, val_generated_agreement_before=before_gen,
                   val_generated_agreement_after=agreement([gen_val]))
    if n_task:  # on single held-out task conversations (answers and prompts)
        res.update(generated_rows=generated_rows_n, generated_tasks=generated_tasks,
                   val_task_agreement_before=before_tasks,
                   val_task_agreement_after=agreement([val_tasks[0]], val_tasks[1]))
    return res

