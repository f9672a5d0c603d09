"""Metrics an objective adds up over the micro-batches between two log lines, kept apart for
training and for eval, and reported as sum / count."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


class Tallies:
    """Running ``[sum, count]`` per metric and mode; ``take`` reports and resets one mode.

    >>> tallies = Tallies(); model = nn.Linear(1, 1).train()
    >>> tallies.add(model, "reward", 3.0, 2); tallies.add(model, "reward", 1.0, 2)
    >>> tallies.take("train"), tallies.take("train")
    ({'reward': 1.0}, {})
    """

    def __init__(self) -> None:
        self.modes: dict[str, defaultdict] = {"train": self._empty(), "eval": self._empty()}

    @staticmethod
    def _empty() -> defaultdict:
        return defaultdict(lambda: [0.0, 0])

    def add(self, model: nn.Module, key: str, total: float, count: int) -> None:
        """Add to ``key`` in the mode ``model`` is in (train or eval)."""
        entry = self.modes["train" if model.training else "eval"][key]
        entry[0] += total
        entry[1] += count

    def add_pairs(self, model: nn.Module, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Each pair's reward of the chosen and of the rejected reply, both (pairs,): their means, the
        pairwise accuracy (chosen above rejected) and the mean margin."""
        pairs = chosen.shape[0]
        self.add(model, "rewards/chosen", float(chosen.sum()), pairs)
        self.add(model, "rewards/rejected", float(rejected.sum()), pairs)
        self.add(model, "rewards/accuracy", float((chosen > rejected).float().sum()), pairs)
        self.add(model, "rewards/margin", float((chosen - rejected).sum()), pairs)

    def take(self, mode: str) -> dict[str, float]:
        tally, self.modes[mode] = self.modes[mode], self._empty()
        return {key: total / count for key, (total, count) in tally.items() if count}
