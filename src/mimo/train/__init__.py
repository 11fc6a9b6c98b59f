"""Training: pretraining (with one MTP head), the 3-MTP-head stage, SFT; checkpoints, FSDP2, CLI entry points.

Entry points: `mimo.train.loop.run(TrainConfig)`, `mimo.train.cli.{pretrain_main, sft_main, eval_main}`;
recipes in `mimo.recipes`.
"""

from .config import TrainConfig, TrainConfigError
from .loop import TrainError, TrainingDiverged, evaluate, run, train_step
from .mtp import copy_mtp_heads

__all__ = ["TrainConfig", "TrainConfigError", "TrainError", "TrainingDiverged", "copy_mtp_heads", "evaluate",
           "run", "train_step"]
