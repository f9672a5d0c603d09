"""Writing a run folder (its layout is ``tunesmith.rundir``'s): created only after config and data
are valid, every file written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunesmith.config.load import dump_config
from tunesmith.config.schema import Config
from tunesmith.errors import TunesmithError
from tunesmith.io import atomic_directory, sha256_of, write_text_atomic, writing
from tunesmith.rundir import RunDir, RunStatus
from tunesmith.train import zero
from tunesmith.train.checkpoint import list_checkpoints

log = logging.getLogger(__name__)


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [f for key in sorted(set(old) | set(new))
                for f in _changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if old != new else []


def open_run_dir(config: Config, resume: bool, overwrite: bool, accelerator: Accelerator | None = None
                 ) -> tuple[Path, Path | None]:
    """Create (or reopen, with ``resume``) the run folder; return it and the checkpoint to resume from.

    Under several processes the main one prepares the folder and the others wait for it.
    """
    run_dir = RunDir.of(config).path
    processes = accelerator.num_processes if accelerator is not None else 1
    if accelerator is not None and not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        checkpoints = list_checkpoints(run_dir) if resume else []
        if checkpoints:  # refused here as on the main process: no process goes on alone
            _check_resume(config, checkpoints[-1], processes)
        return run_dir, checkpoints[-1] if checkpoints else None
    try:
        with writing(run_dir, "the run folder", "nothing was trained; choose a writable output.dir"):
            return _prepare_run_dir(config, run_dir, resume, overwrite, processes)
    finally:
        if accelerator is not None:
            accelerator.wait_for_everyone()


def _check_resume(config: Config, checkpoint: Path, processes: int) -> None:
    """A resume the checkpoint's strategy cannot do is refused before the folder is touched."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("processes", 1)
    zero.check_resume(checkpoint, config.training.distributed == "deepspeed" and processes > 1, processes, saved)


def _prepare_run_dir(config: Config, run_dir: Path, resume: bool, overwrite: bool, processes: int
                     ) -> tuple[Path, Path | None]:
    run = RunDir(run_dir)
    if run_dir.exists() and not resume:
        if not run.config_file.is_file():
            raise TunesmithError(f"{run_dir} exists and is not a tunesmith run folder; choose another output.dir "
                                 f"or output.name (nothing was deleted)")
        if not overwrite:
            raise TunesmithError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                                 f"replace it, or choose another name (output.name=...)")
        shutil.rmtree(run_dir)
    checkpoint = None
    if resume and run_dir.exists():
        if run.config_file.exists():
            changed = _changed_fields(run.saved_config(), config.model_dump(mode="json"))
            if changed:
                log.warning("resuming with a changed config: %s", ", ".join(changed))
        checkpoints = list_checkpoints(run_dir)
        checkpoint = checkpoints[-1] if checkpoints else None
        if checkpoint is None:
            log.warning("%s has no complete checkpoint: training starts from the beginning", run_dir)
        else:
            _check_resume(config, checkpoint, processes)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.config_file, dump_config(config))
    if checkpoint is None or not run.data_file.is_file():  # a resumed run keeps what it first read
        write_text_atomic(run.data_file, json.dumps(data_lineage(config), indent=2) + "\n")
    return run_dir, checkpoint


def data_lineage(config: Config) -> list[dict[str, str]]:
    """Each data file the run reads, with its role and SHA-256 (the registry's lineage)."""
    files = [("train", d.path) for d in config.data.train] + [("eval", d.path) for d in config.data.eval]
    if config.data.replay is not None:
        files.append(("replay", config.data.replay.path))
    return [{"role": role, "path": str(Path(path).resolve()), "sha256": sha256_of(Path(path))}
            for role, path in files if Path(path).is_file()]


def save_final_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, run_dir: Path,
                     state_dict: dict | None = None) -> Path:
    """Write ``model/``: a PEFT adapter folder, a bottleneck adapter folder or a full model folder, with
    the tokenizer; ``state_dict``: the whole weights of a sharded model (gathered by every process)."""
    from tunesmith.adapters.bottleneck import is_bottleneck, save_bottleneck

    target = RunDir(run_dir).model_dir
    with writing(target, "the final model", "nothing partial was left; the checkpoints are intact: free space "
                 "and resume with --resume"), atomic_directory(target) as staging:
        if hasattr(model, "generation_config") and model.generation_config is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        if is_bottleneck(model):
            save_bottleneck(model, staging, model.config.name_or_path)
        else:
            model.save_pretrained(staging, safe_serialization=True,
                                  **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(staging)
    return target


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    path = RunDir(run_dir).summary_file
    with writing(path, "the run's summary"):
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")


def write_status(run_dir: Path, status: RunStatus, reason: str | None = None, step: int | None = None,
                 exit_code: int | None = None) -> None:
    """status.json: what the run is doing or how it ended, with this process's id and host (so that
    ``runs list`` can tell a running run from one killed without a word), and for a stopped run the exit
    code it stopped with (``tunesmith train --nproc`` exits with it: torchrun's own is 1)."""
    record: dict[str, Any] = {"status": status, "reason": reason, "step": step, "exit_code": exit_code,
                              "pid": os.getpid(),
                              "host": socket.gethostname(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = RunDir(run_dir).status_file
    with writing(path, "the run's status"):
        write_text_atomic(path, json.dumps({k: v for k, v in record.items() if v is not None}, indent=2) + "\n")
