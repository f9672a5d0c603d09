"""Distillation losses on a teacher's logits: forward KL, reverse KL and the generalised Jensen-Shannon
divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"), per token.

With ``top_k`` > 0 only the teacher's k most likely tokens at each position are kept (the teacher's
full logits are vocab × tokens floats: 49,152 × 2,048 × 4 bytes = 400 MB for one 2k-token row of the
135M model), and every divergence is taken over that support: the teacher's distribution is its
softmax over the k tokens, the student's its log-softmax over the whole vocabulary at those k tokens
for forward KL (its mass elsewhere then costs nothing, as it carries no teacher mass), and its softmax
renormalised over the k tokens for reverse KL and JSD (which weigh the student's own mass). With
``top_k`` 0 the whole vocabulary is used and all three are exact.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence,
                         beta: float = 0.5, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """One divergence per position: logits (tokens, vocab) of the student and of the teacher at the same
    positions. ``jsd`` with ``beta`` = β is GKD's generalised JSD, β·KL(p ‖ m) + (1 − β)·KL(q ‖ m) with
    m = β·p + (1 − β)·q, p the teacher and q the student (β → 0 tends to forward KL / β, β → 1 to
    reverse KL / (1 − β)); ``temperature`` softens both distributions.

    >>> teacher = torch.log(torch.tensor([[0.5, 0.25, 0.25]])); student = torch.zeros(1, 3)
    >>> round(float(divergence_per_token(student, teacher, "forward_kl")), 4)  # Σ p log(p / (1/3))
    0.0589
    >>> round(float(divergence_per_token(student, teacher, "reverse_kl")), 4)  # Σ (1/3) log((1/3) / p)
    0.0566
    >>> round(float(divergence_per_token(teacher, teacher, "jsd")), 6)
    0.0
    """
    student = student_logits.float() / temperature
    teacher = teacher_logits.float() / temperature
    if top_k:
        teacher, support = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1)  # (tokens, k)
        student_full = F.log_softmax(student, dim=-1)
        student = student.gather(-1, support)
        log_p = F.log_softmax(teacher, dim=-1)
        if kind == "forward_kl":
            return _kl(log_p, student_full.gather(-1, support))
        log_q = F.log_softmax(student, dim=-1)
    else:
        log_p, log_q = F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def distill_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                     kind: Divergence, beta: float = 0.5, temperature: float = 1.0, top_k: int = 0,
                     chunk: int = 256) -> torch.Tensor:
    """The divergence summed over the positions that predict a label (labels (batch, seq) with -100
    elsewhere; logits (batch, seq, vocab), shifted as the next-token loss is), in chunks of positions so
    that the float32 copies stay small. Multiplied by temperature² (Hinton et al.: the gradients' scale
    then does not depend on it)."""
    mask = labels[:, 1:] != -100  # (batch, seq - 1)
    student = student_logits[:, :-1][mask]  # (tokens, vocab)
    teacher = teacher_logits[:, :-1][mask]
    total = student_logits[..., :1].sum().float() * 0.0  # attached to the graph even without labels
    for start in range(0, student.shape[0], chunk):
        total = total + divergence_per_token(student[start:start + chunk], teacher[start:start + chunk], kind,
                                             beta, temperature, top_k).sum()
    return total * temperature ** 2
