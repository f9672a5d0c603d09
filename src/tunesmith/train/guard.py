"""What keeps a run alive and honest: stop signals (preemption), non-finite steps and divergence.

The loop asks these between steps; they hold no model state. Their history lives in ``TrainState``
so that a resumed run judges its steps as the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from types import FrameType, TracebackType

from tunesmith.config.schema import DivergenceConfig
from tunesmith.train.checkpoint import TrainState

log = logging.getLogger(__name__)

# Slurm sends SIGUSR1 (with --signal) or SIGTERM before its SIGKILL; Kubernetes and spot instances SIGTERM.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# Signals closer together than this are one stop: torchrun passes SIGTERM on to its workers, and a scheduler
# that signals the whole process group reaches them directly too.
SAME_SIGNAL_S = 0.5


class StopSignals:
    """Inside this context SIGTERM, SIGUSR1 and SIGINT ask the run to stop after the step in flight
    (the loop checkpoints and exits); a second one, half a second or more after the first, stops at once
    (SystemExit 143, or KeyboardInterrupt for Ctrl-C). Handlers are installed only in the main thread, and the previous ones come back on exit."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self.received_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signum is not None and time.monotonic() - self.received_at < SAME_SIGNAL_S:
            return  # the same stop twice: a launcher (torchrun) passing on what the scheduler also sent
        if self.signum is not None:  # the second: no more waiting
            if number == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signal.SIGTERM)
        self.signum, self.received_at = number, time.monotonic()
        log.warning("%s received: the step in flight finishes, then a checkpoint is written and the run exits "
                    "(send it again to stop at once, without a checkpoint)", signal.Signals(number).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, 143 (128 + SIGTERM) after SIGTERM or SIGUSR1: what schedulers read as 'terminated'."""
        return 130 if self.signum == signal.SIGINT else 128 + signal.SIGTERM

    def too_late(self, remaining_s: float) -> bool:
        """A stop was asked, and finishing the step would take it past the grace period."""
        return self.requested and time.monotonic() - self.received_at + remaining_s > self.grace_s


_active: list[StopSignals] = []


@contextlib.contextmanager
def stop_signals(grace_s: float) -> Iterator[StopSignals]:
    """The run's stop handler: a new one, or the one already active (a recipe's ``lifetime`` holds one from
    the run folder's opening to the final save, and the loop acts on it between steps)."""
    if _active:
        yield _active[-1]
        return
    with StopSignals(grace_s) as stop:
        _active.append(stop)
        try:
            yield stop
        finally:
            _active.pop()


def finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


class DivergenceWatch:
    """Judges each step before its update is applied: non-finite, diverging, or healthy.

    A step diverges when its loss is ``loss_ratio`` times the median of the recent healthy steps'
    losses and ``loss_margin`` above it, or its gradient norm (before clipping) is ``grad_norm_ratio``
    times theirs; neither rule applies before ``min_history`` healthy steps. ``signals`` names what
    the objective's numbers can be judged by (GRPO and PPO: neither; only non-finite steps are caught).
    The history is the run's ``TrainState`` (checkpoints keep it; a rollback restores an older one)."""

    def __init__(self, config: DivergenceConfig, signals: tuple[str, ...] = ("loss", "grad_norm"),
                 scaled_gradients: bool = False):
        self.config, self.signals = config, signals
        # fp16's loss scaler overflows on purpose while it finds its scale, and skips those steps itself.
        self.scaled_gradients = scaled_gradients

    def verdict(self, state: TrainState, loss: float, grad_norm: float | None) -> tuple[str, str] | None:
        """None for a healthy step; else (kind, why) with kind "nonfinite" or "diverged"."""
        if not math.isfinite(loss):
            return "nonfinite", f"the loss is {loss}"
        if not finite(grad_norm) and not self.scaled_gradients:
            return "nonfinite", f"the gradient norm is {grad_norm}"
        config = self.config
        losses, norms = state.recent_losses, state.recent_grad_norms
        if "loss" in self.signals and config.loss_ratio and len(losses) >= config.min_history:
            median = statistics.median(losses)
            if median > 0 and loss > config.loss_ratio * median and loss - median > config.loss_margin:
                return "diverged", (f"the loss {loss:.4g} is {loss / median:.1f}x the median {median:.4g} of the "
                                    f"last {len(losses)} steps")
        if "grad_norm" in self.signals and config.grad_norm_ratio and grad_norm is not None \
                and math.isfinite(grad_norm) and len(norms) >= config.min_history:
            median = statistics.median(norms)
            if median > 0 and grad_norm > config.grad_norm_ratio * median:
                return "diverged", (f"the gradient norm {grad_norm:.4g} is {grad_norm / median:.1f}x the median "
                                    f"{median:.4g} of the last {len(norms)} steps")
        return None

    def healthy(self, state: TrainState, loss: float, grad_norm: float | None) -> None:
        """Add a healthy step to ``state``'s history."""
        window = self.config.window
        state.recent_losses = (state.recent_losses + [loss])[-window:]
        if grad_norm is not None and math.isfinite(grad_norm):
            state.recent_grad_norms = (state.recent_grad_norms + [grad_norm])[-window:]
