"""Metrics over evaluated rows, each a statistic of a set of row indices so that the bootstrap can
resample rows: the same indices for two models give paired confidence intervals of their difference.

ROUGE comes from ``rouge-score`` and BLEU/chrF from ``sacrebleu``; what is ours is the per-row
bookkeeping: sacrebleu's corpus scores are computed from summed per-sentence statistics, which are
extracted once, so a resample costs a sum instead of re-tokenising the corpus.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# The names live in config, which validates `eval --metrics` and `--normalize`; re-exported here.
from tunesmith.config.commands import parse_metrics  # noqa: F401
from tunesmith.config.names import GENERATION_METRICS, LIKELIHOOD_METRICS, NORMALISATIONS  # noqa: F401
from tunesmith.config.names import METRIC_ALIASES as ALIASES  # noqa: F401
from tunesmith.rewards import final_answer

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.DOTALL)


def normalise(text: str, steps: Sequence[str] = NORMALISATIONS) -> str:
    """SQuAD-style answer normalisation, each step optional.

    >>> normalise("  The Answer:  42! ")
    'answer 42'
    >>> normalise("The Answer", ["whitespace"])
    'The Answer'
    """
    if "case" in steps:
        text = text.lower()
    if "punct" in steps:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if "articles" in steps:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split()) if "whitespace" in steps else text.strip()


def extract(text: str, how: str) -> str | None:
    """What exact match compares: the whole text (``none``), the final number (``number``: GSM8K's
    ``#### n`` or else the last number), or a regex's first group (or whole match).

    >>> extract("so 3 + 4 = 7\\n#### 7", "number"), extract("Answer: B.", r"Answer: ([A-D])"), extract("x", "number")
    ('7', 'B', None)
    """
    if how == "none":
        return text
    if how == "number":
        value = final_answer(text)
        if value is None or not math.isfinite(value):
            return None
        return str(int(value)) if value == int(value) else repr(value)
    match = re.search(how, text)
    if not match:
        return None
    return match.group(1) if match.groups() else match.group(0)


def exact_match(prediction: str, reference: str, how: str = "none", steps: Sequence[str] = NORMALISATIONS) -> float:
    """1.0 where the extracted, normalised prediction equals the reference's; a prediction with
    nothing to extract scores 0. A reference with nothing to extract is compared whole (an answer
    key of plain letters or numbers).

    >>> exact_match("The answer is 12.", "#### 12", "number"), exact_match("Paris.", "paris"), exact_match("", "x")
    (1.0, 1.0, 0.0)
    """
    if how == "number":  # compared as numbers: normalisation would drop a minus sign or a decimal point
        got_number, want_number = final_answer(prediction), final_answer(reference)
        return float(got_number is not None and want_number is not None and math.isfinite(got_number)
                     and abs(got_number - want_number) < 1e-6)
    got, want = extract(prediction, how), extract(reference, how)
    if got is None:
        return 0.0
    want = reference if want is None else want
    return float(normalise(got, steps) == normalise(want, steps))


def json_valid(prediction: str) -> float:
    """1.0 where the reply is one JSON value (a surrounding Markdown code fence is allowed).

    >>> json_valid('{"a": 1}'), json_valid('```json\\n[1, 2]\\n```'), json_valid("{'a': 1}")
    (1.0, 1.0, 0.0)
    """
    text = prediction.strip()
    fenced = _FENCE.match(text)
    try:  # NaN and Infinity are Python's extension, not JSON; deep nesting is a degenerate reply
        json.loads(fenced.group(1) if fenced else text, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return 0.0
    return 1.0


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def regex_match(prediction: str, pattern: str) -> float:
    """1.0 where ``pattern`` matches somewhere in the reply (anchor it with ^…$ for the whole reply)."""
    return float(re.search(pattern, prediction, re.DOTALL) is not None)


def rouge_rows(predictions: list[str], references: list[str], kinds: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-row ROUGE F1 (×100) of each kind (rouge1, rouge2, rougeL), with Porter stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {kind: np.array([100 * s[kind].fmeasure for s in scores]) for kind in kinds}


@dataclass
class CorpusMetric:
    """A sacrebleu corpus metric as a statistic of row indices."""

    metric: object  # sacrebleu.metrics.BLEU or CHRF
    stats: np.ndarray  # (rows, statistics)

    def __call__(self, rows: np.ndarray) -> float:
        # Summed per-sentence statistics give exactly the corpus score (the test checks it against
        # sacrebleu's own corpus_score). _extract_corpus_statistics/_compute_score_from_stats are
        # sacrebleu's own path for corpus_score, stable across 2.x.
        return float(self.metric._compute_score_from_stats(self.stats[rows].sum(axis=0).tolist()).score)


def corpus_metric(name: str, predictions: list[str], references: list[str]) -> CorpusMetric:
    """BLEU (sacrebleu's default 13a tokenisation, exponential smoothing) or chrF, per row."""
    from sacrebleu.metrics import BLEU, CHRF

    metric = BLEU() if name == "bleu" else CHRF()
    stats = metric._extract_corpus_statistics(predictions, [references])
    return CorpusMetric(metric, np.array(stats, dtype=np.float64).reshape(len(predictions), -1))


Statistic = Callable[[np.ndarray], float]


def mean_of(values: np.ndarray) -> Statistic:
    return lambda rows: float(values[rows].mean())


def loss_of(nll: np.ndarray, tokens: np.ndarray, exponentiate: bool = False) -> Statistic:
    """Mean negative log-likelihood per assistant token over the rows (the rows' sums over their
    token counts, as training's eval loss), or its exponential, the perplexity."""
    def statistic(rows: np.ndarray) -> float:
        value = float(nll[rows].sum() / max(tokens[rows].sum(), 1))
        return math.exp(value) if exponentiate else value
    return statistic


def bootstrap(statistic: Statistic, rows: int, resamples: int, seed: int = 0,
              minus: Statistic | None = None) -> tuple[float, float]:
    """95% percentile interval of ``statistic`` over rows resampled with replacement; with
    ``minus``, of ``statistic - minus`` on the same resamples (a paired difference)."""
    if resamples <= 0 or rows < 2:
        return (math.nan, math.nan)
    generator = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        sample = generator.integers(0, rows, rows)
        value = statistic(sample)
        values.append(value - minus(sample) if minus is not None else value)
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))
