"""Chat-templated generation that stops at EOS, on top of transformers' ``generate``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from tunesmith.train.loop import evaluating


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus any EOS ids in the model's generation config."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in configured if isinstance(configured, list) else [configured]:
        if value is not None and value not in ids:
            ids.append(value)
    return ids


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], prefill: str = ""
                  ) -> torch.Tensor:
    """Token ids of the conversation plus the assistant generation prompt (and the start of the reply,
    ``prefill``), rendered as in training."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, seq)


def generate_reply(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                   sampling: SamplingConfig = SamplingConfig(), stream: bool = False, prefill: str = "") -> str:
    """The assistant's next reply to ``messages``; generation ends at EOS or ``max_new_tokens``.

    ``prefill`` starts the reply (it is part of the returned text): small models follow a format
    far better when its first words are given.
    """
    device = next(model.parameters()).device
    input_ids = encode_prompt(tokenizer, messages, prefill).to(device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    kwargs = {"do_sample": False} if sampling.temperature <= 0 else {
        "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with evaluating(model):
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=sampling.max_new_tokens, eos_token_id=stop_token_ids(model, tokenizer),
                                pad_token_id=tokenizer.pad_token_id, streamer=streamer, **kwargs)
    return (prefill + tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)).strip()
