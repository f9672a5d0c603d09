"""An OpenAI-compatible HTTP server over the project's batching engine (``engine.py``).

Routes: /health, /v1/models, /v1/chat/completions (streaming SSE or not), /v1/completions.
Several LoRA adapters share one base model; the request's ``model`` field picks one (the base
is served under its own name). Every field of OpenAI's request bodies is either honoured, ignored
because it cannot change the output, or refused with a 400 that names it (``protocol.py``).
Every error, validation included, has OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``
(``errors.py``). Adapters join and leave while it serves (``app.state.load_adapter``,
``app.state.remove_adapter``), and a ``ModelAccess`` decides which models each request sees
(``live.py``; ``tunesmith server``: per API key).
Protection: an optional API key (401), a body size limit (413), prompt + max_tokens over the context
(400), a bounded queue (429 with Retry-After), a per-request timeout (408), and a client that
disconnects, a timeout or a shutdown cancels its generation at the engine's next step. Concurrent
requests, for the base and for any adapters, decode together in one batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import jinja2
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from tunesmith.data.tokenize import encode_prompt
from tunesmith.generate.sample import SamplingConfig, stop_token_ids
from tunesmith.serve import structured, tools
from tunesmith.serve.engine import Engine, RowProcessor, engine_for, streamable
from tunesmith.serve.errors import AsciiJSONResponse, Guard, OpenAIError, install_error_handlers
from tunesmith.serve.handle import Completion, EngineError, Handle, TokenLogprob
from tunesmith.serve.live import LiveAdapters, ModelAccess, model_not_found
from tunesmith.serve.sampling import Bias, Penalties
from tunesmith.serve.served import Served
from tunesmith.serve.protocol import ChatRequest, CompletionRequest, NamedToolChoice, forces_call, refusal

log = logging.getLogger(__name__)
MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy decoding


class _Gate:
    """At most ``capacity`` requests admitted at once (beyond that: refuse with 429); ``running``
    holds the cancel events of the admitted ones, for a shutdown to stop them."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.inside = 0
        self.running: set[threading.Event] = set()

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


def create_app(served: Served, api_key: str | None = None, max_concurrency: int = 64,
               max_body_bytes: int = 1 << 20, request_timeout: float = 300.0, shutdown_timeout: float = 30.0,
               max_batch_size: int = 32, batched: bool = True, prefix_cache_bytes: int = 256 << 20,
               vllm: VLLMFront | None = None, access: ModelAccess | None = None,
               unbuffered: set[str] | frozenset[str] = frozenset()) -> FastAPI:
    """``max_concurrency``: requests admitted at once, generating or waiting for room in the batch;
    beyond it, 429. ``max_batch_size``: completions decoded together (``batched``: the batching
    engine, else one completion after another). ``request_timeout``: seconds a request may take,
    waiting included; beyond it, 408 (or an error event in a stream) and its generation stops.
    ``shutdown_timeout``: at shutdown, how long the cancelled generations may take to stop.
    ``prefix_cache_bytes``: the keys and values of recent prompts' beginnings kept for reuse (0: none).
    ``vllm``: forward the checked requests to a running vLLM server instead (``generate/vllm.py``).
    ``access``: which models each request sees (/v1/models, and a 404 that does not tell whether a
    model exists for others); None: every served model, to every request. ``unbuffered``: paths whose
    bodies neither the body limit nor the guard's buffering touch (an upload route limits its own).
    ``app.state.load_adapter(name, folder)`` and ``app.state.remove_adapter(name)`` (awaited on the app's
    event loop) serve and stop serving adapters without a restart (``live.LiveAdapters``)."""
    gate = _Gate(max_concurrency)
    engine = None if vllm is not None else engine_for(served.model, served.tokenizer, max_batch_size, batched,
                                                       prefix_cache_bytes)
    compiling = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunesmith-grammar")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await _drain(gate, shutdown_timeout)
        if engine is not None:
            await asyncio.to_thread(engine.close)
        if vllm is not None:
            await vllm.aclose()
        compiling.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, unbuffered=frozenset(unbuffered))
    app.state.engine = engine
    live = LiveAdapters(served, engine)
    app.state.load_adapter, app.state.remove_adapter = live.load, live.remove
    install_error_handlers(app)
    context = _Context(served, gate, engine, compiling, vllm, access)

    @app.get("/health")
    async def health() -> dict:  # open to all: with access, it names no model but the base
        return {"status": "ok", "models": served.names if access is None else [served.base_name],
                "queued": gate.inside}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        names = served.names if access is None else await asyncio.to_thread(access.listed, request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tunesmith"}
                                           for name in names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        deadline = time.monotonic() + request_timeout
        return await _respond(context, body, lambda: _chat_job(context, body), request, deadline)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        deadline = time.monotonic() + request_timeout
        return await _respond(context, body, lambda: _completion_job(context, body), request, deadline)

    return app


@dataclass
class _Context:
    """What a request is served with."""

    served: Served
    gate: _Gate
    engine: Engine | None  # None: vLLM generates
    compiling: ThreadPoolExecutor  # grammar compilation, off the event loop and off the default pool
    vllm: VLLMFront | None = None
    access: ModelAccess | None = None  # None: every served model, to every request


async def _drain(gate: _Gate, grace: float) -> None:
    """At shutdown (uvicorn has waited for, or cancelled, the requests): stop what still generates
    and give it ``grace`` seconds to stop."""
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

    def processors(self, served: Served) -> Callable[[], list[RowProcessor]] | None:
        """What makes one completion's fresh row processors (a grammar's follows its tokens); None
        when the request changes no logits."""
        if not (self.presence or self.frequency or self.bias or self.grammar is not None):
            return None
        stop_ids = stop_token_ids(served.model, served.tokenizer)

        def make() -> list[RowProcessor]:
            chain: list[RowProcessor] = []
            if self.presence or self.frequency:
                chain.append(Penalties(self.presence, self.frequency))
            if self.bias:
                chain.append(Bias(self.bias))
            if self.grammar is not None:
                chain.append(structured.GrammarRow(self.grammar, stop_ids))
            return chain

        return make


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


async def _chat_job(context: _Context, body: ChatRequest) -> _Job:
    served = context.served
    syntax = _check_fields(context, body)
    input_ids = _encode_chat(served, body, syntax)
    if context.vllm is not None:  # vLLM constrains its own decoding
        grammar = None
    else:
        grammar = await (_call_grammar(context, body, syntax) if forces_call(body) else _grammar(context, body))
    top = (body.top_logprobs or 0) if body.logprobs else None
    job = _job(context, body, input_ids, chat=True, top_logprobs=top, grammar=grammar)
    if body.tools and body.tool_choice != "none":
        job.calls, job.parallel_calls = syntax, body.parallel_tool_calls is not False
    return job


async def _completion_job(context: _Context, body: CompletionRequest) -> _Job:
    served = context.served
    _check_fields(context, body)
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
    return _job(context, body, input_ids, chat=False, top_logprobs=body.logprobs, echo=echo)


def _check_fields(context: _Context, body: ChatRequest | CompletionRequest) -> tools.CallSyntax | None:
    """404 for a model not served; 400 naming the first field set to what we cannot honour. The
    template's tool-call syntax (None: it has no tool support)."""
    served = context.served
    if body.model not in served.names:
        raise _unknown_model(context, body.model)
    syntax = tools.call_syntax(served.tokenizer)
    tools_supported = syntax is not None and (context.vllm is None or context.vllm.tools)
    found = refusal(body, tools_supported=tools_supported, constrained=context.vllm is not None or structured.available())
    if found is not None:
        raise OpenAIError(400, found[1], found[0], "unsupported_parameter")
    if context.engine is not None and (body.n or 1) > context.engine.max_batch_size:
        raise OpenAIError(400, f"n: at most {context.engine.max_batch_size} on this server (its --max-batch-size)",
                          "n", "invalid_value")
    for key in body.logit_bias or {}:
        if not (key.isascii() and key.isdigit()) or int(key) >= served.vocab_size:
            raise OpenAIError(400, f"logit_bias: {key!r} is not a token id in [0, {served.vocab_size})", "logit_bias")
    return syntax


def _unknown_model(context: _Context, model: str) -> OpenAIError:
    """404 for a model not served: with ``access``, words that do not tell whether it exists for another."""
    if context.access is not None:
        return model_not_found(model)
    served = context.served
    return OpenAIError(404, f"model {model!r} is not served; available: {', '.join(served.names)}", "model",
                       "model_not_found")


def _grammars(served: Served) -> structured.GrammarCompiler:
    if served.grammars is None:
        served.grammars = structured.GrammarCompiler(served.model, served.tokenizer,
                                                     stop_token_ids(served.model, served.tokenizer))
    return served.grammars


async def _call_grammar(context: _Context, body: ChatRequest, syntax: tools.CallSyntax) -> Any:
    """The compiled grammar of exactly one call to the named tool, or to any tool ("required")."""
    named = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
    calls = [(syntax.opening(tool.function.name), tool.function.parameters or {"type": "object"},
              syntax.after_arguments) for tool in body.tools or [] if named in (None, tool.function.name)]
    try:
        return await _compile(context, _grammars(context.served).compile_calls, calls)
    except ValueError as err:
        raise OpenAIError(400, str(err), "tools", "invalid_value") from None


async def _grammar(context: _Context, body: ChatRequest) -> Any:
    """The compiled grammar of ``response_format`` (None for text)."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if not structured.available():
        raise OpenAIError(400, "response_format needs constrained decoding: install tunesmith[structured] "
                          "(xgrammar)", "response_format", "unsupported_parameter")
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    try:
        return await _compile(context, _grammars(context.served).compile, fmt.type, schema)
    except ValueError as err:
        raise OpenAIError(400, str(err), "response_format.json_schema.schema", "invalid_value") from None


async def _compile(context: _Context, compile: Callable[..., Any], *args: Any) -> Any:
    """A grammar compiled on the server's own compile thread: one at a time, after the request was
    admitted, and never on the thread pool the event loop's other work needs."""
    return await asyncio.get_running_loop().run_in_executor(context.compiling, compile, *args)


def _job(context: _Context, body: ChatRequest | CompletionRequest, input_ids: torch.Tensor, chat: bool,
         top_logprobs: int | None, grammar: Any = None, echo: str = "") -> _Job:
    served = context.served
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


async def _respond(context: _Context, body: ChatRequest | CompletionRequest, make_job: Callable[[], Awaitable[_Job]],
                   request: Request, deadline: float):
    """Admit the request (or 429) before any work on it, build its job (a grammar compiles here),
    then hand it to the engine: one JSON body, or a stream of server-sent events."""
    gate = context.gate
    if not gate.try_enter():
        raise OpenAIError(429, "too many requests in the queue; retry shortly", code="rate_limit_exceeded",
                          kind="rate_limit_error", headers={"Retry-After": "1"})
    ticket = _Ticket(gate)
    try:
        if context.access is not None:
            await context.access.prepare(request, body.model)
        job = await make_job()
    except BaseException:
        ticket.release()
        raise
    if context.vllm is not None:
        try:
            return await _forward(context.vllm, job, body, request, deadline, ticket)
        except BaseException:
            ticket.release()  # idempotent: a stream that started releases it when it ends
            raise
    ident = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if job.stream:
        events = _stream(context, job, ident, request, deadline, ticket)
        weakref.finalize(events, ticket.release)
        return StreamingResponse(events, media_type="text/event-stream")
    cancel = threading.Event()
    gate.running.add(cancel)
    watcher = asyncio.create_task(_watch_disconnect(request, cancel))
    try:
        handle = _submit(context, job, cancel)
        completions = await asyncio.wait_for(handle.wait(), timeout=max(deadline - time.monotonic(), 0.001))
    except TimeoutError:
        raise OpenAIError(408, "the request took longer than the server's request timeout; ask for fewer tokens "
                          "or retry", code="request_timeout", kind="timeout_error") from None
    except asyncio.CancelledError:  # uvicorn's graceful shutdown ran out of time
        raise _shutting_down() from None
    except EngineError as err:
        raise _engine_error(context, err) from None
    finally:
        cancel.set()  # a finished request's rows are gone already; anything else stops at the next step
        watcher.cancel()
        gate.running.discard(cancel)
        ticket.release()
    return AsciiJSONResponse(_completion_body(context.served, job, ident, completions))


def _submit(context: _Context, job: _Job, cancel: threading.Event) -> Handle:
    """The job to the engine; 404 for an adapter removed since the job was checked (the engine's removal
    waits for every request submitted before it was asked for)."""
    served = context.served
    if job.model != served.base_name and job.model not in served.adapters:
        raise _unknown_model(context, job.model)
    adapter = served.adapters.get(job.model)  # None: the base model
    assert context.engine is not None
    return context.engine.submit(job.input_ids, job.sampling, job.stop, adapter, cancel, job.n, job.top_logprobs,
                                 job.processors(context.served))


def _shutting_down() -> OpenAIError:
    return OpenAIError(503, "the server is shutting down; retry", code="server_shutting_down", kind="server_error",
                       headers={"Retry-After": "1"})


def _engine_error(context: _Context, error: EngineError) -> OpenAIError:
    """A request the engine could not finish: the server closing (503), else the server's fault (500)."""
    if context.engine is None or context.engine.closed:
        return _shutting_down()
    log.error("generation failed: %s", error.__cause__ or error)
    return OpenAIError(500, "the server had an error while generating", kind="server_error")


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.1)


def _finish_reason(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


def _usage(job: _Job, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


def _completion_body(served: Served, job: _Job, ident: str, completions: list[Completion]) -> dict[str, Any]:
    choices = []
    for index, completion in enumerate(completions):
        logprobs = _logprobs(served, job, completion.logprobs) if completion.logprobs is not None else None
        if job.chat:
            message, reason = _message(job, completion)
            choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
        else:
            choices.append({"index": index, "text": job.echo + completion.text, "logprobs": logprobs,
                            "finish_reason": _finish_reason(completion)})
    return {"id": ident, "object": "chat.completion" if job.chat else "text_completion",
            "created": int(time.time()), "model": job.model, "choices": choices,
            "usage": _usage(job, sum(len(c.token_ids) for c in completions))}


def _message(job: _Job, completion: Completion) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason: tool calls parsed out when the request has tools."""
    message: dict[str, Any] = {"role": "assistant", "content": completion.text, "refusal": None}
    if job.calls is None:
        return message, _finish_reason(completion)
    content, calls = tools.parse_calls(completion.text, job.calls)
    if not calls:
        return message, _finish_reason(completion)
    return {**message, "content": content, "tool_calls": calls if job.parallel_calls else calls[:1]}, "tool_calls"


def _finite(value: float) -> float:
    """A log-probability JSON can carry: -inf and NaN as -9999.0 (as vLLM does)."""
    return value if value > -9999.0 else -9999.0


def _logprobs(served: Served, job: _Job, steps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs object: chat's ``{"content": [...]}``, or completions' parallel lists. A
    token's ``bytes`` are its own, also when it holds part of a character."""
    decode = served.tokenizer.decode
    if job.chat:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {"token": decode([token]), "logprob": _finite(logprob), "bytes": served.bytes_of(token)}

        return {"content": [{**entry(s.token_id, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                            for s in steps], "refusal": None}
    tokens = [decode([s.token_id]) for s in steps]
    offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [_finite(s.logprob) for s in steps],
            "top_logprobs": [{decode([t]): _finite(lp) for t, lp in s.top} for s in steps], "text_offset": offsets}


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=True, allow_nan=False)}\n\n"


def _chunk(ident: str, job: _Job, index: int, delta: dict[str, Any] | str | None, reason: str | None,
           logprobs: dict[str, Any] | None = None) -> str:
    """One streamed choice: chat's ``delta`` (a dict, or a text as its content), or a completion's text."""
    if job.chat:
        delta = {"content": delta} if isinstance(delta, str) else delta or {}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": reason}
    return _event({"id": ident, "object": "chat.completion.chunk" if job.chat else "text_completion",
                   "created": int(time.time()), "model": job.model, "choices": [choice]})


class _Choice:
    """One streamed choice's state: how much text and how many logprobs were sent; with tools, the
    content is held back from where a tool call may begin until the completion is known."""

    def __init__(self, job: _Job):
        self.job, self.text, self.sent, self.logprobs = job, "", 0, []

    def add(self, text: str, logprobs: list[TokenLogprob]) -> str:
        """Take a piece; the content that can be sent now."""
        self.text += text
        self.logprobs += logprobs
        ready = len(self.text)
        if self.job.calls is not None:  # not where a call may begin, nor whitespace that may end the content
            opening = self.job.calls.before_name
            at = self.text.find(opening)
            ready = len(self.text[:at if at >= 0 else streamable(self.text, [opening])].rstrip())
        ready = max(ready, self.sent)
        out, self.sent = self.text[self.sent:ready], ready
        return out

    def take_logprobs(self) -> list[TokenLogprob]:
        taken, self.logprobs = self.logprobs, []
        return taken

    def rest(self, completion: Completion) -> tuple[str, list[dict[str, Any]]]:
        """At the end: (the content not yet sent, the tool calls)."""
        if self.job.calls is not None:
            content, calls = tools.parse_calls(completion.text, self.job.calls)
            if calls:  # the content before the first call, as parse_calls gives it
                end = len(completion.text[:completion.text.find(self.job.calls.before_name)].rstrip())
                return completion.text[self.sent:max(end, self.sent)], calls if self.job.parallel_calls else calls[:1]
        return completion.text[self.sent:], []


async def _stream(context: _Context, job: _Job, ident: str, request: Request, deadline: float,
                  ticket: _Ticket) -> AsyncIterator[str]:
    """Server-sent events; each choice's chunks concatenate to its non-streamed text (text that may
    begin a stop string, or a tool call, is held back until it is clear). The ``n`` choices
    interleave, each chunk naming its index. A client that goes away, the deadline or a shutdown
    stops the generation; past the deadline, or on an error, an error event (OpenAI's body) ends
    the stream."""
    served, gate = context.served, context.gate
    cancel = threading.Event()
    gate.running.add(cancel)
    watcher = asyncio.create_task(_watch_disconnect(request, cancel))
    completion_tokens = 0
    try:
        handle = _submit(context, job, cancel)
        for index in range(job.n):
            yield _chunk(ident, job, index, {"role": "assistant", "content": ""} if job.chat else job.echo, None)
        choices = [_Choice(job) for _ in range(job.n)]
        pieces = aiter(handle.stream())
        while True:
            try:
                piece = await asyncio.wait_for(anext(pieces), timeout=max(deadline - time.monotonic(), 0.001))
            except StopAsyncIteration:
                break
            choice = choices[piece.index]
            text = choice.add(piece.text, piece.logprobs)
            if text:
                steps = choice.take_logprobs()
                logprobs = _logprobs(served, job, steps, choice.sent - len(text)) if job.top_logprobs is not None \
                    else None
                yield _chunk(ident, job, piece.index, text, None, logprobs)
            if piece.finished is not None:
                completion_tokens += len(piece.finished.token_ids)
                for event in _finish_choice(served, job, ident, piece.index, choice, piece.finished):
                    yield event
        if job.include_usage:
            yield _event({"id": ident, "object": "chat.completion.chunk" if job.chat else "text_completion",
                          "created": int(time.time()), "model": job.model, "choices": [],
                          "usage": _usage(job, completion_tokens)})
        yield "data: [DONE]\n\n"
    except TimeoutError:
        yield _event(OpenAIError(408, "the request took longer than the server's request timeout",
                                 code="request_timeout", kind="timeout_error").body())
    except EngineError as err:
        yield _event(_engine_error(context, err).body())
    except OpenAIError as err:
        yield _event(err.body())
    except Exception:
        log.exception("unexpected error in a stream")
        yield _event(OpenAIError(500, "the server had an error while processing the request",
                                 kind="server_error").body())
    finally:
        cancel.set()
        watcher.cancel()
        gate.running.discard(cancel)
        ticket.release()


def _finish_choice(served: Served, job: _Job, ident: str, index: int, choice: _Choice,
                   completion: Completion) -> list[str]:
    """A finished choice's last events: the content held back, its tool calls, its finish reason."""
    events = []
    text, calls = choice.rest(completion)
    steps = choice.take_logprobs()
    if text or steps:
        logprobs = _logprobs(served, job, steps, choice.sent) if job.top_logprobs is not None else None
        events.append(_chunk(ident, job, index, text, None, logprobs))
    if calls:
        deltas = [{"index": k, **call} for k, call in enumerate(calls)]
        events.append(_chunk(ident, job, index, {"tool_calls": deltas}, None))
    events.append(_chunk(ident, job, index, None, "tool_calls" if calls else _finish_reason(completion)))
    return events


class VLLMFront:
    """The client side of a running vLLM server (``vllm.VLLMProcess``): its URL, and whether it was started
    with a tool-call parser (else tools are refused here, as for a template without tool support)."""

    def __init__(self, url: str, tools: bool = False):
        self.url, self.tools = url, tools
        self._clients: dict[int, httpx.AsyncClient] = {}

    def client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (a client is bound to the loop it first ran on)."""
        loop = id(asyncio.get_running_loop())
        if loop not in self._clients:
            self._clients[loop] = httpx.AsyncClient(base_url=self.url, timeout=None)
        return self._clients[loop]

    async def aclose(self) -> None:
        client = self._clients.pop(id(asyncio.get_running_loop()), None)
        if client is not None:
            await client.aclose()


def _payload(job: _Job, body: ChatRequest | CompletionRequest) -> dict[str, Any]:
    """The request as the client sent it (checked), with this server's defaults made explicit: vLLM's
    would otherwise differ (its temperature comes from the model's generation config; its token limit
    is the rest of the context)."""
    try:
        payload = body.model_dump(mode="json", exclude_unset=True, by_alias=True)
    except ValueError as err:  # pydantic's serializer stops at a nesting depth the validator let through
        raise OpenAIError(400, f"the request cannot be forwarded: {err}", code="invalid_value") from None
    if isinstance(body, ChatRequest):  # the messages this server checked and counted, not the raw ones
        payload["messages"] = _forwarded_messages(body)
    payload["temperature"] = job.sampling.temperature if body.temperature is not None else 1.0
    if body.max_new_tokens is None:
        payload["max_tokens"] = job.sampling.max_new_tokens
    return payload


def _forwarded_messages(body: ChatRequest) -> list[dict[str, Any]]:
    """The messages as the built-in engines template them ('developer' as 'system', content parts joined
    as ``ChatMessage.text`` joins them), with their tool calls in OpenAI's shape, for vLLM to template."""
    messages = _chat_messages(body)
    for message, original in zip(messages, body.messages, strict=True):
        if original.tool_calls:
            message["tool_calls"] = [call.model_dump(mode="json", exclude_none=True) for call in original.tool_calls]
        if original.tool_call_id is not None:
            message["tool_call_id"] = original.tool_call_id
    return messages


def _from_vllm(status: int, content: bytes) -> OpenAIError:
    """vLLM's error answer in this server's body (its ``type`` is a class name, its ``param`` starts with
    "body.")."""
    try:
        error = json.loads(content).get("error")
    except (ValueError, AttributeError):
        error = None
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or f"the vLLM engine answered {status}")
    param = error.get("param")
    param = param.removeprefix("body.") if isinstance(param, str) else None
    code = error.get("code") if isinstance(error.get("code"), str) else None
    if status >= 500:
        log.error("vLLM answered %s: %s", status, message)
        return OpenAIError(status, "the vLLM engine had an error while processing the request", kind="server_error")
    return OpenAIError(status, message, param, code)


_VLLM_DOWN = "the vLLM engine is not answering; retry shortly"


async def _forward(front: VLLMFront, job: _Job, body: ChatRequest | CompletionRequest, request: Request,
                   deadline: float, ticket: _Ticket):
    """The checked request to vLLM, its answer back: one JSON body, or its stream relayed line by line. A
    client that goes away closes the connection to vLLM, which stops the generation; so does the deadline
    (408, or an error event in a stream)."""
    client = front.client()
    outgoing = client.build_request("POST", request.url.path, json=_payload(job, body))  # 400 if it cannot

    def left() -> float:
        return max(deadline - time.monotonic(), 0.001)

    try:
        response = await _until_deadline_or_gone(client.send(outgoing, stream=True), request, left())
    except httpx.HTTPError:
        ticket.release()
        raise OpenAIError(503, _VLLM_DOWN, code="engine_unavailable", kind="server_error",
                          headers={"Retry-After": "1"}) from None
    except BaseException:
        ticket.release()
        raise
    if not job.stream or response.status_code != 200:
        try:
            content = await _until_deadline_or_gone(response.aread(), request, left())
        except httpx.HTTPError:
            raise OpenAIError(503, _VLLM_DOWN, code="engine_unavailable", kind="server_error") from None
        finally:
            await response.aclose()
            ticket.release()
        if response.status_code != 200:
            raise _from_vllm(response.status_code, content)
        return Response(content, media_type="application/json")

    async def relay() -> AsyncIterator[str]:
        lines = aiter(response.aiter_lines())
        try:
            while True:
                try:
                    line = await asyncio.wait_for(anext(lines), timeout=left())
                except StopAsyncIteration:
                    break
                if line:
                    yield line + "\n\n"
        except TimeoutError:
            yield _event(OpenAIError(408, "the request took longer than the server's request timeout",
                                     code="request_timeout", kind="timeout_error").body())
        except httpx.HTTPError:
            yield _event(OpenAIError(503, _VLLM_DOWN, code="engine_unavailable", kind="server_error").body())
        finally:
            await response.aclose()
            ticket.release()

    events = relay()
    weakref.finalize(events, ticket.release)
    return StreamingResponse(events, media_type="text/event-stream")


async def _until_deadline_or_gone(work: Awaitable[Any], request: Request, timeout: float) -> Any:
    """``work``'s result; 408 past ``timeout``; cancelled (and its connection closed) if the client goes away."""
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if gone in done:
        raise OpenAIError(499, "the client closed the request", code="client_closed_request")
    raise OpenAIError(408, "the request took longer than the server's request timeout; ask for fewer tokens or "
                      "retry", code="request_timeout", kind="timeout_error")


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
