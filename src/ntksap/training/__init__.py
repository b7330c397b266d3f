"""Training of pruned networks: the loop, presets, checkpoints, torchrun/DDP.

Example:
    >>> from ntksap.training import TrainConfig, preset, list_presets
    >>> list_presets()[:2]
    ['cifar10-resnet20', 'cifar100-vgg16']
"""

from ntksap.training.checkpoint import load_checkpoint, read_json, save_checkpoint, write_json
from ntksap.training.config import PRESETS, TrainConfig, list_presets, preset
from ntksap.training.distributed import DistEnv, setup
from ntksap.training.loop import evaluate, fit, train_one_epoch

__all__ = [
    "PRESETS",
    "DistEnv",
    "TrainConfig",
    "evaluate",
    "fit",
    "list_presets",
    "load_checkpoint",
    "preset",
    "read_json",
    "save_checkpoint",
    "setup",
    "train_one_epoch",
    "write_json",
]
