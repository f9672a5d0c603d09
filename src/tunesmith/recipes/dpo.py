"""Preference pairs: optimisation (``task: dpo``, DPO and its family) and reward models
(``task: reward``, a scoring head trained with the pairwise loss).

Each micro-batch holds B pairs as 2B sequences (chosen first), packed padding-free on the fast
path. The policy's log-probability of each reply is summed over the reply's tokens (the prompt is
masked); the reference's comes from the same model with its adapters off (a frozen copy for full
and freeze), or from a pass made once before training (``preference.precompute_reference``).
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict

import torch
from peft import PeftModel
from torch import nn

from tunesmith.config.schema import Config, PreferenceConfig
from tunesmith.data.pairs import build_pair_datasets, collate_pairs
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.losses import preference as losses
from tunesmith.recipes.common import RunResult, build_trainable_model, eval_batches_of, finish_run, \
    reference_scope, start_run
from tunesmith.recipes.sft import apply_speedups, decoder_and_head, packs_padding_free
from tunesmith.train.loop import MicroBatches, count_rows, train
from tunesmith.train.run import open_run_dir

log = logging.getLogger(__name__)


def label_outputs(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True, hidden_states: bool = False
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """At each position that predicts a label token: (the final hidden state (tokens, hidden), the
    logits (tokens, vocab), the label (tokens,), the index of its sequence (tokens,)). The head runs
    at those positions only where the model allows (``decoder_and_head``). Off that path the hidden
    states are asked for only with ``hidden_states`` (else None): every layer's would stay alive."""
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    targets = labels[:, 1:]  # (batch, seq-1)
    mask = targets != IGNORE_INDEX
    parts = decoder_and_head(model) if chunked else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1][mask]
        logits = head(hidden)
    else:
        out = model(**inputs, use_cache=False, output_hidden_states=hidden_states)
        hidden = out.hidden_states[-1][:, -labels.shape[1]:][:, :-1][mask] if hidden_states else None
        logits = out.logits[:, -labels.shape[1]:][:, :-1][mask]
    if "attention_mask" in batch or "position_ids" not in batch:  # padded: a row per batch row
        row = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)
    else:  # packed: rows start where the position ids restart
        row = ((batch["position_ids"] == 0).cumsum(-1) - 1)[:, 1:].expand_as(targets)
    return hidden, logits, targets[mask], row[mask]


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each label token, the index of its sequence), both (tokens,)."""
    _, logits, targets, row = label_outputs(model, batch, chunked)
    return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1), row


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's label tokens, their count), both (rows,)."""
    values, index = token_logps(model, batch, chunked)
    rows = count_rows(batch)
    sums = values.new_zeros(rows).index_add(0, index, values)
    counts = values.new_zeros(rows).index_add(0, index, torch.ones_like(values))
    return sums, counts


def reward_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A reward model's score of each sequence, (rows,): the scoring head on the hidden state of the
    sequence's last token (its EOS), found from the attention mask (padded) or the position-id
    restarts (packed). transformers' own pooling looks for the first pad token, which is ambiguous
    where pad and EOS are one token and breaks on packed rows; this is used in training and scoring."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    backbone = getattr(inner, inner.base_model_prefix)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (batch, seq, hidden)
    if "attention_mask" in batch:
        last = batch["attention_mask"].sum(1) - 1  # right padding
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        starts = torch.nonzero(batch["position_ids"][0] == 0).flatten()
        ends = torch.cat([starts[1:], starts.new_tensor([hidden.shape[1]])]) - 1
        pooled = hidden[0, ends]
    return inner.score(pooled).squeeze(-1).float()


class PreferenceObjective:
    """The loss of ``preference.loss`` summed over pairs (the unit is one pair), with rewards,
    accuracy, margin and a KL estimate tallied per mode for the metrics. KTO's batches of unpaired
    rows (a ``desirable`` flag each) are summed over rows."""

    def __init__(self, config: PreferenceConfig, reference, chunked: bool = True):
        self.config, self.reference, self.chunked = config, reference, chunked
        # metric -> [sum, count]; each metric is reported as sum / count
        self.tallies: dict[str, defaultdict] = {"train": defaultdict(lambda: [0.0, 0]),
                                                "eval": defaultdict(lambda: [0.0, 0])}

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
        self._tally(model, rewards, pairs, (sums - reference).detach() if config.needs_reference else None, counts)
        return loss.sum()

    def _kto(self, model: nn.Module, sums: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
        # z0: the batch's mean log-ratio, clamped at 0, as the estimate of KL(π ‖ π_ref) (no gradient).
        # The paper estimates it on mismatched prompt/reply pairs, which costs a third forward pass
        # of the policy and the reference per batch; the matched rows' mean stands in for it here.
        point = (sums - reference).detach().mean().clamp(min=0)
        self._tally_value("kl_reference_point", float(point), 1, model)
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
        self._tally_value("rewards/desirable", float(good.sum()), len(good), model)
        self._tally_value("rewards/undesirable", float(bad.sum()), len(bad), model)
        self._tally_value("kl_per_token", float(log_ratio.sum()), int(counts.sum()), model)
        return loss.sum()

    def _tally_value(self, key: str, total: float, count: int, model: nn.Module) -> None:
        entry = self.tallies["train" if model.training else "eval"][key]
        entry[0] += total
        entry[1] += count

    def _tally(self, model: nn.Module, rewards: torch.Tensor, pairs: int, log_ratio: torch.Tensor | None,
               counts: torch.Tensor) -> None:
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        self._tally_value("rewards/chosen", float(chosen.sum()), pairs, model)
        self._tally_value("rewards/rejected", float(rejected.sum()), pairs, model)
        self._tally_value("rewards/accuracy", float((chosen > rejected).float().sum()), pairs, model)
        self._tally_value("rewards/margin", float((chosen - rejected).sum()), pairs, model)
        if log_ratio is not None:  # per token, both replies: an estimate of KL(policy || reference)
            self._tally_value("kl_per_token", float(log_ratio.sum()), int(counts.sum()), model)

    def take_metrics(self, mode: str) -> dict[str, float]:
        tally, self.tallies[mode] = self.tallies[mode], defaultdict(lambda: [0.0, 0])
        out = {key: total / count for key, (total, count) in tally.items() if count}
        if "rewards/desirable" in out and "rewards/undesirable" in out:
            out["rewards/margin"] = out["rewards/desirable"] - out["rewards/undesirable"]
        return out

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_rows(batch) if "desirable" in batch else count_rows(batch) // 2


class RewardObjective(PreferenceObjective):
    """The pairwise reward-model loss −log σ(r_c − r_r − m), summed over pairs; the tallies are the
    scores themselves (accuracy: r_c > r_r)."""

    def __init__(self, margin: float = 0.0):
        super().__init__(PreferenceConfig(), None)
        self.margin = margin

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = reward_scores(model, batch)
        pairs = scores.shape[0] // 2
        self._tally(model, scores.detach(), pairs, None, None)
        return losses.pairwise_reward_loss(scores[:pairs], scores[pairs:], self.margin or None).sum()


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


def run_pairs(config: Config, resume: bool = False, overwrite: bool = False) -> RunResult:
    """``task: dpo`` or ``task: reward``: validate the pairs, train, and write the run folder (as SFT does)."""
    accelerator, source, tokenizer = start_run(config)
    kto = config.task == "dpo" and config.preference.loss == "kto"
    train_rows, eval_rows, report = build_pair_datasets(config.data, tokenizer, config.training.seed, unpaired=kto)
    log.info("data: %d training %s, %d eval %s", len(train_rows), "rows" if kto else "pairs",
             len(eval_rows) if eval_rows else 0, "rows" if eval_rows and "desirable" in eval_rows.column_names
             else "pairs")
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    packed = packs_padding_free(config, model)
    collate = functools.partial(collate_pairs, packed=packed, pad_token_id=tokenizer.pad_token_id)
    apply_speedups(model, config.training, packed)
    reference = reference_scope(model) if config.preference.needs_reference and config.task == "dpo" else None
    objective = RewardObjective(config.preference.reward_margin) if config.task == "reward" else \
        PreferenceObjective(config.preference, reference, config.training.chunked_loss)
    if reference is not None and config.preference.precompute_reference:
        size = config.training.batch_size
        train_rows = precompute_reference(train_rows, collate, objective, accelerator.device, size)
        if eval_rows is not None:
            eval_rows = precompute_reference(eval_rows, collate, objective, accelerator.device, size)
        log.info("reference log-probabilities computed once for %d pairs", len(train_rows) + len(eval_rows or []))
    stream = MicroBatches(train_rows.with_format(None), config.training.batch_size, config.training.seed, collate)
    eval_batches = eval_batches_of(eval_rows, config.training.batch_size, collate)
    result = train(model, objective, stream, eval_batches, config.training, run_dir, accelerator, checkpoint,
                   tracking=config)
    return finish_run(config, accelerator, model, tokenizer, result, run_dir, task=config.task,
                      **({"loss": config.preference.loss} if config.task == "dpo" else {}))
