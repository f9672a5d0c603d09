"""Reshape datasets: convert formats, remove duplicates, split, mix, chunk raw text.

Outputs are JSONL written atomically. Split, dedup and mix write the rows as they were read
(nothing is re-serialised through the canonical form), so no field is lost.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.build import CanonicalRow
from tunesmith.io import write_text_atomic

SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    write_text_atomic(Path(path), "".join(lines))
    return len(lines)


# --- convert -------------------------------------------------------------------------------------

def convert_row(row: dict[str, Any], target: str) -> dict[str, Any]:
    """A canonical row in ``target`` format; ``ValueError`` says what the format cannot carry.

    >>> convert_row({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ...             "sharegpt")
    {'conversations': [{'from': 'human', 'value': 'Q'}, {'from': 'gpt', 'value': 'A'}]}
    """
    if "prompt" in row:
        if target == "preference":
            return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        raise ValueError(f"a preference pair cannot be written as {target} (it has two replies); "
                         "convert --to preference")
    if target == "preference":
        raise ValueError("a chat or text row has no rejected reply to make a preference pair")
    if "text" in row:
        raise ValueError(f"a raw text row has no turns to write as {target}")
    messages = row["messages"]
    if target == "openai":
        return {"messages": messages}
    if target == "sharegpt":
        return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}
    if target == "alpaca":
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        if len(turns) != 2:
            raise ValueError(f"{len(turns) // 2 or 1} exchanges; alpaca holds one (instruction, input, output)")
        out = {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}
        return {**out, "system": system} if system else out
    raise ValueError(f"unknown target format {target!r}")


# --- dedup -----------------------------------------------------------------------------------------

def row_text(row: dict[str, Any]) -> str:
    """All the text of a canonical row, for duplicate detection."""
    if "prompt" in row:
        return " ".join([m["content"] for m in row["prompt"]] + [row["chosen"], row["rejected"]])
    if "text" in row:
        return row["text"]
    return " ".join(m["content"] for m in row["messages"])


def normalise(text: str) -> str:
    """Lowercase, punctuation dropped, white space folded.

    >>> normalise("Hello,   World!\\n")
    'hello world'
    """
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _shingles(text: str, size: int = 3) -> set[bytes]:
    words = normalise(text).split()
    if len(words) < size:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


def duplicate_clusters(texts: list[str], near: float | None = None, num_perm: int = 256) -> list[list[int]]:
    """Groups of row indices that are exact duplicates (after normalisation) or, with ``near``,
    near duplicates (MinHash estimate of word-3-gram Jaccard similarity >= ``near``). Singletons omitted."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    first: dict[str, int] = {}
    for index, text in enumerate(texts):
        key = normalise(text)
        if key in first:
            union(index, first[key])
        else:
            first[key] = index
    if near is not None:
        from datasketch import MinHash, MinHashLSH

        # Bands tuned to miss few true pairs (a missed pair leaks across a split); each candidate is
        # then confirmed by its estimated Jaccard similarity, which removes the extra false positives.
        lsh = MinHashLSH(threshold=near, num_perm=num_perm, weights=(0.1, 0.9))
        signatures = {}
        for index in first.values():
            signature = MinHash(num_perm=num_perm, seed=1)
            signature.update_batch(list(_shingles(texts[index])))
            for other in lsh.query(signature):
                if signature.jaccard(signatures[other]) >= near:
                    union(index, other)
            lsh.insert(index, signature)
            signatures[index] = signature
    groups: dict[int, list[int]] = defaultdict(list)
    for index in range(len(texts)):
        groups[find(index)].append(index)
    return [sorted(g) for g in groups.values() if len(g) > 1]


@dataclass
class DedupResult:
    kept: list[CanonicalRow]
    removed: list[dict[str, Any]]  # one per cluster: kept where, removed wheres


def dedup_rows(rows: list[CanonicalRow], near: float | None = None) -> DedupResult:
    """Keep the first row of every duplicate cluster."""
    clusters = duplicate_clusters([row_text(r.row) for r in rows], near)
    drop = set()
    removed = []
    for cluster in clusters:
        drop.update(cluster[1:])
        removed.append({"kept": rows[cluster[0]].where, "removed": [rows[i].where for i in cluster[1:]]})
    return DedupResult([r for i, r in enumerate(rows) if i not in drop], removed)


# --- split -------------------------------------------------------------------------------------------

def split_assignments(count: int, val: float, test: float, seed: int, groups: list[list[int]] | None = None,
                      strata: list[str] | None = None) -> list[str]:
    """'train' | 'val' | 'test' per row: rows of one group stay together; strata split proportionally.

    >>> a = split_assignments(100, 0.1, 0.2, seed=0)
    >>> a.count("val"), a.count("test"), a == split_assignments(100, 0.1, 0.2, seed=0)
    (10, 20, True)
    """
    owner = list(range(count))
    for group in groups or []:
        for index in group:
            owner[index] = group[0]
    units: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index in range(count):
        stratum = strata[owner[index]] if strata else ""
        units[stratum][owner[index]].append(index)
    rng = random.Random(seed)
    result = ["train"] * count
    for stratum in sorted(units):
        blocks = list(units[stratum].values())
        rng.shuffle(blocks)
        size = sum(len(b) for b in blocks)
        targets = {"val": round(val * size), "test": round(test * size)}
        filled = {"val": 0, "test": 0}
        for block in blocks:
            name = next((n for n in ("test", "val") if filled[n] + len(block) <= targets[n]), "train")
            if name != "train":
                filled[name] += len(block)
            for index in block:
                result[index] = name
    return result


# --- mix ---------------------------------------------------------------------------------------------

@dataclass
class SourcePlan:
    rows: list[CanonicalRow]
    weight: float = 1.0
    max_rows: int | None = None
    category_column: str | None = None
    category_cap: int | None = None
    category_min: int | None = None
    name: str = ""
    chosen: list[CanonicalRow] = field(default_factory=list)


def _resample(rows: list[CanonicalRow], count: int, rng: random.Random) -> list[CanonicalRow]:
    """``count`` rows: every row once per full pass, then a random subset (up- or down-sampling)."""
    if not rows:
        return []
    full, rest = divmod(count, len(rows))
    return rows * full + rng.sample(rows, rest)


def mix_sources(plans: list[SourcePlan], seed: int) -> list[tuple[str, CanonicalRow]]:
    """Rows from several sources, resampled by weight, per-category caps/minimums and source caps,
    shuffled together; each with the source's name."""
    rng = random.Random(seed)
    mixed = []
    for plan in plans:
        rows = plan.rows
        if plan.category_column:
            by_category: dict[str, list[CanonicalRow]] = defaultdict(list)
            for row in rows:
                by_category[str((row.raw or {}).get(plan.category_column, ""))].append(row)
            rows = []
            for category in sorted(by_category):
                members = by_category[category]
                target = len(members)
                if plan.category_cap is not None:
                    target = min(target, plan.category_cap)
                if plan.category_min is not None:
                    target = max(target, plan.category_min)
                rows += _resample(members, target, rng)
        target = round(len(rows) * plan.weight)
        if plan.max_rows is not None:
            target = min(target, plan.max_rows)
        plan.chosen = _resample(rows, target, rng)
        mixed += [(plan.name, row) for row in plan.chosen]
    rng.shuffle(mixed)
    return mixed


# --- chunk -------------------------------------------------------------------------------------------

def chunk_ids(ids: list[int], length: int, overlap: int = 0) -> list[list[int]]:
    """Windows of ``length`` tokens, each starting ``length - overlap`` after the previous.

    >>> chunk_ids(list(range(10)), 4, overlap=1)
    [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    """
    if overlap >= length:
        raise ValueError(f"overlap {overlap} must be smaller than the chunk length {length}")
    stride = length - overlap
    starts = range(0, max(1, len(ids) - overlap), stride)
    return [ids[s:s + length] for s in starts if ids[s:s + length]]


def packing_stats(lengths: list[int], max_len: int) -> dict[str, float]:
    """Sequences and padding share when each chunk is padded alone vs packed end to end (first fit).

    >>> packing_stats([3, 3, 2], 4)
    {'chunks': 3, 'tokens': 8, 'padded_sequences': 3, 'padding_share_unpacked': 0.3333, 'packed_sequences': 3, 'padding_share_packed': 0.3333}
    """
    bins: list[int] = []
    for length in sorted(lengths, reverse=True):
        for i, used in enumerate(bins):
            if used + length <= max_len:
                bins[i] += length
                break
        else:
            bins.append(length)
    tokens = sum(lengths)
    return {"chunks": len(lengths), "tokens": tokens, "padded_sequences": len(lengths),
            "padding_share_unpacked": round(1 - tokens / max(1, len(lengths) * max_len), 4),
            "packed_sequences": len(bins), "padding_share_packed": round(1 - tokens / max(1, len(bins) * max_len), 4)}
