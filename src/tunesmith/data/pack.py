"""Packing for continued pre-training: documents end to end, cut into blocks of equal length."""

from __future__ import annotations

import datasets


def pack_documents(documents: list[list[int]], block: int) -> list[list[int]]:
    """Concatenate token lists (each already ending with EOS) and cut them into ``block``-token
    blocks; the last, shorter remainder is kept as its own block so no token is lost.

    >>> pack_documents([[1, 2, 0], [3, 4, 5, 0], [6, 0]], 4)
    [[1, 2, 0, 3], [4, 5, 0, 6], [0]]
    """
    stream = [token for document in documents for token in document]
    return [stream[start:start + block] for start in range(0, len(stream), block)]


def packed_dataset(rows: datasets.Dataset, block: int) -> datasets.Dataset:
    """Rows of ``input_ids`` -> packed blocks whose labels are the inputs (loss on every token)."""
    blocks = pack_documents(list(rows["input_ids"]), block)
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})
