"""Run `tunesmith train` as child processes: the job queue's workers (``tunesmith server``) and the
sweep's trials (``tunesmith sweep``) both start training this way, one process per slot.

A slot is one GPU (the child sees only it, through ``CUDA_VISIBLE_DEVICES``) or, on a machine without
GPUs, the whole machine: two CPU trainings at once would only slow each other down. A child is in its
own process group (a Ctrl-C in the server's terminal is not sent to it) and gets SIGTERM when its
parent dies (Linux's parent-death signal), so that a killed server leaves checkpoints, not orphans.
SIGTERM is `tunesmith train`'s checkpoint-and-stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tunesmith.io import die_with_parent

# Exit codes of `tunesmith train` (cli/main.py): 0 finished; 2 a bad config or dataset, refused before
# training; 143 (128 + SIGTERM) stopped by a signal with a checkpoint; anything else failed.
EXIT_FINISHED = 0
EXIT_REFUSED = 2
EXIT_STOPPED = 128 + signal.SIGTERM


def device_slots() -> list[str | None]:
    """One entry per training that may run at once: a GPU index for ``CUDA_VISIBLE_DEVICES`` per visible
    GPU, or ``[None]`` (the whole machine) without one."""
    import torch

    slots: list[str | None] = [str(index) for index in range(torch.cuda.device_count())] or [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible and slots[0] is not None:  # this process sees a subset: the children get the same ids
        names = [name.strip() for name in visible.split(",") if name.strip()]
        slots = names[: len(slots)]
    return slots


def train_command(config: Path | str, overrides: Sequence[str] = (), resume: bool = True) -> list[str]:
    """`tunesmith train CONFIG KEY=VALUE ... [--resume]` with this interpreter. ``--resume`` is also right
    for a first start: without a checkpoint it starts from the beginning."""
    return [sys.executable, "-m", "tunesmith", "-q", "train", str(config), *overrides,
            *(["--resume"] if resume else [])]


class Handle(Protocol):
    """A started training, wherever it runs."""

    def poll(self) -> int | None:
        """Its exit code, or None while it runs."""

    def terminate(self) -> None:
        """Ask it to checkpoint and stop (SIGTERM)."""


class TrainProcess:
    """A `tunesmith train` child process on this machine; its output (stdout and stderr) goes to ``log``."""

    def __init__(self, command: Sequence[str], log: Path, slot: str | None = None, cwd: Path | None = None,
                 env: dict[str, str] | None = None):
        environment = {**os.environ, **(env or {})}
        if slot is not None:
            environment["CUDA_VISIBLE_DEVICES"] = slot
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # not ours to pass on
            environment.pop(name, None)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                list(command), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, cwd=cwd,
                env=environment, process_group=0, preexec_fn=die_with_parent if sys.platform == "linux" else None)
        self.pid = self.process.pid

    def poll(self) -> int | None:
        code = self.process.poll()
        return None if code is None else (code if code >= 0 else 128 - code)  # a signal: as a shell reports it

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code once it ended, or None after ``timeout`` seconds."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.poll()


class Executor(Protocol):
    """Where trainings run: this machine (``LocalExecutor``) or a Ray cluster (``server/ray_executor.py``)."""

    def slots(self) -> list[str | None]:
        """One entry per training that may run at once (passed back to ``start``)."""

    def start(self, command: Sequence[str], log: Path, slot: str | None, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Handle:
        """Start ``command`` in ``slot``; its output goes to ``log``."""

    def close(self) -> None:
        """Release what the executor holds (trainings still running are not stopped here)."""


class LocalExecutor:
    """Trainings as child processes of this one, one per GPU, or one at a time without a GPU."""

    def __init__(self, workers: int | None = None):
        """``workers``: trainings at once (default: one per GPU, one without); more than the GPUs share them
        in turn, and on a machine without GPUs that many run side by side."""
        found = device_slots()
        self._slots = [found[index % len(found)] for index in range(workers)] if workers else found

    def slots(self) -> list[str | None]:
        return list(self._slots)

    def start(self, command: Sequence[str], log: Path, slot: str | None, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> TrainProcess:
        return TrainProcess(command, log, slot, cwd, env)

    def close(self) -> None:
        """Nothing to release: the children are followed through their handles."""
