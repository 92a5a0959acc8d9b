"""Training: losses (EDM, iCT, BCT), the resumable training loop and the `restore-train` CLI.

Imports ``restore`` and ``operators``; nothing below imports ``training``.
"""

from training.data import ImageData
from training.finetune import bcm_from_cm
from training.loop import TrainConfig, TrainResult, train
from training.losses import BCTLoss, ConsistencyLoss, EDMLoss, ICTLoss

__all__ = ["BCTLoss", "ConsistencyLoss", "EDMLoss", "ICTLoss", "ImageData", "TrainConfig", "TrainResult",
           "bcm_from_cm", "train"]
