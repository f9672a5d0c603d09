"""Read data files into (location, row) pairs, keeping the line number of every row.

JSON and JSONL are parsed here rather than through ``datasets``: its JSON reader stops at the
first malformed line without naming it, and keeps no line numbers, so its errors cannot say
``file:line``. CSV and Parquet go through ``datasets`` (rows are numbered from 1; a CSV row's
line is its number + 1 for the header, when no field spans lines).
"""

from __future__ import annotations

import bisect
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config.names import DATA_SUFFIXES as SUFFIXES


@dataclass(frozen=True)
class RawRow:
    """One row as read: where it came from, and either the parsed value or why it could not be."""

    file: str
    line: int  # 1-based line (JSON/JSONL) or row number (CSV/Parquet)
    value: Any = None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8-sig")  # a byte-order mark from Windows tools is not part of the JSON


def jsonl_lines(text: str) -> list[str]:
    r"""Lines of a JSONL text: split on newlines only. ``str.splitlines`` would also split on
    U+2028/U+2029, which JSON strings may hold unescaped.

    >>> jsonl_lines('{"a": "x\u2028y"}\r\n{"b": 1}\n')
    ['{"a": "x\u2028y"}', '{"b": 1}', '']
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def parse_json_line(line: str) -> tuple[Any, str | None]:
    """(value, None), or (None, why) for a line that is not JSON.

    >>> parse_json_line('{"a": 1}'), parse_json_line('{"a": }')
    (({'a': 1}, None), (None, 'malformed JSON at column 7: Expecting value'))
    """
    try:
        return json.loads(line), None
    except json.JSONDecodeError as err:
        return None, f"malformed JSON at column {err.colno}: {err.msg}"


def _read_jsonl(path: Path, text: str) -> Iterator[RawRow]:
    for number, line in enumerate(jsonl_lines(text), start=1):
        if line.strip():
            value, error = parse_json_line(line)
            yield RawRow(str(path), number, value, error)


def _read_json_array(path: Path, text: str) -> Iterator[RawRow]:
    """Decode a top-level JSON array element by element, recording where each element starts."""
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_of(offset: int) -> int:
        return bisect.bisect_left(newlines, offset) + 1

    decoder = json.JSONDecoder()
    index = len(text) - len(text.lstrip())
    if not text.startswith("[", index):
        # A single JSON object per line is common under a .json name: treat it as JSONL.
        yield from _read_jsonl(path, text)
        return
    index += 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            yield RawRow(str(path), line_of(index), error="malformed JSON: the array is not closed with ]")
            return
        if text[index] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as err:
            yield RawRow(str(path), line_of(err.pos), error=f"malformed JSON: {err.msg}; rows after it were not read")
            return
        yield RawRow(str(path), line_of(index), value)
        index = end


def _read_tabular(path: Path) -> Iterator[RawRow]:
    import datasets

    datasets.disable_progress_bars()
    if path.suffix == ".csv":
        # pandas with every column as text (datasets' CSV reader cannot be told so): inferred number
        # columns would fail the formats' string checks, and empty cells would become NaN.
        import pandas

        table = datasets.Dataset.from_pandas(pandas.read_csv(path, dtype=str, keep_default_na=False),
                                             preserve_index=False)
        offset = 2  # header on line 1
    else:
        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        offset = 1
    for number, row in enumerate(table, start=offset):
        yield RawRow(str(path), number, {k: v for k, v in row.items() if v is not None})


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Every row of a JSON, JSONL, CSV or Parquet file (optionally .gz for JSON/JSONL)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(path, _open_text(path))
    elif name.endswith((".json", ".json.gz")):
        yield from _read_json_array(path, _open_text(path))
    elif name.endswith((".csv", ".parquet")):
        yield from _read_tabular(path)
    else:
        from tunesmith.errors import DataError

        raise DataError([f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}"])
