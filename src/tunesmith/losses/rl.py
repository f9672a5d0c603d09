"""Policy-gradient losses for GRPO: tensors in, tensors out."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024, DeepSeekMath, outcome supervision): each completion's
    reward normalised within its group, (r − mean) / (std + eps); rewards (prompts, group).

    >>> group_advantages(torch.tensor([[1.0, 0.0, 2.0], [3.0, 3.0, 3.0]])).tolist()  # sample std 1; a flat group: 0
    [[0.0, -0.9998999834060669, 0.9998999834060669], [0.0, 0.0, 0.0]]
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def k3_kl(logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate GRPO uses (Schulman's k3, unbiased, never negative):
    π_ref/π − log(π_ref/π) − 1."""
    delta = reference_logps - logps
    return torch.exp(delta) - delta - 1.0


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, reference_logps: torch.Tensor | None,
                    advantages: torch.Tensor, epsilon: float, beta: float) -> torch.Tensor:
    """Per-token GRPO loss (DeepSeekMath eq. 3, negated for descent): the clipped surrogate
    −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) with ρ = π/π_old, plus β times the k3 KL to the reference.
    All arguments are per completion token; ``advantages`` repeats each completion's A."""
    ratio = torch.exp(logps - old_logps)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantages)
    loss = -surrogate
    if reference_logps is not None and beta:
        loss = loss + beta * k3_kl(logps, reference_logps)
    return loss
