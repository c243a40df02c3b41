"""Knowledge-distillation losses.

loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)).

The T^2 factor keeps the soft-target gradients on the same scale as the hard ones when T changes (Hinton et
al.). For causal LMs the KL is averaged over the predicted (non-ignored) token positions, for classification
over the examples, so the two terms have comparable magnitudes in both tasks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunetune.errors import PrunetuneError

IGNORE = -100


def check_kd(alpha: float, temperature: float) -> None:
    if not (0.0 <= alpha <= 1.0):
        raise PrunetuneError(f"--kd-alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise PrunetuneError(f"--kd-temp must be > 0, got {temperature}")


def kl_soft(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of KL(softmax(t/T) || softmax(s/T)); rows are the last-dim-flattened positions."""
    s = student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() / temperature
    if valid is not None:
        keep = valid.reshape(-1)
        s, t = s[keep], t[keep]
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
            alpha: float = 0.5, temperature: float = 4.0, causal: bool = False) -> tuple[torch.Tensor, dict]:
    """alpha*CE + (1-alpha)*T^2*KL; returns the loss and its parts (floats) for logging.

    `causal=True` shifts logits/labels by one position (next-token prediction) and ignores label -100.
    Without a teacher the loss is plain CE.
    """
    if causal:
        student_logits = student_logits[:, :-1]
        labels = labels[:, 1:]
        teacher_logits = teacher_logits[:, :-1] if teacher_logits is not None else None
    flat_s = student_logits.reshape(-1, student_logits.shape[-1]).float()
    flat_y = labels.reshape(-1)
    ce = F.cross_entropy(flat_s, flat_y, ignore_index=IGNORE)
    if teacher_logits is None or alpha >= 1.0:
        return ce, {"ce": float(ce.detach()), "kl": 0.0}
    kl = kl_soft(student_logits, teacher_logits, temperature, valid=flat_y != IGNORE)
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return loss, {"ce": float(ce.detach()), "kl": float(kl.detach())}
