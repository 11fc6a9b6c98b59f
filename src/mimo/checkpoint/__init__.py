"""Checkpoints in the official MiMo-V2-Flash format: load/save, name mapping, FP8 block (de)quantisation."""

from .io import CheckpointError, load_model, load_weights, save_model

__all__ = ["CheckpointError", "load_model", "load_weights", "save_model"]
