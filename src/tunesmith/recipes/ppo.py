"""PPO (``task: ppo``; Schulman et al. 2017, as applied to language models by Ziegler et al. 2019
and Ouyang et al. 2022).

Each batch of ``training.batch_size`` prompts gets one sampled completion per prompt (one left-
padded ``generate`` with a KV cache), scored by reward functions or a reward model run. The reward
of each completion token is −β·(log π_old − log π_ref), the score is added at its last token, and
GAE over the value head's estimates gives advantages and returns. The policy and its value head
(a linear layer on the policy's final hidden states, trained jointly) then take ``ppo_epochs``
passes over the batch in ``minibatches`` steps each, with the clipped surrogate and the clipped
value loss. β follows the adaptive controller of Ziegler et al. (``target_kl``).

The loop is SFT's: each optimizer step is one minibatch of one pass, so the stream hands each
prompt batch out ``ppo_epochs × minibatches`` times in a row (``RepeatedBatches``), and the rollouts
are sampled at the first. Checkpoints fall between batches of rollouts (the config checks
``save_every``) and keep β, so a resumed run samples and steps as the uninterrupted one would.
Each minibatch's loss is the mean over its completions of each completion's mean token loss.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass

import datasets
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunesmith.config.schema import PPOConfig, PPOTaskConfig
from tunesmith.data.collate import collate_batch
from tunesmith.data.pack import collate_padding_free
from tunesmith.data.prompts import build_prompts, collate_prompts
from tunesmith.generate.sample import SamplingConfig, sample_batch
from tunesmith.io import atomic_directory, writing
from tunesmith.losses.logprobs import label_outputs, token_logps
from tunesmith.losses.rl import AdaptiveKL, gae, ppo_policy_loss, ppo_value_loss, whiten
from tunesmith.models.fastpath import apply_speedups, packs_padding_free
from tunesmith.models.modes import evaluating
from tunesmith.recipes.base import micro_batches_per_step, lifetime, RunResult, Scorer, build_trainable_model, finish_run, reference_scope, reward_source, start_run
from tunesmith.rundir import VALUE_HEAD_FILE, RunDir
from tunesmith.train.loop import MicroBatches, RepeatedBatches, train
from tunesmith.train.run import open_run_dir

log = logging.getLogger(__name__)


def policy_outputs(model: nn.Module, value_head: nn.Module, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per completion token: (log π, the value estimate of the state before it, the policy's
    entropy there, the token's sequence index), all (tokens,)."""
    hidden, logits, targets, index = label_outputs(model, batch, hidden_states=True)
    log_probs = logits.float().log_softmax(-1)  # (tokens, vocab)
    logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1).detach()
    values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    return logps, values, entropy, index


@dataclass
class Rollouts:
    """One batch of sampled completions and what PPO keeps of them, each list one entry per sequence."""

    number: int
    sequences: list[dict]  # input_ids and labels (prompt masked)
    old_logps: list[torch.Tensor]
    old_values: list[torch.Tensor]
    advantages: list[torch.Tensor]
    returns: list[torch.Tensor]


def _split(values: torch.Tensor, index: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """Per-token values (in sequence order) -> one tensor per sequence."""
    return list(torch.split(values, torch.bincount(index, minlength=rows).tolist()))


def _padded(pieces: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in pieces)
    out = pieces[0].new_zeros(len(pieces), width)
    mask = torch.zeros(len(pieces), width, dtype=torch.bool, device=out.device)
    for i, piece in enumerate(pieces):
        out[i, :len(piece)], mask[i, :len(piece)] = piece, True
    return out, mask


class PPOObjective:
    fsdp_ready = False  # it samples outside the model's forward: not sharded yet (ddp instead)
    # An RL loss sits near zero with either sign, and its gradient norm swings by orders of magnitude with the
    # spread of the rewards (a batch of equal rewards leaves only the KL's): neither tells a divergence. Only
    # non-finite steps are caught.
    divergence_signals: tuple[str, ...] = ()

    def __init__(self, config: PPOConfig, tokenizer: PreTrainedTokenizerBase, prompts: datasets.Dataset,
                 score: Scorer, reference, value_head: nn.Module, packed: bool, seed: int):
        self.config, self.tokenizer, self.prompts, self.score = config, tokenizer, prompts, score
        self.reference, self.value_head, self.packed, self.seed = reference, value_head, packed, seed
        self.sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                       top_p=config.top_p)
        self.kl = AdaptiveKL(config.kl_coef, config.target_kl, config.kl_horizon)
        self.rollouts: Rollouts | None = None
        self.tally: defaultdict = defaultdict(float)

    def forget(self) -> None:
        """Drop the cached rollouts (a rollback restored the weights that sampled them, or older ones)."""
        self.rollouts = None

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl.value}

    def load_state_dict(self, state: dict) -> None:
        self.kl.value = state["kl_coef"]

    def _minibatch(self, count: int, rollout: int, step: int) -> list[int]:
        """The sequences of pass ``step``: each PPO epoch shuffles the batch (seeded by run seed,
        rollout and epoch) and splits it into ``minibatches`` near-equal parts."""
        epoch, part = divmod(step, self.config.minibatches)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rollout * 1_009 + epoch)
        order = torch.randperm(count, generator=generator).tolist()
        bounds = [round(i * count / self.config.minibatches) for i in range(self.config.minibatches + 1)]
        return order[bounds[part]:bounds[part + 1]]

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return len(self._minibatch(batch["index"].shape[0], int(batch["rollout"]), int(batch["pass"])))

    def _collate(self, sequences: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
        batch = collate_padding_free(sequences) if self.packed else collate_batch(sequences,
                                                                                  self.tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in batch.items()}

    def _roll_out(self, model: nn.Module, batch: dict[str, torch.Tensor], number: int) -> Rollouts:
        rows = [self.prompts[i] for i in batch["index"].tolist()]
        completions = sample_batch(model, self.tokenizer, [r["prompt_ids"] for r in rows], self.sampling)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        scores = torch.tensor(self.score([json.loads(r["prompt"]) for r in rows], texts, [r["answer"] for r in rows]),
                              dtype=torch.float32)
        sequences = [{"input_ids": r["prompt_ids"] + c, "labels": [-100] * len(r["prompt_ids"]) + c}
                     for r, c in zip(rows, completions)]
        device = batch["input_ids"].device
        packed = self._collate(sequences, device)
        with torch.no_grad(), evaluating(model):
            logps, values, _, index = policy_outputs(model, self.value_head, packed)
            reference = logps
            if self.reference is not None:
                with self.reference() as frozen:
                    reference = token_logps(frozen, packed)[0]
        kl, mask = _padded(_split(logps - reference, index, len(rows)))  # (rows, tokens)
        rewards = -self.kl.value * kl
        last = mask.sum(1) - 1
        rewards[torch.arange(len(rows), device=device), last] += scores.to(device)
        old_values, _ = _padded(_split(values, index, len(rows)))
        advantages, returns = gae(rewards, old_values, mask, self.config.gamma, self.config.lam)
        if self.config.whiten_advantages:
            advantages = whiten(advantages, mask)
        per_sequence_kl = (kl * mask).sum(1)
        self.tally.update(rollouts=len(rows), reward=float(scores.sum()), kl=float(per_sequence_kl.sum()),
                          non_score_reward=float(rewards.sum() - scores.sum()),
                          completion_tokens=float(mask.sum()), kl_coef=self.kl.value * len(rows))
        self.kl.update(float(per_sequence_kl.mean()), len(rows))
        lengths = mask.sum(1).tolist()
        return Rollouts(number, sequences, _split(logps, index, len(rows)), _split(values, index, len(rows)),
                        [a[:n] for a, n in zip(advantages, lengths)], [r[:n] for r, n in zip(returns, lengths)])

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "no_loss" in batch:  # a process past the data's end joins the step with nothing to learn (DDP)
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum() * 0.0
        number, step = int(batch["rollout"]), int(batch["pass"])
        if self.rollouts is None or self.rollouts.number != number:
            if step != 0:
                raise RuntimeError(f"PPO: pass {step} of rollout batch {number} without its rollouts (a resume "
                                   f"from a checkpoint taken inside a batch of rollouts)")
            self.rollouts = self._roll_out(model, batch, number)
        chosen = self._minibatch(batch["index"].shape[0], number, step)
        anchor = sum(p.sum() for p in self.value_head.parameters()) * 0.0  # a step with nothing still backpropagates
        if not chosen:
            return anchor
        rollouts = self.rollouts
        packed = self._collate([rollouts.sequences[i] for i in chosen], batch["input_ids"].device)
        logps, values, entropy, index = policy_outputs(model, self.value_head, packed)

        def gathered(pieces: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([pieces[i] for i in chosen])
        policy, clipped = ppo_policy_loss(logps, gathered(rollouts.old_logps), gathered(rollouts.advantages),
                                          self.config.epsilon)
        value, value_clipped = ppo_value_loss(values, gathered(rollouts.old_values), gathered(rollouts.returns),
                                              self.config.value_clip)
        per_token = policy + self.config.vf_coef * value
        counts = logps.new_zeros(len(chosen)).index_add(0, index, torch.ones_like(logps))
        per_sequence = logps.new_zeros(len(chosen)).index_add(0, index, per_token) / counts.clamp(min=1)
        ratio_log = (logps - gathered(rollouts.old_logps)).detach()
        for key, values_ in (("policy_loss", policy.detach()), ("value_loss", value.detach()),
                             ("clip_fraction", clipped.float()), ("value_clip_fraction", value_clipped.float()),
                             ("entropy", entropy), ("approx_kl", 0.5 * ratio_log ** 2)):
            self.tally["token_" + key] += float(values_.sum())
        self.tally["tokens"] += float(logps.shape[0])
        return anchor + per_sequence.sum()

    def take_metrics(self, mode: str) -> dict[str, float]:
        tally, self.tally = self.tally, defaultdict(float)
        metrics = {}
        tokens = tally.pop("tokens", 0)
        rollouts = tally.pop("rollouts", 0)
        for key, value in tally.items():
            if key.startswith("token_"):
                if tokens:
                    metrics[key[len("token_"):]] = value / tokens
            elif rollouts:
                metrics[key] = value / rollouts
        return metrics


def run_ppo(config: PPOTaskConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Check the prompts and the reward source, train, and write the run folder (the policy as the
    model, the value head beside it in value_head/value_head.safetensors)."""
    load_scorer = reward_source("ppo", config.ppo.rewards, config.ppo.reward_weights, config.ppo.reward_model)
    accelerator, source, tokenizer = start_run(config)
    prompts = build_prompts(config.data, tokenizer, config.ppo.max_new_tokens, task="ppo")
    log.info("data: %d prompts; %d optimizer steps per batch of %d rollouts", len(prompts),
             config.ppo.steps_per_batch, config.training.batch_size)
    scorer = load_scorer(accelerator.device, config.data.max_seq_len)
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    packed = packs_padding_free(config, model)
    apply_speedups(model, config.training, packed)
    reference = reference_scope(model) if config.ppo.kl_coef > 0 else None  # a zero β stays zero
    hidden_size = model.get_output_embeddings().weight.shape[1]
    model.value_head = nn.Linear(hidden_size, 1).to(accelerator.device)  # trained and checkpointed with the policy
    nn.init.zeros_(model.value_head.weight)
    nn.init.zeros_(model.value_head.bias)
    objective = PPOObjective(config.ppo, tokenizer, prompts, scorer, reference, model.value_head, packed,
                             config.training.seed)
    stream = MicroBatches(prompts.with_format(None), config.training.batch_size, config.training.seed,
                          lambda rows: collate_prompts(rows, tokenizer.pad_token_id))
    with lifetime(config, run_dir, accelerator, resumed=checkpoint is not None):
        result = train(model, objective, RepeatedBatches(stream, config.ppo.steps_per_batch,
                                                     micro_batches_per_step(config, accelerator, checkpoint)), None,
                       config.training, run_dir, accelerator, checkpoint)
        value_head = accelerator.unwrap_model(model).value_head
        del accelerator.unwrap_model(model).value_head  # the saved model is the policy alone, as chat loads it
        if accelerator.is_main_process:
            target = RunDir(run_dir).value_head_dir
            with writing(target, "the value head", "the checkpoints are intact; free space and resume with "
                         "--resume"), atomic_directory(target) as staging:
                save_file({k: v.detach().cpu() for k, v in value_head.state_dict().items()},
                          str(staging / VALUE_HEAD_FILE))
        return finish_run(config, accelerator, model, tokenizer, result, run_dir, task="ppo")
