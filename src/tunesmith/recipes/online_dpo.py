"""Online DPO (``task: online_dpo``; Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback", as TRL's OnlineDPOTrainer).

For each prompt of a micro-batch the current policy samples two replies (both replies of every prompt in one
left-padded ``generate``), inside the step and with the torch RNG the checkpoints save, so a resumed run
samples what the uninterrupted one would have. One source ranks the two: reward functions or a reward model
run (the higher score wins), or an LLM judge shown both orders (a reply wins when it wins on balance; a judge
that follows the position, or says T, gives a tie). The pair (chosen, rejected) then takes the DPO (or IPO)
loss against the reference: the model with its adapters off, or a frozen copy. A tie teaches nothing and is
skipped (``tie_share``); each micro-batch's loss is the mean over its decided pairs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import JudgeConfig, OnlineDPOConfig, OnlineDPOTaskConfig
from tunesmith.data.collate import collate_batch
from tunesmith.data.pack import collate_padding_free
from tunesmith.data.prompts import build_prompts, collate_prompts
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.evaluation.judge import JudgeSettings, check_endpoint, judge_rows, open_client
from tunesmith.generate.rollout import HFRollouts
from tunesmith.generate.sample import SamplingConfig
from tunesmith.losses import preference as losses
from tunesmith.losses.logprobs import sequence_logps
from tunesmith.models.fastpath import apply_speedups, packs_padding_free
from tunesmith.recipes.base import RunResult, Scorer, build_trainable_model, finish_run, lifetime, reference_scope, \
    reward_source, start_run
from tunesmith.train.loop import MicroBatches, train
from tunesmith.train.run import open_run_dir
from tunesmith.train.tally import Tallies

log = logging.getLogger(__name__)

# (prompts, reference answers, first replies, second replies) -> the two replies' rewards, (pairs, 2)
Ranker = Callable[[list[list[dict]], list[str], list[str], list[str]], torch.Tensor]
LOSSES = {"dpo": losses.dpo_loss, "ipo": losses.ipo_loss}  # both (pc, pr, rc, rr, β) -> one loss per pair


def order_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the rewards of each pair's two replies (pairs, 2): the pairs the rewards decide (a tie is left
    out), and which reply of each is chosen (0 or 1; the other is rejected).

    A reward that is not a number (NaN, infinite) decides nothing: its pair is a tie.

    >>> order_pairs(torch.tensor([[1.0, 0.0], [0.5, 0.5], [-1.0, 2.0], [float("nan"), 1.0]]))
    (tensor([0, 2]), tensor([0, 1]))
    """
    finite = torch.isfinite(rewards).all(dim=1)
    decided = torch.nonzero((rewards[:, 0] != rewards[:, 1]) & finite).flatten()
    return decided, (rewards[decided, 1] > rewards[decided, 0]).long()


def rank_by_scores(score: Scorer) -> Ranker:
    """A ranker from a scorer (reward functions, a reward model): each reply scored on its own."""

    def rank(prompts: list[list[dict]], answers: list[str], first: list[str], second: list[str]) -> torch.Tensor:
        values = score(prompts + prompts, first + second, answers + answers)
        return torch.tensor(values, dtype=torch.float32).view(2, len(prompts)).T  # (pairs, 2)
    return rank


class JudgeRanker:
    """An LLM judge's ranking: each pair judged in both orders (``judge_rows``); the first reply's reward is its
    score (1 won both, 0.5 a tie or a verdict that followed the position, 0 lost both), the second's 1 − it."""

    def __init__(self, config: JudgeConfig):
        self.settings = JudgeSettings(config.url, config.model, config.api_key_env,
                                      use_reference=config.use_reference)
        self.client = open_client(self.settings, timeout=config.timeout_s)
        self.unparsed = 0  # answers without a verdict, since the metrics were last taken

    def __call__(self, prompts: list[list[dict]], answers: list[str], first: list[str], second: list[str]
                 ) -> torch.Tensor:
        import openai

        try:
            judged = judge_rows(self.settings, prompts, [a or None for a in answers], first, second, self.client,
                                progress=False)
        except openai.OpenAIError as err:
            raise TunesmithError(f"online_dpo.judge: the endpoint {self.settings.url} failed during training "
                                 f"({type(err).__name__}: {err}); the last checkpoint resumes with --resume") from None
        self.unparsed += judged["unparsed"]
        wins = torch.tensor(judged["scores"], dtype=torch.float32)  # (pairs,)
        return torch.stack([wins, 1.0 - wins], dim=1)


def _sequence(prompt_ids: list[int], reply: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt_ids + reply, "labels": [-100] * len(prompt_ids) + reply}


class OnlineDPOObjective:
    """Sample two replies per prompt, rank them, and return the DPO (or IPO) loss of the decided pairs: their
    mean, times the prompts of the micro-batch (the unit is one prompt's pair)."""

    fsdp_ready = False  # it samples inside the step, outside the model's forward: not sharded yet (ddp instead)
    # Each step's pairs are new samples, so its loss starts afresh near log 2 and its gradient norm follows the
    # pairs drawn: neither has a trend to judge. Only non-finite steps are caught.
    divergence_signals: tuple[str, ...] = ()

    def __init__(self, config: OnlineDPOConfig, tokenizer: PreTrainedTokenizerBase, prompts: datasets.Dataset,
                 rank: Ranker, reference, packed: bool, chunked: bool = True):
        self.config, self.tokenizer, self.prompts, self.rank = config, tokenizer, prompts, rank
        self.reference, self.packed, self.chunked = reference, packed, chunked
        self.sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                       top_p=config.top_p)
        self.tallies = Tallies()
        self.signal = 0  # micro-batches with a decided pair, since take_signal
        self.engine = HFRollouts(tokenizer)  # the fast path's kernels off for generation

    def _sample(self, model: nn.Module, rows: list[dict]) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
        """Two replies of each row (token ids) and their rewards (pairs, 2), tallied."""
        replies = self.engine.sample(model, [row["prompt_ids"] for row in rows for _ in range(2)], self.sampling)
        first, second = replies[0::2], replies[1::2]
        texts = [self.tokenizer.decode(reply, skip_special_tokens=True) for reply in replies]
        rewards = self.rank([json.loads(row["prompt"]) for row in rows], [row["answer"] for row in rows],
                            texts[0::2], texts[1::2]).float()
        self.tallies.add(model, "reward", float(rewards.sum()), rewards.numel())
        self.tallies.add(model, "completion_tokens", float(sum(map(len, replies))), len(replies))
        return first, second, rewards

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "no_loss" in batch:  # a process past the data's end joins the step with nothing to learn (DDP)
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum() * 0.0
        rows = [self.prompts[i] for i in batch["index"].tolist()]
        first, second, rewards = self._sample(model, rows)
        decided, chosen_side = order_pairs(rewards)
        self.tallies.add(model, "tie_share", float(len(rows) - decided.numel()), len(rows))
        if decided.numel():
            self.signal += 1
            pair_rewards = rewards[decided]  # (decided, 2)
            chosen_reward = pair_rewards.gather(1, chosen_side[:, None]).squeeze(1)
            rejected_reward = pair_rewards.gather(1, 1 - chosen_side[:, None]).squeeze(1)
            self.tallies.add(model, "reward_chosen", float(chosen_reward.sum()), decided.numel())
            self.tallies.add(model, "reward_rejected", float(rejected_reward.sum()), decided.numel())
            self.tallies.add(model, "reward_margin", float((chosen_reward - rejected_reward).sum()), decided.numel())
        # A batch of ties still goes through the model (DDP's gradient sync), with a loss of zero.
        keep = decided.tolist() or [0]
        sides = chosen_side.tolist() or [0]
        replies = list(zip(first, second))
        sequences = [_sequence(rows[i]["prompt_ids"], replies[i][side]) for i, side in zip(keep, sides)] + \
                    [_sequence(rows[i]["prompt_ids"], replies[i][1 - side]) for i, side in zip(keep, sides)]
        packed = collate_padding_free(sequences) if self.packed else collate_batch(sequences,
                                                                                   self.tokenizer.pad_token_id)
        packed = {k: v.to(batch["input_ids"].device) for k, v in packed.items()}
        sums, counts = sequence_logps(model, packed, self.chunked)  # (2 × pairs,): the chosen, then the rejected
        if not decided.numel():  # the forward alone keeps DDP's gradient sync; the reference is not needed
            return sums.sum() * 0.0
        with self.reference() as frozen:
            reference = sequence_logps(frozen, packed, self.chunked)[0].to(sums.device)
        pairs = len(keep)
        loss = LOSSES[self.config.loss](sums[:pairs], sums[pairs:], reference[:pairs], reference[pairs:],
                                        self.config.beta)  # (pairs,)
        implicit = self.config.beta * (sums - reference).detach()
        self.tallies.add_pairs(model, implicit[:pairs], implicit[pairs:])
        self.tallies.add(model, "kl_per_token", float((sums - reference).detach().sum()), int(counts.sum()))
        return loss.mean() * len(rows)

    def take_signal(self) -> int:
        """Micro-batches with a decided pair since the last call: a step of ties only is not applied (the loop
        skips it), since the optimizer's momentum and weight decay would move the weights with nothing learnt."""
        signal, self.signal = self.signal, 0
        return signal

    def take_metrics(self, mode: str) -> dict[str, float]:
        """``reward`` over every sampled reply; ``reward_chosen``, ``reward_rejected`` and ``reward_margin``
        (the source's rewards) over decided pairs; ``tie_share`` of the pairs sampled; DPO's implicit
        ``rewards/*`` and ``kl_per_token`` over the pairs trained on; the judge's ``unparsed`` answers."""
        metrics = self.tallies.take(mode)
        unparsed = getattr(self.rank, "unparsed", None)
        if unparsed is not None and mode == "train":
            metrics["judge_unparsed"], self.rank.unparsed = float(unparsed), 0
        return metrics

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["index"].shape[0]


def preference_source(config: OnlineDPOConfig) -> Callable[[torch.device, int], Ranker]:
    """The configured source, checked before anything loads (reward functions imported, the reward model's
    run folder read, the judge asked once): a ``ConfigError`` that names the field; returns what builds the
    ranker once the device is known."""
    if config.judge is not None:
        judge = config.judge
        try:
            check_endpoint(JudgeSettings(judge.url, judge.model, judge.api_key_env), judge.timeout_s)
        except (TunesmithError, ImportError) as err:
            raise ConfigError([f"online_dpo.judge: {err}"]) from None
        return lambda device, max_seq_len: JudgeRanker(judge)
    load = reward_source("online_dpo", config.rewards, config.reward_weights, config.reward_model)
    return lambda device, max_seq_len: rank_by_scores(load(device, max_seq_len))


def run_online_dpo(config: OnlineDPOTaskConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Check the preference source and the prompts, train, and write the run folder (as DPO does)."""
    section = config.online_dpo
    build_ranker = preference_source(section)
    accelerator, source, tokenizer = start_run(config)
    prompts = build_prompts(config.data, tokenizer, section.max_new_tokens, task="online_dpo")
    log.info("data: %d prompts, 2 sampled replies each, ranked by %s", len(prompts),
             "an LLM judge" if section.judge else "a reward model" if section.reward_model else "reward functions")
    rank = build_ranker(accelerator.device, config.data.max_seq_len)
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    packed = packs_padding_free(config, model)
    apply_speedups(model, config.training, packed)
    objective = OnlineDPOObjective(section, tokenizer, prompts, rank, reference_scope(model), packed,
                                   config.training.chunked_loss)
    stream = MicroBatches(prompts.with_format(None), config.training.batch_size, config.training.seed,
                          lambda rows: collate_prompts(rows, tokenizer.pad_token_id))
    with lifetime(config, run_dir, accelerator, resumed=checkpoint is not None):
        result = train(model, objective, stream, None, config.training, run_dir, accelerator, checkpoint)
        return finish_run(config, accelerator, model, tokenizer, result, run_dir, task="online_dpo",
                          loss=section.loss)
