"""Batches of tokenized rows -> padded tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunesmith.data.tokenize import IGNORE_INDEX


def collate_batch(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``pad_token_id`` and ``labels`` with ``IGNORE_INDEX``.

    >>> batch = collate_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ...                        {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    >>> batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[-100, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, seq)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[index, :length] = torch.tensor(row["input_ids"])
        labels[index, :length] = torch.tensor(row["labels"])
        attention_mask[index, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def count_rows(batch: dict[str, torch.Tensor]) -> int:
    """Rows in a batch: a padding-free batch counts its position-id restarts.

    >>> count_rows({"input_ids": torch.zeros(1, 5), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])})
    2
    >>> count_rows({"input_ids": torch.zeros(3, 4), "attention_mask": torch.ones(3, 4)})
    3
    """
    if "position_ids" in batch and "attention_mask" not in batch:
        return int((batch["position_ids"] == 0).sum())
    return batch["input_ids"].shape[0]
