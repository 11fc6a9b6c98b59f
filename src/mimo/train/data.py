"""The batches a training stage sees, built from `mimo.data` (corpus, tokenizer, PackedStream, SFTLoader).

- pretrain / mtp: stdlib code mixed with chat-rendered task examples (`task_fraction` of the characters),
  packed into rows of `seq_len + 1` tokens; every target counts. Validation: the corpus' validation files
  mixed with held-out task examples, the first `eval_batches` packed batches (fixed, unshuffled).
- sft: task conversations from the train split, loss only on assistant tokens; optionally one packed code
  micro-batch per step (full loss) weighted `code_fraction` in the objective. Validation: held-out
  conversations.

`cfg.batch_size` is the *global* micro-batch (all ranks together); rank r of W gets its contiguous block of
rows (the loaders' convention), so W ranks see exactly the single-process batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimo import tasks as task_lib
from mimo.data import IGNORE_INDEX, CorpusInfo, PackedStream, SFTLoader, Tokenizer, load_corpus, mixed_documents
from mimo.data.tokenizer import THINK_END

from .config import TrainConfig

# SFT draws this many distinct train conversations per task (the prompt spaces are large; repeats are fine)
SFT_EXAMPLES_PER_TASK = 70_000
VAL_EXAMPLES_PER_TASK = 64


class DataError(ValueError):
    """The data a config asks for cannot be built (missing corpus directory, bad tokenizer, ...)."""


@dataclass
class Batch:
    """What a loss function (train/step.py) gets. The LM objectives use the first three fields; RL fills the
    rest from rollouts (mimo.posttrain.rollout)."""

    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64; labels[:, t] = input_ids[:, t + 1] of the unshifted row
    mask: torch.Tensor | None  # [B, T] bool: where the loss is on; None = everywhere
    advantages: torch.Tensor | None = None  # [B] float32, one per sequence
    old_logprobs: torch.Tensor | None = None  # [B, T] float32: the sampler's log-prob of labels[:, t]
    loss_weights: torch.Tensor | None = None  # [B] float32, e.g. 1 / |y_i| (per-sequence normalisation)
    routed_experts: torch.Tensor | None = None  # [B, T, n_moe_layers, K]: experts chosen at input position t

    @classmethod
    def from_packed(cls, rows: torch.Tensor) -> Batch:
        return cls(rows[:, :-1], rows[:, 1:], None)

    @classmethod
    def from_sft(cls, d: dict[str, torch.Tensor]) -> Batch:
        mask = d["targets"] != IGNORE_INDEX
        # ignored targets become 0 so cross-entropy needs no ignore_index; the mask zeroes them out
        return cls(d["input_ids"], d["targets"].clamp_min(0), mask)

    def n_targets(self, shift: int = 0) -> int:
        """Loss-carrying labels at columns >= shift (shift k + 1 for MTP head k)."""
        if self.mask is None:
            return self.labels.shape[0] * max(self.labels.shape[1] - shift, 0)
        return int(self.mask[:, shift:].sum())


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_pretrained(path)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None


def build_corpus(cfg: TrainConfig):
    try:
        return load_corpus(cfg.corpus, max_bytes=cfg.corpus_max_bytes)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None


def train_tokenizer(corpus, cfg: TrainConfig, vocab_size: int) -> Tokenizer:
    """A BPE tokenizer of at most `vocab_size` ids trained on the training code plus task documents (so
    digits, letters and the chat markup are all well represented)."""
    texts = mixed_documents(corpus.texts("train"), mix=max(cfg.task_fraction, 0.05), seed=cfg.seed,
                            tasks=cfg.tasks or task_lib.TASKS)
    return Tokenizer.train(texts, vocab_size=vocab_size)


def sft_train_examples(cfg: TrainConfig, task_weights: Sequence[tuple[str, float]] | None = None
                       ) -> list[task_lib.Example]:
    """The SFT stage's training examples: one epoch's worth of distinct examples (capped per task at
    SFT_EXAMPLES_PER_TASK; repeats only beyond that), equal per task or in `task_weights` shares."""
    total = cfg.steps * cfg.batch_size * cfg.grad_accum
    if task_weights is None:
        n_per_task = min(SFT_EXAMPLES_PER_TASK, -(-total // len(cfg.tasks)))
        return task_lib.mixed_examples(n_per_task, "train", cfg.seed, cfg.tasks)
    weights = dict(task_weights)
    if set(weights) != set(cfg.tasks) or any(w <= 0 for w in weights.values()):
        raise DataError(f"task_weights {task_weights} must give every task of {cfg.tasks} a positive share")
    norm = sum(weights.values())
    # the loader shuffles, so the per-task lists need no interleaving
    return [ex for t in cfg.tasks for ex in task_lib.generate_examples(
        t, min(SFT_EXAMPLES_PER_TASK, math.ceil(total * weights[t] / norm)), "train", cfg.seed)]


def spelled_answer_encoder(tokenizer: Tokenizer):
    """`SFTLoader`'s encode: the usual chat rendering and mask, with the supervised span (the assistant's
    reasoning, if any, and answer) re-tokenized one character per token, `</think>` kept as its one token.
    The prompt part is untouched, so it is exactly what inference feeds the model."""
    def encode(conv):
        ids, mask = tokenizer.encode_chat_with_mask(conv)
        first = mask.index(True)
        # the supervised span is the answer followed by <|im_end|> (the loader's mask convention)
        end = first + mask[first:].index(False) - 1 if False in mask[first:] else len(mask) - 1
        pieces = tokenizer.decode(ids[first:end]).split(THINK_END)
        spelled = [i for ch in pieces[0] for i in tokenizer.encode(ch)]
        for piece in pieces[1:]:
            spelled += [tokenizer.think_end_id] + [i for ch in piece for i in tokenizer.encode(ch)]
        return ids[:first] + spelled + ids[end:], mask[:first] + [True] * len(spelled) + mask[end:]

    return encode


def packed_val_batches(cfg: TrainConfig, tokenizer: Tokenizer, corpus) -> list[Batch]:
    """The pretrain/mtp validation batches of `cfg`: the corpus' validation files mixed with held-out task
    examples (`task_fraction` of the characters), the first `eval_batches` packed batches, unshuffled. Every
    rank evaluates the same full batches, so the numbers match one process."""
    val_docs = mixed_documents(corpus.texts("val"), mix=cfg.task_fraction, task_split="heldout", seed=cfg.seed,
                               tasks=cfg.tasks)
    # a fixed sample of the whole mixture (mixed_documents lists code first, tasks last)
    random.Random(cfg.seed).shuffle(val_docs)
    val = PackedStream(val_docs, tokenizer, cfg.batch_size, cfg.seq_len, shuffle=False,
                       max_tokens=cfg.eval_batches * cfg.batch_size * cfg.seq_len + 1)
    return [Batch.from_packed(next(val)) for _ in range(cfg.eval_batches)]


class StageData:
    """Training stream + fixed validation batches of one stage, with a resumable position."""

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, corpus, rank: int = 0, world_size: int = 1):
        self.cfg, self.tokenizer, self.corpus = cfg, tokenizer, corpus
        self.info: CorpusInfo | None = corpus.info if corpus is not None else None
        if cfg.batch_size % world_size:
            raise DataError(f"batch_size {cfg.batch_size} must be a multiple of the world size {world_size}")
        kw = dict(rank=rank, world_size=world_size)
        tasks = cfg.tasks
        self.code: PackedStream | None = None
        self.sft: SFTLoader | None = None
        if cfg.stage == "sft":
            opts = cfg.sft_data
            convs = [task_lib.to_messages(ex, reasoning=opts.reasoning)
                     for ex in sft_train_examples(cfg, opts.task_weights)]
            encode = spelled_answer_encoder(tokenizer) if opts.spell_answers else None
            self.sft = SFTLoader(convs, tokenizer, cfg.batch_size, seed=cfg.seed, max_len=cfg.seq_len,
                                 encode=encode, group_by_length=opts.group_by_length, **kw)
            if cfg.code_fraction > 0:
                docs = corpus.texts("train")
                if opts.replay_task_fraction > 0:
                    docs = mixed_documents(docs, mix=opts.replay_task_fraction, seed=cfg.seed, tasks=tasks)
                self.code = PackedStream(docs, tokenizer, cfg.sft_code_rows, cfg.seq_len, seed=cfg.seed, **kw)
            val_convs = [task_lib.to_messages(ex, reasoning=opts.reasoning) for ex in task_lib.mixed_examples(
                VAL_EXAMPLES_PER_TASK, "heldout", cfg.seed, tasks)]
            val = SFTLoader(val_convs, tokenizer, cfg.batch_size, shuffle=False, max_len=cfg.seq_len,
                            encode=encode)
            self.val = [Batch.from_sft(next(val)) for _ in range(min(cfg.eval_batches, val.batches_per_epoch))]
        else:
            docs = mixed_documents(corpus.texts("train"), mix=cfg.task_fraction, seed=cfg.seed, tasks=tasks)
            self.code = PackedStream(docs, tokenizer, cfg.batch_size, cfg.seq_len, seed=cfg.seed, **kw)
            self.val = packed_val_batches(cfg, tokenizer, corpus)

    def next_micro_batches(self) -> tuple[list[Batch], Batch | None]:
        """The grad_accum micro-batches of the next optimizer step (this rank's rows), plus the SFT code
        micro-batch (None outside SFT)."""
        if self.sft is not None:
            micro = [Batch.from_sft(next(self.sft)) for _ in range(self.cfg.grad_accum)]
            code = Batch.from_packed(next(self.code)) if self.code is not None else None
            return micro, code
        return [Batch.from_packed(next(self.code)) for _ in range(self.cfg.grad_accum)], None

    def state_dict(self) -> dict[str, Any]:
        return {"sft": self.sft.state_dict() if self.sft is not None else None,
                "code": self.code.state_dict() if self.code is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, obj in (("sft", self.sft), ("code", self.code)):
            if (state.get(key) is None) != (obj is None):
                raise DataError(f"data state mismatch: checkpoint has {key}={state.get(key)!r}")
            if obj is not None:
                obj.load_state_dict(state[key])
