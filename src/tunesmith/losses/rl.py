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
    loss = clipped_surrogate(logps, old_logps, advantages, epsilon, epsilon)[0]
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


# --- The GRPO family: advantages, ratios and aggregation that the variants change -----------------------

def centred_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO's advantages (Liu et al. 2025, "Understanding R1-Zero-Like Training"): the reward less
    its group's mean, not divided by the group's std (which weights easy and hard prompts unequally).

    >>> centred_advantages(torch.tensor([[1.0, 0.0, 2.0]])).tolist()
    [[0.0, -1.0, 1.0]]
    """
    return rewards - rewards.mean(dim=1, keepdim=True)


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO's advantages (Ahmadian et al. 2024): each reward less the mean of the other G − 1 of its
    group, r_i − (Σ_j r_j − r_i) / (G − 1).

    >>> leave_one_out_advantages(torch.tensor([[1.0, 0.0, 2.0]])).tolist()  # 1 − 1, 0 − 1.5, 2 − 0.5
    [[0.0, -1.5, 1.5]]
    """
    group = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (group - 1)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft over-long punishment (Yu et al. 2025, eq. 13), added to the reward: 0 up to
    ``max_tokens − buffer`` tokens, then falling linearly to −1 at ``max_tokens``.

    >>> overlong_penalty(torch.tensor([10, 14, 16]), max_tokens=16, buffer=4).tolist()
    [0.0, -0.5, -1.0]
    """
    start = max_tokens - buffer
    return ((start - lengths.float()).clamp(max=0) / max(buffer, 1)).clamp(min=-1.0)


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, low: float,
                      high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate per token, negated for descent: −min(ρ·A, clip(ρ, 1 − low, 1 + high)·A) with
    ρ = π/π_old; ``low`` = ``high`` is PPO's and GRPO's clip, ``high`` > ``low`` DAPO's clip-higher (more
    room to raise unlikely tokens). Also whether the clipped term was the one taken (the clip bound).

    >>> loss, clipped = clipped_surrogate(torch.log(torch.tensor([1.5, 0.5])), torch.zeros(2), torch.tensor([1.0, -1.0]),
    ...                                   0.2, 0.28)
    >>> [round(v, 4) for v in loss.tolist()], clipped.tolist()  # −min(1.5, 1.28); −min(−0.5, −0.8)
    ([-1.28, 0.8], [True, True])
    """
    ratio = torch.exp(logps - old_logps)
    plain, clipped = ratio * advantages, torch.clamp(ratio, 1.0 - low, 1.0 + high) * advantages
    return -torch.minimum(plain, clipped), clipped < plain


def sequence_ratio_loss(logps: torch.Tensor, old_logps: torch.Tensor, index: torch.Tensor, sequences: int,
                        advantages: torch.Tensor, low: float, high: float, geometric: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ratio per completion instead of per token, clipped, negated for descent: −min(s·A, clip(s)·A).
    ``geometric``: GSPO's s = (π/π_old)^(1/|y|), the mean token log-ratio exponentiated (Zheng et al.
    2025), which keeps long and short replies on one scale; else the ratio of the whole reply's
    probabilities, exp Σ (log π − log π_old) (RLOO's REINFORCE of the sequence, with PPO's clip).
    ``index`` maps each token to its completion; ``advantages`` has one value per completion.
    Returns (per-completion loss, whether its clip bound).

    >>> logps, index = torch.log(torch.tensor([2.0, 2.0, 0.5])), torch.tensor([0, 0, 1])
    >>> loss, _ = sequence_ratio_loss(logps, torch.zeros(3), index, 2, torch.tensor([1.0, 1.0]), 0.5, 0.5, True)
    >>> [round(v, 4) for v in loss.tolist()]  # s = 2 (clipped to 1.5), s = 0.5
    [-1.5, -0.5]
    """
    log_ratio = logps.new_zeros(sequences).index_add(0, index, logps - old_logps)
    if geometric:
        counts = logps.new_zeros(sequences).index_add(0, index, torch.ones_like(logps))
        log_ratio = log_ratio / counts.clamp(min=1)
    # A whole reply's log-ratio can pass float32's exp range (about 88) after a few updates; past ±20 the
    # clip has long bound, and an overflow would turn the untaken branch's gradient into NaN.
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    plain, clipped = ratio * advantages, torch.clamp(ratio, 1.0 - low, 1.0 + high) * advantages
    return -torch.minimum(plain, clipped), clipped < plain


def reinforce_pp_advantages(rewards: torch.Tensor, logps: torch.Tensor, reference_logps: torch.Tensor | None,
                            index: torch.Tensor, beta: float) -> torch.Tensor:
    """REINFORCE++'s per-token advantages (Hu et al. 2025), in its "baseline" form for groups: the reward
    less its group's mean, then the KL folded into the return, A_t = (r − r̄) − β Σ_{s ≥ t} (log π_s −
    log π_ref,s), then whitened over every token of the batch (the global normalisation that replaces a
    critic). ``rewards``: (prompts, group); the rest per completion token; ``index`` maps tokens to
    completions (each completion's tokens in order).

    >>> r = torch.tensor([[1.0, 0.0]]); lp = torch.tensor([-1.0, -1.0, -2.0]); ref = torch.tensor([-1.5, -1.0, -2.0])
    >>> a = reinforce_pp_advantages(r, lp, ref, torch.tensor([0, 0, 1]), beta=1.0)
    >>> [round(v, 4) for v in a.tolist()]  # before whitening: 0.5 − (0.5 + 0), 0.5 − 0, −0.5 − 0
    [0.0, 1.2247, -1.2247]
    """
    per_completion = centred_advantages(rewards).flatten()[index]
    if reference_logps is not None and beta:
        kl = (logps - reference_logps).detach()  # k1, per token
        # Σ_{s ≥ t} within each completion: its total less what came before t in it.
        totals = kl.new_zeros(rewards.numel()).index_add(0, index, kl)
        before = torch.cumsum(kl, 0) - kl  # everything before t, all completions
        positions = torch.arange(kl.numel(), device=kl.device)
        first = torch.full((rewards.numel(),), kl.numel() - 1, device=kl.device).scatter_reduce(
            0, index, positions, reduce="amin")  # each completion's first token
        per_completion = per_completion - beta * (totals[index] - (before - before[first[index]]))
    if not bool(centred_advantages(rewards).any()):  # equal rewards: only the KL is left, not scaled up to unit size
        return per_completion
    centred = per_completion - per_completion.mean()
    return centred / (centred.std(unbiased=False) + 1e-8)
