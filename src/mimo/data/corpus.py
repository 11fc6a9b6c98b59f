"""Pretraining text: the Python source of the running interpreter's standard library, plus rendered tasks.

Which files (`load_corpus`):
- every `*.py` under `sysconfig.get_paths()["stdlib"]` (or an explicit `root`), walked in sorted order;
- skipped: `site-packages`/`dist-packages` (third-party code), `__pycache__`, `_sysconfigdata*` (build
  settings of this machine, so the corpus hash would differ between installs), files that are not valid
  UTF-8, and empty files;
- test directories (`test`, `tests`, `idle_test`) are skipped unless `include_tests=True`: in CPython 3.11
  they are ~60% of the bytes and full of fixtures, generated tables and deliberately odd encodings; the
  library itself (~12 MB) is plenty for a 4k-vocabulary model.

Train/validation split, by file: `relpath` is in validation iff int(sha256(relpath)[:16], 16) % 10_000 <
round(val_fraction * 10_000). Membership is a function of the path alone, so limiting the corpus (`max_files`,
`max_bytes`) never moves a file from one split to the other.

Limits pick files in a fixed pseudo-random order (sha256 of "order/" + relpath), giving each split its share
(val_fraction for validation) and at least one file each, so a small corpus is a spread-out sample of the
library rather than its alphabetical beginning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mimo import tasks as task_lib
from mimo.data.tokenizer import render_chat

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_HASH_MOD = 10_000


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root, '/'-separated
    text: str


@dataclass(frozen=True)
class CorpusInfo:
    """What a run was trained on; written as JSON next to every run (`save`)."""

    source: str  # "python-stdlib" or "directory"
    root_name: str  # last component of the root (never the full path)
    python_version: str
    n_files_train: int
    n_files_val: int
    bytes_train: int
    bytes_val: int
    n_skipped_undecodable: int
    # sha256 over "relpath\tsha256(content)\n" lines of every selected file, sorted by relpath
    sha256: str
    split_rule: str
    val_fraction: float
    include_tests: bool
    max_files: int | None
    max_bytes: int | None

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CorpusInfo:
        return cls(**json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class Corpus:
    train: list[Document]
    val: list[Document]
    info: CorpusInfo

    def texts(self, split: str = "train") -> list[str]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return [d.text for d in (self.train if split == "train" else self.val)]


def stdlib_dir() -> Path:
    """The standard-library directory of the running interpreter (also inside a virtualenv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _hash_int(s: str) -> int:
    return int(hashlib.sha256(s.encode("utf-8")).hexdigest()[:16], 16)


def is_val_file(relpath: str, val_fraction: float) -> bool:
    """The split rule: see the module docstring."""
    return _hash_int(relpath) % _HASH_MOD < round(val_fraction * _HASH_MOD)


def list_files(root: str | Path | None = None, include_tests: bool = False) -> list[str]:
    """Sorted '/'-separated relative paths of the candidate `*.py` files under `root` (default: stdlib)."""
    base = Path(root) if root is not None else stdlib_dir()
    if not base.is_dir():
        raise FileNotFoundError(f"corpus directory not found: {base}")
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        rel_dir = Path(dirpath).relative_to(base)
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                out.append((rel_dir / f).as_posix())
    return sorted(out)


def _select(
    base: Path, relpaths: list[str], max_files: int | None, max_bytes: int | None
) -> tuple[list[Document], int]:
    """Read `relpaths` in the fixed pseudo-random order until a limit is reached; always at least one file.
    Returns the documents (sorted by name) and the number of files skipped as undecodable."""
    order = sorted(relpaths, key=lambda p: hashlib.sha256(f"order/{p}".encode()).digest())
    docs: list[Document] = []
    n_bytes = n_bad = 0
    for rel in order:
        if max_files is not None and len(docs) >= max_files:
            break
        path = base / rel
        if max_bytes is not None and docs and n_bytes + path.stat().st_size > max_bytes:
            continue  # greedy fill: a smaller file further on may still fit
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            n_bad += 1
            continue
        if not text.strip():
            continue
        docs.append(Document(rel, text))
        n_bytes += len(raw)
    return sorted(docs, key=lambda d: d.name), n_bad


def load_corpus(
    root: str | Path | None = None,
    *,
    val_fraction: float = 0.05,
    max_files: int | None = None,
    max_bytes: int | None = None,
    include_tests: bool = False,
) -> Corpus:
    """Load the corpus (default: this interpreter's stdlib) split by file into train and validation.

    `max_files` / `max_bytes` bound the whole corpus; validation gets `val_fraction` of each bound (at least
    one file), train the rest. A missing `root` raises FileNotFoundError naming it.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    base = Path(root) if root is not None else stdlib_dir()
    relpaths = list_files(base, include_tests)
    if not relpaths:
        raise ValueError(f"no *.py files under the corpus directory {base}")
    val_paths = [p for p in relpaths if is_val_file(p, val_fraction)]
    train_paths = [p for p in relpaths if not is_val_file(p, val_fraction)]

    def share(limit: int | None, frac: float) -> int | None:
        return None if limit is None else max(1, math.floor(limit * frac))

    val_files, val_bytes = share(max_files, val_fraction), share(max_bytes, val_fraction)
    train_files = None if max_files is None else max(1, max_files - (val_files or 0))
    train_bytes = None if max_bytes is None else max(1, max_bytes - (val_bytes or 0))
    train, bad_t = _select(base, train_paths, train_files, train_bytes)
    val, bad_v = _select(base, val_paths, val_files, val_bytes)

    digest = hashlib.sha256()
    for d in sorted(train + val, key=lambda d: d.name):
        digest.update(f"{d.name}\t{hashlib.sha256(d.text.encode('utf-8')).hexdigest()}\n".encode())
    info = CorpusInfo(
        source="python-stdlib" if root is None else "directory",
        root_name=base.name,
        python_version=platform.python_version(),
        n_files_train=len(train),
        n_files_val=len(val),
        bytes_train=sum(len(d.text.encode("utf-8")) for d in train),
        bytes_val=sum(len(d.text.encode("utf-8")) for d in val),
        n_skipped_undecodable=bad_t + bad_v,
        sha256=digest.hexdigest(),
        split_rule=(
            f"val iff int(sha256(relpath)[:16], 16) % {_HASH_MOD} < {round(val_fraction * _HASH_MOD)}"
        ),
        val_fraction=val_fraction,
        include_tests=include_tests,
        max_files=max_files,
        max_bytes=max_bytes,
    )
    return Corpus(train, val, info)


def task_documents(
    n_per_task: int, split: str = "train", seed: int = 0, tasks: Sequence[str] = task_lib.TASKS
) -> list[str]:
    """Task examples rendered as complete chat turns (thinking off), one document each: the exact text an SFT
    example has, so pretraining already teaches the prompt format."""
    return [
        render_chat(task_lib.to_messages(ex), add_generation_prompt=False)
        for ex in task_lib.mixed_examples(n_per_task, split, seed, tasks)
    ]


def mixed_documents(
    code: Sequence[str],
    mix: float = 0.1,
    task_split: str = "train",
    seed: int = 0,
    tasks: Sequence[str] = task_lib.TASKS,
) -> list[str]:
    """Code documents followed by chat-rendered task documents making up about `mix` of all characters.

    With `mix` = m and C code characters, about m / (1 - m) * C characters of task examples are added, the
    same number of examples per task. Use `task_split="heldout"` for a validation mixture. The order is not
    shuffled: `PackedStream` shuffles documents every epoch.
    """
    if not 0.0 <= mix < 1.0:
        raise ValueError(f"mix must be in [0, 1), got {mix}")
    docs = list(code)
    if mix == 0.0 or not tasks:
        return docs
    target = mix / (1.0 - mix) * sum(len(d) for d in docs)
    probe = task_documents(16, task_split, seed, tasks)
    mean_len = sum(len(d) for d in probe) / len(probe)
    n_per_task = max(1, math.ceil(target / (mean_len * len(tasks))))
    return docs + task_documents(n_per_task, task_split, seed, tasks)
