"""Read, validate and tokenize datasets, before any training starts.

Every problem in every file is collected and reported at once as ``file:line: field: message``.
``tunesmith data validate`` and ``tunesmith train`` run the same checks, so they print the same
messages; with any error, nothing is trained (``DataError``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import DataConfig, DatasetConfig
from tunesmith.data.formats import CHAT_FORMATS, detect_format, to_canonical
from tunesmith.data.preference import as_chat, sides
from tunesmith.data.readers import jsonl_lines, parse_json_line, read_rows
from tunesmith.data.tokenize import tokenize_rows_batched
from tunesmith.errors import DataError

log = logging.getLogger(__name__)
BATCH = 1024  # rows per batched tokenizer call
UNKNOWN_FORMAT = ("none of the fields messages, conversations, instruction/output, question/answer, text, or "
                  "prompt/chosen/rejected; name the format (data.train[].format, or --format)")


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

    def merge(self, other: DataReport) -> None:
        self.rows += other.rows
        self.truncated += other.truncated
        self.dropped_empty += other.dropped_empty
        self.trainable_tokens += other.trainable_tokens
        self.findings += other.findings

    def as_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "truncated": self.truncated, "dropped_empty": self.dropped_empty,
                "trainable_tokens": self.trainable_tokens, "formats": self.formats,
                "errors": [asdict(f) for f in self.findings if f.severity == "error"],
                "warnings": [asdict(f) for f in self.findings if f.severity == "warning"]}


def row_fingerprint(row: dict[str, Any]) -> bytes:
    """The same content gives the same fingerprint, whatever the key order or source format."""
    if "messages" in row:
        key = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in row["messages"])
    elif "prompt" in row:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
    else:
        key = row["text"]
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass
class TokenizedItem:
    where: str
    input_ids: list[int]
    labels: list[int]


@dataclass
class _Chunk:
    """One batch of rows to check (and tokenize) together, in this process or a worker."""

    file: str
    items: list[tuple[int, Any]]  # (line, parsed value) or, for JSONL, (line, line text)
    parse: bool  # items hold JSONL text still to parse
    fmt: str
    auto: bool
    first_line: int
    config: DataConfig | None  # tokenize when set
    keep_rows: bool


@dataclass
class _ChunkResult:
    rows: list[CanonicalRow]
    fingerprints: list[tuple[int, bytes]]
    report: DataReport
    tokenized: list[TokenizedItem]


def _canonical(chunk: _Chunk, report: DataReport) -> list[CanonicalRow]:
    rows = []
    for line, value in chunk.items:
        if chunk.parse:
            value, error = parse_json_line(value)
            if error:
                report.add(chunk.file, line, "", error)
                continue
        detected = detect_format(value)
        if line < chunk.first_line and detected is None:
            report.add(chunk.file, line, "row", UNKNOWN_FORMAT)
            continue
        # In a file of unpaired rows, a row with a non-boolean label reads as prompt/completion; it is
        # an unpaired row with a bad flag, which the unpaired reader names.
        flag_fault = chunk.fmt == "unpaired" and detected == "completion" and "label" in value
        if chunk.auto and detected not in (None, chunk.fmt) and not flag_fault:
            report.add(chunk.file, line, "row", f"is in {detected} format but the file is in {chunk.fmt} format "
                       f"(from line {chunk.first_line}); one format per file")
            continue
        canonical, problems = to_canonical(value, chunk.fmt)
        for problem in problems:
            report.add(chunk.file, line, problem.field, problem.message, problem.severity)
        if canonical is not None:
            rows.append(CanonicalRow(chunk.file, line, canonical, chunk.fmt, value))
    return rows


def _check_tokenized(rows: list[CanonicalRow], tokenizer: PreTrainedTokenizerBase, config: DataConfig,
                     report: DataReport) -> list[TokenizedItem]:
    """Tokenize; over-long rows are warned about, empty-label rows follow ``config.empty_labels``."""
    # A preference pair is checked twice: prompt + chosen, prompt + rejected.
    jobs = [(r, side) for r in rows for side in (sides(r.row) or ("row",))]
    chat_rows = [as_chat(r.row, side) for r, side in jobs]
    kept = []
    for (item, side), tokenized in zip(jobs, tokenize_rows_batched(
            tokenizer, chat_rows, config.max_seq_len, config.train_on_prompt)):
        if isinstance(tokenized, ValueError):
            report.add(item.file, item.line, "messages", str(tokenized))
            continue
        if tokenized.length_before_truncation > config.max_seq_len:
            report.truncated += 1
            what = "over-long" if side == "row" else f"over-long, prompt + {side}"
            report.add(item.file, item.line, side, f"{what}, {tokenized.length_before_truncation} tokens > "
                       f"data.max_seq_len {config.max_seq_len}; truncated", "warning")
        if tokenized.problems and side == "row":
            if config.empty_labels == "drop":
                report.dropped_empty += 1
                continue
            for name, message in tokenized.problems:
                report.add(item.file, item.line, name, message)
            continue
        if side != "rejected":
            report.rows += 1
        if side == "row":
            kept.append(TokenizedItem(item.where, tokenized.input_ids, tokenized.labels))
            report.trainable_tokens += tokenized.trainable_tokens
    return kept


_WORKER_TOKENIZER: PreTrainedTokenizerBase | None = None


def _process_chunk(chunk: _Chunk) -> _ChunkResult:
    if multiprocessing.parent_process() is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers fill the cores
    report = DataReport()
    rows = _canonical(chunk, report)
    fingerprints = [(row.line, row_fingerprint(row.row)) for row in rows]
    tokenized = _check_tokenized(rows, _WORKER_TOKENIZER, chunk.config, report) if chunk.config else []
    if not chunk.config:
        report.rows = len(rows)
    return _ChunkResult(rows if chunk.keep_rows else [], fingerprints, report, tokenized)


def _workers(jobs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, jobs) if "fork" in multiprocessing.get_all_start_methods() else 1


def _run_chunks(chunks: list[_Chunk], tokenizer: PreTrainedTokenizerBase | None) -> list[_ChunkResult]:
    """Process chunks, in forked worker processes when there are several chunks and cores: parsing,
    checks and chat-template rendering are Python, one core per process. Workers inherit the
    tokenizer through fork instead of pickling it."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer
    try:
        workers = _workers(len(chunks))
        if workers < 2:
            return [_process_chunk(chunk) for chunk in chunks]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_process_chunk, chunks))
    finally:
        _WORKER_TOKENIZER = None


def _first_row(items: list[tuple[int, Any]], parse: bool) -> tuple[int, str | None]:
    """The line and format of the first row whose format can be told."""
    for line, value in items:
        if parse:
            value, error = parse_json_line(value)
            if error:
                continue
        detected = detect_format(value)
        if detected is not None:
            return line, detected
    return 0, None


def load_rows(dataset: DatasetConfig, report: DataReport, allowed: tuple[str, ...] | None = None,
              tokenizer: PreTrainedTokenizerBase | None = None, config: DataConfig | None = None,
              keep_rows: bool = True) -> tuple[list[CanonicalRow], list[TokenizedItem]]:
    """Check every row of one file (and tokenize it, with ``tokenizer`` and ``config``).

    Problems go into ``report`` as file:line: field: message, sorted by line. ``allowed`` limits
    the formats (SFT takes chat and text rows, not preference pairs).
    """
    path = dataset.path
    if path.lower().endswith(".jsonl"):  # parsed in the workers too
        items = [(n, text) for n, text in enumerate(jsonl_lines(Path(path).read_text(encoding="utf-8-sig")), 1)
                 if text.strip()]
        parse = True
    else:
        items, parse = [], False
        for raw in read_rows(path):
            if raw.error:
                report.add(raw.file, raw.line, "", raw.error)
            else:
                items.append((raw.line, raw.value))
    first_line, detected = _first_row(items, parse)
    file_format = detected if dataset.format == "auto" else dataset.format
    report.formats[path] = file_format or "unknown"
    if file_format is None:
        report.add(path, items[0][0] if items else None, "row", UNKNOWN_FORMAT)
        return [], []
    if allowed and file_format not in allowed:
        report.add(path, first_line, "row", f"the file holds {file_format} rows, which this task does not take "
                   f"(it takes {', '.join(allowed)})")
        return [], []
    chunks = [_Chunk(path, items[i:i + BATCH], parse, file_format, dataset.format == "auto",
                     first_line if dataset.format == "auto" else 0, config if tokenizer else None, keep_rows)
              for i in range(0, len(items), BATCH)]
    rows, tokenized, first_seen = [], [], {}
    for result in _run_chunks(chunks, tokenizer):
        rows += result.rows
        tokenized += result.tokenized
        report.merge(result.report)
        for line, fingerprint in result.fingerprints:
            if fingerprint in first_seen:
                report.add(path, line, "row", f"duplicate of line {first_seen[fingerprint]}", "warning")
            else:
                first_seen[fingerprint] = line
    report.findings.sort(key=lambda f: (f.file, f.line or 0))
    if not items and not report.errors:
        report.add(path, None, "", "the file holds no rows")
    return rows, tokenized


def read_canonical(dataset: DatasetConfig, report: DataReport, allowed: tuple[str, ...] | None = None
                   ) -> list[CanonicalRow]:
    """One file's valid rows in canonical form; problems go into ``report``."""
    return load_rows(dataset, report, allowed)[0]


def _as_dataset(items: list[TokenizedItem]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [i.input_ids for i in items], "labels": [i.labels for i in items],
                                       "where": [i.where for i in items]})


def hold_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded random ``fraction`` of the items (at least one) for evaluation.

    >>> hold_out(list(range(10)), 0.2, seed=0)[1]
    [7, 8]
    """
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(fraction * len(items)))])
    return [item for i, item in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def build_datasets(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0
                   ) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Train and eval datasets of token ids and labels; raises ``DataError`` listing every error."""
    report = DataReport()
    train = [t for d in config.train for t in load_rows(d, report, CHAT_FORMATS, tokenizer, config, False)[1]]
    evaluation = [t for d in config.eval for t in load_rows(d, report, CHAT_FORMATS, tokenizer, config, False)[1]]
    if report.errors:
        raise DataError(report.errors, report.warnings)
    if not evaluation:
        train, evaluation = hold_out(train, config.eval_fraction, seed)
    if report.dropped_empty:
        log.warning("dropped %d row(s) with no trainable token (data.empty_labels: drop)", report.dropped_empty)
    for warning in report.warnings:
        log.warning("%s", warning)
    if not train:
        raise DataError(["no training rows are left after dropping rows with no trainable token"])
    return _as_dataset(train), _as_dataset(evaluation) if evaluation else None, report
