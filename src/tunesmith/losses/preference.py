"""Preference losses, one function each: tensors in, tensors out, one loss per pair (or per row
for KTO), no reduction. Each docstring names the paper and the equation it implements.

Inputs are per-sequence log-probabilities of the reply given the prompt: ``*_logps`` summed over
the reply's tokens, ``*_avg`` their mean per token (the length-normalised forms of SimPO and
ORPO). ``policy`` is the model being trained, ``reference`` the frozen starting model. The
implicit reward of DPO-style methods is β·(log π(y|x) − log π_ref(y|x)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None
                         ) -> torch.Tensor:
    """Reward-model loss (Bradley–Terry; InstructGPT, Ouyang et al. 2022), with Llama 2's
    optional margin m (Touvron et al. 2023): −log σ(r_c − r_r − m).

    >>> round(float(pairwise_reward_loss(torch.tensor(1.0), torch.tensor(0.0))), 6)  # log(1 + e^-1)
    0.313262
    """
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


def _log_ratio_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                      reference_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log π_c − log π_ref,c) − (log π_r − log π_ref,r)."""
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(β·h). With label smoothing ε > 0, conservative
    DPO (cDPO, Mitchell 2023), which assumes a fraction ε of the labels flipped:
    −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)."""
    scaled = beta * _log_ratio_margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return -(1.0 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def robust_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, beta: float, epsilon: float) -> torch.Tensor:
    """Robust DPO (rDPO, Chowdhury et al. 2024): the unbiased loss under label-flip rate
    ε < 1/2: [(1 − ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε)."""
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"robust DPO needs 0 <= epsilon < 0.5, got {epsilon}")
    scaled = beta * _log_ratio_margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return (-(1.0 - epsilon) * F.logsigmoid(scaled) + epsilon * F.logsigmoid(-scaled)) / (1.0 - 2.0 * epsilon)


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, tau: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, the IPO objective): (h − 1/(2τ))², a squared loss that stops pushing once the
    log-ratio margin reaches 1/(2τ)."""
    return (_log_ratio_margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
            - 1.0 / (2.0 * tau)) ** 2


def simpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, beta: float, gamma: float
               ) -> torch.Tensor:
    """SimPO (Meng et al. 2024): reference-free, on mean per-token log-probabilities, with a
    target margin γ: −log σ(β·avg_c − β·avg_r − γ)."""
    return -F.logsigmoid(beta * policy_chosen_avg - beta * policy_rejected_avg - gamma)


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 − P)) for P = exp(avg_logps) < 1, computed without forming 1 − P directly."""
    return avg_logps - torch.log(-torch.expm1(avg_logps))


def orpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024): the chosen reply's NLL per token plus λ times the
    odds-ratio loss, reference-free: −avg_c + λ·(−log σ(log odds_c − log odds_r))."""
    return -policy_chosen_avg + lam * -F.logsigmoid(log_odds(policy_chosen_avg) - log_odds(policy_rejected_avg))


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
             reference_point: torch.Tensor | float, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024), on unpaired rows: with r = log π − log π_ref and the
    reference point z₀ (an estimate of KL(π ‖ π_ref), passed in without gradient),
    λ_D·(1 − σ(β(r − z₀))) for a desirable reply, λ_U·(1 − σ(β(z₀ − r))) for an undesirable one."""
    reward = policy_logps - reference_logps
    value = torch.where(desirable, desirable_weight * torch.sigmoid(beta * (reward - reference_point)),
                        undesirable_weight * torch.sigmoid(beta * (reference_point - reward)))
    weight = torch.where(desirable, torch.full_like(reward, desirable_weight),
                         torch.full_like(reward, undesirable_weight))
    return weight - value
