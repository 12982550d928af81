"""Full-stage knowledge distillation with online hard prompt sampling."""

from .trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
