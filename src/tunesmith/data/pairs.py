"""Preference pairs for ``task: dpo``: rows read and checked like every dataset (errors name file,
line and field), each side tokenized through the chat template with the prompt masked, and
micro-batches that put the chosen replies first and the rejected ones after them. KTO's unpaired
rows (one reply and a desirable flag) go through the same steps as one-sided rows."""

from __future__ import annotations

import logging
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import DataConfig
from tunesmith.data.build import DataReport, hold_out, read_canonical
from tunesmith.data.collate import collate_batch
from tunesmith.data.pack import collate_padding_free
from tunesmith.config.names import PREFERENCE_FORMATS
from tunesmith.data.preference import as_chat, sides
from tunesmith.data.tokenize import IGNORE_INDEX, UNLIMITED, TokenizedRow, tokenize_rows_batched
from tunesmith.errors import DataError

SIDES = ("chosen", "rejected")

log = logging.getLogger(__name__)


def keep_the_end(tokenized: TokenizedRow, max_seq_len: int, what: str) -> str | None:
    """Cut an over-long conversation from the left, so that its last reply (what a pair's two sides differ
    in, and where a reward model reads its score) survives; a cut on the right would drop the replies
    and make a long pair two identical sequences. Returns a warning naming what was cut, or None.

    >>> row = TokenizedRow([1, 2, 3, 4, 5, 6], [-100, -100, -100, 4, 5, 6], 6)
    >>> keep_the_end(row, 4, "chosen"), row.input_ids, row.labels
    ('over-long, prompt + chosen, 6 tokens > max_seq_len 4; the start of the prompt was cut to keep the reply', [3, 4, 5, 6], [-100, 4, 5, 6])
    >>> row = TokenizedRow([1, 2, 3, 4, 5, 6], [-100, 2, 3, 4, 5, 6], 6)
    >>> keep_the_end(row, 4, "reply")
    'over-long, prompt + reply, 6 tokens > max_seq_len 4; the reply alone is 5 tokens, so its start was cut too'
    """
    length = len(tokenized.input_ids)
    if length <= max_seq_len:
        return None
    reply = sum(1 for label in tokenized.labels if label != IGNORE_INDEX)
    tokenized.input_ids = tokenized.input_ids[-max_seq_len:]
    tokenized.labels = tokenized.labels[-max_seq_len:]
    head = f"over-long, prompt + {what}, {length} tokens > max_seq_len {max_seq_len}; "
    if reply > max_seq_len:
        return head + f"the reply alone is {reply} tokens, so its start was cut too"
    return head + "the start of the prompt was cut to keep the reply"


def encode_conversations(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], max_seq_len: int,
                         what: list[str]) -> list[tuple[TokenizedRow | ValueError, str | None]]:
    """The one encoding of "score this conversation" (reward training, its eval, ``reward score`` and PPO's
    reward model): each chat row tokenized whole through the chat template, then cut from the left by
    ``keep_the_end`` (``what[i]`` names row i in the warning). Returns (the tokenized row or its error,
    the warning or None) per row."""
    out = []
    for tokenized, name in zip(tokenize_rows_batched(tokenizer, rows, UNLIMITED, False), what):
        warning = None if isinstance(tokenized, ValueError) else keep_the_end(tokenized, max_seq_len, name)
        out.append((tokenized, warning))
    return out


def _tokenized_pairs(rows: list, tokenizer: PreTrainedTokenizerBase, config: DataConfig,
                     report: DataReport) -> list[dict[str, Any]]:
    """Pairs as ``{chosen,rejected}_{input_ids,labels}``; unpaired rows as ``input_ids``, ``labels``
    and ``desirable``."""
    jobs = [(index, side) for index, r in enumerate(rows) for side in sides(r.row)]
    results = dict(zip(jobs, encode_conversations(tokenizer, [as_chat(rows[i].row, side) for i, side in jobs],
                                                  config.max_seq_len, [side for _, side in jobs])))
    items = []
    for index, row in enumerate(rows):
        item, ok = {"where": row.where}, True
        for side in sides(row.row):
            tokenized, cut = results[index, side]
            if isinstance(tokenized, ValueError):
                report.add(row.file, row.line, side, str(tokenized))
                ok = False
                continue
            if cut is not None:
                report.truncated += 1
                report.add(row.file, row.line, side, cut.replace("max_seq_len", "data.max_seq_len", 1), "warning")
            if tokenized.problems:
                for name, message in tokenized.problems:
                    report.add(row.file, row.line, f"{side}.{name}", message)
                ok = False
                continue
            prefix = "" if side == "completion" else f"{side}_"
            item[f"{prefix}input_ids"], item[f"{prefix}labels"] = tokenized.input_ids, tokenized.labels
            report.trainable_tokens += tokenized.trainable_tokens
        if "desirable" in row.row:
            item["desirable"] = row.row["desirable"]
        if ok:
            report.rows += 1
            items.append(item)
    return items


def split_pairs(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair as two unpaired rows (chosen: desirable, rejected: undesirable); unpaired rows as they are."""
    out = []
    for item in items:
        if "desirable" in item:
            out.append(item)
            continue
        for side in SIDES:
            out.append({"where": item["where"], "input_ids": item[f"{side}_input_ids"],
                        "labels": item[f"{side}_labels"], "desirable": side == "chosen"})
    return out


def _as_dataset(pairs: list[dict[str, Any]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({key: [p[key] for p in pairs] for key in pairs[0]})


def build_pair_datasets(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
                        unpaired: bool = False) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """Train and eval datasets of tokenized pairs; raises ``DataError`` listing every error.

    With ``unpaired`` (KTO) the training rows are unpaired: pairs are split into a desirable and an
    undesirable row. Eval rows stay pairs where all of them are (so the implicit rewards' pairwise
    accuracy is measured). Without it, a file of unpaired rows is an error that names it."""
    report = DataReport()
    train = [r for d in config.train for r in read_canonical(d, report, PREFERENCE_FORMATS)]
    evaluation = [r for d in config.eval for r in read_canonical(d, report, PREFERENCE_FORMATS)]
    if not unpaired:
        named = set()
        for row in train + evaluation:
            if "desirable" in row.row and row.file not in named:
                named.add(row.file)
                report.add(row.file, row.line, "row", "unpaired rows (prompt, completion, label) train only with "
                           "preference.loss kto; the other losses need chosen/rejected pairs")
    train_pairs = _tokenized_pairs(train, tokenizer, config, report)
    eval_pairs = _tokenized_pairs(evaluation, tokenizer, config, report)
    if report.errors:
        raise DataError(report.errors, report.warnings)
    if not eval_pairs:
        train_pairs, eval_pairs = hold_out(train_pairs, config.eval_fraction, seed)
    if unpaired:
        train_pairs = split_pairs(train_pairs)
        if any("desirable" in item for item in eval_pairs):
            eval_pairs = split_pairs(eval_pairs)
    for warning in report.warnings:
        log.warning("%s", warning)
    if not train_pairs:
        raise DataError(["no preference pairs to train on"])
    return _as_dataset(train_pairs), _as_dataset(eval_pairs) if eval_pairs else None, report


def collate_pairs(rows: list[dict[str, Any]], packed: bool, pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B sequences: the B chosen replies, then the B rejected ones (packed
    padding-free, or padded). B unpaired rows -> B sequences and their ``desirable`` flags.
    Precomputed reference log-probabilities come along as ``reference``."""
    if "desirable" in rows[0]:
        sequences = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    else:
        sequences = [{"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]} for side in SIDES
                     for r in rows]
    batch = collate_padding_free(sequences) if packed else collate_batch(sequences, pad_token_id)
    if "desirable" in rows[0]:
        batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows])
        if "reference" in rows[0]:
            batch["reference"] = torch.tensor([r["reference"] for r in rows], dtype=torch.float32)
    elif "reference_chosen" in rows[0]:
        batch["reference"] = torch.tensor([r[f"reference_{side}"] for side in SIDES for r in rows],
                                          dtype=torch.float32)
    return batch
