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

from tunesmith.errors import TunesmithError

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


def open_client(settings: JudgeSettings, max_retries: int = 2, timeout: float = 120.0) -> Any:
    """An ``openai.OpenAI`` client of the judge's endpoint, its key read from ``settings.api_key_env``."""
    try:
        import openai
    except ImportError:
        raise ImportError("the LLM judge talks to its endpoint with the openai package: pip install openai") from None
    return openai.OpenAI(base_url=settings.url, api_key=os.environ.get(settings.api_key_env) or "none",
                         max_retries=max_retries, timeout=timeout)


def check_endpoint(settings: JudgeSettings, timeout: float = 30.0) -> None:
    """One short request to the judge, at once (no retries), so that a wrong URL, model or key fails before any
    work: a ``TunesmithError`` that says which, else nothing."""
    import openai

    client = open_client(settings, max_retries=0, timeout=timeout)
    try:
        client.chat.completions.create(model=settings.model, temperature=0, max_tokens=settings.max_tokens,
                                       messages=[{"role": "user", "content": "Answer with the letter A."}])
    except (openai.APIConnectionError, openai.APITimeoutError) as err:
        cause = err.__cause__ or err  # httpx's error, which says what failed (refused, unknown host, timed out)
        raise TunesmithError(f"the judge's endpoint {settings.url} cannot be reached ({type(err).__name__}: "
                             f"{str(cause) or type(cause).__name__}); "
                             "start its server or fix the url (an OpenAI-compatible base URL, e.g. "
                             "http://localhost:8000/v1)") from None
    except openai.AuthenticationError as err:
        raise TunesmithError(f"the judge's endpoint {settings.url} refused the key in ${settings.api_key_env} "
                             f"({err.status_code}); set that variable to a valid key") from None
    except openai.NotFoundError as err:
        raise TunesmithError(f"the judge's endpoint {settings.url} answered 404 for model {settings.model!r} ({err}); "
                             "check the model name and that the url ends where the API starts (…/v1)") from None
    except openai.APIStatusError as err:
        raise TunesmithError(f"the judge's endpoint {settings.url} answered {err.status_code}: {err}") from None


def judge_rows(settings: JudgeSettings, prompts: list[list[dict[str, str]]], references: list[str | None],
               target: list[str], other: list[str], client: Any = None, progress: bool = True) -> dict[str, Any]:
    """Both orders for every row; returns per-row scores and verdicts, the position consistency (the
    share of rows whose winner did not depend on the order) and the count of unusable answers. A reference
    of None is left out of the judge's prompt; ``progress`` logs every 10 rows."""
    if client is None:
        client = open_client(settings)
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
        if progress and ((index + 1) % 10 == 0 or index + 1 == len(prompts)):
            log.info("judge: %d/%d rows, %.1f s", index + 1, len(prompts), time.monotonic() - started)
    return {"scores": np.array(scores), "verdicts": verdicts, "consistency": consistent / max(len(prompts), 1),
            "unparsed": unparsed}
