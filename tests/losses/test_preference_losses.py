"""Each preference loss against numbers worked out by hand from its paper's formula (with
``math``, not torch), and the sign of its gradient: training must raise the chosen reply's
log-probability and lower the rejected one's."""

import math

import pytest
import torch

from tunesmith.losses.preference import (dpo_loss, ipo_loss, kto_loss, orpo_loss, pairwise_reward_loss,
                                         robust_dpo_loss, simpo_loss)


def log_sigmoid(x):
    return -math.log(1.0 + math.exp(-x))


# policy chosen/rejected, reference chosen/rejected (summed log-probs)
PC, PR, RC, RR = -10.0, -14.0, -11.0, -12.0
H = (PC - RC) - (PR - RR)  # (1) - (-2) = 3


def tensors(*values):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]


def test_pairwise_reward_loss():
    chosen, rejected = tensors(2.0, 0.5)
    assert float(pairwise_reward_loss(chosen, rejected)) == pytest.approx(-log_sigmoid(1.5))
    assert float(pairwise_reward_loss(chosen, rejected, margin=1.0)) == pytest.approx(-log_sigmoid(0.5))
    pairwise_reward_loss(chosen, rejected).backward()
    assert chosen.grad < 0 < rejected.grad  # descent raises r_c, lowers r_r


def check_signs(loss, policy_chosen, policy_rejected):
    loss.backward()
    assert policy_chosen.grad < 0 < policy_rejected.grad


def test_dpo_and_cdpo():
    pc, pr, rc, rr = tensors(PC, PR, RC, RR)
    beta = 0.1
    loss = dpo_loss(pc, pr, rc, rr, beta)
    assert float(loss) == pytest.approx(-log_sigmoid(0.3))  # beta * h = 0.3: 0.554355
    assert float(loss) == pytest.approx(0.5543552444685272)
    check_signs(loss, pc, pr)
    pc, pr, rc, rr = tensors(PC, PR, RC, RR)
    smoothed = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.2)
    assert float(smoothed) == pytest.approx(-0.8 * log_sigmoid(0.3) - 0.2 * log_sigmoid(-0.3))
    check_signs(smoothed, pc, pr)


def test_robust_dpo():
    pc, pr, rc, rr = tensors(PC, PR, RC, RR)
    loss = robust_dpo_loss(pc, pr, rc, rr, beta=0.1, epsilon=0.1)
    assert float(loss) == pytest.approx((-0.9 * log_sigmoid(0.3) + 0.1 * log_sigmoid(-0.3)) / 0.8)
    check_signs(loss, pc, pr)
    assert float(robust_dpo_loss(*tensors(PC, PR, RC, RR), beta=0.1, epsilon=0.0)) == pytest.approx(
        float(dpo_loss(*tensors(PC, PR, RC, RR), beta=0.1)))  # no flips: plain DPO
    with pytest.raises(ValueError, match="epsilon"):
        robust_dpo_loss(*tensors(PC, PR, RC, RR), beta=0.1, epsilon=0.5)


def test_ipo():
    pc, pr, rc, rr = tensors(PC, PR, RC, RR)
    loss = ipo_loss(pc, pr, rc, rr, tau=0.25)  # target margin 1 / (2 * 0.25) = 2
    assert float(loss) == pytest.approx((3.0 - 2.0) ** 2)
    loss.backward()  # past the target: IPO pulls the margin back, unlike DPO
    assert pc.grad > 0 > pr.grad
    pc, pr, rc, rr = tensors(PC, PR, RC, RR)
    below = ipo_loss(pc, pr, rc, rr, tau=0.1)  # target 5 > 3: push on
    assert float(below) == pytest.approx(4.0)
    check_signs(below, pc, pr)


def test_simpo():
    chosen_avg, rejected_avg = tensors(-0.5, -1.25)
    loss = simpo_loss(chosen_avg, rejected_avg, beta=2.0, gamma=1.0)
    assert float(loss) == pytest.approx(-log_sigmoid(2.0 * -0.5 - 2.0 * -1.25 - 1.0))  # -log σ(0.5)
    check_signs(loss, chosen_avg, rejected_avg)


def test_orpo():
    chosen_avg, rejected_avg = tensors(-0.5, -1.25)
    loss = orpo_loss(chosen_avg, rejected_avg, lam=0.1)
    p_c, p_r = math.exp(-0.5), math.exp(-1.25)
    ratio = math.log(p_c / (1 - p_c)) - math.log(p_r / (1 - p_r))
    assert float(loss) == pytest.approx(0.5 + 0.1 * -log_sigmoid(ratio))
    check_signs(loss, chosen_avg, rejected_avg)


def test_kto():
    policy, reference = tensors([-10.0, -14.0], [-11.0, -12.0])
    desirable = torch.tensor([True, False])
    z0, beta = 0.5, 0.1
    loss = kto_loss(policy, reference, desirable, z0, beta, desirable_weight=1.0, undesirable_weight=1.5)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1.0 - sigmoid(0.1 * (1.0 - 0.5)), 1.5 - 1.5 * sigmoid(0.1 * (0.5 - -2.0))]
    assert loss.tolist() == pytest.approx(expected)
    loss.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # raise the desirable reply, lower the undesirable one
