"""Chat-templated generation that stops at EOS, on top of transformers' ``generate``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase,
                          StoppingCriteria, StoppingCriteriaList, TextStreamer)

from tunesmith.data.tokenize import encode_prompt, turn_end_token
from tunesmith.models.modes import evaluating


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS, the template's turn-end token, and any EOS ids in the generation config."""
    ids = [tokenizer.eos_token_id]
    turn_end = tokenizer.convert_tokens_to_ids(turn_end_token(tokenizer))
    if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id and turn_end not in ids:
        ids.append(turn_end)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in configured if isinstance(configured, list) else [configured]:
        if value is not None and value not in ids:
            ids.append(value)
    return ids


class _Cancelled(StoppingCriteria):
    """Stops generation once ``event`` is set (a client that went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # under the model's own distribution (before temperature, top_p, penalties or masks)
    top: list[tuple[int, float]]  # the most likely tokens at this step, most likely first: (token, logprob)


class LogprobRecorder(LogitsProcessor):
    """Records each generated token's log-probability and the ``top`` most likely alternatives.

    Put it first among the processors: it sees the logits as the model gave them. A step is recorded
    once its token is known: at the next step, or when ``resolve`` is called (by a streamer, or after
    the last token)."""

    def __init__(self, top: int = 0):
        self.top = top
        self.steps: list[TokenLogprob] = []
        self._last: torch.Tensor | None = None  # (vocab,) log-probabilities of the step not yet resolved

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.resolve(int(input_ids[0, -1]))
        self._last = torch.log_softmax(scores[0].float(), dim=-1)
        return scores

    def resolve(self, token: int) -> TokenLogprob | None:
        """Record ``token`` as the one chosen at the pending step; its record (None if none was pending)."""
        if self._last is None:
            return None
        values, ids = self._last.topk(self.top) if self.top else (self._last[:0], self._last[:0].long())
        self.steps.append(TokenLogprob(token, float(self._last[token]), list(zip(ids.tolist(), values.tolist()))))
        self._last = None
        return self.steps[-1]


@dataclass
class Generation:
    token_ids: list[int]  # the new tokens, EOS excluded
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled"
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when a recorder was given


def _decoding(sampling: SamplingConfig) -> dict:
    """generate()'s decoding arguments: greedy at temperature 0, else sampling."""
    if sampling.temperature <= 0:
        return {"do_sample": False}
    # top_k 0: transformers otherwise adds its default top-k of 50, which no caller asked for.
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}


def generate_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                 sampling: SamplingConfig = SamplingConfig(), streamer: object | None = None,
                 stop: list[str] | None = None, cancel: threading.Event | None = None,
                 processors: list[LogitsProcessor] | None = None, recorder: LogprobRecorder | None = None
                 ) -> Generation:
    """Generate after ``input_ids`` (1, seq): greedy at temperature 0, stops at EOS, a stop string,
    ``max_new_tokens`` or ``cancel``. The text excludes EOS and the stop string.

    ``processors`` change the logits before temperature and top_p (penalties, a grammar's mask);
    ``recorder``, run before them, fills ``Generation.logprobs``."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    kwargs = _decoding(sampling)
    if stop:
        kwargs.update(stop_strings=stop, tokenizer=tokenizer)
    if cancel is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
    chain = ([recorder] if recorder is not None else []) + list(processors or [])
    if chain:
        kwargs["logits_processor"] = LogitsProcessorList(chain)
    eos = stop_token_ids(model, tokenizer)
    with evaluating(model):
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=sampling.max_new_tokens, eos_token_id=eos,
                                pad_token_id=tokenizer.pad_token_id, streamer=streamer, **kwargs)
    new = output[0, input_ids.shape[1]:].tolist()
    if recorder is not None and new:
        recorder.resolve(new[-1])
    ended = bool(new) and new[-1] in eos
    new = new[:-1] if ended else new
    text = tokenizer.decode(new, skip_special_tokens=True)
    cut = min((text.find(s) for s in stop or [] if s in text), default=-1)
    if cut >= 0:
        text, ended = text[:cut], True
    reason = "stop" if ended else "cancelled" if cancel is not None and cancel.is_set() else "length"
    return Generation(new, text, reason, recorder.steps[:len(new)] if recorder is not None else None)


def _cut_at_stop(rows: list[list[int]], eos: list[int]) -> list[list[int]]:
    """Each row cut after its first stop token, which it keeps (a policy learns to stop)."""
    return [row[:next((i + 1 for i, token in enumerate(row) if token in eos), len(row))] for row in rows]


def _sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded over processes (FSDP2, DeepSpeed ZeRO-3): then every process runs the same
    generation, and transformers keeps them in step until the last one is done (``synced_gpus``; it does not
    see our ``fully_shard`` or accelerate's ZeRO-3 on its own)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules()) or any(
        hasattr(p, "ds_id") for p in model.parameters())


def sample_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                 sampling: SamplingConfig) -> list[list[int]]:
    """One sampled completion of each prompt (token ids; greedy at temperature 0), all generated in
    one left-padded batch with a KV cache; each is cut after its first stop token, which it keeps. A DDP
    wrapper is looked through (it has no ``generate``; sampling needs no gradient sync)."""
    sharded = _sharded(model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = stop_token_ids(model, tokenizer)
    with evaluating(model):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **_decoding(sampling),
                                max_new_tokens=sampling.max_new_tokens, eos_token_id=eos, use_cache=True,
                                pad_token_id=pad, synced_gpus=sharded)
    return _cut_at_stop(output[:, width:].tolist(), eos)


def generate_reply(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                   sampling: SamplingConfig = SamplingConfig(), stream: bool = False, prefill: str = "") -> str:
    """The assistant's next reply to ``messages``; generation ends at EOS or ``max_new_tokens``.

    ``prefill`` starts the reply (it is part of the returned text): small models follow a format
    far better when its first words are given.
    """
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    generation = generate_ids(model, tokenizer, encode_prompt(tokenizer, messages, prefill), sampling, streamer)
    return (prefill + generation.text).strip()


def local_generator(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, temperature: float,
                    max_new_tokens: int, seed: int) -> Callable[[str], str]:
    """``tunesmith data synth``'s generator on a local model: a prompt -> a reply that starts after
    "Instruction:", each call with the next seed."""
    counter = iter(range(10**9))

    def generate(prompt: str) -> str:
        sampling = SamplingConfig(max_new_tokens, temperature, 0.95, seed + next(counter))
        return generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], sampling,
                              prefill="Instruction:")

    return generate
