"""Training-state checkpoints: written atomically, resumed exactly.

Layout of a run directory:

    RUN/
      checkpoints/
        step_000200/              one checkpoint (also a complete model directory)
          config.json             ModelConfig (hub + transformers spellings), via mimo.checkpoint.save_model
          model.safetensors       weights, official tensor names (experts split per expert)
          tokenizer.json, tokenizer_config.json, special_tokens_map.json
          train_state.pt          optimizer, LR scheduler, data-stream position, RNG states, step
          train_config.json       the TrainConfig of the run
          corpus.json             CorpusInfo (file counts, sha256) of the training corpus
        latest                    the name of the newest complete checkpoint ("step_000200")
      metrics.jsonl, curves.png

Atomicity: a checkpoint is written into `checkpoints/.tmp-step_N-PID/`, renamed to `step_N` (a rename within
one directory is atomic), and only then is `latest` replaced (write a temp file, `os.replace`). A crash at
any point leaves `latest` naming the previous complete checkpoint; stray `.tmp-*` directories are ignored
and removed by the next save. Old checkpoints beyond `keep` are deleted after `latest` moves on.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CKPT_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "train_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
CORPUS_FILE = "corpus.json"


class TrainCheckpointError(ValueError):
    """A checkpoint given to resume is missing, corrupt or does not match the run."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_train_state(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


def save_checkpoint(run_dir: str | Path, step: int, write_model: Callable[[Path], None],
                    state: dict[str, Any], extra_json: dict[str, Any], keep: int = 2) -> Path:
    """Write one checkpoint atomically; returns its directory.

    `write_model(dir)` writes the weights, config and tokenizer; `state` goes to train_state.pt;
    `extra_json` maps file names to JSON-able objects (train config, corpus info)."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = step_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        write_model(tmp)
        for fname, obj in extra_json.items():
            (tmp / fname).write_text(json.dumps(obj, indent=2) + "\n")
        save_train_state(state, tmp / STATE_FILE)
        final = root / name
        if final.exists():
            # re-saving a step (after a resume): move the old copy aside first, rename is atomic
            old = root / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, name + "\n")
    _prune(root, keep, name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    done = sorted(p.name for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    for name in done[:-keep] if keep > 0 else []:
        if name != newest:
            shutil.rmtree(root / name, ignore_errors=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CKPT_DIR / LATEST).is_file()


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory for `path`: a checkpoint itself, or a run directory (its latest)."""
    p = Path(path)
    if not p.exists():
        raise TrainCheckpointError(f"checkpoint path {p} does not exist")
    if (p / STATE_FILE).is_file():
        return p
    for root in (p / CKPT_DIR, p):
        latest = root / LATEST
        if latest.is_file():
            ck = root / latest.read_text().strip()
            if (ck / STATE_FILE).is_file():
                return ck
            raise TrainCheckpointError(f"{latest} names {ck.name}, which is not a complete checkpoint")
    raise TrainCheckpointError(f"no training checkpoint in {p} (expected {STATE_FILE} or {CKPT_DIR}/{LATEST})")


def load_train_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip failure means a corrupt file
        raise TrainCheckpointError(f"corrupt checkpoint {ckpt}: cannot read {STATE_FILE} "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise TrainCheckpointError(f"corrupt checkpoint {ckpt}: {STATE_FILE} has no step")
    return state
