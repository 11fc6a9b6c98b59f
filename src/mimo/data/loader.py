"""Batches for pretraining (`PackedStream`) and SFT (`SFTLoader`): deterministic, resumable, rank-sharded.

Shared conventions:
- `batch_size` is the *global* batch B. Rank r of W gets the contiguous rows [r * B/W, (r + 1) * B/W) of the
  batch a single process would produce, so concatenating the ranks' batches in rank order gives exactly the
  single-process batch (and the equal-weight mean of per-rank losses equals the global loss for packed
  batches).
- The state (`state_dict()`) is a global position, the same on every rank: a checkpoint written by rank 0
  resumes every rank, even with another world size (same B).
- Order is shuffled per epoch with numpy's PCG64 seeded by (seed, epoch); epochs follow each other seamlessly
  (a batch may hold the end of one epoch and the start of the next).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch

from mimo.data.tokenizer import Message, Tokenizer

IGNORE_INDEX = -100


def _check_shard(batch_size: int, rank: int, world_size: int) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(
            f"global batch_size {batch_size} must be a positive multiple of world_size {world_size}"
        )
    return batch_size // world_size


def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def tokenize_documents(
    documents: Sequence[str], tokenizer: Tokenizer, max_tokens: int | None = None, chunk: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets): every document's ids followed by `<|endoftext|>`, concatenated; document i is
    tokens[offsets[i]:offsets[i + 1]]. With `max_tokens`, tokenisation stops once that many tokens exist and
    the last document is cut, so `len(tokens) <= max_tokens`.

    Ids are stored as uint16 when the vocabulary fits (half the memory of int32: the stdlib is ~4M tokens).
    """
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    total = 0
    for start in range(0, len(documents), chunk):
        for ids in tokenizer.encode_batch(documents[start : start + chunk]):
            ids.append(tokenizer.eot_id)
            if max_tokens is not None and total + len(ids) > max_tokens:
                ids = ids[: max_tokens - total]
            if ids:
                pieces.append(np.asarray(ids, dtype=dtype))
                lengths.append(len(ids))
                total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if not total:
        raise ValueError("no tokens: the document list is empty")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.concatenate(pieces), offsets


class PackedStream:
    """An endless stream of packed pretraining batches, each a LongTensor [B/W, T+1].

    Documents (ids + `<|endoftext|>`) are concatenated in a per-epoch shuffled order into one stream S. Global
    batch k covers S[k*B*T : k*B*T + B*T + 1], row i being S[k*B*T + i*T : k*B*T + i*T + T + 1]: rows overlap
    by one token, so every token is a target exactly once. Use `batch[:, :-1]` as inputs, `batch[:, 1:]` as
    targets. Example, B=2, T=3: batch 0 rows are S[0:4], S[3:7]; batch 1 rows S[6:10], S[9:13].
    """

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: int | None = None,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.local_batch_size = _check_shard(batch_size, rank, world_size)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.tokens, self.doc_offsets = tokenize_documents(documents, tokenizer, max_tokens)
        self.epoch = 0
        self.offset = 0  # start of the next global batch within the current epoch's stream
        self._cache: dict[int, np.ndarray] = {}

    @property
    def n_documents(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.tokens)

    def _epoch_tokens(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            perm = _permutation(self.n_documents, self.seed, epoch, self.shuffle)
            o = self.doc_offsets
            arr = np.concatenate([self.tokens[o[i] : o[i + 1]] for i in perm])
            # Keep neighbours only: a batch crosses into the next epoch at most once (unless an epoch is
            # shorter than a batch, when recomputing is cheap anyway); reset() drops the later ones.
            self._cache = {e: a for e, a in self._cache.items() if abs(e - epoch) <= 1}
            self._cache[epoch] = arr
        return self._cache[epoch]

    def _read(self, epoch: int, offset: int, n: int) -> np.ndarray:
        length = self.tokens_per_epoch
        epoch, offset = epoch + offset // length, offset % length
        parts = []
        while n > 0:
            take = min(n, length - offset)
            parts.append(self._epoch_tokens(epoch)[offset : offset + take])
            n -= take
            epoch, offset = epoch + 1, 0
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        b, T = self.local_batch_size, self.seq_len
        buf = self._read(self.epoch, self.offset + self.rank * b * T, b * T + 1)
        rows = np.arange(b)[:, None] * T + np.arange(T + 1)[None, :]  # [b, T+1] indices into buf
        batch = torch.from_numpy(buf[rows].astype(np.int64))
        n_epochs, self.offset = divmod(self.offset + self.batch_size * T, self.tokens_per_epoch)
        self.epoch += n_epochs
        return batch

    def reset(self) -> None:
        """Back to the first batch (e.g. to evaluate on the same validation batches every time)."""
        self.epoch, self.offset = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "tokens_per_epoch": self.tokens_per_epoch,
            "n_documents": self.n_documents,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at `state`; ValueError if it was written for other data or another batch geometry."""
        for key in ("seed", "shuffle", "seq_len", "batch_size", "tokens_per_epoch", "n_documents"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"stream state has {key}={state[key]!r}, this stream has {getattr(self, key)!r}"
                )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class SFTLoader:
    """An endless stream of loss-masked chat batches: dicts of [B/W, L] tensors

    - `input_ids` (int64): ids[:-1] of each conversation, right-padded with `pad_id`;
    - `targets` (int64): ids[1:], with IGNORE_INDEX (-100) wherever the loss is off, padding included;
    - `loss_mask` (float32): 1.0 where the target is an assistant token, else 0.0.

    Assistant tokens are those of `Tokenizer.encode_chat_with_mask`: each assistant answer and its closing
    `<|im_end|>` (plus the reasoning, when a message carries `reasoning_content`). The role header, the empty
    `<think>\\n\\n</think>\\n\\n` block and the newline after `<|im_end|>` are prompt: at inference they are
    given, never generated. L is the longest conversation in the *global* batch minus one, so every rank pads
    to the same length and ranks' rows concatenate to the single-process batch. Conversations longer than
    `max_len + 1` tokens are cut to that length.

    Conversations are rendered with thinking off unless `enable_thinking` (which only changes a trailing
    generation prompt; conversations ending with an assistant turn get none). `encode(conversation) -> (ids,
    mask)` replaces that rendering (e.g. to tokenize answers differently); it must follow the same mask
    convention.

    `group_by_length`: each epoch's shuffled order is cut into windows of 64 batches; a window is sorted by
    length and its batches are put in a shuffled order, so a batch holds conversations of similar length
    (less padding: mixed task lengths otherwise pad most rows to twice their size) while the sequence of
    batches stays random.

    NOTE: ranks hold different numbers of supervised tokens; for a loss averaged over all supervised tokens of
    the global batch, sum per-rank losses and all-reduce the token count (`loss_mask.sum()`) before dividing.
    """

    def __init__(
        self,
        conversations: Sequence[Sequence[Message]],
        tokenizer: Tokenizer,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        max_len: int | None = None,
        enable_thinking: bool = False,
        encode: Callable[[Sequence[Message]], tuple[list[int], list[bool]]] | None = None,
        group_by_length: bool = False,
    ):
        if not conversations:
            raise ValueError("no conversations")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.local_batch_size = _check_shard(batch_size, rank, world_size)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.group_by_length = group_by_length
        self.rank, self.world_size, self.pad_id = rank, world_size, tokenizer.pad_id
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        for conv in conversations:
            if encode is None:
                ids, mask = tokenizer.encode_chat_with_mask(conv, enable_thinking=enable_thinking)
            else:
                ids, mask = encode(conv)
            if len(ids) < 2:
                raise ValueError(f"conversation too short to train on: {conv!r}")
            cut = len(ids) if max_len is None else max_len + 1
            self.ids.append(np.asarray(ids[:cut], dtype=np.int64))
            self.masks.append(np.asarray(mask[:cut], dtype=bool))
        self.epoch = 0
        self.index = 0  # position of the next global batch's first conversation within the epoch order
        self._perm_cache: tuple[int, np.ndarray] | None = None

    @property
    def n_conversations(self) -> int:
        return len(self.ids)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n_conversations // self.batch_size)

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = _permutation(self.n_conversations, self.seed, epoch, self.shuffle)
            if self.group_by_length:
                perm = self._group_by_length(perm, epoch)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def _group_by_length(self, perm: np.ndarray, epoch: int) -> np.ndarray:
        lengths = np.fromiter((len(self.ids[i]) for i in perm), dtype=np.int64, count=len(perm))
        rng = np.random.default_rng([self.seed, epoch, 1])
        window = 64 * self.batch_size
        out = []
        for start in range(0, len(perm), window):
            chunk = perm[start : start + window][np.argsort(lengths[start : start + window], kind="stable")]
            batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            out.extend(batches[j] for j in rng.permutation(len(batches)))
        return np.concatenate(out)

    def _next_indices(self) -> list[int]:
        """The global batch's conversation indices; advances the position."""
        out: list[int] = []
        while len(out) < self.batch_size:
            take = min(self.batch_size - len(out), self.n_conversations - self.index)
            out.extend(self._perm(self.epoch)[self.index : self.index + take].tolist())
            self.index += take
            if self.index == self.n_conversations:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self._next_indices()
        L = max(len(self.ids[i]) for i in batch) - 1
        b = self.local_batch_size
        mine = batch[self.rank * b : (self.rank + 1) * b]
        input_ids = np.full((b, L), self.pad_id, dtype=np.int64)
        targets = np.full((b, L), IGNORE_INDEX, dtype=np.int64)
        loss_mask = np.zeros((b, L), dtype=np.float32)
        for row, i in enumerate(mine):
            ids, mask = self.ids[i], self.masks[i]
            n = len(ids) - 1
            input_ids[row, :n] = ids[:-1]
            targets[row, :n] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            loss_mask[row, :n] = mask[1:]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "targets": torch.from_numpy(targets),
            "loss_mask": torch.from_numpy(loss_mask),
        }

    def reset(self) -> None:
        self.epoch, self.index = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "n_conversations": self.n_conversations,
            "group_by_length": self.group_by_length,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = {"group_by_length": False, **state}  # states written before the option existed
        for key in ("seed", "shuffle", "batch_size", "n_conversations", "group_by_length"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]!r}, this loader has {getattr(self, key)!r}"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def sft_batches(
    conversations: Sequence[Sequence[Message]],
    tokenizer: Tokenizer,
    batch_size: int,
    num_batches: int | None = None,
    **kwargs: Any,
) -> Iterator[dict[str, torch.Tensor]]:
    """`num_batches` batches of an `SFTLoader` (endless when None); `kwargs` go to `SFTLoader`."""
    yield from islice(SFTLoader(conversations, tokenizer, batch_size, **kwargs), num_batches)
