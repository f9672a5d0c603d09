"""The GRPO family's pieces against numbers worked by hand, and the sign of their gradients: Dr. GRPO's
and RLOO's advantages, DAPO's clip-higher and over-long shaping, GSPO's and RLOO's sequence ratios,
REINFORCE++'s returns. A loss whose gradient had the wrong sign would train the policy away from
reward; each case checks which way descent moves a token's log-probability."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.losses.rl import (centred_advantages, clipped_surrogate, leave_one_out_advantages,
                                 overlong_penalty, reinforce_pp_advantages, sequence_ratio_loss)


def test_advantages_without_std_and_leaving_one_out():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    assert centred_advantages(rewards).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4]
    # RLOO: 1 − (0 + 0 + 1)/3 = 2/3; 0 − (1 + 0 + 1)/3 = −2/3; G/(G−1) times the centred advantage
    loo = leave_one_out_advantages(rewards)
    assert loo[0].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert loo[0].tolist() == pytest.approx((centred_advantages(rewards)[0] * 4 / 3).tolist())


def test_clip_higher_lets_a_rising_token_go_further_than_it_lets_a_falling_one():
    """Ratios 1.25 and 0.75 with A = +1 and A = −1. GRPO's symmetric clip (0.2) stops both; DAPO's
    (0.2 below, 0.28 above) lets the first rise on: its gradient is −ρ (descent raises it), while the
    clipped one gets none."""
    logps = torch.log(torch.tensor([1.25, 0.75])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0])
    symmetric, bound = clipped_surrogate(logps, torch.zeros(2), advantages, 0.2, 0.2)
    assert symmetric.tolist() == pytest.approx([-1.2, 0.8]) and bound.tolist() == [True, True]
    higher, bound = clipped_surrogate(logps, torch.zeros(2), advantages, 0.2, 0.28)
    assert higher.tolist() == pytest.approx([-1.25, 0.8]) and bound.tolist() == [False, True]
    higher.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-1.25, 0.0])


def test_clipped_surrogate_moves_tokens_the_way_their_advantage_says():
    logps = torch.log(torch.tensor([1.0, 1.0])).requires_grad_()  # ratio 1: inside any clip
    loss, bound = clipped_surrogate(logps, torch.zeros(2), torch.tensor([2.0, -3.0]), 0.2, 0.2)
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-2.0, 3.0]) and not bound.any()  # −A·ρ: descent follows A


def test_gspo_takes_the_geometric_mean_of_the_token_ratios():
    """Completion 0 has token log-ratios 0.1 and 0.3: s = e^0.2 = 1.2214, clipped by GSPO's 4e-4 above 1
    for A > 0 (no gradient); completion 1 has ratio 1 exactly, A = −2: loss 2, and each of its two
    tokens gets gradient −A·s/|y| = 1."""
    logps = torch.tensor([0.1, 0.3, 0.0, 0.0], requires_grad=True)
    index = torch.tensor([0, 0, 1, 1])
    loss, bound = sequence_ratio_loss(logps, torch.zeros(4), index, 2, torch.tensor([1.0, -2.0]), 3e-4, 4e-4,
                                      geometric=True)
    assert loss.tolist() == pytest.approx([-1.0004, 2.0]) and bound.tolist() == [True, False]
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_rloo_takes_the_whole_completions_probability_ratio():
    """Token log-ratios 0.05 and −0.05: the sequence ratio is e^0 = 1 (the geometric one too), A = 1.5;
    each token's gradient is −A·s = −1.5 (GSPO's would be −A·s/2)."""
    logps = torch.tensor([0.05, -0.05], requires_grad=True)
    loss, _ = sequence_ratio_loss(logps, torch.zeros(2), torch.tensor([0, 0]), 1, torch.tensor([1.5]), 0.2, 0.2,
                                  geometric=False)
    assert loss.tolist() == pytest.approx([-1.5])
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-1.5, -1.5])


def test_overlong_shaping():
    lengths = torch.tensor([0, 96, 100, 112, 128, 200])
    assert overlong_penalty(lengths, max_tokens=128, buffer=32).tolist() == pytest.approx(
        [0.0, 0.0, -0.125, -0.5, -1.0, -1.0])


def test_reinforce_pp_folds_the_kl_into_each_tokens_return():
    """Rewards [1, 0]: centred ±0.5. Completion 0's tokens have k1 KL 0.4 and 0.1, completion 1's 0.2:
    with β = 0.5 the returns are 0.5 − 0.5·(0.4 + 0.1), 0.5 − 0.5·0.1 and −0.5 − 0.5·0.2, i.e. 0.25,
    0.45 and −0.6, then whitened over the three tokens (population std)."""
    logps = torch.tensor([-1.0, -1.0, -1.0])
    reference = torch.tensor([-1.4, -1.1, -1.2])
    advantages = reinforce_pp_advantages(torch.tensor([[1.0, 0.0]]), logps, reference, torch.tensor([0, 0, 1]), 0.5)
    raw = torch.tensor([0.25, 0.45, -0.6])
    expected = (raw - raw.mean()) / raw.std(unbiased=False)
    assert advantages.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert advantages[1] > advantages[0] > 0 > advantages[2]  # the KL-heavier token keeps less of its reward
    assert math.isclose(float(advantages.mean()), 0.0, abs_tol=1e-6)
