"""What every recipe does the same way: seed, model + method, accelerator, final save."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from tunesmith import __version__
from tunesmith.adapters.apply import apply_method, count_parameters
from tunesmith.config.schema import Config
from tunesmith.models.device import select_device, select_mixed_precision
from tunesmith.models.load import load_model
from tunesmith.train.loop import TrainResult

log = logging.getLogger(__name__)


def build_accelerator(config: Config) -> Accelerator:
    device = select_device(config.model.device)
    return Accelerator(mixed_precision=select_mixed_precision(config.training.mixed_precision, device),
                       cpu=device.type == "cpu")


def build_trainable_model(config: Config, source: tuple[str, str | None], device: torch.device) -> nn.Module:
    """Load the base model onto ``device`` (this process's, under DDP) and apply the method; logs
    trainable vs total parameters."""
    quantization = config.method.quantization if config.method.type == "qlora" else None
    model = load_model(config.model.model_copy(update={"device": str(device)}), quantization, source)
    model = apply_method(model, config.method, config.training.gradient_checkpointing)
    trainable, total = count_parameters(model)
    log.info("method %s: %s trainable of %s parameters (%.4f%%)", config.method.type, f"{trainable:,}",
             f"{total:,}", 100 * trainable / max(total, 1))
    return model


def seed_everything(config: Config) -> None:
    set_seed(config.training.seed)


def run_summary(config: Config, model: nn.Module, result: TrainResult, run_dir: Path) -> dict:
    trainable, total = count_parameters(model)
    return {
        "name": config.run_name,
        "method": config.method.type,
        "steps": result.state.global_step,
        "tokens_seen": result.state.tokens_seen,
        "train_seconds": round(result.state.elapsed_s, 2),
        "final_train_loss": result.final_train_loss,
        "final_eval_loss": result.final_eval_loss,
        "stopped_early": result.stopped_early,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "model_dir": str(run_dir / "model"),
        "versions": {"tunesmith": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
