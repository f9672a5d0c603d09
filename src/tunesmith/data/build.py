"""Read, validate and tokenize datasets, before any training starts.

Every problem in every file is collected and reported at once as ``file:line: field: message``.
``tunesmith data validate`` and ``tunesmith train`` run the same checks, so they print the same
messages; with any error, nothing is trained (``DataError``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import DataConfig, DatasetConfig
from tunesmith.data.formats import CHAT_FORMATS, detect_format, to_canonical
from tunesmith.data.readers import read_rows
from tunesmith.data.tokenize import tokenize_rows_batched
from tunesmith.errors import DataError

log = logging.getLogger(__name__)
BATCH = 1024  # rows per batched tokenizer call


@dataclass(frozen=True)
class Finding:
    """One problem with one row: where, which field, what, and how bad."""

    file: str
    line: int | None
    field: str
    message: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclass
class CanonicalRow:
    file: str
    line: int
    row: dict[str, Any]
    fmt: str
    raw: Any = None  # the row as read, written back unchanged by split, dedup and mix

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class DataReport:
    """What happened to the data: counts and findings."""

    rows: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    trainable_tokens: int = 0
    formats: dict[str, str] = field(default_factory=dict)  # file -> format
    findings: list[Finding] = field(default_factory=list)

    def add(self, file: str, line: int | None, field_name: str, message: str, severity: str = "error") -> None:
        self.findings.append(Finding(file, line, field_name, message, severity))

    @property
    def errors(self) -> list[str]:
        return [str(f) for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[str]:
        return [str(f) for f in self.findings if f.severity == "warning"]

    def as_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "truncated": self.truncated, "dropped_empty": self.dropped_empty,
                "trainable_tokens": self.trainable_tokens, "formats": self.formats,
                "errors": [asdict(f) for f in self.findings if f.severity == "error"],
                "warnings": [asdict(f) for f in self.findings if f.severity == "warning"]}


def row_fingerprint(row: dict[str, Any]) -> str:
    """The same content gives the same fingerprint, whatever the key order or source format."""
    return hashlib.blake2b(json.dumps(row, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).hexdigest()


def read_canonical(dataset: DatasetConfig, report: DataReport, allowed: tuple[str, ...] | None = None
                   ) -> list[CanonicalRow]:
    """One file's rows in canonical form; problems go into ``report`` with file:line and field.

    ``allowed`` limits the formats (SFT takes chat and text rows, not preference pairs).
    """
    rows: list[CanonicalRow] = []
    file_format = None if dataset.format == "auto" else dataset.format
    first_line, seen = 0, {}
    for raw in read_rows(dataset.path):
        if raw.error:
            report.add(raw.file, raw.line, "", raw.error)
            continue
        detected = detect_format(raw.value)
        if file_format is None:
            if detected is None:
                report.add(raw.file, raw.line, "row", "none of the fields messages, conversations, instruction/output, "
                           "text, or prompt/chosen/rejected; name the format in data.train[].format")
                continue
            file_format, first_line = detected, raw.line
            if allowed and file_format not in allowed:
                report.add(raw.file, raw.line, "row", f"the file holds {file_format} rows, which this task does not "
                           f"take (it takes {', '.join(allowed)})")
                return rows
        elif dataset.format == "auto" and detected not in (None, file_format):
            report.add(raw.file, raw.line, "row", f"is in {detected} format but the file is in {file_format} format "
                       f"(from line {first_line}); one format per file")
            continue
        canonical, problems = to_canonical(raw.value, file_format)
        for problem in problems:
            report.add(raw.file, raw.line, problem.field, problem.message, problem.severity)
        if canonical is None:
            continue
        fingerprint = row_fingerprint(canonical)
        if fingerprint in seen:
            report.add(raw.file, raw.line, "row", f"duplicate of line {seen[fingerprint]}", "warning")
        else:
            seen[fingerprint] = raw.line
        rows.append(CanonicalRow(raw.file, raw.line, canonical, file_format, raw.value))
    report.formats[dataset.path] = file_format or "unknown"
    if not rows and not report.errors:
        report.add(dataset.path, None, "", "the file holds no rows")
    return rows


def tokenize_rows(rows: list[CanonicalRow], tokenizer: PreTrainedTokenizerBase, config: DataConfig,
                  report: DataReport) -> datasets.Dataset:
    """Tokenize canonical rows; over-long rows are warned about, empty-label rows follow the policy."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "where": []}
    results = []
    for start in range(0, len(rows), BATCH):
        chunk = [item.row for item in rows[start:start + BATCH]]
        results += tokenize_rows_batched(tokenizer, chunk, config.max_seq_len, config.train_on_prompt)
    for item, tokenized in zip(rows, results):
        if isinstance(tokenized, ValueError):
            report.add(item.file, item.line, "messages", str(tokenized))
            continue
        if tokenized.length_before_truncation > config.max_seq_len:
            report.truncated += 1
            report.add(item.file, item.line, "row", f"over-long, {tokenized.length_before_truncation} tokens > "
                       f"data.max_seq_len {config.max_seq_len}; truncated", "warning")
        if tokenized.problems:
            if config.empty_labels == "drop":
                report.dropped_empty += 1
                continue
            for name, message in tokenized.problems:
                report.add(item.file, item.line, name, message)
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
    train_rows = [row for dataset in config.train for row in read_canonical(dataset, report, CHAT_FORMATS)]
    eval_rows = [row for dataset in config.eval for row in read_canonical(dataset, report, CHAT_FORMATS)]
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
