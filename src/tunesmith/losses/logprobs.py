"""Log-probabilities and scores of label tokens: what DPO, reward models, GRPO, PPO and evaluation
share (beside the losses that consume them, so no recipe imports another).

A batch is padded (an attention mask, a row per batch row) or packed padding-free (one row whose
position ids restart at each sequence); every helper here handles both.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

from tunesmith.data.collate import count_rows
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.models.fastpath import decoder_and_head, through_wrapper, unwrapped_parts


def label_outputs(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True, hidden_states: bool = False
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """At each position that predicts a label token: (the final hidden state (tokens, hidden), the
    logits (tokens, vocab), the label (tokens,), the index of its sequence (tokens,)). The head runs
    at those positions only where the model allows (``decoder_and_head``). Off that path the hidden
    states are asked for only with ``hidden_states`` (else None): every layer's would stay alive."""
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    targets = labels[:, 1:]  # (batch, seq-1)
    mask = targets != IGNORE_INDEX
    parts = decoder_and_head(model) if chunked else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1][mask]
        logits = head(hidden)
    else:
        out = model(**inputs, use_cache=False, output_hidden_states=hidden_states)
        hidden = out.hidden_states[-1][:, -labels.shape[1]:][:, :-1][mask] if hidden_states else None
        logits = out.logits[:, -labels.shape[1]:][:, :-1][mask]
    if "attention_mask" in batch or "position_ids" not in batch:  # padded: a row per batch row
        row = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)
    else:  # packed: rows start where the position ids restart
        row = ((batch["position_ids"] == 0).cumsum(-1) - 1)[:, 1:].expand_as(targets)
    return hidden, logits, targets[mask], row[mask]


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each label token, the index of its sequence), both (tokens,)."""
    _, logits, targets, row = label_outputs(model, batch, chunked)
    return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1), row


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's label tokens, their count), both (rows,)."""
    values, index = token_logps(model, batch, chunked)
    rows = count_rows(batch)
    sums = values.new_zeros(rows).index_add(0, index, values)
    counts = values.new_zeros(rows).index_add(0, index, torch.ones_like(values))
    return sums, counts


def reward_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A reward model's score of each sequence, (rows,): the scoring head on the hidden state of the
    sequence's last token (its EOS), found from the attention mask (padded) or the position-id
    restarts (packed). transformers' own pooling looks for the first pad token, which is ambiguous
    where pad and EOS are one token and breaks on packed rows; this is used in training and scoring."""
    wrapper, model = unwrapped_parts(model)  # under DDP the wrapper's forward runs (gradients sync)
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    backbone = through_wrapper(wrapper, model, getattr(inner, inner.base_model_prefix))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (batch, seq, hidden)
    if "attention_mask" in batch:
        last = batch["attention_mask"].sum(1) - 1  # right padding
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        starts = torch.nonzero(batch["position_ids"][0] == 0).flatten()
        ends = torch.cat([starts[1:], starts.new_tensor([hidden.shape[1]])]) - 1
        pooled = hidden[0, ends]
    return inner.score(pooled).squeeze(-1).float()
