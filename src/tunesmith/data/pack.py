"""Packing: documents end to end in equal blocks (continued pre-training), and padding-free
micro-batches (SFT's fast path)."""

from __future__ import annotations

import datasets
import torch

from tunesmith.data.tokenize import IGNORE_INDEX


def pack_documents(documents: list[list[int]], block: int) -> list[list[int]]:
    """Concatenate token lists (each already ending with EOS) and cut them into ``block``-token
    blocks; a shorter remainder is kept as its own block, unless it is a single token (nothing in
    its block would predict it, so it carries no loss).

    >>> pack_documents([[1, 2, 0], [3, 4, 5, 0], [6, 0, 7]], 4)
    [[1, 2, 0, 3], [4, 5, 0, 6], [0, 7]]
    >>> pack_documents([[1, 2, 0], [3, 4, 0]], 5)
    [[1, 2, 0, 3, 4]]
    """
    stream = [token for document in documents for token in document]
    blocks = [stream[start:start + block] for start in range(0, len(stream), block)]
    return [b for b in blocks if len(b) > 1]


def packed_dataset(rows: datasets.Dataset, block: int) -> datasets.Dataset:
    """Rows of ``input_ids`` -> packed blocks whose labels are the inputs (loss on every token)."""
    blocks = pack_documents(list(rows["input_ids"]), block)
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def collate_padding_free(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """A micro-batch as ONE sequence: the rows end to end, no padding. ``position_ids`` restart at 0
    for each row; with no ``attention_mask``, transformers reads the restarts as row boundaries, so
    no row attends to another: varlen kernels with ``attn_implementation: flash_attention_2``, a
    block mask with ``flex_attention``, a dense block-diagonal mask with ``sdpa`` (whose cost grows
    with the square of the packed length). Each row's first label is ignored: nothing before it in its row predicts it.

    >>> batch = collate_padding_free([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...                               {"input_ids": [8, 9], "labels": [8, 9]}])
    >>> batch["input_ids"].tolist(), batch["labels"].tolist(), batch["position_ids"].tolist()
    ([[5, 6, 7, 8, 9]], [[-100, 6, 7, -100, 9]], [[0, 1, 2, 0, 1]])
    """
    input_ids, labels, positions = [], [], []
    for row in rows:
        input_ids += row["input_ids"]
        labels += [IGNORE_INDEX, *row["labels"][1:]]
        positions += range(len(row["input_ids"]))
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}
