"""DeepSpeed ZeRO for ``training.distributed: deepspeed`` (the ``deepspeed`` extra).

DeepSpeed partitions the gradients and optimizer state (stage 2), and the weights too (stage 3), and can keep
them in CPU memory. What is ours: the DeepSpeed configuration a tunesmith config means (written to the run
folder as ``deepspeed.json``, for reading and for reuse), and how its engine meets tunesmith's loop:

- the engine is started with ``deepspeed.initialize`` on the process group accelerate opened, not through
  accelerate's DeepSpeed plugin: accelerate runs DeepSpeed on GPUs only (on a CPU machine its state never
  opens a process group for it), and the loop drives backward and step itself either way, so one code path
  serves GPUs and the gloo tests;

- the loop accumulates micro-batches itself and tells the engine where the step ends (DeepSpeed's own
  ``gradient_accumulation_steps`` stays 1, so that it does not scale the loss: the loop normalises it over the
  whole step's label tokens, as under DDP);
- the engine clips and steps; it skips a step whose gradients are not finite (its overflow check), which is
  what tunesmith's non-finite guard does, and its gradient norm (before clipping) feeds the guards;
- checkpoints hold the engine's own files (``deepspeed/``, written by every process, committed by the main one
  like FSDP's shards) beside tunesmith's state, RNG and scheduler files; they resume on the same number of
  processes (ZeRO's partitions are per process).
"""

from __future__ import annotations

import importlib.util
import logging
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config.schema import TrainingConfig
from tunesmith.errors import ConfigError, TunesmithError

log = logging.getLogger(__name__)

ENGINE_DIR = "deepspeed"  # a DeepSpeed run's checkpoint: the engine's own files
TAG = "state"  # DeepSpeed's checkpoint tag (one per checkpoint folder)
CONFIG_FILE = "deepspeed.json"  # the generated configuration, in the run folder


def installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def require_installed() -> None:
    if not installed():
        raise ConfigError(["training.distributed deepspeed: DeepSpeed is not installed (pip install "
                           "'tunesmith[deepspeed]'); or use ddp or fsdp, which need nothing more"])


def deepspeed_config(training: TrainingConfig, processes: int, mixed_precision: str) -> dict[str, Any]:
    """The DeepSpeed configuration of ``training`` on ``processes`` processes; ``mixed_precision``: no, bf16 or
    fp16 (as chosen for the run's device). DeepSpeed wants a micro-batch in rows: the loop feeds it its own
    micro-batches, so the figure (batch_size, also under training.batch_tokens) only sizes DeepSpeed's
    throughput log."""
    settings = training.deepspeed
    pin = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": settings.stage, "contiguous_gradients": True, "overlap_comm": pin}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if settings.stage == 3:  # the final model is gathered whole onto process 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": training.batch_size,
        # The loop accumulates and marks each step's last micro-batch itself (see the module's docstring).
        "gradient_accumulation_steps": 1,
        "train_batch_size": training.batch_size * processes,
        "gradient_clipping": training.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # tunesmith builds the optimizer (torch's AdamW, its parameter groups and decay rules): DeepSpeed wraps it.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # tunesmith logs each step itself
        "wall_clock_breakdown": False,
    }


_engines: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()  # model -> its engine


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, training: TrainingConfig, processes: int,
               mixed_precision: str) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """(the DeepSpeed engine around ``model``, its ZeRO optimizer around ``optimizer``, the configuration).
    The optimizer's parameter groups stay torch's: the scheduler built on it sets their learning rates."""
    import deepspeed

    config = deepspeed_config(training, processes, mixed_precision)
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    _engines[model] = engine
    settings = training.deepspeed
    log.info("deepspeed: ZeRO stage %d over %d processes (offload: optimizer %s, weights %s)", settings.stage,
             processes, settings.offload_optimizer, settings.offload_params)
    return engine, zero_optimizer, config


def engine_of(model: nn.Module) -> nn.Module | None:
    """The DeepSpeed engine ``initialize`` started around ``model``, if any."""
    return _engines.get(model)


def backward(engine: nn.Module, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward; ``last``: the step's last one, where the engine reduces what is left and
    the step ends."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss)


def step(engine: nn.Module) -> float | None:
    """Clip and apply the step (skipped by DeepSpeed itself when a gradient is not finite); returns the
    gradient norm before clipping (infinite for a skipped step; None without clipping)."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def save(engine: nn.Module, folder: Path) -> None:
    """Every process writes its partitions into ``folder`` (a checkpoint's staging folder). Every process
    must call it."""
    # The frozen weights (a LoRA run's whole base model) are the model's own files: not copied into every
    # checkpoint.
    engine.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=True)


def load(engine: nn.Module, folder: Path) -> None:
    """Read a DeepSpeed checkpoint (of the same number of processes) into the engine: weights, optimizer
    state. Every process must call it."""
    path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=False, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise TunesmithError(f"{folder}: DeepSpeed found no checkpoint to load (tag {TAG!r})")


def check_resume(checkpoint: Path, deepspeed: bool, processes: int, saved_processes: int) -> None:
    """Refuse, before training, a resume DeepSpeed cannot do: ZeRO's partitions are per process, and a
    checkpoint written without DeepSpeed holds no ZeRO state."""
    written = (checkpoint / ENGINE_DIR).is_dir()
    if written and (not deepspeed or saved_processes != processes):
        plural = "es" if processes > 1 else ""
        raise TunesmithError(f"{checkpoint} holds DeepSpeed ZeRO partitions of {saved_processes} processes; this "
                             f"run has {processes} process{plural}{'' if deepspeed else ' without DeepSpeed'}. Resume "
                             f"it with training.distributed deepspeed and --nproc {saved_processes}")
    if deepspeed and not written:
        raise TunesmithError(f"{checkpoint} was not written under DeepSpeed: resume it with training.distributed "
                             "ddp or fsdp (they read any checkpoint), or start the DeepSpeed run afresh")


def full_model_state(engine: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a stage-3 ``model`` (the engine's module), whole, on process 0 (the others get an empty
    dict). Every process must call it."""
    state = engine._zero3_consolidated_16bit_state_dict() or {}  # DeepSpeed's own gather, made for this
    # A tied weight (the head sharing the embeddings) is named once, as the model itself saves it.
    named = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor.cpu() for name, tensor in state.items() if name in named}
