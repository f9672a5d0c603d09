"""Distillation losses on a teacher's distributions: forward KL, reverse KL and the generalised
Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"),
per token.

With ``top_k`` > 0 only the teacher's k most likely tokens at each position are kept, with their
log-probabilities over the whole vocabulary (``TeacherTopK``): the teacher's full logits are vocab x
tokens floats (49,152 x 2,048 x 4 bytes = 400 MB for one 2k-token row of the 135M model), and the
recipe computes them a chunk of positions at a time and keeps k of each. Every divergence is then
taken over k + 1 buckets: the k tokens, and the rest of the vocabulary as one bucket. For the teacher
the rest is 1 − the k tokens' probability; for the student, its own probability outside them. So the
student pays for mass it moves away from the teacher's tokens (reverse KL's mode-seeking keeps its
meaning), and with the k tokens holding all of the teacher's mass, the divergences are exact. With
``top_k`` 0 the whole vocabulary is used.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


class TeacherTopK(NamedTuple):
    """The teacher at some positions: the log-probabilities (over the whole vocabulary, at the temperature)
    of its k most likely tokens, and their ids; both (tokens, k)."""

    logprobs: torch.Tensor
    ids: torch.Tensor

    def __getitem__(self, index):  # a slice of positions (NamedTuple's own indexing picks a field)
        if isinstance(index, slice):
            return TeacherTopK(self.logprobs[index], self.ids[index])
        return tuple.__getitem__(self, index)


def teacher_top_k(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    """The k most likely tokens of ``logits`` (tokens, vocab) with their log-probabilities."""
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TeacherTopK(values, ids)


def _with_rest(log_support: torch.Tensor) -> torch.Tensor:
    """(tokens, k) log-probabilities -> (tokens, k + 1): the rest of the vocabulary as one more bucket."""
    rest = -torch.expm1(torch.logsumexp(log_support, dim=-1, keepdim=True))  # 1 − Σ p, ≥ 0 up to rounding
    return torch.cat([log_support, torch.log(rest.clamp_min(1e-30))], dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence_per_token(student_logits: torch.Tensor, teacher: torch.Tensor | TeacherTopK, kind: Divergence,
                         beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """One divergence per position: the student's logits (tokens, vocab), the teacher's logits at the same
    positions (tokens, vocab) or its ``TeacherTopK``. ``jsd`` with ``beta`` = β is GKD's generalised JSD,
    β·KL(p ‖ m) + (1 − β)·KL(q ‖ m) with m = β·p + (1 − β)·q, p the teacher and q the student (as β → 0
    it tends to β·KL(p ‖ q), as β → 1 to (1 − β)·KL(q ‖ p)); ``temperature`` softens both distributions
    (a ``TeacherTopK`` was taken at it).

    >>> teacher = torch.log(torch.tensor([[0.5, 0.25, 0.25]])); student = torch.zeros(1, 3)
    >>> round(float(divergence_per_token(student, teacher, "forward_kl")), 4)  # Σ p log(p / (1/3))
    0.0589
    >>> round(float(divergence_per_token(student, teacher, "reverse_kl")), 4)  # Σ (1/3) log((1/3) / p)
    0.0566
    >>> round(float(divergence_per_token(teacher, teacher, "jsd")), 6)
    0.0
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, TeacherTopK):
        log_p, log_q = _with_rest(teacher.logprobs), _with_rest(log_q.gather(-1, teacher.ids))
    else:
        log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def at_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits (batch, seq, vocab) at the positions that predict a label (labels (batch, seq), -100
    elsewhere; shifted as the next-token loss is): (tokens, vocab)."""
    return logits[:, :-1][labels[:, 1:] != -100]


def distill_loss_sum(student_logits: torch.Tensor, teacher: torch.Tensor | TeacherTopK, labels: torch.Tensor,
                     kind: Divergence, beta: float = 0.5, temperature: float = 1.0, chunk: int = 256) -> torch.Tensor:
    """The divergence summed over the positions that predict a label: the student's logits (batch, seq,
    vocab), the teacher at those positions (``at_labels`` of its logits, or a ``TeacherTopK``), in chunks
    of positions so that the float32 copies stay small. Multiplied by temperature² (Hinton et al.: the
    gradients' scale then does not depend on it)."""
    student = at_labels(student_logits, labels)  # (tokens, vocab)
    total = student_logits[..., :1].sum().float() * 0.0  # attached to the graph even without labels
    for start in range(0, student.shape[0], chunk):
        total = total + divergence_per_token(student[start:start + chunk], teacher[start:start + chunk], kind, beta,
                                             temperature).sum()
    return total * temperature ** 2
