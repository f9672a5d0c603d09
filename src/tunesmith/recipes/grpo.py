"""GRPO (``task: grpo``; Shao et al. 2024, DeepSeekMath): for each prompt, G completions (or multi-turn
episodes with an environment's tools, ``grpo.environment``; generate/episodes.py) are
sampled from the current policy, scored by the configured reward functions, and their rewards
normalised within the group into advantages; the policy then takes the clipped surrogate step
with a per-token k3 KL to the reference (the model with its adapters off, or a frozen copy).

Each micro-batch is a set of prompts; sampling happens inside the step, with the torch RNG the
checkpoints save, so a resumed run samples what the uninterrupted one would have. With one policy
update per sampled batch (μ = 1) the ratio π/π_old is 1 at the step and its gradient is the
advantage-weighted log-likelihood gradient; ``grpo.updates_per_batch`` > 1 reuses each sampled batch
for μ updates against the sampling policy's log-probabilities, so the clip binds; checkpoints (and
stops for a signal) fall between sampled batches, as PPO's do. ``grpo.loss`` picks the variant (``GRPOObjective``);
``grpo.engine`` what samples (generate/rollout.py: transformers on the policy, or vLLM with its LoRA synced).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import GRPOConfig, GRPOTaskConfig
from tunesmith.data.collate import collate_batch
from tunesmith.data.pack import collate_padding_free
from tunesmith.data.prompts import build_prompts, collate_prompts
from tunesmith.errors import ConfigError
from tunesmith.environments import Environment, load_environment
from tunesmith.generate.episodes import longest_prompt, run_episodes
from tunesmith.generate.rollout import HFRollouts, RolloutEngine, rollout_engine
from tunesmith.generate.vllm import VLLMError, find_python as vllm_python
from tunesmith.generate.sample import SamplingConfig
from tunesmith.losses.logprobs import token_logps
from tunesmith.losses.rl import (centred_advantages, clipped_surrogate, group_advantages, k3_kl,
                                 leave_one_out_advantages, overlong_penalty, reinforce_pp_advantages,
                                 sequence_ratio_loss)
from tunesmith.models.fastpath import apply_speedups, packs_padding_free
from tunesmith.recipes.base import micro_batches_per_step, lifetime, RunResult, build_trainable_model, finish_run, reference_scope, start_run
from tunesmith.rewards import WeightedRewards
from tunesmith.rundir import RunDir
from tunesmith.train.loop import MicroBatches, RepeatedBatches, train
from tunesmith.train.run import open_run_dir

log = logging.getLogger(__name__)


@dataclass
class _Rollouts:
    """One sampled batch: its completions as training sequences, rewards, and the sampling policy's
    log-probabilities (the ratio's denominator for all ``updates_per_batch`` updates)."""

    sequences: list[dict]
    rewards: torch.Tensor  # (groups, group_size)
    old_logps: torch.Tensor | None  # per completion token; None: the current policy's (one update per batch)
    dropped: int = 0  # groups dynamic sampling dropped for equal rewards
    empty: bool = False  # no group had a signal: ``sequences`` are the last round's, to train on nothing


class GRPOObjective:
    """Sample, score, turn rewards into advantages, and return the loss summed over completions, as
    ``grpo.loss`` defines it:

    - ``grpo`` (DeepSeekMath eq. 3): group-normalised advantages, the per-token clipped surrogate plus
      β·k3 KL, averaged over each completion's tokens;
    - ``dr_grpo``: advantages not divided by the group's std; each completion's token losses summed and
      divided by ``max_new_tokens`` (a constant, so long wrong replies are not let off lightly);
    - ``dapo``: clip-higher (``epsilon_high``), the token losses averaged over every token of the
      micro-batch (token-level), dynamic sampling and over-long shaping where configured;
    - ``gspo``: one importance ratio per completion, the geometric mean of its token ratios, clipped;
    - ``rloo``: leave-one-out advantages and the ratio of the whole completion's probability (the
      REINFORCE of the sequence), clipped;
    - ``reinforce_pp``: the KL to the reference folded into each token's return, advantages whitened
      over the micro-batch's tokens, the per-token clipped surrogate, token-level.

    With ``updates_per_batch`` = μ > 1 the stream gives each micro-batch μ times in a row (``RepeatedBatches``);
    the first time it is sampled and its log-probabilities kept, the next μ − 1 train on the same
    completions against them, so the ratio moves off 1 and the clip binds."""

    fsdp_ready = False  # it samples inside the step, outside the model's forward: not sharded yet (ddp instead)
    # An RL loss sits near zero with either sign, and its gradient norm swings by orders of magnitude with the
    # spread of the rewards (a batch of equal rewards leaves only the KL's): neither tells a divergence. Only
    # non-finite steps are caught.
    divergence_signals: tuple[str, ...] = ()

    def __init__(self, config: GRPOConfig, tokenizer: PreTrainedTokenizerBase, prompts: datasets.Dataset,
                 rewards: WeightedRewards | None, reference, packed: bool, seed: int = 0, process: int = 0,
                 engine: RolloutEngine | None = None, environment: Environment | None = None, max_length: int = 2048):
        self.config, self.tokenizer, self.prompts, self.reference, self.packed = config, tokenizer, prompts, \
            reference, packed
        self.engine = engine if engine is not None else HFRollouts(tokenizer)
        self.environment, self.max_length = environment, max_length
        self.seed, self.process = seed, process
        self.rewards = rewards
        self.sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                       top_p=config.top_p)
        self.tally: defaultdict = defaultdict(float)
        self.kept: dict[int, _Rollouts] = {}  # by the micro-batch's stream position, while it is reused
        self.signal = 0  # micro-batches with something to learn, since take_signal

    def _sample(self, model: nn.Module, rows: list[dict]) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
        """G completions of each row as training sequences, their rewards (groups, G), and the rewards before
        over-long shaping (what dynamic sampling judges a group's signal by, as DAPO does)."""
        group = self.config.group_size
        sequences, prompts, texts, answers, lengths = [], [], [], [], []
        # Every prompt's G completions in one left-padded generate call: on a CPU the per-token
        # cost of decoding is nearly flat in the batch size, so one call beats one per prompt.
        copies = [row for row in rows for _ in range(group)]
        if self.environment is not None:
            return self._episodes(model, rows, copies)
        completions = self.engine.sample(model, [row["prompt_ids"] for row in copies], self.sampling)
        for row, completion in zip(copies, completions):
            sequences.append({"input_ids": row["prompt_ids"] + completion,
                              "labels": [-100] * len(row["prompt_ids"]) + completion})
            prompts.append(json.loads(row["prompt"]))
            texts.append(self.tokenizer.decode(completion, skip_special_tokens=True))
            answers.append(row["answer"])
            lengths.append(len(completion))
        rewards = torch.tensor(self.rewards(prompts, texts, answers), dtype=torch.float32)
        task_rewards = rewards.view(len(rows), group)
        if self.config.overlong_buffer:
            rewards = rewards + overlong_penalty(torch.tensor(lengths), self.config.max_new_tokens,
                                                 self.config.overlong_buffer)
        rewards = rewards.view(len(rows), group)
        self._count(rewards)
        return sequences, rewards, task_rewards

    def _count(self, rewards: torch.Tensor) -> None:
        """The policy's reward, over every group sampled: those dynamic sampling drops included."""
        self.tally["sampled"] += rewards.numel()
        self.tally["reward"] += float(rewards.sum())
        self.tally["reward_std"] += float(rewards.std(dim=1).sum() * rewards.shape[1])

    def _episodes(self, model: nn.Module, rows: list[dict], copies: list[dict]
                  ) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
        """``_sample`` for multi-turn rollouts: G episodes of each row with the environment, the sampled turns
        trained on and the tool results masked; the environment's final reward (over-long shaping does
        not apply: an episode has several turns)."""
        episodes = run_episodes(self.engine, model, self.tokenizer, self.environment,
                                [{"messages": json.loads(row["prompt"]), "answer": row["answer"]} for row in copies],
                                self.sampling, self.config.max_turns, self.max_length)
        sequences = [{"input_ids": e.input_ids, "labels": e.labels} for e in episodes]
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32).view(len(rows), self.config.group_size)
        self.tally["episodes"] += len(episodes)
        self.tally["tool_calls"] += sum(e.calls for e in episodes)
        self.tally["turns"] += sum(e.turns for e in episodes)
        if hasattr(self.environment, "metrics"):
            for episode in episodes:
                for name, value in self.environment.metrics(episode.state).items():
                    self.tally[f"env/{name}"] += float(value)
        self._count(rewards)
        return sequences, rewards, rewards

    def _rollouts(self, model: nn.Module, rows: list[dict]) -> _Rollouts:
        """A sampled batch; with dynamic sampling, only groups whose (unshaped) rewards differ, refilled with
        groups of prompts drawn at random for up to ``max_resample_rounds``. The draws come from a generator
        seeded by the run's seed, the batch's prompts, the round and the process: a resume draws the same,
        and two processes draw different prompts."""
        if not self.config.dynamic_sampling:
            sequences, rewards, _ = self._sample(model, rows)
            return _Rollouts(sequences, rewards, None)
        key = hash((self.seed, tuple(int(row["index"]) for row in rows), self.process)) % 2**62
        group, wanted = self.config.group_size, len(rows)
        kept_sequences: list[dict] = []
        kept_rewards: list[torch.Tensor] = []
        dropped = 0
        for round_ in range(self.config.max_resample_rounds):
            sequences, rewards, task_rewards = self._sample(model, rows)
            for g in range(len(rows)):
                if float(task_rewards[g].std()) == 0:
                    dropped += 1
                elif len(kept_rewards) < wanted:
                    kept_sequences += sequences[g * group:(g + 1) * group]
                    kept_rewards.append(rewards[g])
            if len(kept_rewards) >= wanted:
                break
            generator = torch.Generator().manual_seed(key + round_)
            draw = torch.randint(len(self.prompts), (wanted - len(kept_rewards),), generator=generator).tolist()
            rows = [self.prompts[i] for i in draw]
        if not kept_rewards:  # nothing to learn; the last round's groups still go through the model (DDP's sync)
            return _Rollouts(sequences, rewards, None, dropped, empty=True)
        return _Rollouts(kept_sequences, torch.stack(kept_rewards), None, dropped)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "no_loss" in batch:  # a process past the data's end joins the step with nothing to learn (DDP)
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum() * 0.0
        config, group = self.config, self.config.group_size
        position = int(batch["rollout"]) if "rollout" in batch else None
        repeat = int(batch["pass"]) if "pass" in batch else 0
        device = batch["input_ids"].device
        rollouts = self.kept.get(position) if repeat > 0 and position is not None else None
        if rollouts is None:
            if repeat > 0:  # checkpoints fall between sampled batches, so a resume starts a fresh one
                log.warning("no kept completions for micro-batch %s: sampling it again", position)
            rollouts = self._rollouts(model, [self.prompts[i] for i in batch["index"].tolist()])
            self.tally["dropped_groups"] += rollouts.dropped
        units = batch["index"].shape[0] * group
        packed = collate_padding_free(rollouts.sequences) if self.packed else collate_batch(
            rollouts.sequences, self.tokenizer.pad_token_id)
        packed = {k: v.to(device) for k, v in packed.items()}
        logps, index = token_logps(model, packed)
        if config.updates_per_batch > 1 and position is not None:  # kept for the next updates, an empty batch too
            if rollouts.old_logps is None:
                rollouts.old_logps = logps.detach()  # the sampling policy's
            if repeat + 1 < config.updates_per_batch:
                self.kept[position] = rollouts
            else:
                self.kept.pop(position, None)
        if rollouts.empty:  # dynamic sampling found no group with a signal: a step that changes nothing
            self.tally["empty_batches"] += 1
            return logps.sum() * 0.0
        self.signal += 1
        old = rollouts.old_logps if rollouts.old_logps is not None else logps.detach()
        reference = None
        if self.reference is not None:
            with self.reference() as frozen:
                reference = token_logps(frozen, packed)[0]
        completions = rollouts.rewards.numel()
        loss, clipped = self._loss(logps, old, reference, rollouts.rewards.to(device), index, completions)
        counts = logps.new_zeros(completions).index_add(0, index, torch.ones_like(logps))
        self.tally["completions"] += completions
        self.tally["completion_tokens"] += float(counts.sum())
        self.tally["clip_fraction"] += float(clipped) * completions
        if reference is not None:
            kl = logps.new_zeros(completions).index_add(0, index, k3_kl(logps.detach(), reference))
            self.tally["kl"] += float((kl / counts.clamp(min=1)).sum())
        return loss * (units / completions)  # the mean over the completions trained on, as a sum over units

    def _loss(self, logps: torch.Tensor, old: torch.Tensor, reference: torch.Tensor | None, rewards: torch.Tensor,
              index: torch.Tensor, completions: int) -> tuple[torch.Tensor, float]:
        """The variant's loss summed over completions, and the share of its terms the clip bound."""
        config, kind = self.config, self.config.loss
        low, high = config.epsilon, config.clip_high
        counts = logps.new_zeros(completions).index_add(0, index, torch.ones_like(logps)).clamp(min=1)
        kl = k3_kl(logps, reference) if reference is not None and config.beta else None

        def per_completion(per_token: torch.Tensor) -> torch.Tensor:
            return logps.new_zeros(completions).index_add(0, index, per_token)

        if kind in ("gspo", "rloo"):
            advantages = group_advantages(rewards) if kind == "gspo" else leave_one_out_advantages(rewards)
            loss, clip = sequence_ratio_loss(logps, old, index, completions, advantages.flatten(), low, high,
                                             geometric=kind == "gspo")
            if kl is not None:
                loss = loss + config.beta * per_completion(kl) / counts
            return loss.sum(), float(clip.float().mean())
        if kind == "reinforce_pp":
            advantages = reinforce_pp_advantages(rewards, old, reference, index, config.beta)  # fixed at sampling
            per_token, clip = clipped_surrogate(logps, old, advantages, low, high)
            return per_token.sum() / per_token.numel() * completions, float(clip.float().mean())
        advantages = centred_advantages(rewards) if kind == "dr_grpo" else group_advantages(rewards)
        per_token, clip = clipped_surrogate(logps, old, advantages.flatten()[index], low, high)
        if kl is not None:
            per_token = per_token + config.beta * kl
        if kind == "dapo":  # token-level: every token of the micro-batch weighs the same
            return per_token.sum() / per_token.numel() * completions, float(clip.float().mean())
        if kind == "dr_grpo":
            return (per_completion(per_token) / config.max_new_tokens).sum(), float(clip.float().mean())
        return (per_completion(per_token) / counts).sum(), float(clip.float().mean())

    def take_signal(self) -> int:
        """Micro-batches with something to learn since the last call (the loop skips an update without any)."""
        signal, self.signal = self.signal, 0
        return signal

    def take_metrics(self, mode: str) -> dict[str, float]:
        """Per step: ``reward`` and ``reward_std`` over every completion sampled (groups that dynamic
        sampling dropped included: the policy's reward); ``kl``, ``completion_tokens`` and
        ``clip_fraction`` over the completions trained on; ``dropped_groups`` and ``empty_batches`` counted."""
        tally, self.tally = self.tally, defaultdict(float)
        count, sampled = tally.pop("completions", 0), tally.pop("sampled", 0)
        metrics = {key: tally.pop(key) / sampled for key in ("reward", "reward_std") if key in tally and sampled}
        episodes = tally.pop("episodes", 0)
        metrics |= {key: tally.pop(key) / episodes for key in [*("tool_calls", "turns"), *(k for k in tally if
                                                              k.startswith("env/"))] if key in tally and episodes}
        totals = {key: tally.pop(key) for key in ("dropped_groups", "empty_batches") if key in tally}
        return metrics | ({key: value / count for key, value in tally.items()} if count else {}) | totals

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["index"].shape[0] * self.config.group_size


def run_grpo(config: GRPOTaskConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Check the prompts and reward functions (or the environment), train, and write the run folder (as SFT
    does)."""
    rewards, environment = None, None
    try:
        if config.grpo.environment:
            environment = load_environment(config.grpo.environment, config.grpo.environment_args)
        else:
            rewards = WeightedRewards(config.grpo.rewards, config.grpo.reward_weights)
    except ValueError as err:
        raise ConfigError([f"grpo.{'environment' if config.grpo.environment else 'rewards'}: {err}"]) from None
    if config.grpo.engine == "vllm":
        try:
            vllm_python(config.grpo.vllm_python)  # vLLM missing: said before anything loads
        except VLLMError as err:
            raise ConfigError([f"grpo.engine: {err}"]) from None
    accelerator, source, tokenizer = start_run(config)
    prompts = build_prompts(config.data, tokenizer, config.grpo.max_new_tokens)
    log.info("data: %d prompts, %d completions each", len(prompts), config.grpo.group_size)
    if environment is not None:
        longest = longest_prompt(tokenizer, environment, [json.loads(p) for p in prompts["prompt"]])
        if longest + config.grpo.max_new_tokens > config.data.max_seq_len:
            raise ConfigError([f"data.max_seq_len: {config.data.max_seq_len} tokens leave no room for a turn: the "
                               f"longest prompt with the environment's instructions and tools takes {longest}, plus "
                               f"grpo.max_new_tokens {config.grpo.max_new_tokens}"])
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    packed = packs_padding_free(config, model)
    apply_speedups(model, config.training, packed)
    reference = reference_scope(model) if config.grpo.beta > 0 else None
    if config.grpo.engine == "vllm" and source[1] is not None:
        raise ConfigError([f"grpo.engine: vllm loads a model folder; {config.model.name_or_path} is a GGUF file"])
    engine = rollout_engine(config.grpo.engine, model, tokenizer, source[0], config.data.max_seq_len,
                            RunDir(run_dir).rollout_log(accelerator.process_index), config.grpo.vllm_python,
                            config.grpo.vllm_args)
    objective = GRPOObjective(config.grpo, tokenizer, prompts, rewards, reference, packed, config.training.seed,
                              accelerator.process_index, engine, environment, config.data.max_seq_len)
    stream = MicroBatches(prompts.with_format(None), config.training.batch_size, config.training.seed,
                          lambda rows: collate_prompts(rows, tokenizer.pad_token_id))
    if config.grpo.updates_per_batch > 1:
        stream = RepeatedBatches(stream, config.grpo.updates_per_batch,
                                 micro_batches_per_step(config, accelerator, checkpoint))
    with lifetime(config, run_dir, accelerator, resumed=checkpoint is not None), contextlib.closing(engine):
        result = train(model, objective, stream, None, config.training, run_dir, accelerator, checkpoint)
        return finish_run(config, accelerator, model, tokenizer, result, run_dir, task="grpo")
