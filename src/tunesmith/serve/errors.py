"""Every error of the server as OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``:
``OpenAIError`` raised anywhere, a request body that fails validation (a 400 naming the first bad field,
as OpenAI names it), a URL or method the app has no route for, and an unexpected exception (a 500 that
tells nothing of it). ``Guard`` answers the two errors due before any route reads a request: a missing or
wrong API key (401) and a body over the size limit (413).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.serve import protocol

log = logging.getLogger(__name__)


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
        return AsciiJSONResponse(self.body(), status_code=self.status, headers=self.headers)


class AsciiJSONResponse(JSONResponse):
    """JSON that any input can be written as: non-ASCII escaped (so a lone surrogate cannot fail to
    encode), and no NaN or infinity (not JSON)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class Guard:
    """Pure ASGI: the API key (401) and the body limit (413, counted on the bytes received, so a
    chunked body is limited too) before anything else reads the request. Bodies sent to the paths
    under ``unbuffered`` (uploads) pass as they come, their size the route's to limit."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, unbuffered: frozenset[str] = frozenset()):
        self.app, self.api_key, self.max_body_bytes, self.unbuffered = app, api_key, max_body_bytes, unbuffered

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and headers.get(b"authorization") != f"Bearer {self.api_key}".encode():
            error = OpenAIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")
            return await error.response()(scope, receive, send)
        if any(scope["path"] == path or scope["path"].startswith(path + "/") for path in self.unbuffered):
            return await self.app(scope, receive, send)
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


def install_error_handlers(app: FastAPI) -> None:
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
