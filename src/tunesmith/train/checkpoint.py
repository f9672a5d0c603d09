"""Checkpoints that a killed run can resume from exactly.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the trainable parameters
(safetensors), the optimizer state, the scheduler state, every RNG state and the data position.
It is written into a temporary folder and renamed into place, so a checkpoint either exists
whole or not at all; a kill while writing leaves only a ``.tmp-`` folder that is ignored and
cleaned up. Only our own files are loaded back, and tensors with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.io import atomic_directory, writing
from tunesmith.rundir import RunDir

PREFIX = "step-"


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    global_step: int = 0
    micro_batches_done: int = 0  # micro-batches consumed from the start of training (data position)
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0
    objective: dict = field(default_factory=dict)  # what a stateful objective needs to resume (PPO's KL coefficient)
    best_step: int | None = None  # the step of best_eval_loss
    best_eval_metrics: dict = field(default_factory=dict)
    lr_factor: float = 1.0  # the learning rate's cut by rollbacks (training.divergence.lr_cut per rollback)
    rollbacks: int = 0
    skipped_steps: int = 0  # updates not applied: non-finite loss or gradient norm
    nonfinite_in_row: int = 0
    micro_splits: int = 1  # each micro-batch runs in this many pieces (halved after running out of memory)
    recent_losses: list = field(default_factory=list)  # the divergence rules' history (healthy steps)
    recent_grad_norms: list = field(default_factory=list)
    events: list = field(default_factory=list)  # what happened: skips, rollbacks, splits, resumes after preemption
    pending_eval: bool = False  # stopped for a signal at an eval step: the eval runs first after --resume
    processes: int = 1  # how many processes trained it (a resume on another number keeps the global batch)
    micro_per_step: int | None = None  # micro-batches a step over all processes (grad_accum x processes)
    batch_tokens: int | None = None  # the token budget of its micro-batches (None: batch_size rows)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = RunDir(run_dir).checkpoints_dir
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainState, keep_last: int,
                    other_rng: list[tuple[dict[str, torch.Tensor], dict]] = (),
                    staged: Path | None = None) -> Path:
    """Write a checkpoint of ``state.global_step``; ``other_rng``: the RNG states of processes 1, 2, ... (this
    process is 0), each restored by its own process on resume; ``staged``: a staging folder every process of
    a sharded run has written its shards into (``staging_dir``), completed here and renamed into place."""
    folder = RunDir(run_dir).checkpoints_dir
    with writing(folder, "the checkpoints folder"):
        folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PREFIX}{state.global_step:07d}"
    previous = list_checkpoints(run_dir)
    intact = f"the previous checkpoint ({previous[-1].name}) is intact" if previous else "no checkpoint was kept"
    with writing(target, "a checkpoint", f"nothing partial was left and {intact}; free space (or choose another "
                 "output.dir) and resume with --resume"), \
            (contextlib.nullcontext(staged) if staged is not None else atomic_directory(target)) as staging:
        if staged is None:
            save_file(trainable_state(model), str(staging / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        (staging / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        tensors, plain = capture_rng()
        save_file(tensors, str(staging / "rng.safetensors"))
        (staging / "rng.json").write_text(json.dumps(plain))
        for rank, (tensors, plain) in enumerate(other_rng, start=1):
            save_file(tensors, str(staging / f"rng-{rank}.safetensors"))
            (staging / f"rng-{rank}.json").write_text(json.dumps(plain))
        (staging / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        if staged is not None:  # complete: into place (a kill before this leaves a .tmp- folder, never picked)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in folder.glob(".tmp-*"):  # from a run killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    return target


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int = 0, sharded: bool = False,
                    engine: Callable[[Path], None] | None = None) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote (the RNG state of process ``rank``; a process the saving
    run did not have keeps its seeded RNG); returns the saved training state. ``engine``: a DeepSpeed run's
    reader of the engine's own files (weights and optimizer state)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's optimizer
    if engine is not None:
        engine(checkpoint / "deepspeed")
    elif (checkpoint / "shards").is_dir():  # a sharded run's: resharded for this run, sharded or not
        from tunesmith.train import shard

        shard.load_shards(model, inner, checkpoint / shard.SHARDS)
    elif sharded:  # whole tensors read by process 0 and scattered into every process's shards
        from tunesmith.train import shard

        weights, saved = {}, {}
        if rank == 0:
            weights = load_file(str(checkpoint / "trainable.safetensors"))
            saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
            saved = saved if _keyed_by_name(saved) else _by_name(saved, inner, model)
        shard.load_weights(model, weights)
        shard.load_optimizer_state(model, inner, saved)
    else:
        saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
        restore_trainable(model, load_file(str(checkpoint / "trainable.safetensors")), checkpoint)
        if _keyed_by_name(saved):  # written by a sharded run
            saved = _by_index(saved, inner, model)
        optimizer.load_state_dict(saved)  # torch moves the state to the parameters' device
    scheduler.load_state_dict(json.loads((checkpoint / "scheduler.json").read_text()))
    suffix = f"-{rank}" if rank else ""
    if (checkpoint / f"rng{suffix}.safetensors").is_file():
        restore_rng(load_file(str(checkpoint / f"rng{suffix}.safetensors")),
                    json.loads((checkpoint / f"rng{suffix}.json").read_text()))
    return TrainState(**json.loads((checkpoint / "trainer_state.json").read_text()))


def _keyed_by_name(saved: dict) -> bool:
    """An optimizer state keyed by parameter name (a sharded run's, from torch.distributed.checkpoint) rather
    than by position (torch's own ``state_dict``)."""
    return any(isinstance(p, str) for group in saved.get("param_groups", []) for p in group["params"])


def _order(optimizer: torch.optim.Optimizer, model: nn.Module) -> tuple[list[str], dict[str, int]]:
    """The optimizer's parameters as names, in its order (the positions of torch's own state_dict)."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return order, {name: index for index, name in enumerate(order)}


def _by_name(saved: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A positional optimizer state (a one-process or DDP run's) keyed by parameter name, for a sharded model.
    Positions match names because every run builds its groups from the same parameters in the same order."""
    order, _ = _order(optimizer, model)
    return {"state": {order[index]: value for index, value in saved["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in saved["param_groups"]]}


def _by_index(saved: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A sharded run's optimizer state (keyed by name) by position, for a model that is not sharded."""
    _, index = _order(optimizer, model)
    return {"state": {index[name]: value for name, value in saved["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in saved["param_groups"]]}


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where the processes of a sharded run write the checkpoint of ``step`` before it is committed (a name
    every process knows; ignored and cleaned up like any other ``.tmp-`` folder)."""
    return RunDir(run_dir).checkpoints_dir / f".tmp-{PREFIX}{step:07d}-shards"


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX):])


def drop_checkpoints_after(run_dir: Path, step: int) -> None:
    """Delete the checkpoints of steps after ``step`` (a rolled-back trajectory's)."""
    for checkpoint in list_checkpoints(run_dir):
        if checkpoint_step(checkpoint) > step:
            shutil.rmtree(checkpoint, ignore_errors=True)


BEST_WEIGHTS = "trainable.safetensors"
BEST_RECORD = "best.json"


def save_best(run_dir: Path, model: nn.Module, step: int, eval_loss: float, metrics: dict,
              weights: dict[str, torch.Tensor] | None = None) -> None:
    """checkpoints/best/: the trainable weights of the best eval loss so far (``training.keep_best``)."""
    target = RunDir(run_dir).best_dir
    with writing(target, "the best checkpoint", "the previous best is intact; free space and resume with --resume"), \
            atomic_directory(target) as staging:
        save_file(weights if weights is not None else trainable_state(model), str(staging / BEST_WEIGHTS))
        (staging / BEST_RECORD).write_text(json.dumps({"step": step, "eval_loss": eval_loss, "metrics": metrics}))


def drop_best_after(run_dir: Path, step: int, delete: bool = True) -> bool:
    """Whether the best checkpoint is of a step after ``step`` (a rolled-back trajectory's); if so it is
    deleted (by the process that writes, ``delete``)."""
    record = RunDir(run_dir).best_dir / BEST_RECORD
    if not (record.is_file() and json.loads(record.read_text())["step"] > step):
        return False
    if delete:
        shutil.rmtree(RunDir(run_dir).best_dir, ignore_errors=True)
    return True


def load_best(run_dir: Path, model: nn.Module, sharded: bool = False) -> dict | None:
    """Put the best checkpoint's weights into ``model``; its record (step, eval loss), or None without one."""
    folder = RunDir(run_dir).best_dir
    if not (folder / BEST_RECORD).is_file():
        return None
    if sharded:
        import torch.distributed as dist

        from tunesmith.train import shard

        shard.load_weights(model, load_file(str(folder / BEST_WEIGHTS)) if dist.get_rank() == 0 else {})
    else:
        restore_trainable(model, load_file(str(folder / BEST_WEIGHTS)), folder)
    return json.loads((folder / BEST_RECORD).read_text())


def restore_trainable(model: nn.Module, weights: dict[str, torch.Tensor], source: Path | str) -> None:
    parameters = dict(model.named_parameters())
    missing = sorted(set(n for n, p in parameters.items() if p.requires_grad) - set(weights))
    unexpected = sorted(set(weights) - set(parameters))
    if missing or unexpected:
        raise TunesmithError(f"{source}: does not match this model and method (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); resume with the config it was trained with, or "
                             f"start a new run (--overwrite or output.name=...)")
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor.to(parameters[name].device))


@dataclass
class Snapshot:
    """The start of a run held in memory (trainable weights on the CPU, the optimizer and scheduler
    before any step, the RNG): where a rollback goes before the first checkpoint exists."""

    weights: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: tuple[dict[str, torch.Tensor], dict]
    state: dict

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainState) -> Snapshot:
        return cls({k: v.clone() for k, v in trainable_state(model).items()}, copy.deepcopy(optimizer.state_dict()),
                   copy.deepcopy(scheduler.state_dict()), capture_rng(), copy.deepcopy(asdict(state)))

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler) -> TrainState:
        restore_trainable(model, self.weights, "the run's start")
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        restore_rng(*self.rng)
        return TrainState(**copy.deepcopy(self.state))


# Optimizer state bytes per trainable parameter element, beside the parameter itself.
_OPTIMIZER_BYTES = {"adamw": 8, "adamw_fused": 8, "adamw_8bit": 2, "sgd": 0}


def checkpoint_bytes(model: nn.Module, optimizer: str, deepspeed: bool = False) -> int:
    """What one checkpoint takes on disk: the trainable parameters in their dtype and the optimizer's
    state (AdamW: two fp32 moments; 8-bit AdamW: two 1-byte moments; SGD without momentum: none);
    ``deepspeed``: ZeRO's fp32 master copy of them too."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.element_size()) for p in model.parameters() if p.requires_grad]
    count = sum(n for n, _ in sizes)
    per_parameter = _OPTIMIZER_BYTES.get(optimizer, 8) + (4 if deepspeed else 0)
    return sum(n * size for n, size in sizes) + count * per_parameter + (1 << 20)


def final_model_bytes(model: nn.Module) -> int:
    """What the final model folder takes: an adapter's trainable weights, or every weight of a full model."""
    from peft import PeftModel

    from tunesmith.adapters.bottleneck import is_bottleneck

    parameters = model.parameters() if not (isinstance(model, PeftModel) or is_bottleneck(model)) else \
        (p for p in model.parameters() if p.requires_grad)
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in parameters)
