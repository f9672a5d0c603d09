"""LLM-as-judge pairwise win rate through any OpenAI-compatible chat endpoint.

Each row is judged twice, the two replies swapped between positions A and B, so that a judge that
favours a position scores 0.5, not a win. A row scores 1 per order the target's reply wins, 0.5
per tie (or an answer that is not A, B or T), averaged over the two orders.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

JUDGE_SYSTEM = ("You compare two assistant replies to the same conversation. Judge which reply better answers "
                "the user: correct, helpful, and following the instructions. A reference answer may be given. "
                "Answer with a single letter: A, B, or T for a tie.")
_VERDICT = re.compile(r"^\W*(A|B|T|TIE)\b", re.IGNORECASE)


@dataclass
class JudgeSettings:
    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = 4
    use_reference: bool = True


def verdict(text: str | None) -> str | None:
    """'A', 'B', 'T' from a judge's answer, or None when it is none of them.

    >>> verdict("B"), verdict(" **A** is better"), verdict("tie"), verdict("Both are fine")
    ('B', 'A', 'T', None)
    """
    match = _VERDICT.match(text or "")
    if not match:
        return None
    letter = match.group(1).upper()
    return "T" if letter == "TIE" else letter


def judge_prompt(prompt: list[dict[str, str]], reference: str | None, first: str, second: str) -> str:
    conversation = "\n\n".join(f"[{turn['role']}]\n{turn['content']}" for turn in prompt)
    parts = [f"# Conversation\n{conversation}"]
    if reference is not None:
        parts.append(f"# Reference answer\n{reference}")
    parts += [f"# Reply A\n{first}", f"# Reply B\n{second}", "Which reply is better: A, B or T (tie)?"]
    return "\n\n".join(parts)


def order_score(answer: str | None, target_is: str) -> float:
    """1 when the judge chose the target's position, 0 for the other's, 0.5 for a tie or no verdict."""
    if answer not in ("A", "B"):
        return 0.5
    return 1.0 if answer == target_is else 0.0


def judge_rows(settings: JudgeSettings, prompts: list[list[dict[str, str]]], references: list[str],
               target: list[str], other: list[str], client: Any = None) -> dict[str, Any]:
    """Both orders for every row; returns per-row scores and verdicts, the position consistency (the
    share of rows whose winner did not depend on the order) and the count of unusable answers."""
    if client is None:
        try:
            import openai
        except ImportError:
            raise ImportError("the LLM judge talks to its endpoint with the openai package: pip install openai") \
                from None
        client = openai.OpenAI(base_url=settings.url, api_key=os.environ.get(settings.api_key_env) or "none",
                               max_retries=2, timeout=120)
    scores, verdicts, consistent, unparsed = [], [], 0, 0
    started = time.monotonic()
    for index, (prompt, reference, mine, theirs) in enumerate(zip(prompts, references, target, other)):
        answers = []
        for first, second in ((mine, theirs), (theirs, mine)):
            text = judge_prompt(prompt, reference if settings.use_reference else None, first, second)
            reply = client.chat.completions.create(
                model=settings.model, temperature=0, max_tokens=settings.max_tokens,
                messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": text}])
            answers.append(verdict(reply.choices[0].message.content))
        unparsed += sum(a is None for a in answers)
        forward, swapped = order_score(answers[0], "A"), order_score(answers[1], "B")
        consistent += forward == swapped
        scores.append((forward + swapped) / 2)
        verdicts.append(answers)
        if (index + 1) % 10 == 0 or index + 1 == len(prompts):
            log.info("judge: %d/%d rows, %.1f s", index + 1, len(prompts), time.monotonic() - started)
    return {"scores": np.array(scores), "verdicts": verdicts, "consistency": consistent / max(len(prompts), 1),
            "unparsed": unparsed}
