"""Training: pretraining (with one MTP head), the 3-MTP-head stage, SFT; checkpoints, FSDP2.

Entry points: `mimo.train.loop.run(TrainConfig)`; the commands in `mimo.cli.train`; recipes in `mimo.train.recipes`.
The names below load lazily, so `mimo.train.config` and `mimo.train.recipes` import without torch.
"""

from mimo._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "mimo.train.config",
    "TrainConfigError": "mimo.train.config",
    "TrainError": "mimo.train.loop",
    "TrainingDiverged": "mimo.train.step",
    "copy_mtp_heads": "mimo.train.mtp",
    "evaluate": "mimo.train.loop",
    "forward_backward": "mimo.train.step",
    "optimizer_step": "mimo.train.step",
    "run": "mimo.train.loop",
    "train_step": "mimo.train.loop",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
