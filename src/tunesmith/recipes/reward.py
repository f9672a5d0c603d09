"""Reward models (``task: reward``): a one-output scoring head on the LM, trained on preference pairs
with the pairwise loss −log σ(r_c − r_r − m). Each micro-batch holds B pairs as 2B sequences (chosen
first), encoded as every scorer of a reward model encodes them (``data.pairs.encode_conversations``).
Score rows with a trained one: ``tunesmith reward score RUN --file F``."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.config.schema import RewardTaskConfig
from tunesmith.data.collate import count_rows
from tunesmith.losses import preference as losses
from tunesmith.losses.logprobs import reward_scores
from tunesmith.recipes.base import lifetime, RunResult, eval_batches_of, finish_run, set_up_pairs
from tunesmith.train.loop import train
from tunesmith.train.tally import Tallies


class RewardObjective:
    """The pairwise reward-model loss summed over pairs (the unit is one pair); the tallies are the
    scores themselves (accuracy: r_c > r_r)."""

    fsdp_ready = False  # its score head is not tested sharded yet (ddp instead)

    def __init__(self, margin: float = 0.0):
        self.margin = margin
        self.tallies = Tallies()

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = reward_scores(model, batch)  # (2 * pairs,): the chosen replies first
        pairs = scores.shape[0] // 2
        self.tallies.add_pairs(model, scores[:pairs].detach(), scores[pairs:].detach())
        return losses.pairwise_reward_loss(scores[:pairs], scores[pairs:], self.margin or None).sum()

    def take_metrics(self, mode: str) -> dict[str, float]:
        return self.tallies.take(mode)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_rows(batch) // 2


def run_reward(config: RewardTaskConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Validate the pairs, train the scoring head (and the method's parameters), write the run folder."""
    run = set_up_pairs(config, resume, overwrite)
    objective = RewardObjective(config.reward.margin)
    stream = run.micro_batches(config, run.train_rows)
    eval_batches = eval_batches_of(run.eval_rows, config.training.batch_size, run.collate)
    with lifetime(config, run.run_dir, run.accelerator, resumed=run.checkpoint is not None):
        result = train(run.model, objective, stream, eval_batches, config.training, run.run_dir, run.accelerator,
                       run.checkpoint)
        return finish_run(config, run.accelerator, run.model, run.tokenizer, result, run.run_dir, task="reward")
