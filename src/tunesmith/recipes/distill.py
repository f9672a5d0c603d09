"""Distillation (``task: distill``): the student, the run's model with any method (LoRA, full, ...),
learns a teacher's next-token distributions over the assistant replies of chat rows: forward KL,
reverse KL or GKD's generalised JSD (``losses/distill.py``), on the teacher's top-k tokens where
``distill.top_k`` is set. With ``distill.on_policy`` = λ, that share of micro-batches (drawn with the
RNG the checkpoints keep) has its replies sampled by the student itself from the rows' prompts, and
the teacher scores those (GKD's on-policy distillation); λ = 0 is supervised KD on the dataset's
replies. The teacher is loaded once, frozen, beside the student; its tokenizer must be the student's.
The eval loss is the same divergence on held-out rows' replies: the student's held-out distance to
the teacher.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.config.schema import DistillConfig, DistillTaskConfig
from tunesmith.data.collate import collate_batch
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.generate.sample import SamplingConfig, sample_batch
from tunesmith.losses.distill import TeacherTopK, at_labels, distill_loss_sum, teacher_top_k
from tunesmith.losses.sft import count_label_tokens, sft_loss_sum
from tunesmith.models.fastpath import apply_speedups, decoder_and_head
from tunesmith.recipes.base import (RunResult, batch_tokens_for, build_trainable_model, build_training_data,
                                    eval_batches_of, finish_run, lifetime, start_run, training_controls)
from tunesmith.targets import load_target
from tunesmith.train.loop import MicroBatches, train
from tunesmith.train.run import open_run_dir

log = logging.getLogger(__name__)


def collate_with_prompts(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Padded rows, plus each row's prompt (its tokens before the first trained one), right-padded, and
    the prompts' lengths: what on-policy batches sample replies to."""
    batch = collate_batch(rows, pad_token_id)
    prompts = []
    for row in rows:
        first = next((i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX), len(row["labels"]))
        prompts.append(list(row["input_ids"][:max(first, 1)]))
    width = max(len(p) for p in prompts)
    batch["prompt_ids"] = torch.tensor([p + [pad_token_id] * (width - len(p)) for p in prompts])
    batch["prompt_lengths"] = torch.tensor([len(p) for p in prompts])
    return batch


class DistillObjective:
    """The divergence to the teacher summed over reply tokens (the unit is one reply token), plus
    ``sft_weight`` times their next-token loss."""

    fsdp_ready = False  # a teacher beside each process's student

    def __init__(self, config: DistillConfig, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.config, self.teacher, self.tokenizer = config, teacher, tokenizer
        self.teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
        self.teacher_parts = decoder_and_head(teacher) if config.top_k else None  # its hidden states, then its head
        self.sampling = SamplingConfig(config.max_new_tokens, config.sampling_temperature)
        self.tally: defaultdict = defaultdict(float)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        config, scale, sampled = self.config, 1.0, False
        if model.training and config.on_policy and float(torch.rand(())) < config.on_policy:
            sampled = True
            units = count_label_tokens(batch["labels"])
            batch = self._sampled(model, batch)
            scale = units / max(count_label_tokens(batch["labels"]), 1)  # the mean over its tokens, as `units` sums
            self.tally["on_policy_batches"] += 1
        self.tally["batches"] += 1
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        logits = model(**inputs).logits
        vocab = min(logits.shape[-1], self.teacher_vocab)  # a padded embedding adds columns no token uses
        teacher = self._teacher_at_labels(inputs, batch["labels"], vocab)
        loss = distill_loss_sum(logits[..., :vocab], teacher, batch["labels"], config.loss, config.beta,
                                config.temperature)
        if config.sft_weight and model.training and not sampled:  # the dataset's replies only; eval: the divergence
            loss = loss + config.sft_weight * sft_loss_sum(logits, batch["labels"])
        return loss * scale

    def _teacher_at_labels(self, inputs: dict, labels: torch.Tensor, vocab: int) -> torch.Tensor | TeacherTopK:
        """The teacher at the positions that predict a label: its logits, or with ``top_k`` its k most likely
        tokens, taken from its last hidden states a chunk of positions at a time, so that its full logits
        never exist at once."""
        k, temperature = self.config.top_k, self.config.temperature
        with torch.no_grad():
            parts = self.teacher_parts
            if parts is None:
                logits = at_labels(self.teacher(**inputs).logits, labels)[..., :vocab]
                return teacher_top_k(logits, k, temperature) if k else logits
            decoder, head = parts
            hidden = at_labels(decoder(**inputs).last_hidden_state, labels)  # (tokens, hidden)
            pieces = [teacher_top_k(head(hidden[s:s + 256])[..., :vocab], k, temperature)
                      for s in range(0, hidden.shape[0], 256)]
        if not pieces:
            width = min(k, vocab)
            return TeacherTopK(hidden.new_zeros(0, width), torch.zeros(0, width, dtype=torch.long, device=hidden.device))
        return TeacherTopK(torch.cat([p.logprobs for p in pieces]), torch.cat([p.ids for p in pieces]))

    def _sampled(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's prompts with replies the student samples (GKD's on-policy data)."""
        lengths = batch["prompt_lengths"].tolist()
        prompts = [row[:n] for row, n in zip(batch["prompt_ids"].tolist(), lengths)]
        replies = sample_batch(model, self.tokenizer, prompts, self.sampling)
        rows = [{"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r} for p, r in zip(prompts, replies)]
        device = batch["input_ids"].device
        return {k: v.to(device) for k, v in collate_batch(rows, self.tokenizer.pad_token_id).items()}

    def take_metrics(self, mode: str) -> dict[str, float]:
        tally, self.tally = self.tally, defaultdict(float)
        batches = tally.pop("batches", 0)
        return {"on_policy_share": tally["on_policy_batches"] / batches} if batches and self.config.on_policy else {}

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_label_tokens(batch["labels"])


def load_teacher(config: DistillTaskConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device
                 ) -> PreTrainedModel:
    """The frozen teacher; ConfigError (before the run folder is touched) when it cannot teach this student."""
    try:
        teacher, teacher_tokenizer = load_target(config.distill.teacher, str(device))
    except TunesmithError as err:
        raise ConfigError([f"distill.teacher: {err}"]) from None
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError([f"distill.teacher: {config.distill.teacher}'s tokenizer is not the student's "
                           f"({len(teacher_tokenizer)} against {len(tokenizer)} tokens, or the same count with other "
                           "ids): the distributions would be over different tokens. Distil within one tokenizer "
                           "family"])
    return teacher.eval().requires_grad_(False)


def run_distill(config: DistillTaskConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Check data and teacher, train the student, and write the run folder (as SFT does)."""
    accelerator, source, tokenizer = start_run(config)
    train_rows, eval_rows, replay_rows = build_training_data(config, tokenizer)
    teacher = load_teacher(config, tokenizer, accelerator.device)
    log.info("distill: teacher %s, %s%s%s", config.distill.teacher, config.distill.loss,
             f" (top {config.distill.top_k} tokens)" if config.distill.top_k else "",
             f", on-policy share {config.distill.on_policy}" if config.distill.on_policy else "")
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    apply_speedups(model, config.training, False)
    collate = functools.partial(collate_with_prompts, pad_token_id=tokenizer.pad_token_id)
    stream = MicroBatches(train_rows.with_format(None), config.training.batch_size, config.training.seed, collate,
                          replay_rows, config.data.replay.share if config.data.replay else 0.0,
                          batch_tokens_for(config, model, accelerator, checkpoint), True)
    eval_batches = eval_batches_of(eval_rows, config.training.batch_size, collate)
    lr_scale, held = training_controls(config, model)
    objective = DistillObjective(config.distill, teacher, tokenizer)
    with lifetime(config, run_dir, accelerator, resumed=checkpoint is not None):
        result = train(model, objective, stream, eval_batches, config.training, run_dir, accelerator, checkpoint,
                       lr_scale, held)
        return finish_run(config, accelerator, model, tokenizer, result, run_dir, task="distill",
                          teacher=config.distill.teacher)
