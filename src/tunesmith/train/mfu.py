"""Model FLOPs utilisation: achieved training FLOP/s over the accelerator's peak.

Per token, a training step costs a forward (2N: one multiply-add per parameter), the backward
through the activations (2N) and the weight gradients of the trainable parameters (2T), plus the
attention scores and values: 6·L·s·d for causal attention over s tokens of width d in L layers
(12·L·s·d halved by the causal mask). Full fine-tuning (T = N) gives the usual 6N; a frozen base
with small adapters about 4N. Recomputation by activation checkpointing is not counted.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense bf16 peak TFLOP/s by device name fragment (vendor data sheets).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


class FlopCount:
    """The model's sizes, counted once; training FLOPs per token at any sequence length."""

    def __init__(self, model: nn.Module):
        # ds_numel: a DeepSpeed ZeRO-3 parameter holds only its partition (numel() is 0 outside its forward)
        self.total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.layers, self.hidden = config.num_hidden_layers, config.hidden_size

    def per_token(self, seq: float) -> float:
        return 4 * self.total + 2 * self.trainable + 6 * self.layers * seq * self.hidden

    def formula(self, seq: float) -> str:
        return (f"4N + 2T + 6·L·s·d with N={self.total / 1e9:.3f}B, T={self.trainable / 1e9:.4f}B, "
                f"L={self.layers}, s={seq:.0f}, d={self.hidden}")


def flops_per_token(model: nn.Module, seq: float) -> tuple[float, str]:
    """(training FLOPs per token at sequence length ``seq``, the formula with its numbers)."""
    count = FlopCount(model)
    return count.per_token(seq), count.formula(seq)


class MFUMeter:
    """MFU of a training step from its token and row counts; None on devices with no known peak."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.flops = FlopCount(model)
        self.peak = peak_flops(device)

    def __call__(self, tokens: int, rows: int, seconds: float) -> float | None:
        if self.peak is None or seconds <= 0 or rows <= 0:
            return None
        return tokens * self.flops.per_token(tokens / rows) / seconds / self.peak  # mean row length for s


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for fragment, tflops in PEAK_TFLOPS.items() if fragment in name), None)
