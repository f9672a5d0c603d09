"""Built-in reward functions for ``task: grpo``. A reward function takes the prompts (chat
messages), the completions (text) and the reference answers (the dataset's assistant turn, or
None) and returns one float per completion. Name them in the config as ``module:function``
(``tunesmith.rewards:gsm8k_exact``, ``my_rewards:brevity``)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

RewardFunction = Callable[[list[list[dict]], list[str], list[str | None]], list[float]]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_answer(text: str | None) -> float | None:
    """The number after GSM8K's ``####``, else the last number in the text.

    >>> final_answer("She pays 3 * 4 = 12 dollars.\\n#### 1,200"), final_answer("so the answer is 42."), final_answer("none")
    (1200.0, 42.0, None)
    """
    if not text:
        return None
    marked = _FINAL.search(text)
    if marked:
        return _number(marked.group(1))
    numbers = _NUMBER.findall(text)
    return _number(numbers[-1]) if numbers else None


def gsm8k_exact(prompts: list[list[dict]], completions: list[str], answers: list[str | None]) -> list[float]:
    """1.0 where the completion's final number equals the reference's ``#### n``, else 0.0.

    >>> gsm8k_exact([[]] * 2, ["... #### 18", "I think 17"], ["x #### 18", "x #### 18"])
    [1.0, 0.0]
    """
    rewards = []
    for completion, answer in zip(completions, answers):
        expected, got = final_answer(answer), final_answer(completion)
        rewards.append(float(expected is not None and got is not None and abs(expected - got) < 1e-6))
    return rewards


def gsm8k_format(prompts: list[list[dict]], completions: list[str], answers: list[str | None]) -> list[float]:
    """1.0 where the completion ends its reasoning with ``#### <number>``, the format GSM8K grades.

    >>> gsm8k_format([[]] * 2, ["3 + 4 = 7\\n#### 7", "7"], [None, None])
    [1.0, 0.0]
    """
    return [float(bool(_FINAL.search(c))) for c in completions]


def load_reward(name: str) -> RewardFunction:
    """``module:function`` (or ``module.function``) -> the callable; a clear error otherwise."""
    module_name, _, attribute = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"reward {name!r}: cannot import it ({err}); name a function as module:function") from None
    if not callable(function):
        raise ValueError(f"reward {name!r} is not callable")
    return function


class WeightedRewards:
    """The configured reward functions, loaded once: ``names`` as module:function, summed with
    ``weights`` (all 1 by default) into one float per completion."""

    def __init__(self, names: list[str], weights: list[float] | None = None):
        self.functions = [load_reward(name) for name in names]
        self.weights = weights or [1.0] * len(self.functions)

    def __call__(self, prompts: list[list[dict]], completions: list[str], answers: list[str | None]) -> list[float]:
        total = [0.0] * len(completions)
        for function, weight in zip(self.functions, self.weights):
            values = function(prompts, completions, answers)
            if len(values) != len(completions):
                raise ValueError(f"reward {function.__name__} returned {len(values)} values for "
                                 f"{len(completions)} completions")
            total = [t + weight * float(v) for t, v in zip(total, values)]
        return total
