"""Supervised fine-tuning: next-token loss on the trained spans (assistant replies by default)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunesmith.config.schema import Config
from tunesmith.data.build import build_datasets
from tunesmith.data.collate import collate_batch
from tunesmith.losses.sft import count_label_tokens, sft_loss_sum
from tunesmith.models.load import load_tokenizer, resolve_model_source
from tunesmith.recipes.common import build_accelerator, build_trainable_model, run_summary, seed_everything
from tunesmith.train.loop import MicroBatches, TrainResult, train
from tunesmith.train.run import open_run_dir, save_final_model, write_summary

log = logging.getLogger(__name__)


class SFTObjective:
    """Summed next-token NLL over label tokens; the unit is one label token."""

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sft_loss_sum(logits, batch["labels"])  # logits: (batch, seq, vocab)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_label_tokens(batch["labels"])


@dataclass
class SFTRun:
    run_dir: Path
    model: nn.Module  # the trained model, unwrapped (a PeftModel for adapter methods)
    result: TrainResult


def run_sft(config: Config, resume: bool = False, overwrite: bool = False) -> SFTRun:
    """Validate data, train, and write the run folder."""
    accelerator = build_accelerator(config)
    seed_everything(config)
    with accelerator.main_process_first():  # the main process converts the embedded model once
        source = resolve_model_source(config.model)
    tokenizer = load_tokenizer(config.model, source)
    train_rows, eval_rows, report = build_datasets(config.data, tokenizer, config.training.seed)
    log.info("data: %d training rows (%d trainable tokens), %d eval rows, %d truncated", len(train_rows),
             report.trainable_tokens, len(eval_rows) if eval_rows else 0, report.truncated)
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)  # config and data are valid
    model = build_trainable_model(config, source, accelerator.device)
    collate = functools.partial(collate_batch, pad_token_id=tokenizer.pad_token_id)
    stream = MicroBatches(train_rows.with_format(None), config.training.batch_size, config.training.seed, collate)
    eval_batches = None
    if eval_rows is not None:
        rows = [eval_rows[i] for i in range(len(eval_rows))]
        size = config.training.batch_size
        eval_batches = [collate(rows[i:i + size]) for i in range(0, len(rows), size)]
    result = train(model, SFTObjective(), stream, eval_batches, config.training, run_dir, accelerator, checkpoint)
    final = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_final_model(final, tokenizer, run_dir)
        write_summary(run_dir, run_summary(config, final, result, run_dir))
        log.info("saved %s (train loss %.4f%s)", run_dir / "model", result.final_train_loss or float("nan"),
                 f", eval loss {result.final_eval_loss:.4f}" if result.final_eval_loss is not None else "")
    return SFTRun(run_dir, final, result)
