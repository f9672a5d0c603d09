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

from tunesmith.config.schema import GRPOConfig, GRPOTaskConfig
from tunesmith.data.collate import collate_batch
from tunesmith.data.pack import collate_padding_free
from tunesmith.data.prompts import build_prompts, collate_prompts
from tunesmith.errors import ConfigError
from tunesmith.generate.sample import SamplingConfig, sample_batch
from tunesmith.losses.logprobs import token_logps
from tunesmith.losses.rl import group_advantages, grpo_token_loss, k3_kl
from tunesmith.models.fastpath import apply_speedups, packs_padding_free
from tunesmith.recipes.base import lifetime, RunResult, build_trainable_model, finish_run, reference_scope, start_run
from tunesmith.rewards import WeightedRewards
from tunesmith.train.loop import MicroBatches, train
from tunesmith.train.run import open_run_dir

log = logging.getLogger(__name__)


class GRPOObjective:
    """Sample, score, normalise within groups, and return the summed per-completion GRPO loss
    (each completion's per-token loss averaged over its tokens, as in DeepSeekMath eq. 3)."""

    fsdp_ready = False  # it samples inside the step, outside the model's forward: not sharded yet (ddp instead)
    # An RL loss sits near zero with either sign, and its gradient norm swings by orders of magnitude with the
    # spread of the rewards (a batch of equal rewards leaves only the KL's): neither tells a divergence. Only
    # non-finite steps are caught.
    divergence_signals: tuple[str, ...] = ()

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


def run_grpo(config: GRPOTaskConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
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
    with lifetime(config, run_dir, accelerator, resumed=checkpoint is not None):
        result = train(model, objective, stream, None, config.training, run_dir, accelerator, checkpoint)
        return finish_run(config, accelerator, model, tokenizer, result, run_dir, task="grpo")
