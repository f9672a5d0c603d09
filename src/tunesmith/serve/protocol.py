"""The request bodies of OpenAI's chat and (legacy) completions APIs, every field declared.

Each field is in one of three groups: honoured (it changes the generation as OpenAI documents),
ignored (it does not change the output: ``IGNORED``), or refused with a 400 that names it when set to
a value we cannot honour (``refusal``). A field OpenAI does not define is refused by validation, as
OpenAI itself does ("Unrecognized request argument supplied: ...").
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Fields accepted and ignored: none changes what is generated.
IGNORED = {
    "chat": ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
             "prompt_cache_retention", "stream_options.include_obfuscation"),
    "completions": ("user",),
}
INT64 = 2**63 - 1


def _valid_unicode(text: str) -> str:
    """Text that can be encoded: a lone surrogate (JSON's "\\udcff") is not a character.

    >>> _valid_unicode("ok \\u202e\\x00")
    'ok \\u202e\\x00'
    >>> _valid_unicode("a\\udcff")
    Traceback (most recent call last):
    ...
    ValueError: holds a lone surrogate (U+DCFF at index 1), which is not Unicode text; send valid UTF-8
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[err.start]):04X} at index {err.start}), which is "
                         "not Unicode text; send valid UTF-8") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


MAX_STOP_CHARS = 256
MAX_SCHEMA_CHARS = 16_384

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Strict):
    """One part of a message's content. Only ``text`` parts are honoured (``refusal`` parts in an
    assistant turn are read as text); image, audio and file parts are refused by ``refusal``."""

    type: Literal["text", "image_url", "input_audio", "file", "refusal"]
    text: Text | None = None
    refusal: Text | None = None
    image_url: dict[str, Any] | None = None
    input_audio: dict[str, Any] | None = None
    file: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _payload_present(self) -> ContentPart:
        if getattr(self, self.type) is None:
            raise ValueError(f"a content part of type {self.type!r} needs its {self.type!r} field")
        return self


class FunctionCall(_Strict):
    name: Text
    arguments: Text


class ToolCall(_Strict):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None
    refusal: Text | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None

    def text(self) -> str:
        """The content as one string: text parts concatenated (refusal parts too)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or part.refusal or "" for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: Text


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object ({'name': ..., 'schema': {...}})")
        if self.json_schema is not None and len(json.dumps(self.json_schema.schema_ or {})) > MAX_SCHEMA_CHARS:
            # The grammar's compile time grows fast with the schema (minutes for ~100 KB of optional properties),
            # and it runs before the request's place in the queue: bounded here.
            raise ValueError(f"the json_schema may have at most {MAX_SCHEMA_CHARS:,} characters")
        return self


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Request(_Strict):
    """What both APIs share."""

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=128)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: Text | None = None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)  # OpenAI's own limit
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Text] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_retention: Literal["in-memory", "24h"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=20)
    suffix: Text | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


def _tools_refusal(body: ChatRequest, tools_supported: bool, constrained: bool) -> tuple[str, str] | None:
    if not body.tools and body.tool_choice in (None, "none"):
        return None
    if not tools_supported:
        name = "tools" if body.tools else "tool_choice"
        return name, f"{name}: the served model's chat template has no tool support"
    if not body.tools:
        return "tool_choice", "tool_choice needs tools"
    names = [tool.function.name for tool in body.tools]
    if isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name not in names:
        return "tool_choice.function.name", f"no tool named {body.tool_choice.function.name!r} among the tools"
    if forces_call(body) and not constrained:
        return "tool_choice", "a required tool call needs constrained decoding: install tunesmith[structured]"
    if forces_call(body) and body.response_format is not None and body.response_format.type != "text":
        return "response_format", "response_format cannot be combined with a required tool call"
    return None


def forces_call(body: ChatRequest) -> bool:
    """Whether tool_choice demands a tool call ("required", or a named function)."""
    return bool(body.tools) and (body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice))


def _chat_refusal(body: ChatRequest, tools_supported: bool, constrained: bool) -> tuple[str, str] | None:
    for name in ("audio", "prediction", "web_search_options", "functions", "function_call", "reasoning_effort",
                 "verbosity"):
        if getattr(body, name) is not None:
            return name, f"{name} is not supported by this server (a text-only model without that feature)"
    if body.modalities and "audio" in body.modalities:
        return "modalities", "only the 'text' modality is served"
    if body.top_logprobs is not None and not body.logprobs:
        return "top_logprobs", "top_logprobs needs logprobs: true"
    found = _tools_refusal(body, tools_supported, constrained)
    if found is not None:
        return found
    for i, message in enumerate(body.messages):
        problem = _message_refusal(message, tools_supported)
        if problem is not None:
            return f"messages[{i}].{problem[0]}", problem[1]
    return None


def _message_refusal(message: ChatMessage, tools_supported: bool) -> tuple[str, str] | None:
    if message.role == "function" or message.function_call is not None:
        return "role", "the 'function' role (deprecated by OpenAI) is not supported; use tools"
    if message.audio is not None:
        return "audio", "audio is not supported by this server"
    if message.content is None and not (message.role == "assistant" and message.tool_calls):
        return "content", f"a message of role {message.role!r} needs content"
    if not tools_supported and (message.role == "tool" or message.tool_calls):
        field = "role" if message.role == "tool" else "tool_calls"
        return field, "the served model's chat template has no tool support"
    for j, part in enumerate(message.content if isinstance(message.content, list) else []):
        if part.type not in ("text", "refusal"):
            return f"content[{j}].type", (f"content parts of type {part.type!r} are not supported: the served "
                                          "model reads text only")
    return None


def _shared_refusal(body: _Request) -> tuple[str, str] | None:
    if any(s == "" for s in body.stop_strings()):
        return "stop", "a stop sequence must not be empty"
    if len(body.stop_strings()) > 4:
        return "stop", "at most 4 stop sequences"
    if any(len(s) > MAX_STOP_CHARS for s in body.stop_strings()):
        # transformers' stop-string matcher builds a (vocabulary x length) table for each: bounded here.
        return "stop", f"a stop sequence may have at most {MAX_STOP_CHARS} characters"
    if body.stream_options is not None and not body.stream:
        return "stream_options", "stream_options is only allowed with stream: true"
    return None


def _completion_refusal(body: CompletionRequest) -> tuple[str, str] | None:
    if body.suffix:
        return "suffix", "suffix (insertion) is not supported by this server"
    if body.echo and body.logprobs is not None:
        return "echo", "echo with logprobs is not supported by this server"
    if body.best_of is not None and body.best_of != (body.n or 1):
        return "best_of", "best_of other than n is not supported (completions are not ranked)"
    if isinstance(body.prompt, list) and len(body.prompt) != 1 and not all(isinstance(p, int) for p in body.prompt):
        return "prompt", "send one prompt per request (a string, a list of one string, or a list of token ids)"
    if isinstance(body.prompt, list) and not body.prompt:
        return "prompt", "the prompt is empty"
    return None


def refusal(body: ChatRequest | CompletionRequest, tools_supported: bool = False, constrained: bool = False
            ) -> tuple[str, str] | None:
    """(param, message) for the first field set to something we cannot honour, else None.
    ``tools_supported``: the chat template has tool support; ``constrained``: a grammar library is there."""
    found = _shared_refusal(body)
    if found is None and isinstance(body, ChatRequest):
        found = _chat_refusal(body, tools_supported, constrained)
    elif found is None:
        found = _completion_refusal(body)
    return found
