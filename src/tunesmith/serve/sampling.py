"""OpenAI's logit adjustments as the engine's row processors (``engine.RowProcessor``): presence and
frequency penalties, and ``logit_bias``. Each sees one completion's tokens and next-token logits."""

from __future__ import annotations

import torch


class Penalties:
    """``logit[j] -= frequency * count[j] + presence * (count[j] > 0)`` over the tokens the completion
    has generated so far (not the prompt), as OpenAI defines them.

    >>> logits = Penalties(presence=1.0, frequency=0.5)([2, 2, 0], torch.zeros(4))
    >>> logits.tolist()
    [-1.5, 0.0, -2.0, 0.0]
    """

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency

    def __call__(self, tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not tokens:
            return logits
        ids = torch.tensor(tokens, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        return logits - self.frequency * counts - self.presence * (counts > 0).to(logits.dtype)


class Bias:
    """A fixed bias added to the logits of chosen token ids (OpenAI's ``logit_bias``).

    >>> Bias({1: 5.0, 3: -100.0})([], torch.zeros(4)).tolist()
    [0.0, 5.0, 0.0, -100.0]
    """

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()))

    def __call__(self, tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[self.ids.to(logits.device)] += self.values.to(logits.device, logits.dtype)
        return logits
