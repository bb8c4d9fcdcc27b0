"""Knowledge distillation for seeds (Kasmina arch 5, ``[seeds.distill]``): a TRAINING seed's own loss adds the
KL divergence from the host's output distribution on the same batch (the teacher, detached) to the network's
output with the seed substituted (Hinton et al.: softened by ``temperature``, scaled by T^2 so its gradient
keeps its size as T changes). Only the seed's own pass sees it: host gradients are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from esper.core.config import DistillConfig


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over every prediction
    (a row of the last axis: per sample for ``[N, C]``, per token for ``[N, T, V]``)."""
    t = cfg.temperature
    s = F.log_softmax(student.float().flatten(0, -2) / t, dim=-1)
    q = F.log_softmax(teacher.detach().float().flatten(0, -2) / t, dim=-1)
    return cfg.weight * t * t * F.kl_div(s, q, log_target=True, reduction="batchmean")
