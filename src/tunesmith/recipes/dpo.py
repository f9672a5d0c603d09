"""Preference optimisation on pairs (``task: dpo``: DPO and its family, and KTO on unpaired rows).

Each micro-batch holds B pairs as 2B sequences (chosen first), packed padding-free on the fast
path. The policy's log-probability of each reply is summed over the reply's tokens (the prompt is
masked); the reference's comes from the same model with its adapters off (a frozen copy for full
and freeze), or from a pass made once before training (``preference.precompute_reference``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tunesmith.config.schema import DPOTaskConfig, PreferenceConfig
from tunesmith.data.collate import count_rows
from tunesmith.losses import preference as losses
from tunesmith.losses.logprobs import sequence_logps
from tunesmith.recipes.base import lifetime, RunResult, eval_batches_of, finish_run, reference_scope, \
    set_up_pairs
from tunesmith.train.loop import train
from tunesmith.train.tally import Tallies

log = logging.getLogger(__name__)


class PreferenceObjective:
    """The loss of ``preference.loss`` summed over pairs (the unit is one pair), with rewards,
    accuracy, margin and a KL estimate tallied per mode for the metrics. KTO's batches of unpaired
    rows (a ``desirable`` flag each) are summed over rows."""

    def __init__(self, config: PreferenceConfig, reference, chunked: bool = True):
        self.config, self.reference, self.chunked = config, reference, chunked
        self.tallies = Tallies()

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference" in batch:
            return batch["reference"]
        with self.reference() as frozen:
            return sequence_logps(frozen, batch, self.chunked)[0]

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        config = self.config
        sums, counts = sequence_logps(model, batch, self.chunked)
        if "desirable" in batch:
            return self._unpaired_loss(model, batch, sums, counts)
        pairs = sums.shape[0] // 2
        averages = sums / counts.clamp(min=1)
        if config.needs_reference:
            reference = self.reference_logps(batch).to(sums.device)
            pc, pr, rc, rr = sums[:pairs], sums[pairs:], reference[:pairs], reference[pairs:]
            rewards = config.beta * (sums - reference).detach()
        else:
            rewards = config.beta * averages.detach()  # SimPO's implicit reward, for the metrics
        if config.loss in ("dpo", "cdpo"):
            loss = losses.dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing)
        elif config.loss == "robust":
            loss = losses.robust_dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing)
        elif config.loss == "ipo":
            loss = losses.ipo_loss(pc, pr, rc, rr, config.beta)
        elif config.loss == "simpo":
            loss = losses.simpo_loss(averages[:pairs], averages[pairs:], config.beta, config.gamma)
        elif config.loss == "orpo":
            loss = losses.orpo_loss(averages[:pairs], averages[pairs:], config.orpo_lambda)
        else:  # kto on pairs (held-out pairs of a KTO run): the chosen replies desirable, the rejected not
            desirable = torch.arange(2 * pairs, device=sums.device) < pairs
            loss = 0.5 * self._kto(model, sums, reference, desirable).view(2, pairs).sum(0)
        self.tallies.add_pairs(model, rewards[:pairs], rewards[pairs:])
        if config.needs_reference:  # per token, both replies: an estimate of KL(policy || reference)
            self.tallies.add(model, "kl_per_token", float((sums - reference).detach().sum()), int(counts.sum()))
        return loss.sum()

    def _kto(self, model: nn.Module, sums: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
        # z0: the batch's mean log-ratio, clamped at 0, as the estimate of KL(π ‖ π_ref) (no gradient).
        # The paper estimates it on mismatched prompt/reply pairs, which costs a third forward pass
        # of the policy and the reference per batch; the matched rows' mean stands in for it here.
        point = (sums - reference).detach().mean().clamp(min=0)
        self.tallies.add(model, "kl_reference_point", float(point), 1)
        return losses.kto_loss(sums, reference, desirable, point, self.config.beta,
                               self.config.kto_desirable_weight, self.config.kto_undesirable_weight)

    def _unpaired_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], sums: torch.Tensor,
                       counts: torch.Tensor) -> torch.Tensor:
        """KTO on unpaired rows, summed over rows; metrics: the mean implicit reward β·log(π/π_ref)
        of desirable and of undesirable rows, their difference, and the KL estimates."""
        reference = self.reference_logps(batch).to(sums.device)
        desirable = batch["desirable"].to(sums.device)
        loss = self._kto(model, sums, reference, desirable)
        log_ratio = (sums - reference).detach()
        rewards = self.config.beta * log_ratio
        good, bad = rewards[desirable], rewards[~desirable]
        self.tallies.add(model, "rewards/desirable", float(good.sum()), len(good))
        self.tallies.add(model, "rewards/undesirable", float(bad.sum()), len(bad))
        self.tallies.add(model, "kl_per_token", float(log_ratio.sum()), int(counts.sum()))
        return loss.sum()

    def take_metrics(self, mode: str) -> dict[str, float]:
        out = self.tallies.take(mode)
        if "rewards/desirable" in out and "rewards/undesirable" in out:
            out["rewards/margin"] = out["rewards/desirable"] - out["rewards/undesirable"]
        return out

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_rows(batch) if "desirable" in batch else count_rows(batch) // 2


def precompute_reference(rows, collate, objective: PreferenceObjective, device: torch.device, batch_size: int):
    """The reference log-probabilities of every pair, as two new columns (of unpaired rows: one)."""
    chosen, rejected, single = [], [], []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in range(start, min(start + batch_size,
                                                                                         len(rows)))]).items()}
        values = objective.reference_logps(batch).tolist()
        if "desirable" in batch:
            single += values
            continue
        half = len(values) // 2
        chosen += values[:half]
        rejected += values[half:]
    if single:
        return rows.add_column("reference", single)
    return rows.add_column("reference_chosen", chosen).add_column("reference_rejected", rejected)


def run_dpo(config: DPOTaskConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Validate the pairs, train, and write the run folder (as SFT does)."""
    kto = config.preference.loss == "kto"
    run = set_up_pairs(config, resume, overwrite, unpaired=kto)
    reference = reference_scope(run.model) if config.preference.needs_reference else None
    objective = PreferenceObjective(config.preference, reference, config.training.chunked_loss)
    train_rows, eval_rows = run.train_rows, run.eval_rows
    if reference is not None and config.preference.precompute_reference:
        size, device = config.training.batch_size, run.accelerator.device
        train_rows = precompute_reference(train_rows, run.collate, objective, device, size)
        if eval_rows is not None:
            eval_rows = precompute_reference(eval_rows, run.collate, objective, device, size)
        log.info("reference log-probabilities computed once for %d pairs", len(train_rows) + len(eval_rows or []))
    stream = run.micro_batches(config, train_rows)
    eval_batches = eval_batches_of(eval_rows, config.training.batch_size, run.collate)
    with lifetime(config, run.run_dir, run.accelerator, resumed=run.checkpoint is not None):
        result = train(run.model, objective, stream, eval_batches, config.training, run.run_dir, run.accelerator,
                       run.checkpoint)
        return finish_run(config, run.accelerator, run.model, run.tokenizer, result, run.run_dir, task="dpo",
                          loss=config.preference.loss)
