"""Look at a dataset before training on it: validate, stats, preview."""

from __future__ import annotations

import html
import statistics
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import DataConfig, DatasetConfig
from tunesmith.data.build import CanonicalRow, DataReport, load_rows
from tunesmith.data.preference import as_chat
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedRow, tokenize_row, tokenize_rows_batched


def validate_file(path: str, fmt: str = "auto", tokenizer: PreTrainedTokenizerBase | None = None,
                  max_seq_len: int = 1024, train_on_prompt: bool = False) -> DataReport:
    """Every problem of one file in one pass: the same checks ``tunesmith train`` runs."""
    report = DataReport()
    dataset = DatasetConfig(path=path, format=fmt)
    config = DataConfig(train=[dataset], max_seq_len=max_seq_len, train_on_prompt=train_on_prompt)
    load_rows(dataset, report, None, tokenizer, config, keep_rows=False)
    return report


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0}
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 1)}


@dataclass
class DatasetStats:
    rows: int
    tokens: dict[str, dict[str, float]]  # prompt / response / total -> min, median, p95, max, mean
    turns: dict[str, float]
    system_prompt_share: float
    max_seq_len: int
    truncated_share: float
    training_tokens_per_epoch: int
    lengths: list[int] = field(repr=False, default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "lengths"}


def compute_stats(rows: list[CanonicalRow], tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> DatasetStats:
    """Token counts with the model's tokenizer and chat template (nothing truncated while counting)."""
    chat_rows = [as_chat(r.row) for r in rows]
    tokenized = [t for t in tokenize_rows_batched(tokenizer, chat_rows, 10**9) if isinstance(t, TokenizedRow)]
    totals = [len(t.input_ids) for t in tokenized]
    responses = [t.trainable_tokens for t in tokenized]
    turns = [sum(m["role"] == "user" for m in r.get("messages", [])) for r in chat_rows]
    with_system = sum(1 for r in chat_rows if r.get("messages") and r["messages"][0]["role"] == "system")
    return DatasetStats(
        rows=len(rows),
        tokens={"prompt": _summary([a - b for a, b in zip(totals, responses)]), "response": _summary(responses),
                "total": _summary(totals)},
        turns=_summary(turns),
        system_prompt_share=round(with_system / max(len(rows), 1), 4),
        max_seq_len=max_seq_len,
        truncated_share=round(sum(t > max_seq_len for t in totals) / max(len(totals), 1), 4),
        training_tokens_per_epoch=sum(min(t, max_seq_len) for t in totals),
        lengths=totals,
    )


def histogram(values: list[int], bins: int = 12) -> list[tuple[int, int, int]]:
    """(low, high, count) per bin over [min, max].

    >>> histogram([1, 2, 2, 9], bins=2)
    [(1, 5, 3), (5, 9, 1)]
    """
    if not values:
        return []
    low, high = min(values), max(values)
    width = max(1, -(-(high - low) // bins))
    edges = [low + i * width for i in range(bins + 1)]
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, (value - low) // width)] += 1
    return [(edges[i], min(edges[i + 1], high), counts[i]) for i in range(bins) if edges[i] <= high]


def terminal_histogram(values: list[int], width: int = 40) -> str:
    rows = histogram(values)
    peak = max((c for _, _, c in rows), default=1) or 1
    return "\n".join(f"{lo:>7}-{hi:<7} {'#' * round(width * c / peak):<{width}} {c}" for lo, hi, c in rows)


def html_report(stats: DatasetStats, source: str) -> str:
    """A self-contained HTML page: the numbers and an SVG histogram of row lengths."""
    rows = histogram(stats.lengths, bins=30)
    peak = max((c for _, _, c in rows), default=1) or 1
    bar_width, height = 20, 200
    bars = "".join(
        f'<rect x="{40 + i * bar_width}" y="{10 + height - height * c / peak:.1f}" width="{bar_width - 2}" '
        f'height="{height * c / peak:.1f}" fill="#4a7bd0"><title>{lo}-{hi} tokens: {c} rows</title></rect>'
        for i, (lo, hi, c) in enumerate(rows))
    limit_x = 40 + bar_width * len(rows) * (stats.max_seq_len - min(stats.lengths, default=0)) / max(
        1, max(stats.lengths, default=1) - min(stats.lengths, default=0))
    limit = (f'<line x1="{limit_x:.1f}" y1="5" x2="{limit_x:.1f}" y2="{height + 10}" stroke="#c33" '
             f'stroke-dasharray="4"/><text x="{limit_x + 4:.1f}" y="20" fill="#c33">max_seq_len</text>'
             if 40 <= limit_x <= 40 + bar_width * len(rows) else "")
    table = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{v[s]}</td>" for s in
                    ("min", "median", "p95", "max", "mean")) + "</tr>" for k, v in stats.tokens.items())
    svg_width = 60 + bar_width * len(rows)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>tunesmith data stats</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:right}}</style></head><body>
<h1>{html.escape(source)}</h1>
<p>{stats.rows} rows; {stats.training_tokens_per_epoch:,} training tokens per epoch at max_seq_len
{stats.max_seq_len}; {100 * stats.truncated_share:.1f}% of rows truncated;
{100 * stats.system_prompt_share:.1f}% with a system prompt.</p>
<table><tr><th>tokens</th><th>min</th><th>median</th><th>p95</th><th>max</th><th>mean</th></tr>{table}</table>
<h2>Row length (tokens)</h2>
<svg width="{svg_width}" height="{height + 40}" xmlns="http://www.w3.org/2000/svg">{bars}{limit}
<text x="40" y="{height + 30}">{min(stats.lengths, default=0)}</text>
<text x="{svg_width - 40}" y="{height + 30}">{max(stats.lengths, default=0)}</text></svg>
</body></html>
"""


def render_preview(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], max_seq_len: int,
                   color: bool, train_on_prompt: bool = False) -> str:
    """The exact training text of a row with the trained tokens marked: green, or ``[[...]]``."""
    tokenized = tokenize_row(tokenizer, row, max_seq_len, train_on_prompt)
    pieces, current, trained = [], [], None
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            pieces.append((trained, tokenizer.decode(current)))
            current = []
        current.append(token)
        trained = is_trained
    if current:
        pieces.append((bool(trained), tokenizer.decode(current)))
    open_mark, close_mark = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    text = "".join(f"{open_mark}{piece}{close_mark}" if is_trained else piece for is_trained, piece in pieces)
    if tokenized.length_before_truncation > max_seq_len:
        text += f"\n... truncated at {max_seq_len} of {tokenized.length_before_truncation} tokens"
    return text

