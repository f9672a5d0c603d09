"""An OpenAI-compatible HTTP server over the project's own generation code.

Routes: /health, /v1/models, /v1/chat/completions (streaming SSE or not), /v1/completions.
Several LoRA adapters share one base model; the request's ``model`` field picks one (the base
is served under its own name). Every field of OpenAI's request bodies is either honoured, ignored
because it cannot change the output, or refused with a 400 that names it (``protocol.py``).
Every error, validation included, has OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.
Protection: an optional API key (401), a body size limit (413), prompt + max_tokens over the context
(400), a bounded queue (429 with Retry-After), a per-request timeout (408), and a client that
disconnects, a timeout or a shutdown cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import jinja2
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from tunesmith.data.tokenize import encode_prompt
from tunesmith.generate.sample import (BiasProcessor, Generation, LogprobRecorder, PenaltyProcessor,
                                       SamplingConfig, generate_ids, stop_token_ids)
from tunesmith.serve import protocol, structured, tools
from tunesmith.serve.protocol import ChatRequest, CompletionRequest, NamedToolChoice, forces_call, refusal

log = logging.getLogger(__name__)
MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy decoding


@dataclass
class Served:
    """One base model, its tokenizer, and the adapter names loaded on it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> peft adapter name
    default_max_tokens: int = 256
    grammars: structured.GrammarCompiler | None = field(default=None, repr=False)  # built on first use

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    @property
    def context_length(self) -> int:
        config = getattr(self.model, "config", None)
        return int(getattr(config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        return int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or len(self.tokenizer))

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
    """At most ``capacity`` requests admitted at once (beyond that: refuse). They take turns on the
    one model object (adapter selection changes the model, so two generations never overlap)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.inside = 0
        self.running: set[threading.Event] = set()  # the cancel events of the generations under way
        self._locks: dict[int, asyncio.Lock] = {}

    def try_enter(self) -> bool:
        if self.inside >= self.capacity:
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        self.inside -= 1

    def turn(self) -> asyncio.Lock:
        """The lock of the running event loop (a test client may run the app on several loops)."""
        return self._locks.setdefault(id(asyncio.get_running_loop()), asyncio.Lock())


class _Ticket:
    """A place in the gate, given back exactly once: by the request, or by the garbage collector
    when a streaming response is dropped before its body ever started."""

    def __init__(self, gate: _Gate):
        self.gate, self.held = gate, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.leave()


class OpenAIError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = (
            status, message, param, code, kind, headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _JSON(self.body(), status_code=self.status, headers=self.headers)


class _JSON(JSONResponse):
    """JSON that any input can be written as: non-ASCII escaped (so a lone surrogate cannot fail to
    encode), and no NaN or infinity (not JSON)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class _Guard:
    """Pure ASGI: the API key (401) and the body limit (413, counted on the bytes received, so a
    chunked body is limited too) before anything else reads the request."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and headers.get(b"authorization") != f"Bearer {self.api_key}".encode():
            error = OpenAIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")
            return await error.response()(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                error = OpenAIError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
                return await error.response()(scope, receive, send)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


def _param(loc: tuple) -> str | None:
    """A validation error's location as the request field's path: ('body', 'messages', 0, 'content')
    -> 'messages[0].content'. pydantic's union-member tags ('str', 'list[ContentPart]') are dropped.

    >>> _param(("body", "messages", 0, "content", "list[ContentPart]", 1, "type"))
    'messages[0].content[1].type'
    >>> _param(("body", "tool_choice", "NamedToolChoice", "type"))
    'tool_choice.type'
    """
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_tag(part):
            path += f".{part}" if path else str(part)
    return path or None


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"} | {
    cls.__name__ for cls in vars(protocol).values() if isinstance(cls, type) and issubclass(cls, BaseModel)}


def _is_union_tag(part: str) -> bool:
    """Whether a location part names a union's member (a type), not a field."""
    return "[" in part or part in _UNION_TAGS


def _validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """The first failing field (for a union, the member that got furthest) as a 400."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    tag_at = next((i for i, p in enumerate(loc) if isinstance(p, str) and _is_union_tag(p)), None)
    if tag_at is not None:
        first = max((e for e in errors if tuple(e.get("loc", ()))[:tag_at] == loc[:tag_at]),
                    key=lambda e: len(e.get("loc", ())))
        loc = tuple(first.get("loc", ()))
    kind, param = first.get("type"), _param(loc)
    if kind == "json_invalid":
        message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}"
        return OpenAIError(400, message, code="invalid_json")
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing" and param is None:
        return OpenAIError(400, "the request needs a JSON body", code="invalid_request")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return OpenAIError(400, f"{param}: {message}" if param else message, param, "invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(list(error.errors()) or [{}]).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif error.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return OpenAIError(error.status_code, message, kind=kind, headers=getattr(error, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return OpenAIError(500, "the server had an error while processing the request", kind="server_error").response()


def create_app(served: Served, api_key: str | None = None, max_concurrency: int = 8,
               max_body_bytes: int = 1 << 20, request_timeout: float = 300.0) -> FastAPI:
    """``max_concurrency``: requests admitted at once, one generating and the others waiting; beyond
    it, 429. ``request_timeout``: seconds a request may take, waiting included; beyond it, 408 (or an
    error event in a stream) and its generation stops."""
    gate = _Gate(max_concurrency)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await _drain(gate)

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": served.names, "queued": gate.inside}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tunesmith"}
                                           for name in served.names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        job = await _chat_job(served, body)
        return await _respond(served, gate, job, body, request, time.monotonic() + request_timeout)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        job = _completion_job(served, body)
        return await _respond(served, gate, job, body, request, time.monotonic() + request_timeout)

    return app


async def _drain(gate: _Gate, grace: float = 30.0) -> None:
    """At shutdown (uvicorn has waited for, or cancelled, the requests): stop what still generates."""
    for cancel in list(gate.running):
        cancel.set()
    deadline = time.monotonic() + grace
    while gate.running and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


@dataclass
class _Job:
    """One request's generations, resolved and checked."""

    model: str
    chat: bool
    input_ids: torch.Tensor  # (1, seq)
    sampling: SamplingConfig
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs
    presence: float = 0.0
    frequency: float = 0.0
    bias: dict[int, float] = field(default_factory=dict)
    grammar: Any = None  # a compiled xgrammar grammar (response_format, or a required tool call)
    echo: str = ""  # completions: the prompt, written before each completion
    calls: tools.CallSyntax | None = None  # parse tool calls out of the text with this syntax
    parallel_calls: bool = True  # False: at most one tool call

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def processors(self, served: Served) -> list[LogitsProcessor]:
        """Fresh logits processors for one generation (they follow its tokens)."""
        chain: list[LogitsProcessor] = []
        if self.presence or self.frequency:
            chain.append(PenaltyProcessor(self.prompt_tokens, self.presence, self.frequency))
        if self.bias:
            chain.append(BiasProcessor(self.bias))
        if self.grammar is not None:
            chain.append(structured.GrammarProcessor(self.grammar, stop_token_ids(served.model, served.tokenizer)))
        return chain


def _chat_messages(body: ChatRequest) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: content parts joined, 'developer' as 'system'."""
    messages = []
    for message in body.messages:
        item: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                "content": message.text()}
        if message.name is not None:
            item["name"] = message.name
        messages.append(item)
    return messages


def _encode_chat(served: Served, body: ChatRequest, syntax: tools.CallSyntax | None) -> torch.Tensor:
    """The prompt's token ids: the messages (with their tool calls where the template has tool
    support) and the tools, unless tool_choice is "none"."""
    messages = _chat_messages(body)
    if syntax is not None:
        try:
            messages = tools.template_messages(messages, body.messages)
        except ValueError as err:
            raise OpenAIError(400, f"{err}: a tool call's arguments must be a JSON object", str(err)) from None
    try:
        if body.tools and body.tool_choice != "none":
            described = [tool.model_dump(exclude_none=True) for tool in body.tools]
            return tools.encode_with_tools(served.tokenizer, messages, described)
        return encode_prompt(served.tokenizer, messages)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, RecursionError) as err:
        raise OpenAIError(400, f"the model's chat template cannot render these messages: {err}",
                          "messages") from None


async def _chat_job(served: Served, body: ChatRequest) -> _Job:
    syntax = _check_fields(served, body)
    input_ids = _encode_chat(served, body, syntax)
    grammar = await (_call_grammar(served, body, syntax) if forces_call(body) else _grammar(served, body))
    top = (body.top_logprobs or 0) if body.logprobs else None
    job = _job(served, body, input_ids, chat=True, top_logprobs=top, grammar=grammar)
    if body.tools and body.tool_choice != "none":
        job.calls, job.parallel_calls = syntax, body.parallel_tool_calls is not False
    return job


def _completion_job(served: Served, body: CompletionRequest) -> _Job:
    _check_fields(served, body)
    prompt = body.prompt[0] if isinstance(body.prompt, list) and not isinstance(body.prompt[0], int) else body.prompt
    if isinstance(prompt, str):
        input_ids = served.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        if any(not 0 <= token < served.vocab_size for token in prompt):
            raise OpenAIError(400, f"prompt: token ids must lie in [0, {served.vocab_size})", "prompt")
        input_ids = torch.tensor([prompt], dtype=torch.long).reshape(1, -1)
    if input_ids.shape[1] == 0:
        raise OpenAIError(400, "prompt: the prompt has no tokens", "prompt")
    echo = served.tokenizer.decode(input_ids[0], skip_special_tokens=True) if body.echo else ""
    return _job(served, body, input_ids, chat=False, top_logprobs=body.logprobs, echo=echo)


def _check_fields(served: Served, body: ChatRequest | CompletionRequest) -> tools.CallSyntax | None:
    """404 for a model not served; 400 naming the first field set to what we cannot honour. The
    template's tool-call syntax (None: it has no tool support)."""
    if body.model not in served.names:
        raise OpenAIError(404, f"model {body.model!r} is not served; available: {', '.join(served.names)}",
                          "model", "model_not_found")
    syntax = tools.call_syntax(served.tokenizer)
    found = refusal(body, tools_supported=syntax is not None, constrained=structured.available())
    if found is not None:
        raise OpenAIError(400, found[1], found[0], "unsupported_parameter")
    for key in body.logit_bias or {}:
        if not (key.isascii() and key.isdigit()) or int(key) >= served.vocab_size:
            raise OpenAIError(400, f"logit_bias: {key!r} is not a token id in [0, {served.vocab_size})", "logit_bias")
    return syntax


def _grammars(served: Served) -> structured.GrammarCompiler:
    if served.grammars is None:
        served.grammars = structured.GrammarCompiler(served.model, served.tokenizer,
                                                     stop_token_ids(served.model, served.tokenizer))
    return served.grammars


async def _call_grammar(served: Served, body: ChatRequest, syntax: tools.CallSyntax) -> Any:
    """The compiled grammar of exactly one call to the named tool, or to any tool ("required")."""
    named = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
    calls = [(syntax.opening(tool.function.name), tool.function.parameters or {"type": "object"},
              syntax.after_arguments) for tool in body.tools or [] if named in (None, tool.function.name)]
    try:
        return await asyncio.to_thread(_grammars(served).compile_calls, calls)
    except ValueError as err:
        raise OpenAIError(400, str(err), "tools", "invalid_value") from None


async def _grammar(served: Served, body: ChatRequest) -> Any:
    """The compiled grammar of ``response_format`` (None for text)."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if not structured.available():
        raise OpenAIError(400, "response_format needs constrained decoding: install tunesmith[structured] "
                          "(xgrammar)", "response_format", "unsupported_parameter")
    _grammars(served)
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    try:
        return await asyncio.to_thread(served.grammars.compile, fmt.type, schema)
    except ValueError as err:
        raise OpenAIError(400, str(err), "response_format.json_schema.schema", "invalid_value") from None


def _job(served: Served, body: ChatRequest | CompletionRequest, input_ids: torch.Tensor, chat: bool,
         top_logprobs: int | None, grammar: Any = None, echo: str = "") -> _Job:
    limit = body.max_new_tokens or served.default_max_tokens
    prompt_tokens = int(input_ids.shape[1])
    if prompt_tokens + limit > served.context_length:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise OpenAIError(400, f"prompt ({prompt_tokens} tokens) + {param} ({limit}) exceeds the context length of "
                          f"{served.context_length} tokens", param, "context_length_exceeded")
    temperature = 1.0 if body.temperature is None else body.temperature
    temperature = 0.0 if temperature < MIN_TEMPERATURE else temperature  # logits / 1e-300 overflow: greedy
    sampling = SamplingConfig(limit, temperature, 1.0 if body.top_p is None else body.top_p, body.seed)
    return _Job(body.model, chat, input_ids, sampling, body.stop_strings(), body.n or 1, bool(body.stream),
                bool(body.stream_options and body.stream_options.include_usage), top_logprobs,
                body.presence_penalty or 0.0, body.frequency_penalty or 0.0,
                {int(k): v for k, v in (body.logit_bias or {}).items()}, grammar, echo)


def _generate(served: Served, job: _Job, index: int, cancel: threading.Event,
              streamer: BaseStreamer | None = None, recorder: LogprobRecorder | None = None) -> Generation:
    """The one call into generation, run in a worker thread while the request holds its turn
    (a batching engine replaces this). Completion ``index`` of ``n`` gets seed + index."""
    seed = None if job.sampling.seed is None else (job.sampling.seed + index) % 2**64
    sampling = SamplingConfig(job.sampling.max_new_tokens, job.sampling.temperature, job.sampling.top_p, seed)
    with served.selected(job.model):
        return generate_ids(served.model, served.tokenizer, job.input_ids, sampling, streamer, job.stop, cancel,
                            job.processors(served), recorder)


async def _in_turn(gate: _Gate, work: Callable[[], Generation], cancel: threading.Event, deadline: float
                   ) -> Generation:
    """``work`` in a thread once this request's turn on the model comes. Past ``deadline`` (waiting
    included: TimeoutError) or when the request is cancelled, its generation is stopped and waited
    for before the turn passes on, so that two generations never overlap."""
    lock = gate.turn()
    await _acquire(lock, deadline)
    gate.running.add(cancel)
    try:
        future = asyncio.get_running_loop().run_in_executor(None, work)
        try:
            done, _ = await asyncio.wait({future}, timeout=max(deadline - time.monotonic(), 0.001))
        except BaseException:  # cancelled: a client gone, a shutdown
            cancel.set()
            await asyncio.wait({future})
            raise
        if not done:
            cancel.set()  # stops at the next token
            await asyncio.wait({future})
            raise TimeoutError
        return future.result()
    finally:
        gate.running.discard(cancel)
        lock.release()


async def _acquire(lock: asyncio.Lock, deadline: float) -> None:
    """``lock``, or TimeoutError at ``deadline``; never leaves it held on any way out."""
    acquire = asyncio.ensure_future(lock.acquire())
    try:
        done, _ = await asyncio.wait({acquire}, timeout=max(deadline - time.monotonic(), 0.001))
    except BaseException:
        done = set()
        raise
    finally:
        if not done:
            acquire.cancel()
            if await asyncio.gather(acquire, return_exceptions=True) == [True]:
                lock.release()  # it was acquired as it was cancelled
    if not done:
        raise TimeoutError


async def _respond(served: Served, gate: _Gate, job: _Job, body: Any, request: Request, deadline: float):
    if not gate.try_enter():
        raise OpenAIError(429, "too many requests in the queue; retry shortly", code="rate_limit_exceeded",
                          kind="rate_limit_error", headers={"Retry-After": "1"})
    ident = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if job.stream:
        ticket = _Ticket(gate)
        events = _stream(served, gate, job, ident, request, deadline, ticket)
        weakref.finalize(events, ticket.release)
        return StreamingResponse(events, media_type="text/event-stream")
    cancel = threading.Event()
    watcher = asyncio.create_task(_watch_disconnect(request, cancel))
    try:
        generations = []
        for index in range(job.n):
            if cancel.is_set():  # the client went away: the remaining choices are not generated
                break
            recorder = LogprobRecorder(job.top_logprobs) if job.top_logprobs is not None else None
            generations.append(await _in_turn(
                gate, lambda i=index, r=recorder: _generate(served, job, i, cancel, recorder=r), cancel, deadline))
    except TimeoutError:
        raise OpenAIError(408, "the request took longer than the server's request timeout; ask for fewer tokens "
                          "or retry", code="request_timeout", kind="timeout_error") from None
    except asyncio.CancelledError:  # uvicorn's graceful shutdown ran out of time: the generation has stopped
        raise OpenAIError(503, "the server is shutting down; retry", code="server_shutting_down",
                          kind="server_error", headers={"Retry-After": "1"}) from None
    finally:
        watcher.cancel()
        gate.leave()
    return _JSON(_completion_body(served, job, ident, generations))


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.1)


def _finish_reason(generation: Generation) -> str:
    return "length" if generation.finish_reason == "length" else "stop"


def _usage(job: _Job, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


def _completion_body(served: Served, job: _Job, ident: str, generations: list[Generation]) -> dict[str, Any]:
    choices = []
    for index, generation in enumerate(generations):
        logprobs = _logprobs(served, job, generation.logprobs) if generation.logprobs is not None else None
        if job.chat:
            message, reason = _message(job, generation)
            choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
        else:
            choices.append({"index": index, "text": job.echo + generation.text, "logprobs": logprobs,
                            "finish_reason": _finish_reason(generation)})
    return {"id": ident, "object": "chat.completion" if job.chat else "text_completion",
            "created": int(time.time()), "model": job.model, "choices": choices,
            "usage": _usage(job, sum(len(g.token_ids) for g in generations))}


def _message(job: _Job, generation: Generation) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason: tool calls parsed out when the request has tools."""
    message: dict[str, Any] = {"role": "assistant", "content": generation.text, "refusal": None}
    if job.calls is None:
        return message, _finish_reason(generation)
    content, calls = tools.parse_calls(generation.text, job.calls)
    if not calls:
        return message, _finish_reason(generation)
    return {**message, "content": content, "tool_calls": calls if job.parallel_calls else calls[:1]}, "tool_calls"


def _finite(value: float) -> float:
    """A log-probability JSON can carry: -inf and NaN as -9999.0 (as vLLM does)."""
    return value if value > -9999.0 else -9999.0


def _logprobs(served: Served, job: _Job, steps: list, offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs object: chat's ``{"content": [...]}``, or completions' parallel lists."""
    decode = served.tokenizer.decode
    if job.chat:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = decode([token])
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                            for s in steps], "refusal": None}
    tokens = [decode([s.token]) for s in steps]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [_finite(s.logprob) for s in steps],
            "top_logprobs": [{decode([t]): _finite(lp) for t, lp in s.top} for s in steps], "text_offset": offsets}


class _TokenFeed(BaseStreamer):
    """generate()'s streamer: each new token id (and its logprob step) onto an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, recorder: LogprobRecorder | None):
        self.loop, self.queue, self.recorder, self.prompt_seen = loop, queue, recorder, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            step = self.recorder.resolve(token) if self.recorder is not None else None
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (token, step))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


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


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=True, allow_nan=False)}\n\n"


def _chunk(ident: str, job: _Job, index: int, text: str | None, reason: str | None, role: bool = False,
           logprobs: dict[str, Any] | None = None) -> str:
    if job.chat:
        delta: dict[str, Any] = {"content": text} if text is not None else {}
        if role:
            delta["role"] = "assistant"
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
    return _event({"id": ident, "object": "chat.completion.chunk" if job.chat else "text_completion",
                   "created": int(time.time()), "model": job.model, "choices": [choice]})


async def _stream(served: Served, gate: _Gate, job: _Job, ident: str, request: Request, deadline: float,
                  ticket: _Ticket) -> AsyncIterator[str]:
    """Server-sent events; each choice's chunks concatenate to its non-streamed text (text that may
    begin a stop string is held back until it is clear). The n choices come one after another. A
    client that goes away, or the deadline, stops the generation; past the deadline, or on an
    unexpected error, an error event (OpenAI's body) ends the stream."""
    cancel = threading.Event()
    completion_tokens = 0
    try:
        for index in range(job.n):
            if cancel.is_set():  # the client went away: the remaining choices are not generated
                break
            async for event in _stream_choice(served, gate, job, ident, index, request, cancel, deadline):
                if isinstance(event, int):
                    completion_tokens += event
                else:
                    yield event
        if job.include_usage:
            yield _event({"id": ident, "object": "chat.completion.chunk" if job.chat else "text_completion",
                          "created": int(time.time()), "model": job.model, "choices": [],
                          "usage": _usage(job, completion_tokens)})
        yield "data: [DONE]\n\n"
    except TimeoutError:
        yield _event(OpenAIError(408, "the request took longer than the server's request timeout",
                                 code="request_timeout", kind="timeout_error").body())
    except Exception:
        log.exception("unexpected error in a stream")
        yield _event(OpenAIError(500, "the server had an error while processing the request",
                                 kind="server_error").body())
    finally:
        cancel.set()
        ticket.release()


async def _stream_choice(served: Served, gate: _Gate, job: _Job, ident: str, index: int, request: Request,
                         cancel: threading.Event, deadline: float) -> AsyncIterator[str | int]:
    """One choice's chunks, then its number of completion tokens."""
    queue: asyncio.Queue = asyncio.Queue()
    recorder = LogprobRecorder(job.top_logprobs) if job.top_logprobs is not None else None
    feed = _TokenFeed(asyncio.get_running_loop(), queue, recorder)
    task = asyncio.create_task(_in_turn(gate, lambda: _generate(served, job, index, cancel, feed, recorder),
                                        cancel, deadline))
    eos = set(stop_token_ids(served.model, served.tokenizer))
    if job.chat or job.echo:
        yield _chunk(ident, job, index, "" if job.chat else job.echo, None, role=job.chat)
    tokens: list[int] = []
    pending: list = []
    sent = 0
    try:
        while (item := await _next_token(queue, task, deadline)) is not None:
            if await request.is_disconnected():
                cancel.set()
                break
            token, step = item
            if token in eos:
                continue
            tokens.append(token)
            pending += [step] if step is not None else []
            text = served.tokenizer.decode(tokens, skip_special_tokens=True)
            ready = _safe_prefix(text.rstrip("\ufffd"), job.stop)  # not a character cut in half
            if ready > sent:
                logprobs = _logprobs(served, job, pending, sent) if recorder is not None else None
                yield _chunk(ident, job, index, text[sent:ready], None, logprobs=logprobs)
                sent, pending = ready, []
        generation = await task
    finally:
        if not task.done():
            cancel.set()
            await asyncio.wait({task})
    if len(generation.text) > sent:  # what was held back and turned out not to be a stop string
        logprobs = _logprobs(served, job, pending, sent) if recorder is not None else None
        yield _chunk(ident, job, index, generation.text[sent:], None, logprobs=logprobs)
    yield _chunk(ident, job, index, None, _finish_reason(generation))
    yield len(generation.token_ids)


async def _next_token(queue: asyncio.Queue, task: asyncio.Task, deadline: float) -> tuple | None:
    """The next (token, logprob step) of a streamed generation; None at its end. The generation's own
    error (or TimeoutError past the deadline) is raised."""
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter, task}, timeout=max(deadline - time.monotonic(), 0.001),
                                 return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    if task in done:
        task.result()  # raises the generation's error, if any
        return queue.get_nowait() if not queue.empty() else None
    raise TimeoutError
