"""One explicit training loop for every method: setup -> steps (accumulate, clip, step) -> eval -> save.

The data order is a pure function of (seed, epoch), and the position in it is a count of
micro-batches, so a resumed run sees exactly the batches an uninterrupted run would. The loss of
an optimizer step is the sum over the whole accumulation window divided by the window's number
of loss units (label tokens for SFT), not a mean of per-micro-batch means.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm import tqdm

from tunesmith.config.schema import TrainingConfig
from tunesmith.data.collate import count_rows
from tunesmith.errors import RunStopped, TunesmithError
from tunesmith.io import write_text_atomic, writing
from tunesmith.models.fastpath import zero3_partitioned
from tunesmith.models.modes import evaluating
from tunesmith.rundir import RunDir
from tunesmith.tracking import log_record
from tunesmith.train.checkpoint import Snapshot, TrainState, capture_rng, checkpoint_bytes, checkpoint_step, \
    drop_best_after, drop_checkpoints_after, final_model_bytes, list_checkpoints, load_best, load_checkpoint, save_best, \
    restore_rng, save_checkpoint, staging_dir
from tunesmith.train import shard, zero
from tunesmith.train.guard import DivergenceWatch, StopSignals, stop_signals
from tunesmith.train.mfu import MFUMeter
from tunesmith.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    """What a recipe trains: a loss summed over units, and the unit count used to normalise it.
    Optional: ``take_metrics(mode)`` (what it tallied), ``state_dict()``/``load_state_dict(d)``
    (JSON-able state that checkpoints keep, such as PPO's adaptive KL coefficient), and
    ``divergence_signals`` (which of "loss" and "grad_norm" the divergence rules may judge; both by
    default)."""

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
    status: str = "finished"  # or "diverged": the model is then the last good step's (``reason`` says why)
    reason: str | None = None
    stopped_at: int | None = None  # the step at which a diverged run stopped
    best_step: int | None = None  # training.keep_best: the step whose weights are the model
    keep_model: bool = True  # False: no good weights to save (a divergence with nothing to go back to)


def epoch_order(rows: int, seed: int, epoch: int) -> list[int]:
    """The shuffled row order of one epoch: the same for every run with this seed.

    >>> epoch_order(5, seed=0, epoch=0) == epoch_order(5, seed=0, epoch=0) != epoch_order(5, seed=0, epoch=1)
    True
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(rows, generator=generator).tolist()


PACKING_WINDOW = 64  # micro-batches open to a row at once while packing by tokens (first fit among them)


def pack_by_tokens(lengths: list[int], budget: int, order: list[int], padded: bool = False) -> list[list[int]]:
    """Rows (their indices, taken in ``order``) packed whole into micro-batches of at most ``budget`` tokens;
    a row of ``budget`` tokens or more is a micro-batch of its own. Each row goes into the first of the last
    ``PACKING_WINDOW`` micro-batches with room for it, else starts a new one: the fill of first fit, in
    linear time, and the rows of a micro-batch stay a random draw (not sorted by length). Deterministic.
    ``padded``: the micro-batch is padded to its longest row, so it costs rows x the longest, not the sum.

    >>> pack_by_tokens([5, 3, 9, 2, 4, 12], budget=10, order=[0, 1, 2, 3, 4, 5])
    [[0, 1, 3], [2], [4], [5]]
    >>> pack_by_tokens([5, 3, 9, 2, 4, 12], budget=10, order=[0, 1, 2, 3, 4, 5], padded=True)
    [[0, 1], [2], [3, 4], [5]]
    """
    packs: list[list[int]] = []
    used: list[int] = []  # tokens of each pack (the sum; padded: rows x the longest)
    longest: list[int] = []
    window: list[int] = []  # the packs still open, oldest first

    def cost(pack: int, size: int) -> int:
        if padded:
            return (len(packs[pack]) + 1) * max(longest[pack], size)
        return used[pack] + size

    for index in order:
        size = lengths[index]
        if size >= budget:
            packs.append([index])
            used.append(size)
            longest.append(size)
            continue
        slot = next((p for p in window if cost(p, size) <= budget), None)
        if slot is None:
            slot = len(packs)
            packs.append([])
            used.append(0)
            longest.append(0)
            window.append(slot)
            if len(window) > PACKING_WINDOW:
                window.pop(0)
        used[slot] = cost(slot, size)
        longest[slot] = max(longest[slot], size)
        packs[slot].append(index)
        if used[slot] == budget:
            window.remove(slot)
    return packs


def _row_lengths(dataset: Any, padded: bool = False) -> list[int]:
    """``row_tokens`` of every row, read from the Arrow columns where the dataset has them (no row is built).
    ``padded``: a row's width in a padded batch instead: its longest sequence x its sequences (a preference
    pair is two sequences, each padded to the batch's longest)."""
    columns = [name for name in getattr(dataset, "column_names", []) if name.endswith("input_ids")]
    table = getattr(dataset, "data", None)
    if table is None or not columns or getattr(dataset, "_indices", None) is not None:  # a selection: by row
        sides = [[len(value) for key, value in dataset[i].items() if key.endswith("input_ids")]
                 for i in range(len(dataset))]
    else:
        import pyarrow.compute as pc

        per_column = [[count or 0 for count in pc.list_value_length(table.column(name)).to_pylist()]
                      for name in columns]
        sides = [list(counts) for counts in zip(*per_column)]
    return [len(row) * max(row) if padded else sum(row) or 1 for row in sides]


class MicroBatches:
    """The stream of micro-batches over epochs, addressable by its position (so a resumed run sees
    exactly the batches the interrupted one would have).

    ``batch_size`` rows each, or with ``batch_tokens`` whole rows packed up to that many tokens
    (``pack_by_tokens``, once, in a seeded order; each epoch then shuffles the micro-batches): short rows
    fill a micro-batch as long ones do, and every epoch has the same micro-batches, so epochs, the
    schedule and resuming count them as before.

    With ``replay`` (forgetting mitigation), ``round(replay_share x batch_size)`` rows of each
    micro-batch (at least one) come from the replay dataset, cycled in its own shuffled order; the
    rest from ``dataset``, whose epochs are counted as before."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, collate: Callable[[list[dict]], Batch],
                 replay: Any = None, replay_share: float = 0.0, batch_tokens: int | None = None,
                 padded: bool = False):
        self.dataset, self.seed, self.collate, self.replay = dataset, seed, collate, replay
        self.replay_rows = 0 if replay is None else max(1, round(replay_share * batch_size))
        self.batch_size = batch_size - self.replay_rows  # rows of ``dataset`` per micro-batch
        if self.batch_size < 1:
            raise ValueError(f"batch size {batch_size} leaves no room for training rows beside the replay rows")
        self.packs: list[list[int]] | None = None
        self.batch_tokens = batch_tokens
        if batch_tokens:
            lengths = _row_lengths(dataset, padded)
            self.packs = pack_by_tokens(lengths, batch_tokens, epoch_order(len(dataset), seed, -1), padded)
            self.pack_tokens = [sum(lengths[i] for i in pack) if not padded else
                                len(pack) * max(lengths[i] for i in pack) for pack in self.packs]
            log.info("training.batch_tokens %d: %d micro-batches an epoch, %.1f rows and %.0f tokens each on "
                     "average (%.0f%% full)", batch_tokens, len(self.packs), len(dataset) / len(self.packs),
                     sum(lengths) / len(self.packs), 100 * sum(lengths) / len(self.packs) / batch_tokens)
        self.per_epoch = len(self.packs) if self.packs is not None else math.ceil(len(dataset) / self.batch_size)
        self._orders: dict[int, list[int]] = {}
        self._replay_orders: dict[int, list[int]] = {}

    def __getitem__(self, position: int) -> Batch:
        return self.collate(self.rows(position))

    def tokens(self, position: int) -> int:
        """The tokens of the packed micro-batch at ``position`` (``batch_tokens``' measure)."""
        epoch, index = divmod(position, self.per_epoch)
        return self.pack_tokens[self._order(epoch)[index]]

    def _order(self, epoch: int) -> list[int]:
        """The shuffled order of ``epoch``: of the packs with ``batch_tokens``, else of the rows."""
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.packs) if self.packs is not None else len(self.dataset),
                                               self.seed, epoch)}
        return self._orders[epoch]

    def pieces(self, position: int, parts: int) -> list[Batch]:
        """The micro-batch at ``position`` as ``parts`` smaller ones, its rows in order (after running out
        of memory): the rows, and so the step's gradient, are the same."""
        rows = self.rows(position)
        size = math.ceil(len(rows) / parts)
        return [self.collate(rows[i:i + size]) for i in range(0, len(rows), size)]

    def rows(self, position: int) -> list[dict]:
        """The rows of the micro-batch at ``position``, not yet collated."""
        epoch, index = divmod(position, self.per_epoch)
        order = self._order(epoch)
        if self.packs is not None:
            indices = self.packs[order[index]]
        else:
            indices = order[index * self.batch_size:(index + 1) * self.batch_size]
        rows = [self.dataset[i] for i in indices]
        if self.replay is not None:
            rows += [self.replay[i] for i in self._replay_indices(position)]
        return rows

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
    """A batch that trains nothing: a process with no data left still joins the step (DDP). Its labels all
    ignored; a task whose batches have none (it samples: grpo, ppo) finds it marked ``no_loss``."""
    if "labels" not in batch:
        return {**batch, "no_loss": torch.tensor(1)}
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
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", rows=record.get("rows"),
                                 tokens=record["tokens"], tok_s=f"{record['tokens_per_s']:.0f}", **extra)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.monotonic() - self.started) / max(done, 1) * (self.total - step)
            mfu = f"  MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
            log.info("step %d/%d  loss %.4f  lr %.2e  %s rows, %d tokens  %.0f tok/s%s  eta %s", step, self.total,
                     record["loss"], record["lr"], record.get("rows", "?"), record["tokens"], record["tokens_per_s"],
                     mfu, time.strftime("%H:%M:%S", time.gmtime(eta)))

    def rewind(self, step: int) -> None:
        """Back to ``step`` (a rollback)."""
        if not self.bar.disable:
            self.bar.n = step
            self.bar.refresh()

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
            self.rewind(start_step)

    def write(self, record: dict[str, Any]) -> None:
        with writing(self.path, "a metrics record", "the checkpoints are intact; free space and resume with "
                     "--resume"), self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.accelerator is not None:
            log_record(self.accelerator, record)

    def rewind(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a rollback trains them again)."""
        kept = [json.dumps(r) + "\n" for r in RunDir(self.path.parent).metrics() if r.get("step", 0) <= step]
        with writing(self.path, "metrics.jsonl"):
            write_text_atomic(self.path, "".join(kept))


# The most trainable bytes kept in host memory as the run's start, the point a rollback goes back to before
# the first checkpoint: an adapter's weights, or a small model's; a large full fine-tune relies on checkpoints.
START_POINT_LIMIT = 2 * 2**30


class _Dropped(Exception):
    """The step in flight was given up: a stop signal came, and finishing it would outlast the grace period."""


Judge = Callable[[float, float | None], tuple[tuple[str, str] | None, bool]]


@dataclass
class StepOutcome:
    loss: float  # per unit, over the whole window (and every process)
    grad_norm: float | None  # before clipping
    tokens: int
    rows: int
    verdict: tuple[str, str] | None  # ("nonfinite" | "diverged", why), or None for a healthy step
    applied: bool  # the optimizer stepped


def _apply_all(loss: float, grad_norm: float | None) -> tuple[tuple[str, str] | None, bool]:
    return None, True


def _train_step(model: nn.Module, objective: Objective, window: list[Batch], accelerator: Accelerator,
                optimizer: torch.optim.Optimizer, max_grad_norm: float | None, judge: Judge = _apply_all,
                held: list[nn.Parameter] = (), offload: bool = False,
                too_late: Callable[[float], bool] | None = None, engine: bool = False) -> StepOutcome:
    """One optimizer step over an accumulation window. ``judge`` sees the loss and the gradient norm
    before the update and says whether to apply it (a non-finite or diverging step is not applied:
    weights and optimizer state stay as they were). ``held`` parameters (gradual unfreezing) lose
    their gradients before clipping: they do not move. ``offload``: tensors saved for backward wait in
    pinned CPU memory. ``too_late(seconds left)``: between micro-batches, whether to give the step up
    (raises ``_Dropped``; nothing was applied). ``engine``: ``model`` is a DeepSpeed engine, which reduces,
    clips and steps itself (``zero``); a diverging step is then applied, and undone by the rollback."""
    window = [{k: v.to(accelerator.device) for k, v in b.items()} for b in window]
    units = torch.tensor(float(sum(objective.units(b) for b in window)), device=accelerator.device)
    units = accelerator.reduce(units, "sum").clamp(min=1)  # across processes too
    loss_total = 0.0
    started = time.monotonic()
    for index, batch in enumerate(window):
        if index and too_late is not None and too_late((time.monotonic() - started) / index * (len(window) - index)):
            optimizer.zero_grad(set_to_none=True)
            raise _Dropped
        last = index == len(window) - 1
        sync = accelerator.no_sync(model) if not last and not engine else nullcontext()
        saved = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else nullcontext()
        with sync, accelerator.autocast(), saved:
            loss = objective.loss_sum(model, batch) / units
            # DDP (and DeepSpeed) average gradients over processes; the normaliser already counts all of them.
            if engine:
                zero.backward(model, loss * accelerator.num_processes, last)
            else:
                accelerator.backward(loss * accelerator.num_processes)
        loss_total += float(loss.detach())
    if engine:
        grad_norm = zero.step(model)
        loss_total = float(accelerator.reduce(torch.tensor(loss_total, device=accelerator.device), "sum"))
        verdict, apply = judge(loss_total, grad_norm)
        return StepOutcome(loss_total, grad_norm, sum(_tokens(b) for b in window),
                           sum(count_rows(b) for b in window), verdict, apply)
    signal = getattr(objective, "take_signal", None)  # sampling objectives: how many micro-batches had something to learn
    if signal is not None and float(accelerator.reduce(torch.tensor(float(signal()), device=accelerator.device),
                                                       "sum")) == 0:
        # No process had anything to learn (GRPO's batch of equal rewards under dynamic sampling, online DPO's
        # ties): the gradients are zero, but AdamW's momentum and weight decay would still move the weights.
        optimizer.zero_grad(set_to_none=True)
        loss_total = float(accelerator.reduce(torch.tensor(loss_total, device=accelerator.device), "sum"))
        return StepOutcome(loss_total, 0.0, sum(_tokens(b) for b in window), sum(count_rows(b) for b in window),
                           None, False)
    for parameter in held:
        parameter.grad = None
    # The norm is measured on every step (an infinite threshold clips nothing) for the non-finite guard.
    grad_norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad and p.grad is not None],
                                            max_grad_norm if max_grad_norm is not None else math.inf)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor
    loss_total = float(accelerator.reduce(torch.tensor(loss_total, device=accelerator.device), "sum"))
    verdict, apply = judge(loss_total, grad_norm)
    if apply:
        try:
            optimizer.step()
        except torch.OutOfMemoryError:
            # Smaller micro-batches would not help: the optimizer's state (allocated at its first step) does not fit.
            raise TunesmithError("out of memory in the optimizer step (its state does not fit beside the model): "
                                 "use training.optimizer adamw_8bit, a LoRA or QLoRA method, or a smaller model"
                                 ) from None
    elif accelerator.scaler is not None:
        accelerator.scaler.update()  # fp16: the scaler unscaled these gradients for the norm; close its step
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss_total, grad_norm, sum(_tokens(b) for b in window), sum(count_rows(b) for b in window),
                       verdict, apply)


class RepeatedBatches:
    """Each optimizer step's micro-batches of ``stream`` handed out ``repeats`` times in a row (PPO's passes
    over a batch of rollouts, GRPO's updates per sampled batch), each marked with its position in
    ``stream`` (``rollout``) and which time it is (``pass``); addressable by position, as ``MicroBatches``
    is, so a resume finds its place. ``per_step``: micro-batches per optimizer step (grad_accum x
    processes). Epochs count passes over ``stream``."""

    def __init__(self, stream: MicroBatches, repeats: int, per_step: int = 1):
        self.stream, self.repeats, self.per_step = stream, repeats, per_step
        self.per_epoch = stream.per_epoch * repeats
        self.checkpoint_every = repeats  # the loop checkpoints (and stops for a signal) between batches of rollouts

    def __getitem__(self, position: int) -> Batch:
        step, within = divmod(position, self.per_step)
        rollout = (step // self.repeats) * self.per_step + within
        return {**self.stream[rollout], "rollout": torch.tensor(rollout), "pass": torch.tensor(step % self.repeats)}


def _window(stream: MicroBatches, positions: list[int], end: int | None, first: int, splits: int) -> list[Batch]:
    """A step's micro-batches; each in ``splits`` pieces after running out of memory."""
    live = [p for p in positions if end is None or p < end]
    if not live:
        return [_no_loss(stream[first])]
    if splits == 1:
        return [stream[p] for p in live]
    return [piece for p in live for piece in stream.pieces(p, splits)]


def row_tokens(row: dict) -> int:
    """A row's tokens: its input ids, or the sum of its ``*_input_ids`` (a preference pair's two sides)."""
    if "input_ids" in row:
        return len(row["input_ids"])
    return sum(len(value) for key, value in row.items() if key.endswith("input_ids")) or 1


def deal(items: list, hands: int, size: Callable[[Any], int]) -> list[list]:
    """``items`` dealt into ``hands`` of (nearly) equal count and equal total ``size``: the largest first, in
    a snake (0, 1, ..., n-1, n-1, ..., 0), so no hand waits on the others' long rows. Pure and stable:
    every process deals the same hands.

    >>> deal([5, 1, 4, 2, 3, 3], 2, size=lambda x: x)
    [[5, 3, 2], [4, 3, 1]]
    """
    order = sorted(range(len(items)), key=lambda i: (-size(items[i]), i))
    hands_of: list[list] = [[] for _ in range(hands)]
    for turn, index in enumerate(order):
        lap, seat = divmod(turn, hands)
        hands_of[seat if lap % 2 == 0 else hands - 1 - seat].append(items[index])
    return hands_of


def _balanced_window(stream: MicroBatches, step_first: int, micro: int, end: int | None, process: int,
                     processes: int, splits: int) -> list[Batch]:
    """This process's micro-batches of a step under several processes: the step's rows (its ``micro`` x
    ``processes`` micro-batches of the data order) dealt over the processes by tokens, then over this
    process's micro-batches by tokens. The step trains the same rows as on one process (the gradient is
    their sum, normalised by all of their label tokens), and no process waits on the longest rows."""
    positions = [p for p in range(step_first, step_first + micro * processes) if end is None or p < end]
    rows = [row for p in positions for row in stream.rows(p)]
    hands = deal(rows, processes, row_tokens)
    mine = hands[process]
    if not mine:
        return [_no_loss(stream[step_first])]
    # The same number of micro-batches on every process (FSDP gathers weights in each forward, together):
    # at the data's end a process may have a row fewer than another.
    count = max(1, min(micro * splits, *(len(hand) for hand in hands)))
    return [stream.collate(hand) for hand in deal(mine, count, row_tokens)]


def _packed_window(stream: MicroBatches, step_first: int, micro: int, end: int | None, process: int,
                   processes: int) -> list[Batch]:
    """This process's micro-batches of a step under several processes when micro-batches are packed by tokens:
    the step's packs (its ``micro`` x ``processes`` micro-batches of the data order) dealt whole over the
    processes by tokens, so none exceeds the budget and the processes' tokens match (the packs are nearly
    full). The step trains the same rows as on one process. Every process gets the same number of
    micro-batches (FSDP gathers weights in each forward, together): at the data's end, a process short of
    packs runs one without loss in their place."""
    positions = [p for p in range(step_first, step_first + micro * processes) if end is None or p < end]
    hands = deal(positions, processes, stream.tokens)
    count = max(1, max(len(hand) for hand in hands))
    mine = [stream[p] for p in hands[process]]
    if len(mine) < count:
        mine += [_no_loss(stream[step_first])] * (count - len(mine))
    return mine


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def elastic(config: TrainingConfig, micro: int, saved: int, now: int) -> TrainingConfig:
    """The training settings for resuming on ``now`` processes a run saved on ``saved`` with ``micro``
    micro-batches a step over all its processes: grad_accum set so that the global batch (batch_size x
    grad_accum x processes), and so each step's rows, stay the same.

    >>> elastic(TrainingConfig(grad_accum=2), micro=4, saved=2, now=1).grad_accum
    4
    """
    if micro % now:
        raise TunesmithError(f"resuming a run of {saved} processes on {now}: its {micro} micro-batches per step do "
                             f"not divide over {now} processes; resume on a number of processes that divides {micro}")
    if micro // now != config.grad_accum:
        log.info("elastic resume: %d -> %d processes; training.grad_accum %d -> %d keeps the global batch of %d "
                 "rows", saved, now, config.grad_accum, micro // now, micro * config.batch_size)
    return config.model_copy(update={"grad_accum": micro // now})


def check_disk_space(run_dir: Path, model: nn.Module, config: TrainingConfig, deepspeed: bool = False) -> None:
    """Refuse to start when the run folder's disk cannot hold what the run will write: ``keep_last``
    checkpoints (plus the next, written before the oldest goes), the best checkpoint and the final model."""
    each = checkpoint_bytes(model, config.optimizer, deepspeed)
    existing = len(list_checkpoints(run_dir))
    count = max(1, config.keep_last + 1 - existing) if config.save_every or config.save_every_minutes else 1
    final = final_model_bytes(model)
    best = each if config.keep_best else 0
    need = count * each + final + best
    free = shutil.disk_usage(run_dir).free
    if need > free:
        raise TunesmithError(
            f"{run_dir}: not enough disk space: {count} checkpoint(s) of {_size(each)} (training.keep_last "
            f"{config.keep_last}, plus the next while it is written){', a best checkpoint' if best else ''} and a "
            f"final model of {_size(final)} need {_size(need)}, and {_size(free)} is free there; free space, lower "
            f"training.keep_last, or choose another output.dir (nothing was trained)")


def train(model: nn.Module, objective: Objective, stream: MicroBatches, eval_batches: list[Batch] | None,
          config: TrainingConfig, run_dir: Path, accelerator: Accelerator,
          resume_from: Path | None = None, lr_scale: Callable[[str], float] | None = None,
          held: Callable[[int], list[nn.Parameter]] | None = None,
          samples: Callable[[nn.Module], list[dict[str, str]]] | None = None) -> TrainResult:
    """Train until max_steps/epochs or early stopping; checkpoints and metrics go to ``run_dir``, and
    every metrics record to the trackers the recipe started (``tracking.tracked``), if any.

    What keeps the run alive (docs/reliability.md): a stop signal checkpoints and raises ``RunStopped``
    (status preempted); non-finite steps are skipped and ``nonfinite_limit`` of them in a row end the
    run with the last good weights; a diverging step follows ``training.divergence.policy``; running out
    of memory halves the micro-batch and retries the step; the disk is checked before the first step.

    ``lr_scale``: a learning-rate multiplier per parameter name (layer decay, LoRA+); ``held``: the
    parameters to keep still at a given step (gradual unfreezing); ``samples``: replies to fixed
    prompts, logged at each eval."""
    if resume_from is not None:  # a resume on another number of processes keeps the global batch
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        processes = saved.get("processes", 1)
        micro = saved.get("micro_per_step") or config.grad_accum * processes
        if processes != accelerator.num_processes or micro != config.grad_accum * processes:
            config = elastic(config, micro, processes, accelerator.num_processes)
    return _Training(model, objective, stream, eval_batches, config, run_dir, accelerator, lr_scale, held,
                     samples).run(resume_from)


class _Training:
    """One run of the loop: its model, optimizer, state and guards."""

    def __init__(self, model: nn.Module, objective: Objective, stream: MicroBatches, eval_batches: list[Batch] | None,
                 config: TrainingConfig, run_dir: Path, accelerator: Accelerator,
                 lr_scale: Callable[[str], float] | None, held: Callable[[int], list[nn.Parameter]] | None,
                 samples: Callable[[nn.Module], list[dict[str, str]]] | None):
        self.objective, self.stream, self.eval_batches, self.config = objective, stream, eval_batches, config
        self.run_dir, self.accelerator, self.held, self.samples = run_dir, accelerator, held, samples
        chosen = shard.strategy(config, model, accelerator)
        self.sharded, self.engine = chosen == "fsdp", chosen == "deepspeed"
        if self.engine and held is not None:
            raise TunesmithError("gradual unfreezing (method.freeze's schedule) is not run under DeepSpeed yet: its "
                                 "held parameters' gradients are in ZeRO's partitions; use ddp or fsdp")
        if self.sharded and not getattr(objective, "fsdp_ready", True):  # auto chose it for a task that cannot
            log.info("training.distributed auto: ddp, not fsdp (this task generates or scores outside the model's "
                     "forward, which sharding does not support yet)")
            self.sharded = False
        if self.sharded:  # before the optimizer: it must hold the sharded parameters
            shard.shard(model, config)
        self.optimizer = build_optimizer(model, config, lr_scale)
        self.steps = total_steps(config, stream.per_epoch, accelerator.num_processes)
        self.scheduler = build_scheduler(self.optimizer, config, self.steps)
        self.main = accelerator.is_main_process
        if self.sharded:  # sharded by torch: accelerate would wrap it in DDP as well
            self.model, self.optimizer = model, accelerator.prepare(self.optimizer)
        elif self.engine:  # the engine steps the optimizer; the scheduler (built above) sets its rates
            self.model, self.optimizer, engine_config = zero.initialize(
                model, self.optimizer, config, accelerator.num_processes, accelerator.mixed_precision)

            def write_engine_config() -> None:  # the configuration the engine runs with, to read or reuse
                with writing(run_dir / zero.CONFIG_FILE, "the DeepSpeed configuration"):
                    write_text_atomic(run_dir / zero.CONFIG_FILE, json.dumps(engine_config, indent=2) + "\n")
            self._on_main(write_engine_config)
        else:
            self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.state = TrainState()
        self.start_point: Snapshot | None = None
        self.last_saved_step: int | None = None
        self.offload = config.offload_activations and accelerator.device.type == "cuda"
        self.watch = DivergenceWatch(config.divergence, getattr(objective, "divergence_signals", ("loss", "grad_norm")),
                                     accelerator.scaler is not None)
        # Steps between the points where a checkpoint may fall: PPO's batch of rollouts, sampled at its first
        # step and used by the rest, cannot be cut.
        self.every = getattr(stream, "checkpoint_every", 1)

    # saving and going back
    def _objective_state(self) -> None:
        self.state.objective = self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}

    def save(self) -> None:
        self.accelerator.wait_for_everyone()
        self._objective_state()
        self.state.processes = self.accelerator.num_processes
        self.state.micro_per_step = self.config.grad_accum * self.accelerator.num_processes
        self.state.batch_tokens = getattr(self.stream, "batch_tokens", None)
        rng = gather_object([capture_rng()]) if self.accelerator.num_processes > 1 else [None]  # every process's
        staged = None
        if self.sharded or self.engine:  # every process writes its part into a staging folder; the main one commits
            staged = staging_dir(self.run_dir, self.state.global_step)

            def prepare() -> None:
                with writing(staged, "a checkpoint's staging folder"):
                    shutil.rmtree(staged, ignore_errors=True)
                    staged.mkdir(parents=True)
            self._on_main(prepare)
            if self.engine:
                zero.save(self.model, staged / zero.ENGINE_DIR)
            else:
                shard.save_shards(self.unwrapped, self.optimizer.optimizer, staged / shard.SHARDS)
            self.accelerator.wait_for_everyone()
        self._on_main(lambda: save_checkpoint(self.run_dir, self.unwrapped, self.optimizer, self.scheduler,
                                              self.state, self.config.keep_last, rng[1:], staged), timed=True)
        self.last_saved_step, self.last_save_time = self.state.global_step, time.monotonic()
        if len(list_checkpoints(self.run_dir)) >= 2:
            # A rollback never goes to the newest checkpoint right after it was written (its weights are
            # suspect when the next step diverges); with an older one on disk the start is not needed.
            self.start_point = None

    def _engine_loader(self) -> Callable[[Path], None] | None:
        """How a DeepSpeed run reads its checkpoints' engine files (every process), else None."""
        return (lambda folder: zero.load(self.model, folder)) if self.engine else None

    def _on_main(self, write: Callable[[], Any], timed: bool = False) -> None:
        """A write the main process does; its failure stops every process (none is left waiting)."""
        failure = None
        if self.main:
            started = time.monotonic()
            try:
                write()
            except TunesmithError as err:
                failure = err
            if timed:
                self.save_seconds = time.monotonic() - started
        if self._agreed(failure is not None):
            raise failure or TunesmithError("the main process failed to write to the run folder (its error "
                                            "is in its log)")

    def go_back(self, before_step: int) -> tuple[TrainState, str] | None:
        """Restore the last good point before ``before_step``: the newest checkpoint before it, or the
        run's start. Returns the restored state and where it came from; None when there is neither."""
        self.accelerator.wait_for_everyone()
        candidates = [c for c in list_checkpoints(self.run_dir) if checkpoint_step(c) < before_step]
        if candidates:
            restored = load_checkpoint(candidates[-1], self.unwrapped, self.optimizer, self.scheduler,
                                       self.accelerator.process_index, self.sharded, self._engine_loader())
            where = f"checkpoint {candidates[-1].name}"
        elif self.start_point is not None:
            restored = self.start_point.restore(self.unwrapped, self.optimizer, self.scheduler)
            where = "the start of the run"
        else:
            return None
        if restored.objective and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(restored.objective)
        if hasattr(self.objective, "forget"):
            self.objective.forget()  # PPO's rollouts, sampled by the weights just abandoned
        self.objective_metrics_dropped()
        self.last_saved_step = None  # the state now differs (lr cut, counts) from any checkpoint's
        return restored, where

    def objective_metrics_dropped(self) -> None:
        objective_metrics(self.objective, "train")  # tallies of steps that no longer count

    def cut_lr(self, factor_now: float, factor_wanted: float) -> None:
        ratio = factor_wanted / factor_now
        self.scheduler.base_lrs = [lr * ratio for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            group["initial_lr"] *= ratio

    def event(self, record: dict[str, Any]) -> None:
        self.state.events = (self.state.events + [record])[-100:]

    # the loop
    def run(self, resume_from: Path | None) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        mfu = MFUMeter(self.unwrapped, accelerator.device)
        if config.offload_activations and not self.offload:
            log.info("training.offload_activations: nothing to do on %s (activations are in host memory already)",
                     accelerator.device.type)
        if resume_from is not None:
            self.state = load_checkpoint(resume_from, self.unwrapped, self.optimizer, self.scheduler,
                                         accelerator.process_index, self.sharded, self._engine_loader())
            if self.state.objective:
                self.objective.load_state_dict(self.state.objective)
            self.last_saved_step = self.state.global_step
            log.info("resumed from %s at step %d", resume_from, self.state.global_step)
        check_disk_space(self.run_dir, self.unwrapped, config, self.engine)  # every process: none is left waiting
        if config.divergence.policy != "warn" and resume_from is None and not (self.sharded or self.engine):
            size = sum(p.numel() * p.element_size() for p in self.unwrapped.parameters() if p.requires_grad)
            if size <= START_POINT_LIMIT:
                self.start_point = Snapshot.take(self.unwrapped, self.optimizer, self.scheduler, self.state)
            else:
                log.info("training.divergence: the run's start is not kept in memory (%.1f GiB of trainable "
                         "weights); a divergence before the first checkpoint stops the run without a model",
                         size / 2**30)
        self.metrics = MetricsLog(RunDir(self.run_dir).metrics_file, self.state.global_step, self.main, accelerator)
        progress = self.progress = Progress(self.steps, self.state.global_step, self.main, config.log_every)
        result = TrainResult(self.state, None, None, stopped_early=False)
        self.last_save_time, self.save_seconds = time.monotonic(), 0.0
        self.model.train()
        with stop_signals(config.preemption_grace_s) as stop:
            self.stop = stop
            if self.state.pending_eval:  # the run stopped for a signal where it was to evaluate
                self.state.pending_eval = False
                self._evaluate_and_sample(result)
            while self.state.global_step < self.steps and not result.stopped_early:
                started = time.monotonic()
                outcome = self._step(stop)
                if outcome is None:  # given up for a stop signal
                    self._stop(stop)
                ended = self._after_step(outcome, time.monotonic() - started, mfu, progress, result)
                if ended:
                    break
                if self._agreed(stop.requested) and self.state.global_step % self.every == 0:
                    self._stop(stop)
        progress.close()
        if self.eval_batches and result.final_eval_loss is None and result.status == "finished":
            if self._agreed(stop.requested):  # training is complete: the final save goes ahead, its eval does not
                log.warning("%s after the last step: the final eval is skipped, the model is saved", stop.name)
            else:
                self._evaluate(result)
        if config.keep_best and result.status == "finished":
            self.accelerator.wait_for_everyone()
            best = load_best(self.run_dir, self.unwrapped, self.sharded)
            if best is not None:
                result.best_step, result.final_eval_loss = best["step"], best["eval_loss"]
                result.final_eval_metrics = best["metrics"]
                log.info("training.keep_best: the model is step %d's (eval loss %.4f)", best["step"],
                         best["eval_loss"])
        result.state = self.state
        return result

    def _agreed(self, flag: bool) -> bool:
        """Whether any process raised ``flag`` (every process then acts on it together)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, "max") > 0)

    def _stop(self, stop: StopSignals) -> None:
        step = self.state.global_step
        if self.last_saved_step != step:
            self.save()
        checkpoint = RunDir(self.run_dir).checkpoints_dir / f"step-{step:07d}"
        log.warning("%s: stopped with a checkpoint at step %d of %d", stop.name or "stop signal", step, self.steps)
        raise RunStopped(f"{stop.name or 'a stop signal'}: checkpoint {checkpoint} holds step {step} of {self.steps}; "
                         f"`tunesmith train CONFIG --resume` continues from it with no step lost", "preempted",
                         stop.exit_code, step)

    def _judge(self, loss: float, grad_norm: float | None) -> tuple[tuple[str, str] | None, bool]:
        """The step's verdict, and whether its update is applied (healthy, or diverging under policy warn)."""
        verdict = self.watch.verdict(self.state, loss, grad_norm)
        return verdict, verdict is None or (verdict[0] == "diverged" and self.config.divergence.policy == "warn")

    def _step(self, stop: StopSignals) -> StepOutcome | None:
        """Run one step, halving the micro-batches and trying again when the device runs out of memory;
        None when a stop signal made it give up."""
        config, accelerator, state = self.config, self.accelerator, self.state
        first = state.micro_batches_done + accelerator.process_index
        positions = [first + i * accelerator.num_processes for i in range(config.grad_accum)]
        end = total_micro_batches(config, self.stream.per_epoch)
        single = accelerator.num_processes == 1  # under DDP every process must take the same path
        too_late = (lambda left: stop.too_late(left + self.save_seconds)) if single and self.every == 1 else None
        while True:
            if accelerator.num_processes > 1 and getattr(self.stream, "packs", None) is not None:
                window = _packed_window(self.stream, state.micro_batches_done, config.grad_accum, end,
                                        accelerator.process_index, accelerator.num_processes)
            elif accelerator.num_processes > 1 and hasattr(self.stream, "rows"):
                window = _balanced_window(self.stream, state.micro_batches_done, config.grad_accum, end,
                                          accelerator.process_index, accelerator.num_processes, state.micro_splits)
            else:
                window = _window(self.stream, positions, end, first, state.micro_splits)
            rng = capture_rng()  # a dropped or retried step must leave the RNG as it found it (dropout, sampling)
            out_of_memory = False
            try:
                return _train_step(self.model, self.objective, window, accelerator, self.optimizer,
                                   config.max_grad_norm, self._judge,
                                   self.held(state.global_step) if self.held else (), self.offload, too_late,
                                   self.engine)
            except _Dropped:
                restore_rng(*rng)
                self.objective_metrics_dropped()
                log.warning("step %d given up: finishing it would outlast training.preemption_grace_s (%.0f s)",
                            state.global_step + 1, config.preemption_grace_s)
                return None
            except torch.OutOfMemoryError:
                out_of_memory = True  # handled below, once the exception's frames (and tensors) are gone
            if out_of_memory:
                restore_rng(*rng)
                self._out_of_memory(window)

    def _out_of_memory(self, window: list[Batch]) -> None:
        state, config = self.state, self.config
        self.optimizer.zero_grad(set_to_none=True)
        self.objective_metrics_dropped()
        _free_memory()
        rows = max(count_rows(b) for b in window)
        settings = ("lower data.max_seq_len, set training.gradient_checkpointing: true (and "
                    "training.offload_activations: true), or train with method qlora or a smaller model")
        if rows <= 1:
            raise TunesmithError(f"out of memory at step {state.global_step + 1} with one row per micro-batch "
                                 f"(training.batch_size {config.batch_size} run in {state.micro_splits} pieces): "
                                 f"{settings}")
        if self.accelerator.num_processes > 1 or not hasattr(self.stream, "pieces"):
            why = "several processes" if self.accelerator.num_processes > 1 else "its task samples per batch"
            raise TunesmithError(f"out of memory at step {state.global_step + 1} with {rows} rows per micro-batch; "
                                 f"this run cannot split its micro-batches ({why}): lower training.batch_size and "
                                 f"raise training.grad_accum (the same effective batch), or {settings}")
        state.micro_splits *= 2
        size = math.ceil(config.batch_size / state.micro_splits)
        log.warning("out of memory at step %d: retrying with micro-batches of %d rows (%d x training.grad_accum "
                    "of them; the same rows and loss per step)", state.global_step + 1, size, state.micro_splits)
        self.event({"step": state.global_step + 1, "event": "out_of_memory", "micro_batch_rows": size})

    def _after_step(self, outcome: StepOutcome, elapsed: float, mfu: MFUMeter, progress: Progress,
                    result: TrainResult) -> bool:
        """Count the step, log it, evaluate, save; apply the guards. True when the run ends here."""
        config, accelerator, state = self.config, self.accelerator, self.state
        group = self.optimizer.param_groups[0]  # the rate this step used, as a multiple of the base rate
        lr = config.lr * state.lr_factor * group["lr"] / group["initial_lr"]
        self.scheduler.step()
        state.global_step += 1
        state.micro_batches_done = min(state.micro_batches_done + config.grad_accum * accelerator.num_processes,
                                       total_micro_batches(config, self.stream.per_epoch) or 10**18)
        tokens, rows = outcome.tokens, outcome.rows  # every process's, summed (MFU below stays per device)
        if accelerator.num_processes > 1:
            summed = accelerator.reduce(torch.tensor([tokens, rows], device=accelerator.device), "sum")
            tokens, rows = (int(value) for value in summed.tolist())
        state.tokens_seen += tokens
        state.elapsed_s += elapsed
        record = {"step": state.global_step, "epoch": round(state.micro_batches_done / self.stream.per_epoch, 4),
                  "loss": outcome.loss, "lr": lr, "grad_norm": outcome.grad_norm, "tokens": tokens, "rows": rows,
                  "tokens_per_s": tokens / max(elapsed, 1e-9), "elapsed_s": round(state.elapsed_s, 3)}
        utilisation = mfu(outcome.tokens, outcome.rows, elapsed)  # this process's tokens over one device's peak
        if utilisation is not None:
            record["mfu"] = round(utilisation, 4)
        record.update(objective_metrics(self.objective, "train"))
        kind, why = outcome.verdict or (None, None)
        if kind == "nonfinite":
            state.skipped_steps += 1
            state.nonfinite_in_row += 1
            record.update(skipped=why, skipped_steps=state.skipped_steps)
            log.warning("step %d: %s: the update was skipped (%d in a row; training.nonfinite_limit is %d)",
                        state.global_step, why, state.nonfinite_in_row, config.nonfinite_limit)
            self.event({"step": state.global_step, "event": "skipped", "why": why})
        else:
            state.nonfinite_in_row = 0
            result.final_train_loss = outcome.loss
            if kind is None:
                self.watch.healthy(state, outcome.loss, outcome.grad_norm)
            else:
                record["diverged"] = why
                log.warning("step %d diverges: %s (training.divergence.policy %s)", state.global_step, why,
                            config.divergence.policy)
                if config.divergence.policy == "warn":
                    self.event({"step": state.global_step, "event": "diverging", "why": why})
        if self.main:
            self.metrics.write(record)
        progress.update(record)
        if kind == "nonfinite" and state.nonfinite_in_row >= config.nonfinite_limit:
            good = state.global_step - state.nonfinite_in_row
            result.status, result.stopped_at = "diverged", state.global_step
            result.reason = (f"{state.nonfinite_in_row} non-finite steps in a row (steps {good + 1}-"
                             f"{state.global_step}; the last: {why}); the model is step {good}'s, the last good one")
            self.event({"step": state.global_step, "event": "stopped", "why": result.reason})
            return True
        if kind == "diverged" and config.divergence.policy != "warn":
            return self._diverged(why, result)
        last = state.global_step == self.steps
        at_eval = bool(config.eval_every) and (state.global_step % config.eval_every == 0 or last)
        if at_eval and (self.samples is not None or self.eval_batches) and self._agreed(self.stop.requested) \
                and state.global_step % self.every == 0:
            state.pending_eval = True  # a stop is asked: checkpoint now, evaluate first thing after --resume
            return False
        if at_eval:
            self._evaluate_and_sample(result)
        periodic = bool(config.save_every) and state.global_step % config.save_every == 0
        due = bool(config.save_every_minutes) and self._agreed(
            time.monotonic() - self.last_save_time >= 60 * config.save_every_minutes)
        if (periodic or due) and not last and state.global_step % self.every == 0:
            self.save()
        return result.stopped_early

    def _diverged(self, why: str, result: TrainResult) -> bool:
        """Roll back (and go on) or stop, as the policy says; True when the run ends."""
        config, old = self.config.divergence, self.state
        at = old.global_step
        # The step's loss and gradient were computed on the weights of the step before it: those are
        # suspect too, so the point to go back to is older than that.
        back = self.go_back(at - 1)
        if back is None:
            result.status, result.stopped_at, result.keep_model = "diverged", at, False
            result.reason = (f"diverged at step {at}: {why}; there is no checkpoint before it and the run's start "
                             f"was not kept, so no model was written (raise training.keep_last or lower "
                             f"training.save_every)")
            self.event({"step": at, "event": "stopped", "why": result.reason})
            return True
        restored, where = back
        restored.events, restored.skipped_steps, restored.micro_splits = old.events, old.skipped_steps, \
            old.micro_splits
        restored.rollbacks, restored_factor = old.rollbacks, restored.lr_factor
        self.state = restored
        result.final_train_loss = None
        stale_best = self.config.keep_best and drop_best_after(self.run_dir, restored.global_step, delete=False)
        self.accelerator.wait_for_everyone()  # every process has looked before the main one deletes
        if self.main:  # the abandoned steps' checkpoints are suspect: a --resume never sees them
            drop_checkpoints_after(self.run_dir, restored.global_step)
            if stale_best:
                drop_best_after(self.run_dir, restored.global_step)
        if stale_best:  # the best weights came from the abandoned steps: the best is chosen again from here on
            restored.best_eval_loss, restored.best_step, restored.best_eval_metrics = None, None, {}
            restored.evals_without_improvement = 0
        if config.policy == "rollback" and old.rollbacks < config.max_rollbacks:
            restored.rollbacks += 1
            restored.lr_factor = old.lr_factor * config.lr_cut
            self.cut_lr(restored_factor, restored.lr_factor)
            log.warning("rollback %d of %d: back to %s (step %d), learning rate x%.3g", restored.rollbacks,
                        config.max_rollbacks, where, restored.global_step, restored.lr_factor)
            self.event({"step": at, "event": "rollback", "why": why, "to_step": restored.global_step,
                        "lr_factor": restored.lr_factor})
            if self.main:
                self.metrics.rewind(restored.global_step)
                self.metrics.write({"step": restored.global_step, "event": "rollback", "from_step": at, "why": why,
                                    "lr_factor": restored.lr_factor})
            self.progress.rewind(restored.global_step)
            return False
        tried = f" after {old.rollbacks} rollback(s)" if config.policy == "rollback" else ""
        result.status, result.stopped_at = "diverged", at
        result.reason = (f"diverged at step {at}{tried}: {why}; the model is {where}'s (step "
                         f"{restored.global_step})")
        self.event({"step": at, "event": "stopped", "why": result.reason})
        log.error("run stopped: %s", result.reason)
        return True

    def _evaluate_and_sample(self, result: TrainResult) -> None:
        collective = self.sharded or (self.engine and zero3_partitioned(self.unwrapped))
        if self.samples is not None and (self.main or collective):
            # Sharded, every process generates the same replies together (each forward gathers the weights);
            # the main process writes them.
            replies = self.samples(self.unwrapped)
            if self.sharded:
                self.unwrapped.reshard()
            if self.main:
                self.metrics.write({"step": self.state.global_step, "samples": replies})
        if self.eval_batches:
            self._evaluate(result)
        if result.stopped_early:
            log.info("early stopping: eval loss has not improved for %d evals", self.config.early_stopping_patience)

    def _evaluate(self, result: TrainResult) -> None:
        state = self.state
        loss = evaluate(self.model, self.objective, self.eval_batches, self.accelerator)
        if self.sharded:  # a forward without backward leaves the root's weights gathered
            self.unwrapped.reshard()
        metrics = objective_metrics(self.objective, "eval")
        result.final_eval_loss, result.final_eval_metrics = loss, metrics
        if self.main:
            self.metrics.write({"step": state.global_step, "eval_loss": loss, **metrics})
        log.info("step %d: eval loss %.4f", state.global_step, loss)
        improved = math.isfinite(loss) and (state.best_eval_loss is None or loss < state.best_eval_loss)
        result.stopped_early = _early_stop(state, loss, self.config.early_stopping_patience)
        if improved:
            state.best_step, state.best_eval_metrics = state.global_step, metrics
            if self.config.keep_best:
                self.accelerator.wait_for_everyone()
                weights = shard.trainable_weights(self.unwrapped) if self.sharded else None
                self._on_main(lambda: save_best(self.run_dir, self.unwrapped, state.global_step, loss, metrics,
                                                weights))


def _early_stop(state: TrainState, eval_loss: float, patience: int | None) -> bool:
    if math.isfinite(eval_loss) and (state.best_eval_loss is None or eval_loss < state.best_eval_loss):
        state.best_eval_loss = eval_loss
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    return bool(patience) and state.evals_without_improvement >= patience
