"""One explicit training loop for every method: setup -> steps (accumulate, clip, step) -> eval -> save.

The data order is a pure function of (seed, epoch), and the position in it is a count of
micro-batches, so a resumed run sees exactly the batches an uninterrupted run would. The loss of
an optimizer step is the sum over the whole accumulation window divided by the window's number
of loss units (label tokens for SFT), not a mean of per-micro-batch means.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from tunesmith.config.schema import TrainingConfig
from tunesmith.data.collate import count_rows
from tunesmith.io import write_text_atomic
from tunesmith.models.modes import evaluating
from tunesmith.rundir import RunDir
from tunesmith.tracking import log_record
from tunesmith.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from tunesmith.train.mfu import MFUMeter
from tunesmith.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    """What a recipe trains: a loss summed over units, and the unit count used to normalise it.
    Optional: ``take_metrics(mode)`` (what it tallied), and ``state_dict()``/``load_state_dict(d)``
    (JSON-able state that checkpoints keep, such as PPO's adaptive KL coefficient)."""

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def units(self, batch: Batch) -> int: ...


def objective_metrics(objective: Objective, mode: str) -> dict[str, float]:
    """What an objective tallied since it was last asked ("train" or "eval"): DPO's rewards and
    accuracy, for example; empty for objectives that tally nothing."""
    take = getattr(objective, "take_metrics", None)
    if take is None:
        return {}
    prefix = "eval_" if mode == "eval" else ""
    return {prefix + key: value for key, value in take(mode).items()}


@dataclass
class TrainResult:
    state: TrainState
    final_train_loss: float | None
    final_eval_loss: float | None
    stopped_early: bool
    final_eval_metrics: dict[str, float] = field(default_factory=dict)


def epoch_order(rows: int, seed: int, epoch: int) -> list[int]:
    """The shuffled row order of one epoch: the same for every run with this seed.

    >>> epoch_order(5, seed=0, epoch=0) == epoch_order(5, seed=0, epoch=0) != epoch_order(5, seed=0, epoch=1)
    True
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(rows, generator=generator).tolist()


class MicroBatches:
    """The stream of micro-batches over epochs, addressable by its position (so a resumed run sees
    exactly the batches the interrupted one would have).

    With ``replay`` (forgetting mitigation), ``round(replay_share x batch_size)`` rows of each
    micro-batch (at least one) come from the replay dataset, cycled in its own shuffled order; the
    rest from ``dataset``, whose epochs are counted as before."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, collate: Callable[[list[dict]], Batch],
                 replay: Any = None, replay_share: float = 0.0):
        self.dataset, self.seed, self.collate, self.replay = dataset, seed, collate, replay
        self.replay_rows = 0 if replay is None else max(1, round(replay_share * batch_size))
        self.batch_size = batch_size - self.replay_rows  # rows of ``dataset`` per micro-batch
        if self.batch_size < 1:
            raise ValueError(f"batch size {batch_size} leaves no room for training rows beside the replay rows")
        self.per_epoch = math.ceil(len(dataset) / self.batch_size)
        self._orders: dict[int, list[int]] = {}
        self._replay_orders: dict[int, list[int]] = {}

    def __getitem__(self, position: int) -> Batch:
        epoch, index = divmod(position, self.per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.dataset), self.seed, epoch)}
        indices = self._orders[epoch][index * self.batch_size:(index + 1) * self.batch_size]
        rows = [self.dataset[i] for i in indices]
        if self.replay is not None:
            rows += [self.replay[i] for i in self._replay_indices(position)]
        return self.collate(rows)

    def _replay_indices(self, position: int) -> list[int]:
        indices = []
        for offset in range(position * self.replay_rows, (position + 1) * self.replay_rows):
            epoch, index = divmod(offset, len(self.replay))
            if epoch not in self._replay_orders:
                self._replay_orders = {epoch: epoch_order(len(self.replay), self.seed + 7919, epoch)}
            indices.append(self._replay_orders[epoch][index])
        return indices


def total_micro_batches(config: TrainingConfig, micro_per_epoch: int) -> int | None:
    """Micro-batches in ``epochs`` passes over the data; None when ``max_steps`` sets the length."""
    return None if config.max_steps else max(1, math.ceil(config.epochs * micro_per_epoch))


def total_steps(config: TrainingConfig, micro_per_epoch: int, processes: int = 1) -> int:
    """Optimizer steps: ``max_steps`` if set, else enough for ``epochs`` passes (the last step may
    take fewer micro-batches, as the data runs out, rather than wrap into another epoch).

    >>> from tunesmith.config.schema import TrainingConfig
    >>> total_steps(TrainingConfig(epochs=2, grad_accum=4), micro_per_epoch=10)
    5
    >>> total_steps(TrainingConfig(epochs=1, grad_accum=8), micro_per_epoch=5)
    1
    """
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(total_micro_batches(config, micro_per_epoch) / (config.grad_accum * processes)))


def _tokens(batch: Batch) -> int:
    """Non-padding tokens: a padding-free batch has no attention mask and no padding."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def _no_loss(batch: Batch) -> Batch:
    """A batch whose labels are all ignored: a process with no data left still joins the step (DDP)."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


def evaluate(model: nn.Module, objective: Objective, batches: list[Batch], accelerator: Accelerator) -> float:
    """Mean loss per unit (label token) over all eval batches."""
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    units = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with evaluating(model):
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            total += objective.loss_sum(model, batch).double()
            units += objective.units(batch)
    total, units = accelerator.reduce(total, "sum"), accelerator.reduce(units, "sum")
    return float(total / units.clamp(min=1))


class Progress:
    """A progress bar on a terminal; plain log lines elsewhere. Both show loss, lr, tokens/s, ETA."""

    def __init__(self, total: int, start: int, enabled: bool, log_every: int):
        self.total, self.start, self.log_every, self.enabled = total, start, log_every, enabled
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        disable=not (enabled and sys.stderr.isatty()))

    def update(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if not self.enabled:
            return
        if not self.bar.disable:
            self.bar.update(1)
            extra = {"mfu": f"{100 * record['mfu']:.1f}%"} if record.get("mfu") is not None else {}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", **extra)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.monotonic() - self.started) / max(done, 1) * (self.total - step)
            mfu = f"  MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s%s  eta %s", step, self.total, record["loss"],
                     record["lr"], record["tokens_per_s"], mfu, time.strftime("%H:%M:%S", time.gmtime(eta)))

    def close(self) -> None:
        self.bar.close()


class MetricsLog:
    """metrics.jsonl in the run folder: one JSON object per line, appended and flushed; each record
    also goes to the accelerator's trackers (MLflow, TensorBoard...)."""

    def __init__(self, path: Path, start_step: int, main_process: bool = True, accelerator: Accelerator | None = None):
        self.path, self.accelerator = path, accelerator
        if main_process and path.exists():
            # Steps after the starting point are trained again: drop their old records (and a line
            # cut short by a kill).
            kept = []
            for line in path.read_text().split("\n"):
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.accelerator is not None:
            log_record(self.accelerator, record)


def _train_step(model: nn.Module, objective: Objective, window: list[Batch], accelerator: Accelerator,
                optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                held: list[nn.Parameter] = (), offload: bool = False) -> tuple[float, float | None, int, int]:
    """One optimizer step over an accumulation window; returns (loss per unit, grad norm, tokens, rows).
    ``held`` parameters (gradual unfreezing) lose their gradients before clipping: they do not move.
    ``offload``: tensors saved for backward wait in pinned CPU memory (activation offloading)."""
    window = [{k: v.to(accelerator.device) for k, v in b.items()} for b in window]
    units = torch.tensor(float(sum(objective.units(b) for b in window)), device=accelerator.device)
    units = accelerator.reduce(units, "sum").clamp(min=1)  # across processes too
    loss_total = 0.0
    for index, batch in enumerate(window):
        sync = accelerator.no_sync(model) if index < len(window) - 1 else nullcontext()
        saved = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else nullcontext()
        with sync, accelerator.autocast(), saved:
            loss = objective.loss_sum(model, batch) / units
            # DDP averages gradients over processes; the normaliser already counts all of them.
            accelerator.backward(loss * accelerator.num_processes)
        loss_total += float(loss.detach())
    for parameter in held:
        parameter.grad = None
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad and p.grad is not None], max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_total = float(accelerator.reduce(torch.tensor(loss_total, device=accelerator.device), "sum"))
    return loss_total, grad_norm, sum(_tokens(b) for b in window), sum(count_rows(b) for b in window)


def train(model: nn.Module, objective: Objective, stream: MicroBatches, eval_batches: list[Batch] | None,
          config: TrainingConfig, run_dir: Path, accelerator: Accelerator,
          resume_from: Path | None = None, lr_scale: Callable[[str], float] | None = None,
          held: Callable[[int], list[nn.Parameter]] | None = None,
          samples: Callable[[nn.Module], list[dict[str, str]]] | None = None) -> TrainResult:
    """Train until max_steps/epochs or early stopping; checkpoints and metrics go to ``run_dir``, and
    every metrics record to the trackers the recipe started (``tracking.tracked``), if any.

    ``lr_scale``: a learning-rate multiplier per parameter name (layer decay, LoRA+); ``held``: the
    parameters to keep still at a given step (gradual unfreezing); ``samples``: replies to fixed
    prompts, logged at each eval."""
    return _train(model, objective, stream, eval_batches, config, run_dir, accelerator, resume_from, lr_scale,
                  held, samples)


def _train(model: nn.Module, objective: Objective, stream: MicroBatches, eval_batches: list[Batch] | None,
           config: TrainingConfig, run_dir: Path, accelerator: Accelerator, resume_from: Path | None,
           lr_scale: Callable[[str], float] | None, held: Callable[[int], list[nn.Parameter]] | None,
           samples: Callable[[nn.Module], list[dict[str, str]]] | None) -> TrainResult:
    optimizer = build_optimizer(model, config, lr_scale)
    steps = total_steps(config, stream.per_epoch, accelerator.num_processes)
    scheduler = build_scheduler(optimizer, config, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    mfu = MFUMeter(accelerator.unwrap_model(model), accelerator.device)
    offload = config.offload_activations and accelerator.device.type == "cuda"
    if config.offload_activations and not offload:
        log.info("training.offload_activations: nothing to do on %s (activations are in host memory already)",
                 accelerator.device.type)
    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler)
        if state.objective:
            objective.load_state_dict(state.objective)
        log.info("resumed from %s at step %d", resume_from, state.global_step)
    metrics = MetricsLog(RunDir(run_dir).metrics_file, state.global_step, accelerator.is_main_process, accelerator)
    progress = Progress(steps, state.global_step, accelerator.is_main_process, config.log_every)
    per_step = config.grad_accum * accelerator.num_processes
    end = total_micro_batches(config, stream.per_epoch)  # the data's end, when epochs set the length
    result = TrainResult(state, None, None, stopped_early=False)
    model.train()
    while state.global_step < steps:
        started = time.monotonic()
        first = state.micro_batches_done + accelerator.process_index
        positions = [first + i * accelerator.num_processes for i in range(config.grad_accum)]
        window = [stream[p] for p in positions if end is None or p < end] or [_no_loss(stream[first])]
        loss, grad_norm, tokens, rows = _train_step(model, objective, window, accelerator, optimizer,
                                                    config.max_grad_norm, held(state.global_step) if held else (),
                                                    offload)
        lr = config.lr * scheduler.get_last_lr()[0] / optimizer.param_groups[0]["initial_lr"]  # the base rate
        scheduler.step()
        elapsed = time.monotonic() - started
        state.global_step += 1
        state.micro_batches_done = min(state.micro_batches_done + per_step, end or 10**18)
        state.tokens_seen += tokens
        state.elapsed_s += elapsed
        record = {"step": state.global_step, "epoch": round(state.micro_batches_done / stream.per_epoch, 4),
                  "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                  "tokens_per_s": tokens / max(elapsed, 1e-9), "elapsed_s": round(state.elapsed_s, 3)}
        utilisation = mfu(tokens, rows, elapsed)  # this process's tokens over one device's peak
        if utilisation is not None:
            record["mfu"] = round(utilisation, 4)
        record.update(objective_metrics(objective, "train"))
        result.final_train_loss = loss
        if accelerator.is_main_process:
            metrics.write(record)
        progress.update(record)
        last = state.global_step == steps
        at_eval = bool(config.eval_every) and (state.global_step % config.eval_every == 0 or last)
        if samples is not None and at_eval and accelerator.is_main_process:
            metrics.write({"step": state.global_step, "samples": samples(accelerator.unwrap_model(model))})
        if eval_batches and at_eval:
            result.final_eval_loss = evaluate(model, objective, eval_batches, accelerator)
            result.final_eval_metrics = objective_metrics(objective, "eval")
            if accelerator.is_main_process:
                metrics.write({"step": state.global_step, "eval_loss": result.final_eval_loss,
                               **result.final_eval_metrics})
            log.info("step %d: eval loss %.4f", state.global_step, result.final_eval_loss)
            result.stopped_early = _early_stop(state, result.final_eval_loss, config.early_stopping_patience)
        if config.save_every and (state.global_step % config.save_every == 0) and not last:
            accelerator.wait_for_everyone()
            state.objective = objective.state_dict() if hasattr(objective, "state_dict") else {}
            if accelerator.is_main_process:
                save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler, state, config.keep_last)
        if result.stopped_early:
            log.info("early stopping: eval loss has not improved for %d evals", config.early_stopping_patience)
            break
    progress.close()
    if eval_batches and result.final_eval_loss is None:
        result.final_eval_loss = evaluate(model, objective, eval_batches, accelerator)
        result.final_eval_metrics = objective_metrics(objective, "eval")
        if accelerator.is_main_process:
            metrics.write({"step": state.global_step, "eval_loss": result.final_eval_loss,
                           **result.final_eval_metrics})
    return result


def _early_stop(state: TrainState, eval_loss: float, patience: int | None) -> bool:
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss = eval_loss
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    return bool(patience) and state.evals_without_improvement >= patience
