"""Next-token loss without materialising the logits.

A causal LM's head turns (tokens, hidden) into (tokens, vocab) logits: for a 49k-word vocabulary
and 2,048 tokens that is 400 MB in fp32, and autograd keeps it (and a softmax copy) until backward.
Here the head runs only at the positions that carry a label (SFT skips every prompt token), in
chunks, each under activation checkpointing: its logits are freed after the forward and recomputed
in backward, so at most one chunk of logits exists at a time. Liger's fused kernel does the same on
GPU in Triton; this version is plain PyTorch and runs everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.data.tokenize import IGNORE_INDEX


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")  # head(hidden): (chunk, vocab)


def chunked_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                     chunk_size: int = 1024) -> torch.Tensor:
    """Sum of next-token NLL over label positions, equal to ``sft_loss_sum(head(hidden), labels)``.

    hidden: (batch, seq, hidden) final hidden states; labels: (batch, seq).

    >>> head = nn.Linear(4, 6, bias=False); hidden = torch.randn(2, 5, 4)
    >>> labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 0]])
    >>> from tunesmith.losses.sft import sft_loss_sum
    >>> torch.allclose(chunked_loss_sum(hidden, head, labels, chunk_size=2), sft_loss_sum(head(hidden), labels))
    True
    """
    targets = labels[:, 1:]  # (batch, seq-1)
    mask = targets != IGNORE_INDEX
    selected = hidden[:, :-1][mask]  # (tokens, hidden): only the positions that predict a label
    wanted = targets[mask]  # (tokens,)
    total = hidden[..., :1].sum().float() * 0.0  # attached to the graph: a batch without labels still backpropagates
    for start in range(0, wanted.shape[0], chunk_size):
        piece, answer = selected[start:start + chunk_size], wanted[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, piece, answer, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(piece, answer, head)
    return total
