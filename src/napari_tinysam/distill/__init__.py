"""Full-stage knowledge distillation with online hard prompt sampling."""

from .trainer import Trainer, TrainConfig

__all__ = ["TrainConfig", "Trainer"]
