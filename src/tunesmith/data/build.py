"""Read, validate and tokenize the configured datasets, before any training starts.

Every problem in every file is collected and reported at once as ``file:line: field: message``;
if there is any error, nothing is trained (``DataError``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import DataConfig, DatasetConfig
from tunesmith.data.formats import detect_format, to_canonical
from tunesmith.data.readers import read_rows
from tunesmith.data.tokenize import tokenize_row
from tunesmith.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class CanonicalRow:
    where: str  # file:line
    row: dict[str, Any]


@dataclass
class DataReport:
    """What happened to the data: counts and the warnings shown to the user."""

    rows: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    trainable_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_canonical(dataset: DatasetConfig, report: DataReport) -> list[CanonicalRow]:
    """One file's rows in canonical form; problems go into ``report`` with file:line and field."""
    rows: list[CanonicalRow] = []
    file_format = None if dataset.format == "auto" else dataset.format
    first_line = 0
    for raw in read_rows(dataset.path):
        if raw.error:
            report.errors.append(f"{raw.where}: {raw.error}")
            continue
        detected = detect_format(raw.value)
        if file_format is None:
            if detected is None:
                report.errors.append(f"{raw.where}: row: none of the fields messages, conversations, "
                                     "instruction/output or text; name the format in data.train[].format")
                continue
            file_format, first_line = detected, raw.line
        elif dataset.format == "auto" and detected not in (None, file_format):
            report.errors.append(f"{raw.where}: row: is in {detected} format but the file is in {file_format} "
                                 f"format (from line {first_line}); one format per file")
            continue
        canonical, problems = to_canonical(raw.value, file_format)
        for problem in problems:
            target = report.errors if problem.severity == "error" else report.warnings
            target.append(f"{raw.where}: {problem.field}: {problem.message}")
        if canonical is not None:
            rows.append(CanonicalRow(raw.where, canonical))
    if not rows and not report.errors:
        report.errors.append(f"{dataset.path}: the file holds no rows")
    return rows


def tokenize_rows(rows: list[CanonicalRow], tokenizer: PreTrainedTokenizerBase, config: DataConfig,
                  report: DataReport) -> datasets.Dataset:
    """Tokenize canonical rows; over-long rows are warned about, empty-label rows follow the policy."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "where": []}
    for item in rows:
        try:
            tokenized = tokenize_row(tokenizer, item.row, config.max_seq_len, config.train_on_prompt)
        except ValueError as err:
            report.errors.append(f"{item.where}: messages: {err}")
            continue
        if tokenized.length_before_truncation > config.max_seq_len:
            report.truncated += 1
            report.warnings.append(f"{item.where}: row: over-long, {tokenized.length_before_truncation} tokens > "
                                   f"data.max_seq_len {config.max_seq_len}; truncated")
        if tokenized.problems:
            if config.empty_labels == "drop":
                report.dropped_empty += 1
                continue
            report.errors += [f"{item.where}: {name}: {message}" for name, message in tokenized.problems]
            continue
        columns["input_ids"].append(tokenized.input_ids)
        columns["labels"].append(tokenized.labels)
        columns["where"].append(item.where)
        report.trainable_tokens += tokenized.trainable_tokens
    report.rows += len(columns["where"])
    return datasets.Dataset.from_dict(columns)


def build_datasets(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0
                   ) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Train and eval datasets of token ids and labels; raises ``DataError`` listing every error."""
    report = DataReport()
    train_rows = [row for dataset in config.train for row in read_canonical(dataset, report)]
    eval_rows = [row for dataset in config.eval for row in read_canonical(dataset, report)]
    if not eval_rows and config.eval_fraction > 0 and len(train_rows) > 1:
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        held = set(order[: max(1, round(config.eval_fraction * len(train_rows)))])
        eval_rows = [train_rows[i] for i in sorted(held)]
        train_rows = [row for i, row in enumerate(train_rows) if i not in held]
    # Tokenize even when reading found errors, so that length problems are reported in the same pass.
    train = tokenize_rows(train_rows, tokenizer, config, report)
    evaluation = tokenize_rows(eval_rows, tokenizer, config, report) if eval_rows else None
    if report.errors:
        raise DataError(report.errors, report.warnings)
    if report.dropped_empty:
        log.warning("dropped %d row(s) with no trainable token (data.empty_labels: drop)", report.dropped_empty)
    for warning in report.warnings:
        log.warning("%s", warning)
    if len(train) == 0:
        raise DataError(["no training rows are left after dropping rows with no trainable token"])
    return train, evaluation, report
