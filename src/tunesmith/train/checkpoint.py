"""Checkpoints that a killed run can resume from exactly.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the trainable parameters
(safetensors), the optimizer state, the scheduler state, every RNG state and the data position.
It is written into a temporary folder and renamed into place, so a checkpoint either exists
whole or not at all; a kill while writing leaves only a ``.tmp-`` folder that is ignored and
cleaned up. Only our own files are loaded back, and tensors with ``weights_only=True``.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.io import atomic_directory
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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
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
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainState, keep_last: int) -> Path:
    folder = RunDir(run_dir).checkpoints_dir
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PREFIX}{state.global_step:07d}"
    with atomic_directory(target) as staging:
        save_file(trainable_state(model), str(staging / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        (staging / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        tensors, plain = _rng_state()
        save_file(tensors, str(staging / "rng.safetensors"))
        (staging / "rng.json").write_text(json.dumps(plain))
        (staging / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in folder.glob(".tmp-*"):  # from a run killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    return target


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote; returns the saved training state."""
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    parameters = dict(model.named_parameters())
    missing = sorted(set(n for n, p in parameters.items() if p.requires_grad) - set(weights))
    unexpected = sorted(set(weights) - set(parameters))
    if missing or unexpected:
        raise TunesmithError(f"{checkpoint}: does not match this model and method (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); resume with the config it was trained with, or "
                             f"start a new run (--overwrite or output.name=...)")
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor.to(parameters[name].device))
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(json.loads((checkpoint / "scheduler.json").read_text()))
    _set_rng_state(load_file(str(checkpoint / "rng.safetensors")), json.loads((checkpoint / "rng.json").read_text()))
    return TrainState(**json.loads((checkpoint / "trainer_state.json").read_text()))
