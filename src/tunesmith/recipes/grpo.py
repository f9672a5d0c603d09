"""GRPO (``task: grpo``; Shao et al. 2024, DeepSeekMath): for each prompt, G completions are
sampled from the current policy, scored by the configured reward functions, and their rewards
normalised within the group into advantages; the policy then takes the clipped surrogate step
with a per-token k3 KL to the reference (the model with its adapters off, or a frozen copy).

Each micro-batch is a set of prompts; sampling happens inside the step, with the torch RNG the
checkpoints save, so a resumed run samples what the uninterrupted one would have. One policy
update per sampled batch (μ = 1): the ratio π/π_old is 1 at the step and its gradient is the
advantage-weighted log-likelihood gradient; the clip matters from μ > 1, which is not offered.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import Config, DataConfig, GRPOConfig
from tunesmith.data.build import DataReport, read_canonical
from tunesmith.data.collate import collate_batch
from tunesmith.data.formats import CHAT_FORMATS
from tunesmith.data.pack import collate_padding_free
from tunesmith.errors import ConfigError, DataError
from tunesmith.generate.sample import SamplingConfig, encode_prompt, sample_batch
from tunesmith.losses.rl import group_advantages, grpo_token_loss, k3_kl
from tunesmith.recipes.common import RunResult, build_trainable_model, finish_run, reference_scope, start_run
from tunesmith.recipes.dpo import token_logps
from tunesmith.recipes.sft import apply_speedups, packs_padding_free
from tunesmith.rewards import WeightedRewards
from tunesmith.train.loop import MicroBatches, train
from tunesmith.train.run import open_run_dir

log = logging.getLogger(__name__)


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


class GRPOObjective:
    """Sample, score, normalise within groups, and return the summed per-completion GRPO loss
    (each completion's per-token loss averaged over its tokens, as in DeepSeekMath eq. 3)."""

    def __init__(self, config: GRPOConfig, tokenizer: PreTrainedTokenizerBase, prompts: datasets.Dataset,
                 rewards: WeightedRewards, reference, packed: bool):
        self.config, self.tokenizer, self.prompts, self.reference, self.packed = config, tokenizer, prompts, \
            reference, packed
        self.rewards = rewards
        self.sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                       top_p=config.top_p)
        self.tally: defaultdict = defaultdict(float)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        group = self.config.group_size
        rows = [self.prompts[i] for i in batch["index"].tolist()]
        sequences, prompts, texts, answers = [], [], [], []
        # Every prompt's G completions in one left-padded generate call: on a CPU the per-token
        # cost of decoding is nearly flat in the batch size, so one call beats one per prompt.
        copies = [row for row in rows for _ in range(group)]
        completions = sample_batch(model, self.tokenizer, [row["prompt_ids"] for row in copies], self.sampling)
        for row, completion in zip(copies, completions):
            sequences.append({"input_ids": row["prompt_ids"] + completion,
                              "labels": [-100] * len(row["prompt_ids"]) + completion})
            prompts.append(json.loads(row["prompt"]))
            texts.append(self.tokenizer.decode(completion, skip_special_tokens=True))
            answers.append(row["answer"])
        rewards = torch.tensor(self.rewards(prompts, texts, answers))  # (prompts * group,)
        advantages = group_advantages(rewards.view(len(rows), group)).flatten()
        device = batch["input_ids"].device
        packed = collate_padding_free(sequences) if self.packed else collate_batch(sequences,
                                                                                    self.tokenizer.pad_token_id)
        packed = {k: v.to(device) for k, v in packed.items()}
        logps, index = token_logps(model, packed)
        reference = None
        if self.reference is not None:
            with self.reference() as frozen:
                reference = token_logps(frozen, packed)[0]
        per_token = grpo_token_loss(logps, logps.detach(), reference, advantages.to(device)[index],
                                    self.config.epsilon, self.config.beta)
        counts = logps.new_zeros(len(sequences)).index_add(0, index, torch.ones_like(logps))
        per_sequence = logps.new_zeros(len(sequences)).index_add(0, index, per_token) / counts.clamp(min=1)
        self.tally["completions"] += len(sequences)
        self.tally["reward"] += float(rewards.sum())
        self.tally["reward_std"] += float(rewards.view(len(rows), group).std(dim=1).sum() * group)
        self.tally["completion_tokens"] += float(counts.sum())
        if reference is not None:
            kl = logps.new_zeros(len(sequences)).index_add(0, index, k3_kl(logps.detach(), reference))
            self.tally["kl"] += float((kl / counts.clamp(min=1)).sum())
        return per_sequence.sum()

    def take_metrics(self, mode: str) -> dict[str, float]:
        tally, self.tally = self.tally, defaultdict(float)
        count = tally.pop("completions", 0)
        return {key: value / count for key, value in tally.items()} if count else {}

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["index"].shape[0] * self.config.group_size


def run_grpo(config: Config, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Check the prompts and reward functions, train, and write the run folder (as SFT does)."""
    try:
        rewards = WeightedRewards(config.grpo.rewards, config.grpo.reward_weights)
    except ValueError as err:
        raise ConfigError([f"grpo.rewards: {err}"]) from None
    accelerator, source, tokenizer = start_run(config)
    prompts = build_prompts(config.data, tokenizer, config.grpo.max_new_tokens)
    log.info("data: %d prompts, %d completions each", len(prompts), config.grpo.group_size)
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    packed = packs_padding_free(config, model)
    apply_speedups(model, config.training, packed)
    reference = reference_scope(model) if config.grpo.beta > 0 else None
    objective = GRPOObjective(config.grpo, tokenizer, prompts, rewards, reference, packed)
    stream = MicroBatches(prompts.with_format(None), config.training.batch_size, config.training.seed,
                          lambda rows: collate_prompts(rows, tokenizer.pad_token_id))
    result = train(model, objective, stream, None, config.training, run_dir, accelerator, checkpoint,
                   tracking=config)
    return finish_run(config, accelerator, model, tokenizer, result, run_dir, task="grpo")
