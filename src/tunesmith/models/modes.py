"""Scoped model state: every exit path restores what it found (STYLE 8)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; the previous mode is restored on every exit path.

    >>> layer = nn.Dropout(0.5).train()
    >>> with evaluating(layer):
    ...     layer.training, torch.is_grad_enabled()
    (False, False)
    >>> layer.training
    True
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
