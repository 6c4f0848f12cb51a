"""Knowledge distillation loss (Hinton et al. 2015): KL divergence between temperature-softened teacher and
student distributions, scaled by T² so its gradients keep their size as T changes, blended with the hard-label
cross-entropy. A training loop calls it in place of its plain CE when it has a teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100) -> torch.Tensor:
    """alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels), both averaged over the
    positions whose label is not ``ignore_index``. Logits [B, T, V] (or [N, V]); labels [B, T] (or [N]),
    already aligned with the logits (shifted by the caller for next-token prediction). The teacher gets no
    gradient. Softmaxes run in fp32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; the teacher must share the vocabulary")
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).float()
    t = teacher_logits.reshape(-1, V).float().detach()
    y = labels.reshape(-1)
    keep = y != ignore_index
    n = keep.sum().clamp(min=1)
    log_p_s = F.log_softmax(s / temperature, -1)
    log_p_t = F.log_softmax(t / temperature, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # [N]
    soft = (kl * keep).sum() / n * temperature**2
    hard = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum") / n
    return alpha * soft + (1 - alpha) * hard
