"""Batched generation for the server: one background thread owns the model and decodes every active
request together, one token per step, over one left-padded batch with a KV cache.

The batching is continuous: requests that arrive while others are decoding join the batch
between two steps (their prompts are prefilled together, then their cache rows are left-padded to
the batch's width and concatenated), and a row that finishes leaves at once (its cache rows are
dropped, and the columns that have become padding in every remaining row are trimmed). This is
correct with transformers' ``DynamicCache`` because every layer of it is a plain
``[batch, heads, seq, head_dim]`` tensor that grows by concatenation, and a left-padded position
is masked out of attention and skipped by the position ids. A model whose cache has other layers
(a sliding window, linear attention, shared KV) falls back to dynamic batching: the requests that
wait when a batch starts join it, and the next batch starts when it ends.

Why ours and not transformers' continuous-batching API (``init_continuous_batching``): that API
packs all requests into one row of paged attention (``input_ids`` of shape ``(1, total_tokens)``),
so peft's per-row ``adapter_names`` cannot pick a LoRA adapter per request; it has one seed for
all requests and no stop strings. Here each row names its adapter (``"__base__"`` for the base)
in the forward, samples from its own ``torch.Generator``, and stops at its own strings.

Per row, the rules are those of ``generate_ids``: the stop token ids of ``stop_token_ids``, stop
strings (the text excludes the stop string; the token ids keep the token that completed it),
``max_new_tokens``, greedy at temperature 0 (a lone greedy request decodes token for token as
``generate_ids`` does: same forward, same cache, no mask when no row is padded), else
temperature and top-p. Cancelling a request finishes its rows with ``"cancelled"`` before the
next step.

Adapters come and go while it serves: ``add_adapter`` and ``remove_adapter`` queue a change that the
engine's thread makes between two decoding steps (at once when idle), never during a forward. The
rows in flight decode on with their own adapters, token for token as without the change: a new LoRA
adapter adds per-row branches that the other rows' adapter names skip. The first adapter of a model
without peft wraps it in ``PeftModel`` (``engine.model`` changes; base rows then pass peft's
``"__base__"``); removing the last one unwraps it again (``adapter_load.py``: which folders load, and how).

Use (the engine owns the model while it runs: nothing else may call it or switch its adapters)::

    engine = Engine(model, tokenizer)                       # starts the thread
    handle = engine.submit(prompt_ids, SamplingConfig(16), stop=["\\n"], adapter="first")
    for piece in handle:                                     # streamed text, optional
        print(piece.index, piece.text)
    [completion] = handle.result()                           # token_ids, text, finish_reason, logprobs
    engine.add_adapter("second", "runs/second/model").result()  # a concurrent.futures.Future
    engine.close()

In an asyncio server: ``async for piece in handle.stream()`` and ``await handle.wait()`` (``handle.py``).
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel
from transformers import (DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase,
                          TemperatureLogitsWarper, TopPLogitsWarper)
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from tunesmith.generate.sample import LogprobRecorder, SamplingConfig, generate_ids, stop_token_ids
from tunesmith.models.modes import evaluating
from tunesmith.serve.adapter_load import load_adapter, mixable, read_adapter_config, unload_adapter
from tunesmith.serve.handle import Completion, EngineError, FinishReason, Handle, TokenLogprob
from tunesmith.serve.prefix import PrefixCache

BASE = "__base__"  # peft's name for "no adapter" in a row of ``adapter_names``


class RowProcessor(Protocol):
    """Changes one row's next-token logits before the token is chosen (penalties, a bias, a grammar's
    mask). One instance per completion: it may keep state, since it sees the row's tokens grow by one
    token per call. Logprobs are taken before it, from the model's own distribution."""

    def __call__(self, tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        """``tokens``: the completion's tokens so far; ``logits``: (vocab,) float32. Returns the new logits."""


@dataclass
class _Request:
    prompt: list[int]
    sampling: SamplingConfig
    stop: list[str]
    adapter: str | None
    top_logprobs: int | None
    n: int
    cancel: threading.Event
    handle: Handle
    processors: Callable[[], list[RowProcessor]] | None = None


@dataclass
class _Row:
    """One completion being decoded: a row of the batch."""

    request: _Request
    index: int
    generator: torch.Generator | None  # None: greedy
    processors: list[RowProcessor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already streamed
    logprobs_sent: int = 0  # entries of ``logprobs`` already streamed

    @property
    def gone(self) -> bool:
        """Cancelled, or its request has failed (another of its rows did)."""
        return self.request.cancel.is_set() or self.request.handle.done


@dataclass
class _Batch:
    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # (batch, width) long: 1 for a real token, 0 for left padding
    logits: torch.Tensor  # (batch, vocab) float32: each row's next-token logits


@dataclass
class _Change:
    """A change of the model's adapters, made on the engine's thread between two decoding steps."""

    make: Callable[[], None]
    ready: Callable[[_Batch | None], bool]  # whether it can be made with this batch in flight (always when None)
    blocks: bool  # while it is not ready, no request joins the batch, which drains until it is
    done: Future[None] = field(default_factory=Future)


def streamable(text: str, stop: list[str], whole_words: bool = False) -> int:
    """How much of a growing ``text`` can be streamed now: not a tail that may begin a stop string,
    not a trailing incomplete character, and with ``whole_words`` not the last word (a tokenizer
    that cleans up spaces, ``" ."`` -> ``"."``, may still change how the next token joins it).

    >>> streamable("Hello wor", []), streamable("Hello wor", [], whole_words=True)
    (9, 5)
    >>> streamable("one two\ufffd", []), streamable("ab c", ["b c d"]), streamable("ab c", ["x"])
    (7, 1, 4)
    """
    end = len(text.rstrip("\ufffd"))
    if whole_words:
        last_space = re.search(r"\s\S*\Z", text[:end])
        end = last_space.start() if last_space else 0
    longest = max((len(s) for s in stop), default=0)
    for start in range(max(0, len(text) - longest + 1), end):
        if any(s.startswith(text[start:]) for s in stop):
            return start
    return end


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros in front along ``dim`` (negative) up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    return F.pad(tensor, (0, 0) * (-dim - 1) + (missing, 0))


def _joinable(cache: DynamicCache) -> bool:
    """Whether rows can be added to and removed from ``cache`` by padding and slicing its tensors."""
    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch of ``a``'s rows then ``b``'s, right-aligned: the narrower is left-padded.

    DynamicCache has no way to concatenate two caches along the batch (only to select or repeat
    rows), so this edits its layers' tensors directly; ``_joinable`` checks they are plain ones."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for mine, theirs in zip(a.cache.layers, b.cache.layers, strict=True):
        mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
        mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
    mask = torch.cat([_pad_left(a.mask, width, -1), _pad_left(b.mask, width, -1)])
    return _Batch(a.rows + b.rows, a.cache, mask, torch.cat([a.logits, b.logits]))


def _select(batch: _Batch, keep: list[int]) -> _Batch | None:
    """The batch of the rows ``keep``, without the columns that are padding in all of them. A cache whose
    layers are not plain (a sliding window keeps only its last tokens, so its columns do not line up
    with the mask) only has its rows selected."""
    if not keep:
        return None
    if len(keep) == len(batch.rows):
        return batch
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]  # (kept, width)
    if not _joinable(batch.cache):
        batch.cache.batch_select_indices(index)
        return _Batch([batch.rows[i] for i in keep], batch.cache, mask, batch.logits[index])
    start = int(mask.any(dim=0).nonzero()[0])
    for layer in batch.cache.layers:
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
    return _Batch([batch.rows[i] for i in keep], batch.cache, mask[:, start:], batch.logits[index])


def _failed(error: BaseException) -> Future[None]:
    future: Future[None] = Future()
    future.set_exception(error)
    return future


class Engine:
    """Decodes all submitted requests together on one thread (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch_size: int = 32,
                 prefix_cache_bytes: int = 256 << 20):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.device = next(model.parameters()).device
        plain = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
        self.plain_cache = plain  # rows can be joined, and prefixes reused, by editing the cache's tensors
        self.prefixes = PrefixCache(prefix_cache_bytes) if plain and prefix_cache_bytes > 0 else None
        self.stop_ids = set(stop_token_ids(model, tokenizer))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.adapters, self.mixed = self._adapter_mode(model)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.whole_words = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._waiting: list[_Request] = []
        self._changes: list[_Change] = []  # adapter changes not made yet, oldest first
        self._retiring: set[str] = set()  # adapters being removed: no new request may use them
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int] | torch.Tensor, sampling: SamplingConfig, stop: list[str] | None = None,
               adapter: str | None = None, cancel: threading.Event | None = None, n: int = 1,
               top_logprobs: int | None = None, processors: Callable[[], list[RowProcessor]] | None = None
               ) -> Handle:
        """Queue ``n`` completions of ``prompt_ids`` (a list, or a (1, seq) tensor). ``adapter``: a peft
        adapter name of the model, or None for the base. ``top_logprobs``: None for no logprobs, else
        each token's logprob and the k most likely alternatives. ``processors``: called once per
        completion, the logits processors of that completion. Rows of a request with a seed use
        seeds ``seed``, ``seed + 1``, ..."""
        prompt = prompt_ids.flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        self._check(prompt, sampling, n, top_logprobs)
        cancel = cancel if cancel is not None else threading.Event()
        request = _Request(prompt, sampling, [s for s in stop or [] if s], adapter, top_logprobs, n, cancel,
                           Handle(n, cancel), processors)
        with self._wakeup:  # with the adapter check: a removal sees every request that passed it
            if self._closed:
                raise EngineError("the engine is closed")
            self._check_adapter(adapter)
            self._waiting.append(request)
            self._wakeup.notify()
        return request.handle

    def add_adapter(self, name: str, folder: Path | str) -> Future[None]:
        """Load the LoRA-family PEFT adapter in ``folder`` as the model's adapter ``name``, on the engine's
        thread between two decoding steps; the future is done once requests may name it. It fails with
        ValueError, the engine left as it was, for a name loaded already, a folder that is not such an
        adapter (prompt learning included), or an adapter that does not fit the model (see ``check_fit``:
        another base model of the same shapes cannot be told apart). An adapter peft cannot mix per row
        (DoRA, LoHa, LoKr) turns a mixing engine into one adapter per batch: it waits, admitting no
        request, until the rows in flight share one adapter."""
        folder = Path(folder)
        try:
            config = read_adapter_config(folder)
        except ValueError as error:
            return _failed(error)

        def ready(batch: _Batch | None) -> bool:
            return (batch is None or not self.mixed or mixable(config)
                    or len({row.request.adapter for row in batch.rows}) == 1)

        return self._queue(_Change(lambda: self._load_adapter(name, folder, config), ready, blocks=True))

    def remove_adapter(self, name: str) -> Future[None]:
        """Unload adapter ``name``: from now on requests for it are refused; those in flight or waiting
        finish first (other requests go on joining), then the engine's thread deletes it and the future is
        done. Removing the last adapter unwraps the model from ``PeftModel``. ValueError for a name not loaded."""
        with self._wakeup:
            if name not in (self.adapters or ()) or name in self._retiring:
                return _failed(ValueError(f"adapter {name!r} is not loaded (or is being removed already)"))
            self._retiring.add(name)
        return self._queue(_Change(lambda: self._unload_adapter(name), lambda batch: not self._in_use(name, batch),
                                   blocks=False))

    def close(self) -> None:
        """Stop the thread; requests not finished fail with ``EngineError``."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _queue(self, change: _Change) -> Future[None]:
        with self._wakeup:
            if self._closed:
                change.done.set_exception(EngineError("the engine is closed"))
            else:
                self._changes.append(change)
                self._wakeup.notify()
        return change.done

    def _in_use(self, name: str, batch: _Batch | None) -> bool:
        """Whether a row in flight or a waiting request uses adapter ``name``."""
        with self._wakeup:
            if any(request.adapter == name for request in self._waiting):
                return True
        return batch is not None and any(row.request.adapter == name for row in batch.rows)

    def _make_changes(self, batch: _Batch | None) -> bool:
        """Make the pending adapter changes that can be made with ``batch`` in flight, oldest first (on the
        engine's thread, between two forwards). False while one that blocks admission is not ready."""
        with self._wakeup:
            pending = list(self._changes)
        for change in pending:
            if not change.ready(batch):
                if change.blocks:
                    return False
                continue
            with self._wakeup:
                self._changes.remove(change)
            try:
                change.make()
            except Exception as error:  # the change failed and left the model as it was: serving goes on
                change.done.set_exception(error)
            else:
                change.done.set_result(None)
        return True

    def _load_adapter(self, name: str, folder: Path, config: PeftConfig) -> None:
        """On the engine's thread: load the adapter, or undo what was done of it and raise ValueError."""
        if name == BASE or name in (self.adapters or ()):
            raise ValueError(f"adapter {name!r}: a name loaded already; remove that adapter first, or choose another")
        with load_adapter(self.model, name, folder, config, self.device) as loaded:
            adapters, mixed = self._adapter_mode(loaded)
        with self._wakeup:
            self.model, self.adapters, self.mixed = loaded, adapters, mixed

    def _unload_adapter(self, name: str) -> None:
        """On the engine's thread, once no row uses it: delete the adapter (unwrap after the last one)."""
        assert isinstance(self.model, PeftModel)
        model = unload_adapter(self.model, name)
        if self.prefixes is not None:  # its keys and values may be cached under its name, which may come back
            self.prefixes = PrefixCache(self.prefixes.capacity_bytes, self.prefixes.block)
        adapters, mixed = self._adapter_mode(model)
        with self._wakeup:
            self.model, self.adapters, self.mixed = model, adapters, mixed
            self._retiring.discard(name)

    @staticmethod
    def _adapter_mode(model: PreTrainedModel) -> tuple[set[str] | None, bool]:
        """(the peft adapter names, or None without peft; whether rows of different adapters can share a
        batch). peft mixes adapters per row (``adapter_names``) for LoRA only, not with DoRA; other
        adapter kinds run one adapter per batch. Prompt learning (prefix, prompt, p-tuning) supplies its
        own past keys and values, which this engine's cache cannot hold: ``SequentialEngine`` serves it."""
        if not isinstance(model, PeftModel):
            return None, True
        configs = list(model.peft_config.values())
        if any(config.is_prompt_learning for config in configs):
            raise ValueError("prompt-learning adapters (prefix, prompt or p-tuning) cannot be batched by this "
                             "engine; serve them with SequentialEngine")
        return set(model.peft_config), all(mixable(config) for config in configs)

    def _check(self, prompt: list[int], sampling: SamplingConfig, n: int, top_logprobs: int | None) -> None:
        if not prompt:
            raise ValueError("prompt_ids: empty; a request needs at least one prompt token")
        if not 0 <= min(prompt) <= max(prompt) < self.vocab_size:  # one bad row would fail its whole batch
            raise ValueError(f"prompt_ids: token ids from {min(prompt)} to {max(prompt)}; the model's "
                             f"vocabulary has ids 0 to {self.vocab_size - 1}")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens: {sampling.max_new_tokens}; use 1 or more")
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"n: {n}; use 1 to {self.max_batch_size} (the engine's max_batch_size)")
        if top_logprobs is not None and not 0 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs: {top_logprobs}; use 0 to 20, or None for no logprobs")

    def _check_adapter(self, adapter: str | None) -> None:
        """(Under ``_wakeup``.) ValueError for an adapter not loaded, or being removed."""
        if adapter is not None and (adapter not in (self.adapters or ()) or adapter in self._retiring):
            known = ", ".join(sorted(set(self.adapters or ()) - self._retiring)) or "none (the model has no adapters)"
            being = " (it is being removed)" if adapter in self._retiring else ""
            raise ValueError(f"adapter: {adapter!r} is not loaded on the model{being}; loaded: {known}")

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._waiting and not self._changes and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    break
            self._serve_until_idle()
        with self._wakeup:
            waiting, self._waiting = self._waiting, []
            changes, self._changes = self._changes, []
        for request in waiting:
            request.handle._fail(EngineError("the engine closed before the request started"))
        for change in changes:
            change.done.set_exception(EngineError("the engine closed before the adapter change was made"))

    def _serve_until_idle(self) -> None:
        """Decode until no row is left and none waits: change adapters, admit, choose tokens, drop finished
        rows, step."""
        batch: _Batch | None = None
        rows: list[_Row] = []
        try:
            with evaluating(self.model):
                while not self._closed:
                    joining = self._take_waiting(batch) if self._make_changes(batch) else []
                    if joining:
                        rows = (batch.rows if batch else []) + [row for request in joining for row in request]
                        batch = self._admit(batch, joining)
                        rows = batch.rows if batch else []
                    if batch is None:
                        return
                    keep, tokens = self._step(batch)
                    batch = _select(batch, keep)
                    rows = batch.rows if batch else []
                    if batch is not None:
                        self._decode(batch, tokens)
                error: BaseException = EngineError("the engine was closed")
        except Exception as caught:  # the rows in flight fail; the engine goes on with the next requests
            error = caught
        for row in rows:
            row.request.handle._fail(error)

    def _take_waiting(self, batch: _Batch | None) -> list[list[_Row]]:
        """The rows of the waiting requests that fit in the batch (all, with room), oldest first, one
        list per request. When adapters cannot share a batch, only requests for the batch's adapter
        join it, and none once an older request waits for another adapter (the batch then drains)."""
        if batch is not None and not _joinable(batch.cache):
            return []  # dynamic batching: this batch runs to its end
        room = self.max_batch_size - (len(batch.rows) if batch else 0)
        taken: list[_Request] = []
        with self._wakeup:
            adapter = batch.rows[0].request.adapter if batch else self._waiting[0].adapter if self._waiting else None
            while self._waiting and self._waiting[0].n <= room and (self.mixed or self._waiting[0].adapter == adapter):
                request = self._waiting.pop(0)
                room -= request.n
                taken.append(request)
        joining = []
        for request in taken:
            try:
                rows = [_Row(request, index, self._generator(request.sampling, index),
                             request.processors() if request.processors is not None else [])
                        for index in range(request.n)]
            except Exception as error:  # its processors could not be made: this request fails, alone
                request.handle._fail(error)
                continue
            if request.cancel.is_set():  # cancelled while it waited: no prefill for it
                for row in rows:
                    self._finish(row, "cancelled")
            else:
                joining.append(rows)
        return joining

    def _admit(self, batch: _Batch | None, joining: list[list[_Row]]) -> _Batch | None:
        """``batch`` with the joining requests' rows, prefilled together. If that prefill fails, each
        request is prefilled alone and only those that fail again fail (a joinable cache; otherwise
        they all fail)."""
        try:
            new: _Batch | None = self._prefill([row for rows in joining for row in rows])
        except Exception as error:
            if len(joining) == 1 or not self.plain_cache:
                for rows in joining:
                    rows[0].request.handle._fail(error)
                return batch
            new = None
            for rows in joining:
                try:
                    part = self._prefill(rows)
                except Exception as alone:
                    rows[0].request.handle._fail(alone)
                    continue
                new = part if new is None else _merge(new, part)
        if new is None:
            return batch
        return new if batch is None else _merge(batch, new)

    def _generator(self, sampling: SamplingConfig, index: int) -> torch.Generator | None:
        """A sampled row's own generator, seeded ``seed + index`` (a random seed without one); None for greedy."""
        if sampling.temperature <= 0:
            return None
        generator = torch.Generator(self.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed((sampling.seed + index) % 2**64)
        return generator

    def _forward(self, rows: list[_Row], input_ids: torch.Tensor, mask: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """The next-token logits (batch, vocab) after ``input_ids`` (batch, new), ``mask`` covering the
        cache and the new tokens. Without padding, no mask: the path ``generate`` takes."""
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -input_ids.shape[1]:]  # (batch, new)
        extra = {}
        if self.adapters is not None and self.mixed:
            extra["adapter_names"] = [row.request.adapter or BASE for row in rows]
        with self._selected(rows[0].request.adapter):
            output = self.model(input_ids=input_ids, attention_mask=None if bool(mask.all()) else mask,
                                position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return output.logits[:, -1].to(dtype=torch.float32, copy=True)

    @contextmanager
    def _selected(self, adapter: str | None) -> Iterator[None]:
        """Adapters that cannot share a batch: the batch's one adapter active (none, for the base)."""
        if self.adapters is None or self.mixed:
            yield
        elif adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    def _prefill(self, rows: list[_Row]) -> _Batch:
        """The rows' prompts through the model: rows whose prompt begins with a cached prefix start from
        it (one forward per cached length), the others from nothing; their prefixes are cached after."""
        groups: dict[int, list[tuple[_Row, list]]] = {}
        for row in rows:
            found = self.prefixes.match(row.request.adapter, row.request.prompt) if self.prefixes else (0, [])
            groups.setdefault(found[0], []).append((row, found[1]))
        batch: _Batch | None = None
        for length, members in groups.items():
            part = self._prefill_after(length, members)
            batch = part if batch is None else _merge(batch, part)
        assert batch is not None
        if self.prefixes is not None:
            self._keep_prefixes(batch)
        return batch

    def _prefill_after(self, cached: int, members: list[tuple[_Row, list]]) -> _Batch:
        """Prefill rows that share the length ``cached`` of their cached prefix: their cache starts as
        the prefixes' keys and values, and the rest of each prompt, left-padded, goes through the model
        (the padding then sits between prefix and rest, masked like any other)."""
        rows = [row for row, _ in members]
        rests = [row.request.prompt[cached:] for row in rows]
        width = max(len(rest) for rest in rests)
        ids = [[self.pad_id] * (width - len(rest)) + rest for rest in rests]
        mask = [[1] * cached + [0] * (width - len(rest)) + [1] * len(rest) for rest in rests]
        cache = DynamicCache(config=self.model.config)
        for index in range(len(cache.layers) if cached else 0):
            cache.update(torch.stack([layers[index][0] for _, layers in members]),
                         torch.stack([layers[index][1] for _, layers in members]), index)
        input_ids = torch.tensor(ids, device=self.device)  # (batch, width)
        mask_tensor = torch.tensor(mask, device=self.device)  # (batch, cached + width)
        return _Batch(rows, cache, mask_tensor, self._forward(rows, input_ids, mask_tensor, cache))

    def _keep_prefixes(self, batch: _Batch) -> None:
        """Each request's prompt keys and values (its real columns of the cache) into the prefix cache."""
        assert self.prefixes is not None
        seen: set[int] = set()
        for i, row in enumerate(batch.rows):
            if id(row.request) in seen or self.prefixes.covers(row.request.adapter, row.request.prompt):
                continue
            seen.add(id(row.request))
            columns = batch.mask[i].nonzero().flatten()  # (len(prompt),)
            self.prefixes.add(row.request.adapter, row.request.prompt,
                              [(layer.keys[i][:, columns], layer.values[i][:, columns]) for layer in batch.cache.layers])

    def _decode(self, batch: _Batch, tokens: list[int]) -> None:
        batch.mask = F.pad(batch.mask, (0, 1), value=1)  # (batch, width + 1)
        input_ids = torch.tensor(tokens, device=self.device)[:, None]  # (batch, 1)
        batch.logits = self._forward(batch.rows, input_ids, batch.mask, batch.cache)

    def _step(self, batch: _Batch) -> tuple[list[int], list[int]]:
        """Choose each row's next token and finish the rows that are done: (rows that go on, their tokens)."""
        scores = self._processed(batch)
        chosen = self._choose(batch, scores)
        logprobs = self._logprobs(batch, chosen)
        keep, tokens = [], []
        for i, row in enumerate(batch.rows):
            reason = "cancelled" if row.gone else self._advance(row, chosen[i], logprobs[i])
            if reason is None:
                keep.append(i)
                tokens.append(chosen[i])
            else:
                self._finish(row, reason)
        return keep, tokens

    def _processed(self, batch: _Batch) -> torch.Tensor:
        """The logits after each row's processors. A processor that fails fails its request only."""
        if not any(row.processors for row in batch.rows):
            return batch.logits
        scores = batch.logits.clone()
        for i, row in enumerate(batch.rows):
            if row.gone:
                continue
            try:
                for processor in row.processors:
                    scores[i] = processor(row.tokens, scores[i])
            except Exception as error:
                row.request.handle._fail(error)
        return scores

    def _choose(self, batch: _Batch, scores: torch.Tensor) -> list[int]:
        """Greedy rows: argmax. Sampled rows: transformers' temperature and top-p warpers (they take one
        value for a whole batch, so rows are grouped by their values), then a draw from the row's own
        generator (``generate`` draws all rows from the global one)."""
        chosen = scores.argmax(dim=-1)  # (batch,)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(batch.rows):
            if row.generator is not None and not row.gone:
                groups.setdefault((row.request.sampling.temperature, row.request.sampling.top_p), []).append(i)
        for (temperature, top_p), members in groups.items():
            warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
            probs = warpers(None, scores[members]).softmax(dim=-1)  # (group, vocab)
            for j, i in enumerate(members):
                chosen[i] = torch.multinomial(probs[j], 1, generator=batch.rows[i].generator)[0]
        return chosen.tolist()

    def _logprobs(self, batch: _Batch, chosen: list[int]) -> list[TokenLogprob | None]:
        wanted = [i for i, row in enumerate(batch.rows) if row.request.top_logprobs is not None]
        found: list[TokenLogprob | None] = [None] * len(batch.rows)
        if not wanted:
            return found
        logprobs = batch.logits[wanted].log_softmax(dim=-1)  # (wanted, vocab)
        k = max(batch.rows[i].request.top_logprobs or 0 for i in wanted)
        top_values, top_ids = logprobs.topk(k, dim=-1)  # (wanted, k), sorted, most likely first
        for j, i in enumerate(wanted):
            keep = batch.rows[i].request.top_logprobs or 0
            top = list(zip(top_ids[j, :keep].tolist(), top_values[j, :keep].tolist()))
            found[i] = TokenLogprob(chosen[i], float(logprobs[j, chosen[i]]), top)
        return found

    def _advance(self, row: _Row, token: int, logprob: TokenLogprob | None) -> FinishReason | None:
        """Add ``token`` to the row and stream what is safe; the finish reason once the row is done."""
        if token in self.stop_ids:
            return "stop"
        row.tokens.append(token)
        if logprob is not None:
            row.logprobs.append(logprob)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in row.request.stop if s in text), default=-1)
        row.text = text[:cut] if cut >= 0 else text
        if cut >= 0:
            return "stop"
        if len(row.tokens) >= row.request.sampling.max_new_tokens:
            return "length"
        ready = streamable(row.text, row.request.stop, self.whole_words)
        if ready > row.sent:
            row.request.handle._emit(row.index, row.text[row.sent:ready], row.logprobs[row.logprobs_sent:])
            row.sent, row.logprobs_sent = ready, len(row.logprobs)
        return None

    def _finish(self, row: _Row, reason: FinishReason) -> None:
        logprobs = row.logprobs if row.request.top_logprobs is not None else None
        row.request.handle._complete(row.index, Completion(row.tokens, row.text, reason, logprobs),
                                     row.text[row.sent:], row.logprobs[row.logprobs_sent:])



class _RowLogits(LogitsProcessor):
    """A completion's row processors as one of ``generate``'s logits processors (batch of one)."""

    def __init__(self, processors: list[RowProcessor], prompt_length: int):
        self.processors, self.prompt_length = processors, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = input_ids[0, self.prompt_length:].tolist()
        row = scores[0].float()
        for processor in self.processors:
            row = processor(tokens, row)
        return row[None].to(scores.dtype)


class _RowStreamer(BaseStreamer):
    """``generate``'s streamer for one completion: each new token through the engine's own rules for
    what may be streamed (the first call carries the prompt)."""

    def __init__(self, engine: SequentialEngine, row: _Row, recorder: LogprobRecorder | None):
        self.engine, self.row, self.recorder, self.prompt_seen, self.done = engine, row, recorder, False, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            step = self.recorder.resolve(token) if self.recorder is not None else None
            logprob = TokenLogprob(step.token, step.logprob, step.top) if step is not None else None
            if not self.done:
                self.done = self.engine._advance(self.row, token, logprob) is not None

    def end(self) -> None:
        """Nothing to flush: the completion's last text goes with it (``Engine._finish``)."""


class SequentialEngine(Engine):
    """The engine's interface over transformers' ``generate``, one completion after another, for the
    models the batching engine cannot serve: prompt-learning adapters, whose prefix ``generate``
    puts in front of the cache itself. Same handles, same rules per completion."""

    @staticmethod
    def _adapter_mode(model: PreTrainedModel) -> tuple[set[str] | None, bool]:
        """Never mixed: ``Engine._selected`` then makes the request's adapter the active one."""
        return (set(model.peft_config) if isinstance(model, PeftModel) else None), False

    def _serve_until_idle(self) -> None:
        while not self._closed:
            self._make_changes(None)  # between two requests: no forward runs
            with self._wakeup:
                if not self._waiting:
                    return
                request = self._waiting.pop(0)
            for index in range(request.n):
                try:
                    row = _Row(request, index, None,
                               request.processors() if request.processors is not None else [])
                    reason = "cancelled" if row.gone else self._generate(row)
                except Exception as error:  # this request fails; the engine goes on with the next
                    request.handle._fail(error)
                    break
                self._finish(row, reason)

    def _generate(self, row: _Row) -> FinishReason:
        request = row.request
        sampling = request.sampling
        if sampling.seed is not None:
            sampling = SamplingConfig(sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                                      (sampling.seed + row.index) % 2**64)
        recorder = LogprobRecorder(request.top_logprobs or 0) if request.top_logprobs is not None else None
        processors = [_RowLogits(row.processors, len(request.prompt))] if row.processors else []
        with self._selected(request.adapter):
            generation = generate_ids(self.model, self.tokenizer, torch.tensor([request.prompt], device=self.device),
                                      sampling, _RowStreamer(self, row, recorder), request.stop, request.cancel,
                                      processors, recorder)
        row.tokens, row.text = generation.token_ids, generation.text
        row.logprobs = [TokenLogprob(s.token, s.logprob, s.top) for s in generation.logprobs or []]
        row.logprobs_sent = min(row.logprobs_sent, len(row.logprobs))
        row.sent = min(row.sent, len(row.text))
        return generation.finish_reason  # type: ignore[return-value]


def engine_for(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch_size: int = 32,
               batched: bool = True, prefix_cache_bytes: int = 256 << 20) -> Engine:
    """The batching engine; the sequential one when asked for, or for prompt-learning adapters."""
    learns_prompts = isinstance(model, PeftModel) and any(c.is_prompt_learning for c in model.peft_config.values())
    if batched and not learns_prompts:
        return Engine(model, tokenizer, max_batch_size, prefix_cache_bytes)
    return SequentialEngine(model, tokenizer, max_batch_size, prefix_cache_bytes=0)
