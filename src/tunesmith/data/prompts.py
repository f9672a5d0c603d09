"""Prompts for the online tasks (grpo, ppo): chat rows read and checked like every dataset, each
row's last assistant turn kept as the reference answer the reward functions see."""

from __future__ import annotations

import json

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from tunesmith.config.names import CHAT_FORMATS
from tunesmith.config.schema import DataConfig
from tunesmith.data.build import DataReport, read_canonical
from tunesmith.data.collate import collate_batch
from tunesmith.data.tokenize import encode_prompt
from tunesmith.errors import DataError


def build_prompts(config: DataConfig, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                  task: str = "grpo") -> datasets.Dataset:
    """Prompts from chat rows: every turn but the last assistant reply, which becomes the reference
    answer handed to the reward functions (GSM8K's ``#### n`` lives there)."""
    report = DataReport()
    rows = [r for d in config.train for r in read_canonical(d, report, CHAT_FORMATS)]
    prompts, answers, ids, where = [], [], [], []
    for row in rows:
        messages = row.row.get("messages")
        if not messages:
            report.add(row.file, row.line, "row", f"task {task} needs chat rows (a prompt and a reference reply), "
                       "not raw text")
            continue
        prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        encoded = encode_prompt(tokenizer, prompt)[0].tolist()
        if len(encoded) + max_new_tokens > config.max_seq_len:
            report.add(row.file, row.line, "messages", f"the prompt is {len(encoded)} tokens; with "
                       f"{task}.max_new_tokens {max_new_tokens} it passes data.max_seq_len {config.max_seq_len}")
            continue
        prompts.append(json.dumps(prompt))
        answers.append(messages[-1]["content"] if messages[-1]["role"] == "assistant" else "")
        ids.append(encoded)
        where.append(row.where)
    if report.errors:
        raise DataError(report.errors, report.warnings)
    if not ids:
        raise DataError(["no prompts to train on"])
    return datasets.Dataset.from_dict({"prompt_ids": ids, "prompt": prompts, "answer": answers, "where": where,
                                       "index": list(range(len(ids)))})


def collate_prompts(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The prompts, padded (their tokens count as the step's input tokens), and their dataset indices."""
    batch = collate_batch([{"input_ids": r["prompt_ids"], "labels": r["prompt_ids"]} for r in rows], pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "index": torch.tensor([r["index"] for r in rows])}
