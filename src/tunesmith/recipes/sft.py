"""Supervised fine-tuning: next-token loss on the trained spans (assistant replies by default)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunesmith.config.schema import Config
from tunesmith.data.collate import collate_batch
from tunesmith.losses.sft import count_label_tokens, kl_to_reference_sum, sft_loss_sum
from tunesmith.models.load import load_tokenizer, resolve_model_source
from tunesmith.recipes.common import Reference, base_reference, build_accelerator, build_trainable_model, \
    build_training_data, run_summary, seed_everything, training_controls
from tunesmith.train.loop import MicroBatches, TrainResult, train
from tunesmith.train.run import open_run_dir, save_final_model, write_summary

log = logging.getLogger(__name__)


class SFTObjective:
    """Summed next-token NLL over label tokens; the unit is one label token. With ``kl_to_base``,
    plus that coefficient times KL(model || base) at the same positions (``reference`` gives the base's
    logits for a batch)."""

    def __init__(self, kl_to_base: float = 0.0, reference: Reference | None = None):
        self.kl_to_base, self.reference = kl_to_base, reference

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -labels.shape[1]:]  # prompt tuning puts its virtual tokens first: (batch, seq, vocab)
        loss = sft_loss_sum(logits, labels)
        if self.kl_to_base and model.training:  # a regulariser of training; eval loss stays the plain NLL
            with torch.no_grad():
                reference = self.reference(batch)[:, -labels.shape[1]:]
            loss = loss + self.kl_to_base * kl_to_reference_sum(logits, reference, labels)
        return loss

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
    train_rows, eval_rows, replay_rows = build_training_data(config, tokenizer)
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)  # config and data are valid
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    objective = SFTObjective(config.regularization.kl_to_base,
                             base_reference(model) if config.regularization.kl_to_base else None)
    collate = functools.partial(collate_batch, pad_token_id=tokenizer.pad_token_id)
    stream = MicroBatches(train_rows.with_format(None), config.training.batch_size, config.training.seed, collate,
                          replay_rows, config.data.replay.share if config.data.replay else 0.0)
    eval_batches = None
    if eval_rows is not None:
        rows = [eval_rows[i] for i in range(len(eval_rows))]
        size = config.training.batch_size
        eval_batches = [collate(rows[i:i + size]) for i in range(0, len(rows), size)]
    lr_scale, held = training_controls(config, model)
    result = train(model, objective, stream, eval_batches, config.training, run_dir, accelerator, checkpoint,
                   lr_scale, held)
    final = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_final_model(final, tokenizer, run_dir)
        write_summary(run_dir, run_summary(config, final, result, run_dir))
        log.info("saved %s (train loss %.4f%s)", run_dir / "model", result.final_train_loss or float("nan"),
                 f", eval loss {result.final_eval_loss:.4f}" if result.final_eval_loss is not None else "")
    return SFTRun(run_dir, final, result)
