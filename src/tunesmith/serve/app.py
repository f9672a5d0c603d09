"""An OpenAI-compatible HTTP server over the project's own generation code.

Routes: /health, /v1/models, /v1/chat/completions (streaming SSE or not), /v1/completions.
Several LoRA adapters share one base model; the request's ``model`` field picks one (the base
is served under its own name). Protection: an optional API key (401), a body size limit (413),
prompt + max_tokens over the context (400, OpenAI-style error body), a bounded queue (429 with
Retry-After), and a client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

from tunesmith.data.tokenize import encode_prompt
from tunesmith.generate.sample import SamplingConfig, generate_ids


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, n=1, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str


@dataclass
class Served:
    """One base model, its tokenizer, and the adapter names loaded on it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> peft adapter name
    default_max_tokens: int = 256

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    @property
    def context_length(self) -> int:
        config = getattr(self.model, "config", None)
        return int(getattr(config, "max_position_embeddings", 2048))

    @contextmanager
    def selected(self, name: str):
        """The adapter ``name`` active (or none, for the base) for the duration of the block."""
        if not self.adapters:
            yield
        elif name == self.base_name:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(self.adapters[name])
            yield


class _Gate:
    """At most ``capacity`` requests admitted at once (beyond that: refuse). They take turns on
    the one model object through ``lock``: adapter selection changes the model, so two generations
    never overlap."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.inside = 0
        self.lock = threading.Lock()

    def try_enter(self) -> bool:
        if self.inside >= self.capacity:
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        self.inside -= 1


class _Ticket:
    """A place in the gate, given back exactly once: by the request, or by the garbage collector
    when a streaming response is dropped before its body ever started."""

    def __init__(self, gate: _Gate):
        self.gate, self.held = gate, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.leave()


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def create_app(served: Served, api_key: str | None = None, max_concurrency: int = 8,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """``max_concurrency``: requests admitted at once, one generating and the others waiting."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None)
    gate = _Gate(max_concurrency)

    @app.middleware("http")
    async def protect(request: Request, call_next):
        if request.url.path != "/health":
            if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_request_error",
                              code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and int(length) > max_body_bytes:
                return _error(413, f"request body over {max_body_bytes} bytes", "invalid_request_error")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": served.names, "queued": gate.inside}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tunesmith"}
                                           for name in served.names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        return await _complete(served, gate, body, encode_prompt(served.tokenizer, messages), request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ids = served.tokenizer(body.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return await _complete(served, gate, body, ids, request, chat=False)

    return app


def _sampling(body: _Request, served: Served) -> SamplingConfig:
    limit = body.max_completion_tokens or body.max_tokens or served.default_max_tokens
    return SamplingConfig(limit, body.temperature, body.top_p, body.seed)


async def _complete(served: Served, gate: _Gate, body: _Request, input_ids: torch.Tensor, request: Request,
                    chat: bool):
    if body.model not in served.names:
        return _error(404, f"model {body.model!r} is not served; available: {', '.join(served.names)}",
                      "invalid_request_error", "model", "model_not_found")
    sampling = _sampling(body, served)
    prompt_tokens = int(input_ids.shape[1])
    if prompt_tokens + sampling.max_new_tokens > served.context_length:
        return _error(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({sampling.max_new_tokens}) exceeds the "
                      f"context length of {served.context_length} tokens", "invalid_request_error", "max_tokens",
                      "context_length_exceeded")
    if not gate.try_enter():
        return _error(429, "too many requests in the queue; retry shortly", "rate_limit_error",
                      headers={"Retry-After": "1"})
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    cancel = threading.Event()
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def run(streamer=None):
        try:
            with gate.lock, served.selected(body.model):
                return generate_ids(served.model, served.tokenizer, input_ids, sampling, streamer, stop, cancel)
        except BaseException:
            if streamer is not None:
                streamer.end()  # the reader must not wait for text that will never come
            raise

    if body.stream:
        ticket = _Ticket(gate)
        events = _stream(served, body, run, cancel, ident, chat, request, ticket)
        weakref.finalize(events, ticket.release)
        return StreamingResponse(events, media_type="text/event-stream")
    watcher = asyncio.create_task(_watch_disconnect(request, cancel))
    try:
        generation = await asyncio.to_thread(run)
    finally:
        watcher.cancel()
        gate.leave()
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(generation.token_ids),
             "total_tokens": prompt_tokens + len(generation.token_ids)}
    reason = "length" if generation.finish_reason == "length" else "stop"
    choice = ({"index": 0, "message": {"role": "assistant", "content": generation.text}, "finish_reason": reason}
              if chat else {"index": 0, "text": generation.text, "finish_reason": reason, "logprobs": None})
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model, "choices": [choice], "usage": usage}


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.1)


def _chunk(ident: str, model: str, chat: bool, text: str | None, reason: str | None, role: bool = False) -> str:
    if chat:
        delta: dict[str, Any] = {"content": text} if text is not None else {}
        if role:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
    payload = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
               "created": int(time.time()), "model": model, "choices": [choice]}
    return f"data: {json.dumps(payload)}\n\n"


def _safe_prefix(text: str, stop: list[str]) -> int:
    """How much of ``text`` can be sent: up to a stop string, and not a tail that may begin one.

    >>> _safe_prefix("hello wor", ["world"]), _safe_prefix("hello world!", ["world"]), _safe_prefix("abc", [])
    (6, 6, 3)
    """
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    if cut >= 0:
        return cut
    for start in range(max(0, len(text) - max((len(s) for s in stop), default=0) + 1), len(text)):
        if any(s.startswith(text[start:]) for s in stop):
            return start
    return len(text)


async def _stream(served: Served, body: _Request, run, cancel: threading.Event, ident: str,
                  chat: bool, request: Request, ticket: _Ticket) -> AsyncIterator[str]:
    """Server-sent events whose chunks concatenate to the non-streamed text (text that may begin a
    stop string is held back until it is clear). A client that goes away cancels the generation."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    try:
        streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        task = asyncio.create_task(asyncio.to_thread(run, streamer))
        if chat:
            yield _chunk(ident, body.model, chat, "", None, role=True)
        received, sent = "", 0
        iterator = iter(streamer)
        while (piece := await asyncio.to_thread(next, iterator, None)) is not None:
            if await request.is_disconnected():
                cancel.set()
                break
            received += piece
            ready = _safe_prefix(received, stop)
            if ready > sent:
                yield _chunk(ident, body.model, chat, received[sent:ready], None)
                sent = ready
        generation = await task
        if len(generation.text) > sent:  # what was held back and turned out not to be a stop string
            yield _chunk(ident, body.model, chat, generation.text[sent:], None)
        reason = "length" if generation.finish_reason == "length" else "stop"
        yield _chunk(ident, body.model, chat, None, reason)
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()
        ticket.release()
