"""Parity: does an exported model behave like the model that was trained?

Both models are run teacher-forced on fixed chat prompts followed by the reference model's own
greedy continuation. Reported: the largest absolute logit difference, and the share of
continuation positions where the exported model's top token is the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunesmith.data.tokenize import encode_prompt
from tunesmith.models.modes import evaluating

PARITY_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Give me a word that rhymes with 'cat'.",
    "Explain what a noun is in one sentence.",
    "What is 12 times 7?",
    "Name a colour of the rainbow.",
    "How many days are in a week?",
    "Write a haiku about autumn.",
    "What does a thermometer measure?",
    "Suggest a name for a pet goldfish.",
    "Summarise the plot of Cinderella in one sentence.",
    "What is the opposite of 'ancient'?",
    "Convert 3 kilometres to metres.",
    "Who wrote 'Romeo and Juliet'?",
    "Give one tip for sleeping better.",
    "What is the boiling point of water in Celsius?",
    "Describe a cat in five words.",
    "Why is the sky blue? Answer briefly.",
)

# Thresholds an export must meet, by dtype or quantization: (largest |logit difference|, greedy
# agreement). None: reported only. Agreement is teacher-forced on the reference's own greedy
# continuation, so one flipped near-tie costs one position, not the rest of the reply.
THRESHOLDS: dict[str, tuple[float | None, float | None]] = {
    "float32": (1e-3, 0.99),
    "bfloat16": (None, 0.9),
    "float16": (None, 0.99),
    "gguf-f32": (1e-3, 0.99),
    "gguf-f16": (None, 0.99),
    "gguf-bf16": (None, 0.9),
    "gguf-q8_0": (None, 0.8),
    "gguf-q4_0": (None, None),
    "bnb-8bit": (None, 0.7),
    # NF4 keeps 73% of the embedded 135M model's greedy choices on CPU (78-87% on a trained tiny model);
    # an export that lost its adapter keeps 0.3% (tests/export/test_bnb.py).
    "bnb-4bit": (None, 0.5),
}


@dataclass
class Reference:
    """The training-time model's behaviour on the parity prompts."""

    sequences: list[torch.Tensor]  # (seq,) prompt + greedy continuation
    prompt_lengths: list[int]
    logits: list[torch.Tensor]  # (seq, vocab) float32


@dataclass
class ParityReport:
    max_abs_logit_diff: float
    greedy_agreement: float
    positions: int

    def summary(self) -> str:
        return (f"max |logit difference| {self.max_abs_logit_diff:.3g}, greedy agreement "
                f"{100 * self.greedy_agreement:.1f}% over {self.positions} positions")


def _logits(model: PreTrainedModel, sequence: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with evaluating(model):
        return model(input_ids=sequence.unsqueeze(0).to(device)).logits[0].float().cpu()  # (seq, vocab)


def record_reference(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, new_tokens: int = 16,
                     prompts: tuple[str, ...] = PARITY_PROMPTS) -> Reference:
    sequences, lengths, logits = [], [], []
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = encode_prompt(tokenizer, [{"role": "user", "content": prompt}])  # (1, seq)
        with evaluating(model):
            output = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                    max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        sequence = output[0].cpu()
        sequences.append(sequence)
        lengths.append(ids.shape[1])
        logits.append(_logits(model, sequence))
    return Reference(sequences, lengths, logits)


def compare(model: PreTrainedModel, reference: Reference) -> ParityReport:
    worst, agree, positions = 0.0, 0, 0
    for sequence, start, expected in zip(reference.sequences, reference.prompt_lengths, reference.logits):
        logits = _logits(model, sequence)  # (seq, vocab)
        worst = max(worst, float((logits - expected).abs().max()))
        predicted = logits[start - 1:-1].argmax(-1)  # the token each position predicts next
        target = sequence[start:]
        agree += int((predicted == target).sum())
        positions += len(target)
    return ParityReport(worst, agree / max(positions, 1), positions)


def check(report: ParityReport, dtype: str) -> str | None:
    """Why the report fails the thresholds for ``dtype``, or None if it passes."""
    max_diff, min_agreement = THRESHOLDS[dtype]
    if max_diff is not None and report.max_abs_logit_diff > max_diff:
        return f"max |logit difference| {report.max_abs_logit_diff:.3g} > {max_diff:g} for {dtype}"
    if min_agreement is not None and report.greedy_agreement < min_agreement:
        return f"greedy agreement {100 * report.greedy_agreement:.1f}% < {100 * min_agreement:.0f}% for {dtype}"
    return None
