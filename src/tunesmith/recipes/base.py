"""What every recipe does the same way: seed, model + method, accelerator, the run folder, the
trackers' lifetime, the final save. Recipes import this module and never each other."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from transformers import PreTrainedTokenizerBase

from peft import PeftModel

from tunesmith import __version__

from tunesmith.adapters.apply import apply_method, count_parameters, decoder_layers, gradual_unfreeze
from tunesmith.adapters.bottleneck import bottlenecks_disabled, is_bottleneck
from tunesmith.config.schema import Config, DatasetConfig
from tunesmith.data.build import build_datasets
from tunesmith.data.pack import packed_dataset
from tunesmith.data.pairs import build_pair_datasets, collate_pairs
from tunesmith.data.tokenize import UNLIMITED  # max_seq_len while tokenizing documents for packing
from tunesmith.evaluation.reward import RewardModelScorer, check_reward_run
from tunesmith.models.device import select_device, select_mixed_precision
from tunesmith.models.fastpath import apply_speedups, packs_padding_free, zero3_partitioned
from tunesmith.models.load import initialise_added_tokens, load_model, load_tokenizer, resolve_model_source, \
    tokens_to_add
from tunesmith.models.modes import evaluating
from tunesmith.rewards import WeightedRewards
from tunesmith.rundir import RunDir
from tunesmith.errors import ConfigError, RunStopped, TunesmithError
from tunesmith.tracking import check_backends, ended_as, finish_tracking, tracked
from tunesmith.train import shard, zero
from tunesmith.train.guard import stop_signals
from tunesmith.train.loop import MicroBatches, TrainResult
from tunesmith.train.optim import lr_scale_for
from tunesmith.train.run import open_run_dir, save_final_model, write_status, write_summary

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    model: nn.Module  # the trained model, unwrapped (a PeftModel for adapter methods)
    result: TrainResult


def build_accelerator(config: Config) -> Accelerator:
    device = select_device(config.model.device)
    precision = select_mixed_precision(config.training.mixed_precision, device)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if config.training.distributed == "deepspeed" and processes > 1:
        zero.require_installed()  # before anything loads; the loop starts the engine (train.zero says why)
    if device.type == "cuda" and processes > 1 and config.training.fsdp.cpu_offload \
            and not torch.distributed.is_initialized():
        # FSDP's CPU offload reduces gradients and clips their norm on CPU tensors: the process group needs a CPU
        # backend beside NCCL (accelerate, finding it initialised, keeps it).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="cuda:nccl,cpu:gloo")
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


def batch_tokens_for(config: Config, model: nn.Module, accelerator: Accelerator, checkpoint: Path | None = None
                     ) -> int | None:
    """``training.batch_tokens`` for this run: the number set, or for auto on a GPU (batch_size not set: the
    config's validator turns auto into null when it is) the most tokens per micro-batch the memory estimate
    fits on each device under the run's strategy; None: batch_size rows. A resumed run keeps the budget its
    checkpoint was trained with (its data position counts those micro-batches)."""
    chosen, training, device = config.training.batch_tokens, config.training, accelerator.device
    if chosen != "auto":
        return chosen
    if checkpoint is not None:
        saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("batch_tokens")
        log.info("training.batch_tokens auto: %s, as the checkpoint was trained", f"{saved} tokens per micro-batch"
                 if saved else "batch_size rows")
        return saved
    if device.type != "cuda" or config.task in ("grpo", "ppo", "distill", "online_dpo") or config.data.replay:
        return None  # (distill: the estimate does not count the teacher beside the student)
    from tunesmith import estimate

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    arch = estimate.read_architecture(inner.config.to_dict(), config.model.name_or_path)
    memory = torch.cuda.get_device_properties(device).total_memory
    plan = estimate.plan_from_config(config, arch, gpus=accelerator.num_processes, device="cuda")
    strategy = estimate.strategy_of(config) or estimate.auto_strategy(arch, plan, memory)
    plan = dataclasses.replace(plan, strategy=strategy if accelerator.num_processes > 1 else "single")
    tokens = estimate.fitting_batch_tokens(arch, plan, config.data.max_seq_len, memory)
    if tokens is None:
        log.info("training.batch_tokens auto: no micro-batch of %d tokens fits the estimate; %d rows instead",
                 estimate.BATCH_TOKEN_CHOICES[0], training.batch_size)
        return None
    log.info("training.batch_tokens auto: %d tokens per micro-batch (the most the memory estimate fits in "
             "%.0f%% of %.0f GiB; set training.batch_tokens or batch_size to choose)", tokens,
             100 * estimate.FIT_SHARE, memory / 2**30)
    return tokens


def start_run(config: Config) -> tuple[Accelerator, tuple[str, str | None], PreTrainedTokenizerBase]:
    """What every task does first: the accelerator, the seed, the model's source (the main process
    converts the embedded model once) and the tokenizer."""
    check_backends(config)  # a tracker that is not installed: refused before anything loads
    accelerator = build_accelerator(config)
    if accelerator.num_processes > 1:
        log.info("distributed: %d processes (%s, %s backend); this is process %d", accelerator.num_processes,
                 accelerator.distributed_type.value, torch.distributed.get_backend(), accelerator.process_index)
    seed_everything(config)
    with accelerator.main_process_first():
        source = resolve_model_source(config.model)
    return accelerator, source, load_tokenizer(config.model, source)


@contextlib.contextmanager
def lifetime(config: Config, run_dir: Path, accelerator: Accelerator, resumed: bool) -> Iterator[None]:
    """A run's life once its folder is open, entered by every recipe around training and ``finish_run``:
    status.json says running, then how the run ended (finished, preempted, failed with the reason, or
    diverged), and the trackers (``tracking.tracked``) end their runs to match."""
    main = accelerator.is_main_process
    if main:
        write_status(run_dir, "running", "resumed" if resumed else None)
    try:
        # Stop signals are caught from here to the final save: between steps the loop checkpoints and stops;
        # after the last step the final model is written and the run ends as finished.
        with stop_signals(config.training.preemption_grace_s), tracked(config, run_dir, accelerator, resumed):
            yield
    except BaseException as err:
        if main:
            _record_end(run_dir, err)
        raise


def _record_end(run_dir: Path, err: BaseException) -> None:
    """status.json for a run that raised; a failure to write it is logged, never put in the error's place."""
    status, code = ended_as(err), None
    if isinstance(err, RunStopped):
        reason, step, code = str(err), err.step, err.exit_code
    elif isinstance(err, KeyboardInterrupt):
        reason, step, code = "interrupted (a second Ctrl-C): stopped at once, without a checkpoint", None, 130
    elif isinstance(err, SystemExit):
        reason, step = "a second stop signal: stopped at once, without a checkpoint", None
        code = err.code if isinstance(err.code, int) else 1
    else:
        reason, step = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", None
    try:
        write_status(run_dir, status, reason, step, code)
    except TunesmithError as write_err:
        log.warning("%s", write_err)


def micro_batches_per_step(config: Config, accelerator: Accelerator, checkpoint: Path | None) -> int:
    """Micro-batches in one optimizer step over all processes: grad_accum x processes, or, resuming, what the
    checkpoint was trained with (an elastic resume keeps it; the loop adapts grad_accum to it)."""
    if checkpoint is not None:
        saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("micro_per_step")
        if saved:
            return int(saved)
    return config.training.grad_accum * accelerator.num_processes


def finish_run(config: Config, accelerator: Accelerator, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
               result: TrainResult, run_dir: Path, **summary: Any) -> RunResult:
    """What every task does last, inside ``lifetime``: the final model, summary.json (``summary`` adds task
    fields), the trackers' final numbers and the run's status. A diverged run (its model is the last
    good step's) then raises ``RunStopped``, so that the command exits non-zero."""
    final = accelerator.unwrap_model(model)
    whole = None
    if result.keep_model and shard.is_sharded(final):
        whole = shard.full_model_state(final)
    elif result.keep_model and zero3_partitioned(final):
        whole = zero.full_model_state(zero.engine_of(final), final)
    if accelerator.is_main_process:
        if result.keep_model:
            save_final_model(final, tokenizer, run_dir, whole)
        summary = {**run_summary(config, final, result, run_dir), **summary}
        write_summary(run_dir, summary)
        finish_tracking(accelerator, run_dir, summary)
        write_status(run_dir, result.status, result.reason, result.state.global_step)
        log.info("saved %s (train loss %.4f%s)", RunDir(run_dir).model_dir,
                 float("nan") if result.final_train_loss is None else result.final_train_loss,
                 f", eval loss {result.final_eval_loss:.4f}" if result.final_eval_loss is not None else "")
    if result.status != "finished":
        written = f"{RunDir(run_dir).model_dir} and summary.json were" if result.keep_model else "summary.json was"
        raise RunStopped(f"{result.reason}; {written} written", result.status, 1, result.state.global_step)
    return RunResult(run_dir, final, result)


def _added_token_parts(config: Config, source: tuple[str, str | None]) -> dict[str, list[int]]:
    """Each token of ``model.add_tokens`` not already in the vocabulary -> its ids under the old tokenizer."""
    old = load_tokenizer(config.model.model_copy(update={"add_tokens": None}), source)
    vocabulary = old.get_vocab()
    return {token: old(token, add_special_tokens=False)["input_ids"]
            for token in tokens_to_add(config.model) if token not in vocabulary}


def build_trainable_model(config: Config, source: tuple[str, str | None], device: torch.device,
                          tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """Load the base model onto ``device`` (this process's, under DDP), add the config's tokens, and apply
    the method; logs trainable vs total parameters."""
    quantization = config.method.quantization if config.method.type == "qlora" else None
    reward = config.task == "reward"
    model = load_model(config.model.model_copy(update={"device": str(device)}), quantization, source,
                       head="score" if reward else "lm")
    new_ids: list[int] = []
    if config.model.add_tokens:
        parts = _added_token_parts(config, source)
        new_ids = initialise_added_tokens(model, tokenizer, parts)
        log.info("added %d tokens to the vocabulary (%d already in it)", len(new_ids),
                 len(tokens_to_add(config.model)) - len(new_ids))
    model = apply_method(model, config.method, config.training.gradient_checkpointing, tokenizer, new_ids,
                         task_type="SEQ_CLS" if reward else "CAUSAL_LM")
    trainable, total = count_parameters(model)
    log.info("method %s: %s trainable of %s parameters (%.4f%%)", config.method.type, f"{trainable:,}",
             f"{total:,}", 100 * trainable / max(total, 1))
    return model


Reference = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # model inputs -> the base model's logits


def reference_scope(model: nn.Module) -> Callable[[], AbstractContextManager[nn.Module]]:
    """A context that yields the frozen base model, in eval mode with no grad: for adapter methods
    the same model with its adapters switched off (no second copy in memory); full and freeze
    fine-tuning change the base itself, so they keep a frozen copy, taken now (before the first step)."""
    if isinstance(model, PeftModel) or is_bottleneck(model):
        switch_off = model.disable_adapter if isinstance(model, PeftModel) else functools.partial(bottlenecks_disabled,
                                                                                                   model)

        @contextlib.contextmanager
        def adapters_off() -> Iterator[nn.Module]:
            with switch_off(), evaluating(model):  # no dropout in the reference
                yield model
        return adapters_off
    log.info("a reference model with a full/freeze method: keeping a frozen copy of the base model in memory")
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @contextlib.contextmanager
    def the_copy() -> Iterator[nn.Module]:
        with torch.no_grad():
            yield frozen
    return the_copy


def base_reference(model: nn.Module) -> Reference:
    """The frozen base's logits for a batch, for the KL-to-base regulariser."""
    scope = reference_scope(model)

    def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with scope() as reference:
            return reference(**batch).logits
    return logits


Scorer = Callable[[list[list[dict]], list[str], list[str]], list[float]]  # (prompts, completions, answers) -> scores


def reward_source(section: str, rewards: list[str], weights: list[float] | None, reward_model: str | None
                  ) -> Callable[[torch.device, int], Scorer]:
    """A sampling task's reward functions or reward model, checked before anything loads (a ``ConfigError``
    naming ``section``'s field); returns what builds the scorer once the device is known: (device,
    max_seq_len) -> (prompts, completions, answers) -> one score per completion."""
    if reward_model:
        check_reward_run(reward_model, f"{section}.reward_model")

        def load_model_scorer(device: torch.device, max_seq_len: int) -> Scorer:
            try:
                return RewardModelScorer(reward_model, device, max_seq_len)
            except TunesmithError as err:
                raise ConfigError([f"{section}.reward_model: {err}"]) from None
        return load_model_scorer
    try:
        functions = WeightedRewards(rewards, weights)
    except ValueError as err:
        raise ConfigError([f"{section}.rewards: {err}"]) from None
    return lambda device, max_seq_len: functions


def build_training_data(config: Config, tokenizer: PreTrainedTokenizerBase
                        ) -> tuple[datasets.Dataset, datasets.Dataset | None, datasets.Dataset | None]:
    """(train, eval, replay) datasets. For ``task: pretrain`` documents are tokenized whole (chat rows
    with the loss on every turn) and packed into ``data.max_seq_len`` blocks."""
    data = config.data.model_copy(update={"replay": None})
    pretrain = config.task == "pretrain"
    if pretrain:
        data = data.model_copy(update={"max_seq_len": UNLIMITED, "train_on_prompt": True})
    train_rows, eval_rows, report = build_datasets(data, tokenizer, config.training.seed)
    replay_rows = None
    if config.data.replay is not None:
        replay = config.data.replay
        replay_data = data.model_copy(update={"train": [DatasetConfig(path=replay.path, format=replay.format)],
                                              "eval": [], "eval_fraction": 0.0})
        replay_rows = build_datasets(replay_data, tokenizer, config.training.seed)[0]
    if pretrain:
        block = config.data.max_seq_len
        train_rows = packed_dataset(train_rows, block)
        eval_rows = packed_dataset(eval_rows, block) if eval_rows is not None else None
        replay_rows = packed_dataset(replay_rows, block) if replay_rows is not None else None
    log.info("data: %d training %s (%d trainable tokens), %d eval, %d replay, %d truncated", len(train_rows),
             f"blocks of {config.data.max_seq_len} tokens" if pretrain else "rows", report.trainable_tokens,
             len(eval_rows) if eval_rows else 0, len(replay_rows) if replay_rows else 0, report.truncated)
    return train_rows, eval_rows, replay_rows


def eval_batches_of(rows: datasets.Dataset | None, batch_size: int, collate: Callable) -> list | None:
    """The eval set as fixed micro-batches (collated once, in order), or None without eval rows."""
    if rows is None:
        return None
    items = [rows[i] for i in range(len(rows))]
    return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def training_controls(config: Config, model: nn.Module
                      ) -> tuple[Callable[[str], float] | None, Callable[[int], list[nn.Parameter]] | None]:
    """(per-parameter learning-rate scale, parameters held still per step) from the config."""
    needs_layers = config.training.layer_decay is not None or config.method.freeze.unfreeze_every
    layers = len(decoder_layers(model)) if needs_layers else 0
    held = gradual_unfreeze(model, config.method.freeze) if config.method.type == "freeze" else None
    return lr_scale_for(config, layers), held


def peak_memory_mb() -> float:
    """The process's peak: CUDA memory allocated on a GPU run, else the peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def seed_everything(config: Config) -> None:
    set_seed(config.training.seed)


def run_summary(config: Config, model: nn.Module, result: TrainResult, run_dir: Path) -> dict:
    trainable, total = count_parameters(model)
    return {
        "name": config.run_name,
        "task": config.task,
        "method": config.method.type,
        "steps": result.state.global_step,
        "tokens_seen": result.state.tokens_seen,
        "train_seconds": round(result.state.elapsed_s, 2),
        "final_train_loss": result.final_train_loss,
        "final_eval_loss": result.final_eval_loss,
        **{"final_" + key: value for key, value in result.final_eval_metrics.items()},
        "stopped_early": result.stopped_early,
        "status": result.status,
        **({"reason": result.reason, "stopped_at_step": result.stopped_at} if result.status != "finished" else {}),
        **({"best_step": result.best_step} if result.best_step is not None else {}),
        "skipped_steps": result.state.skipped_steps,
        "rollbacks": result.state.rollbacks,
        **({"lr_factor": result.state.lr_factor} if result.state.lr_factor != 1.0 else {}),
        **({"micro_batch_rows": math.ceil(config.training.batch_size / result.state.micro_splits)}
           if result.state.micro_splits > 1 else {}),
        "events": result.state.events,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "model_dir": str(RunDir(run_dir).model_dir) if result.keep_model else None,
        "data": RunDir(run_dir).data_lineage(),
        "versions": {"tunesmith": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }


@dataclass
class PairRun:
    """A preference-pair task set up (``task: dpo`` and ``task: reward``): data checked, run folder
    open, model built with its fast path."""

    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    train_rows: datasets.Dataset
    eval_rows: datasets.Dataset | None
    run_dir: Path
    checkpoint: Path | None
    model: nn.Module
    collate: Callable
    packed: bool  # micro-batches packed padding-free (else padded to their longest sequence)

    def micro_batches(self, config: Config, rows: datasets.Dataset) -> MicroBatches:
        """The training stream of these pairs: batch_size pairs, or pairs packed by tokens."""
        return MicroBatches(rows.with_format(None), config.training.batch_size, config.training.seed, self.collate,
                            batch_tokens=batch_tokens_for(config, self.model, self.accelerator, self.checkpoint),
                            padded=not self.packed)


def set_up_pairs(config: Config, resume: bool, overwrite: bool, unpaired: bool = False) -> PairRun:
    """Validate the pairs (or KTO's unpaired rows), open the run folder, and build the model; each micro-batch
    packs its pairs padding-free where that is exact."""
    accelerator, source, tokenizer = start_run(config)
    train_rows, eval_rows, _ = build_pair_datasets(config.data, tokenizer, config.training.seed, unpaired=unpaired)
    log.info("data: %d training %s, %d eval %s", len(train_rows), "rows" if unpaired else "pairs",
             len(eval_rows) if eval_rows else 0, "rows" if eval_rows and "desirable" in eval_rows.column_names
             else "pairs")
    run_dir, checkpoint = open_run_dir(config, resume, overwrite, accelerator)
    model = build_trainable_model(config, source, accelerator.device, tokenizer)
    packed = packs_padding_free(config, model)
    apply_speedups(model, config.training, packed)
    collate = functools.partial(collate_pairs, packed=packed, pad_token_id=tokenizer.pad_token_id)
    return PairRun(accelerator, tokenizer, train_rows, eval_rows, run_dir, checkpoint, model, collate, packed)
