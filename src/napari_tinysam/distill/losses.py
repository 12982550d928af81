"""Loss terms of full-stage distillation and of ground-truth training.

All per-mask functions take logits/targets of shape (N, T, H, W) and return (N, T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels: (N, T, H, W) -> (N, T)."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice coefficient: (N, T, H, W) -> (N, T)."""
    prob = torch.sigmoid(logits).flatten(2)
    t = targets.flatten(2)
    num = 2 * (prob * t).sum(-1)
    den = prob.sum(-1) + t.sum(-1)
    return 1 - (num + smooth) / (den + smooth)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of binary masks (..., H, W) -> (...); two empty masks have IoU 1."""
    p = pred.flatten(-2).bool()
    t = target.flatten(-2).bool()
    inter = (p & t).sum(-1).float()
    union = (p | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def hard_mask_weight(iou_teacher: torch.Tensor, iou_student: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """TinySAM's hard-mask weight H = sigmoid(IoU(M_t, M_gt) / (IoU(M_s, M_gt) + eps) - 1):
    large where the teacher is right and the student is not."""
    return torch.sigmoid(iou_teacher / (iou_student + eps) - 1)


def embedding_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L1 between image embeddings (mean over all elements)."""
    return (student - teacher).abs().mean()


def token_l1(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """L1 between the two-way transformer's output tokens (B, N, C)."""
    return (student_tokens - teacher_tokens).abs().mean()


def weighted_logit_l1(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L1 between mask logits (N, T, H, W), each mask weighted by ``weight`` (N, T)."""
    per_mask = (student - teacher).abs().flatten(2).mean(-1)
    return (per_mask * weight).mean()
