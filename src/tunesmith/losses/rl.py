"""Policy-gradient losses for GRPO and PPO: tensors in, tensors out."""

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


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's completion tokens:
    δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γ·λ·A_{t+1}, with V and A zero past a row's last token;
    returns (advantages, returns = A + V). rewards, values, mask: (rows, tokens), mask 1 on tokens.

    >>> a, r = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 1.0)
    >>> a.tolist(), r.tolist()  # A_1 = 1 − 0.25; A_0 = 0 + 0.25 − 0.5 + A_1
    ([[0.5, 0.75]], [[1.0, 1.0]])
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    following = torch.zeros_like(values[:, 0])  # A_{t+1}
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(following)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        following = (delta + gamma * lam * following) * mask[:, t]
        advantages[:, t] = following
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (PPO's advantage normalisation); zero elsewhere."""
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7, negated for descent):
    max(−ρ·A, −clip(ρ, 1−ε, 1+ε)·A) with ρ = π/π_old; also whether the clip was the one taken."""
    ratio = torch.exp(logps - old_logps)
    plain, clipped = -ratio * advantages, -torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantages
    return torch.maximum(plain, clipped), clipped > plain


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss per token (as in OpenAI's baselines): ½·max((V − R)², (V_clip − R)²)
    with V_clip = V_old + clip(V − V_old, −c, c); also whether the clipped term was the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


class AdaptiveKL:
    """The adaptive KL coefficient of Ziegler et al. 2019 (eq. 2): after each batch of n rollouts
    with mean KL to the reference k, β ← β·(1 + K_β·e·n) with e = clip(k / target − 1, −0.2, 0.2)
    and K_β = 1 / horizon. A fixed β where ``target`` is None.

    >>> kl = AdaptiveKL(0.1, target=6.0, horizon=100)
    >>> round(kl.update(12.0, 10), 6)  # e clipped to 0.2: β·(1 + 0.2·10/100)
    0.102
    """

    def __init__(self, coefficient: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coefficient, target, horizon

    def update(self, kl: float, rollouts: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * rollouts / self.horizon
        return self.value
