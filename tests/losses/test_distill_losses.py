"""Distillation divergences against numbers worked by hand, their limits, the top-k approximation's
meaning, and the direction their gradients move the student."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.losses.distill import at_labels, distill_loss_sum, divergence_per_token, teacher_top_k


def test_generalised_jsd_by_hand_and_its_symmetry():
    """p = (0.5, 0.5), q = (0.9, 0.1), β = 0.5: m = (0.7, 0.3); JSD = ½·KL(p‖m) + ½·KL(q‖m)."""
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    m = 0.5 * p + 0.5 * q
    kl = lambda a, b: float((a * (a / b).log()).sum())  # noqa: E731
    expected = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    got = divergence_per_token(q.log(), p.log(), "jsd", beta=0.5)
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert float(divergence_per_token(p.log(), q.log(), "jsd", beta=0.5)) == pytest.approx(expected, abs=1e-6)
    # β = 0.9 weighs the teacher's side: not symmetric any more
    assert float(divergence_per_token(q.log(), p.log(), "jsd", beta=0.9)) != pytest.approx(
        float(divergence_per_token(p.log(), q.log(), "jsd", beta=0.9)))


def test_top_k_buckets_the_rest_of_the_vocabulary_and_full_k_is_exact():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 12), torch.randn(5, 12)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence_per_token(student, teacher_top_k(teacher, 12), kind).tolist() == pytest.approx(
            divergence_per_token(student, teacher, kind).tolist(), abs=1e-4)  # the empty rest bucket: ~1e-30
    # top 1: two buckets, the teacher's argmax and the rest; forward KL over them, worked by hand
    p = torch.softmax(teacher, -1).max(-1)
    q = torch.softmax(student, -1).gather(-1, p.indices[:, None]).squeeze(-1)
    expected = p.values * (p.values / q).log() + (1 - p.values) * ((1 - p.values) / (1 - q)).log()
    got = divergence_per_token(student, teacher_top_k(teacher, 1), "forward_kl")
    assert got.tolist() == pytest.approx(expected.tolist(), abs=1e-5)


def test_mass_the_student_moves_off_the_teachers_tokens_is_paid_for():
    """The student puts nearly all its mass on a token outside the teacher's top 2: reverse KL and JSD
    over the buckets stay large (renormalising the student over the top 2 alone would make them 0)."""
    teacher = torch.tensor([[3.0, 2.0, -5.0, -5.0]])
    student = torch.tensor([[3.0, 2.0, 20.0, -5.0]])
    top = teacher_top_k(teacher, 2)
    assert float(divergence_per_token(student, top, "reverse_kl")) > 5.0
    assert float(divergence_per_token(student, top, "jsd")) > 0.3
    assert float(divergence_per_token(student, top, "forward_kl")) > 5.0


def test_descending_forward_kl_moves_the_student_to_the_teacher():
    """At temperature 1 the gradient of KL(p ‖ q) with respect to the student's logits is q − p: the
    logit of a token the teacher likes more than the student falls in loss, so descent raises it."""
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    student = torch.zeros(1, 3, requires_grad=True)
    divergence_per_token(student, teacher, "forward_kl").sum().backward()
    expected = torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)
    assert student.grad[0].tolist() == pytest.approx(expected[0].tolist(), abs=1e-6)
    assert student.grad[0, 0] < 0 < student.grad[0, 2]


def test_the_summed_loss_counts_only_reply_positions_and_scales_by_t_squared():
    """Positions predicting a label only (shifted as the next-token loss is), times T²."""
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    labels = torch.tensor([[-100, -100, 3, 4]])  # positions 1 and 2 predict labels
    total = distill_loss_sum(student, at_labels(teacher, labels), labels, "reverse_kl", temperature=2.0)
    by_hand = divergence_per_token(student[0, 1:3], teacher[0, 1:3], "reverse_kl", temperature=2.0).sum() * 4.0
    assert float(total) == pytest.approx(float(by_hand), abs=1e-5)
    none = torch.full((1, 4), -100)
    assert float(distill_loss_sum(student, at_labels(teacher, none), none, "jsd")) == 0.0
    assert math.isfinite(float(total))
