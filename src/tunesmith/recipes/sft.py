"""Supervised fine-tuning: next-token loss on the trained spans (assistant replies by default)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


from tunesmith.config.schema import PretrainTaskConfig, RunConfig, SFTTaskConfig
from tunesmith.data.collate import collate_batch
from tunesmith.data.pack import collate_padding_free
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.generate.sample import SamplingConfig, sample_batch
from tunesmith.losses.chunked import chunked_loss_sum
from tunesmith.losses.sft import count_label_tokens, kl_to_reference_sum, sft_loss_sum
from tunesmith.models.fastpath import apply_speedups, decoder_and_head, packs_padding_free
from tunesmith.recipes.base import lifetime, Reference, RunResult, base_reference, batch_tokens_for, build_trainable_model, \
    build_training_data, eval_batches_of, finish_run, start_run, training_controls
from tunesmith.train.loop import MicroBatches, train
from tunesmith.train.run import open_run_dir

log = logging.getLogger(__name__)


class SFTObjective:
    """Summed next-token NLL over label tokens; the unit is one label token. With ``kl_to_base``,
    plus that coefficient times KL(model || base) at the same positions (``reference`` gives the base's
    logits for a batch)."""

    def __init__(self, kl_to_base: float = 0.0, reference: Reference | None = None, chunked: bool = False,
                 liger: bool = True):
        self.kl_to_base, self.reference, self.chunked, self.liger = kl_to_base, reference, chunked, liger

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        inputs["use_cache"] = False  # a cache would also hide the packed rows' boundaries from the mask
        parts = decoder_and_head(model) if self.chunked and not self.kl_to_base else None
        if parts is not None:  # the fast path: no full logits
            decoder, head = parts
            return chunked_loss_sum(decoder(**inputs).last_hidden_state, head, labels, liger=self.liger)
        logits = model(**inputs).logits
        logits = logits[:, -labels.shape[1]:]  # prompt tuning puts its virtual tokens first: (batch, seq, vocab)
        loss = sft_loss_sum(logits, labels)
        if self.kl_to_base and model.training:  # a regulariser of training; eval loss stays the plain NLL
            with torch.no_grad():
                reference = self.reference(inputs)[:, -labels.shape[1]:]
            loss = loss + self.kl_to_base * kl_to_reference_sum(logits, reference, labels)
        return loss

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_label_tokens(batch["labels"])


def _collate_for(config: RunConfig, model: nn.Module, pad_token_id: int):
    """Padding-free micro-batches where they are exact, padded ones elsewhere."""
    if packs_padding_free(config, model):
        return collate_padding_free
    return functools.partial(collate_batch, pad_token_id=pad_token_id)


def sample_replies(rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, count: int, max_new_tokens: int
                   ) -> Callable[[nn.Module], list[dict[str, str]]]:
    """The ``eval.samples`` callback: greedy replies to the prompts of the first ``count`` rows (each
    row's tokens before its first trained token: the first turns and the assistant header)."""
    prompts = []
    for row in rows.with_format(None).select(range(min(len(rows), count))):
        first = next((i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX), 0)
        prompts.append(row["input_ids"][:first] or row["input_ids"][:1])  # raw text: its first token
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)

    def generate(model: nn.Module) -> list[dict[str, str]]:
        replies = sample_batch(model, tokenizer, prompts, sampling)
        return [{"prompt": tokenizer.decode(p), "reply": tokenizer.decode(r, skip_special_tokens=True)}
                for p, r in zip(prompts, replies)]
    return generate


def run_sft(config: SFTTaskConfig | PretrainTaskConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Validate data, train, and write the run folder."""
    accelerator, source, tokenizer = start_run(config)
    train_rows, eval_rows, replay_rows = build_training_data(config, tokenizer)
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)  # config and data are valid
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    objective = SFTObjective(config.regularization.kl_to_base,
                             base_reference(model) if config.regularization.kl_to_base else None,
                             config.training.chunked_loss, config.training.liger)
    collate = _collate_for(config, model, tokenizer.pad_token_id)
    apply_speedups(model, config.training, collate is collate_padding_free)
    if config.training.chunked_loss and (config.regularization.kl_to_base or decoder_and_head(model) is None):
        log.info("training.chunked_loss: full logits instead (%s)", "kl_to_base compares full distributions"
                 if config.regularization.kl_to_base else "not available for this model or method")
    stream = MicroBatches(train_rows.with_format(None), config.training.batch_size, config.training.seed, collate,
                          replay_rows, config.data.replay.share if config.data.replay else 0.0,
                          batch_tokens_for(config, model, accelerator, checkpoint), collate is not collate_padding_free)
    eval_batches = eval_batches_of(eval_rows, config.training.batch_size, collate)
    lr_scale, held = training_controls(config, model)
    samples = sample_replies(eval_rows if eval_rows is not None else train_rows, tokenizer, config.eval.samples,
                             config.eval.max_new_tokens) if config.eval.samples else None
    with lifetime(config, run_dir, accelerator, resumed=checkpoint is not None):
        result = train(model, objective, stream, eval_batches, config.training, run_dir, accelerator, checkpoint,
                       lr_scale, held, samples)
        return finish_run(config, accelerator, model, tokenizer, result, run_dir)
