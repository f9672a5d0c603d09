"""The server speaks OpenAI's API: every field honoured or refused with a 400 that names it, every
error in OpenAI's body, no input that reaches a 5xx (hostile cases, then a fuzz from the OpenAPI
schema), 429 beyond the queue, a request timeout, and a clean shutdown. A tiny random model (2
layers, the embedded tokenizer) stands in: what is checked is the protocol, not the prose.

The tests can fail: with the greedy fallback for a tiny temperature removed, hostile case 11 got a
500 (found first by bench/fuzz_serve.py); with the timeout no longer stopping its generation, the
timeout test failed (the generation ran all its 200 steps); with the shutdown's cancellation not
answered, the shutdown test got uvicorn's bare 500. Each plant was then removed.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from tunesmith.serve.app import create_app
from tunesmith.serve.served import Served

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "Count to 4."}]


def _bench_fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_serve", REPO / "bench" / "fuzz_serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fuzz_serve = _bench_fuzz()


@pytest.fixture(scope="module")
def served(tiny_model_dir) -> Served:
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    return Served(model, AutoTokenizer.from_pretrained(tiny_model_dir), "tiny", {}, default_max_tokens=8)


def serve(app):
    """``app`` on a free loopback port in a thread: (url, uvicorn server, thread)."""
    return fuzz_serve.start_server(app)


@pytest.fixture(scope="module")
def url(served):
    address, server, thread = serve(create_app(served, max_concurrency=4, request_timeout=60))
    yield address
    server.should_exit = True
    thread.join(timeout=10)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, path: str, body: bytes | str, content_type: str = "application/json",
         method: str = "POST") -> tuple[int, dict, dict]:
    """Raw bytes to the server (the openai client cannot send a lone surrogate): (status, headers, JSON)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request(method, path, body.encode() if isinstance(body, str) else body,
                       {"Content-Type": content_type} if content_type else {})
    response = connection.getresponse()
    text = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), json.loads(text)


def assert_openai_error(body: dict, param: str | None) -> None:
    assert fuzz_serve.is_openai_error(body), body
    assert body["error"]["param"] == param, body


def chat(**fields) -> str:
    return json.dumps({"model": "tiny", "messages": MESSAGES, **fields})  # ensure_ascii: "\udcff" stays escaped


HOSTILE = [  # (path, raw body, expected status, expected param)
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "\udcff\x00\u202e"}]), 400,
     "messages[0].content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]),
     400, "messages[0].content[0].text"),
    ("/v1/chat/completions", chat(stop=["\udfff"]), 400, "stop[0]"),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "\udcff"}), 400, "prompt"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "\x00\u202e\ufeff"}], max_tokens=2), 200,
     None),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [', 400, None),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": "\xff\xfe"}', 400, None),
    ("/v1/chat/completions", "", 400, None),
    ("/v1/chat/completions", "[1, 2]", 400, None),
    ("/v1/chat/completions", "[" * 5000 + "]" * 5000, 400, None),
    ("/v1/chat/completions", chat(temperature=float("nan")), 400, "temperature"),
    ("/v1/chat/completions", chat(temperature=1e-300, max_tokens=2), 200, None),
    ("/v1/chat/completions", chat(seed=2**70), 400, "seed"),
    ("/v1/chat/completions", chat(n=0), 400, "n"),
    ("/v1/chat/completions", chat(max_tokens=10**30), 400, "max_tokens"),
    ("/v1/chat/completions", chat(max_completion_tokens=100_000), 400, "max_completion_tokens"),
    ("/v1/chat/completions", chat(stop=""), 400, "stop"),
    ("/v1/chat/completions", chat(logit_bias={"-1": 5}), 400, "logit_bias"),
    ("/v1/chat/completions", chat(logit_bias={"\u00b2": 5}), 400, "logit_bias"),
    ("/v1/chat/completions", chat(logit_bias={"10": 1000}), 400, "logit_bias.10"),
    ("/v1/chat/completions", chat(brand_new_field=1), 400, "brand_new_field"),
    ("/v1/chat/completions", chat(messages=[]), 400, "messages"),
    ("/v1/chat/completions", chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("/v1/chat/completions", chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "minItems": 3, "maxItems": 1}}}), 400,
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", chat(model="nope"), 404, "model"),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": ""}), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": [10**12]}), 400, "prompt"),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": ["a", "b"]}), 400, "prompt"),
    # Bounded inputs: a long stop string (transformers builds a vocabulary x length table for it) and a huge
    # schema (its grammar's compile time grows fast) are refused before any work.
    ("/v1/chat/completions", chat(stop=["a" * 3000]), 400, "stop"),
    ("/v1/chat/completions", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}}}),
     400, "response_format"),
]


@pytest.mark.parametrize("path,body,status,param", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_requests_get_openai_errors_never_a_5xx(url, path, body, status, param):
    code, _, answer = post(url, path, body)
    assert code == status, answer
    if status != 200:
        assert_openai_error(answer, param)


def test_wrong_routes_methods_and_content_types_answer_in_openai_shape(url):
    code, _, answer = post(url, "/v1/nowhere", chat())
    assert code == 404 and answer["error"]["message"] == "Invalid URL (POST /v1/nowhere)"
    code, _, answer = post(url, "/v1/chat/completions", "", content_type="", method="GET")
    assert code == 405 and fuzz_serve.is_openai_error(answer)
    code, _, answer = post(url, "/v1/chat/completions", chat(), content_type="text/plain")
    assert code == 400 and fuzz_serve.is_openai_error(answer)


def test_content_parts_are_joined_and_developer_is_system(url):
    api = client(url)
    as_text = api.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                  {"role": "user", "content": "Count to 4."}],
                                          temperature=0, max_tokens=6)
    as_parts = api.chat.completions.create(
        model="tiny", temperature=0, max_tokens=6,
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Count to 4."}]}])
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


def test_n_choices_seeded_and_reproducible(url):
    api = client(url)
    asked = dict(model="tiny", messages=MESSAGES, n=3, temperature=1.0, seed=7, max_completion_tokens=6)
    first, again = api.chat.completions.create(**asked), api.chat.completions.create(**asked)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # the seed fixes all n
    assert len(set(texts)) > 1  # each choice has its own seed
    assert first.usage.completion_tokens <= 18 and all(c.finish_reason in ("stop", "length") for c in first.choices)


def test_logprobs_and_top_logprobs(url):
    reply = client(url).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=5,
                                                logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)  # greedy picks the most likely
        assert token.logprob <= 0


def test_a_logprob_token_holding_part_of_a_character_has_its_own_bytes(url, served):
    """"日" is more than one byte-level token; forcing the first gives a token whose text is a
    replacement character but whose bytes begin the character's UTF-8. Planted defect seen
    failing: the bytes taken from the token's decoded text ([239, 191, 189])."""
    first, *rest = served.tokenizer.encode("日", add_special_tokens=False)
    assert rest, "the character is one token here: the test would prove nothing"
    reply = client(url).chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=1,
                                                logprobs=True, logit_bias={str(first): 100})
    [entry] = reply.choices[0].logprobs.content
    whole = list("日".encode())
    assert entry.token == "\ufffd" and entry.bytes and entry.bytes == whole[:len(entry.bytes)] != whole


def test_completions_logprobs_echo_and_stop(url):
    api = client(url)
    plain = api.completions.create(model="tiny", prompt="1 2 3", temperature=0, max_tokens=6, logprobs=2)
    assert len(plain.choices[0].logprobs.tokens) == plain.usage.completion_tokens
    echoed = api.completions.create(model="tiny", prompt="1 2 3", temperature=0, max_tokens=6, echo=True)
    assert echoed.choices[0].text == "1 2 3" + plain.choices[0].text
    text = plain.choices[0].text
    if len(text) > 2:
        cut = api.completions.create(model="tiny", prompt="1 2 3", temperature=0, max_tokens=6, stop=[text[1:3]])
        assert cut.choices[0].text == text[: text.find(text[1:3])] and cut.choices[0].finish_reason == "stop"


def test_a_stream_with_n_logprobs_and_usage(url):
    api = client(url)
    asked = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=6, n=2, logprobs=True)
    whole = api.chat.completions.create(**asked)
    chunks = list(api.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content
        tokens = [t.token for c in mine if c.logprobs for t in c.logprobs.content]
        assert tokens == [t.token for t in whole.choices[index].logprobs.content]
        assert mine[-1].finish_reason == whole.choices[index].finish_reason


def test_logit_bias_and_penalties_change_the_output(url, served):
    api = client(url)
    token = served.tokenizer.convert_tokens_to_ids("Ġyes")
    biased = api.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=4,
                                         logit_bias={str(token): 100})
    assert biased.choices[0].message.content == " yes" * 4
    penalised = api.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=4,
                                            logit_bias={str(token): 5}, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content != biased.choices[0].message.content


def test_json_schema_reply_parses_and_validates(url):
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "additionalProperties": False, "required": ["done", "colour", "count"],
              "properties": {"done": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]},
                             "count": {"type": "integer", "minimum": 0, "maximum": 9}}}
    reply = client(url).chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=1.0, seed=3, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    value = json.loads(reply.choices[0].message.content)
    jsonschema_rs.validate(schema, value)
    assert reply.choices[0].finish_reason == "stop"


UNSUPPORTED = [  # (field, value): each refused with a 400 that names it
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "low"), ("verbosity", "low"),
    ("web_search_options", {}), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"), ("top_logprobs", 2),
]


@pytest.mark.parametrize("field,value", UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED])
def test_an_unsupported_field_is_a_400_naming_it(url, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, extra_body={field: value})
    assert caught.value.param == field and caught.value.status_code == 400


@pytest.mark.parametrize("asked,param", [({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"),
                                         ({"echo": True, "logprobs": 1}, "echo")])
def test_unsupported_completion_fields(url, asked, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).completions.create(model="tiny", prompt="1 2", max_tokens=2, **asked)
    assert caught.value.param == param


def test_image_parts_and_tool_messages_are_refused_by_name(url):
    api = client(url)
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}])
    assert caught.value.param == "messages[0].content[1].type"
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="tiny", messages=[*MESSAGES, {"role": "tool", "tool_call_id": "1",
                                                                        "content": "4"}])
    assert caught.value.param == "messages[1].role"


class Slowed:
    """The model's forward takes ``seconds`` longer per step, for as long as the block lasts."""

    def __init__(self, model, seconds: float):
        self.model, self.seconds, self.steps = model, seconds, 0

    def __enter__(self):
        def slow(module, args, kwargs):
            self.steps += 1
            time.sleep(self.seconds)

        self.handle = self.model.register_forward_pre_hook(slow, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_overload_answers_only_200_or_429_with_retry_after(served):
    address, server, thread = serve(create_app(served, max_concurrency=2))
    body = chat(max_tokens=6, temperature=0)
    try:
        with Slowed(served.model, 0.02), ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: post(address, "/v1/chat/completions", body), range(24)))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 429}, statuses
    for status, headers, answer in answers:
        if status == 429:
            assert headers["retry-after"] == "1" and answer["error"]["code"] == "rate_limit_exceeded"


def test_a_request_past_its_timeout_is_a_408_and_its_generation_stops(served):
    address, server, thread = serve(create_app(served, request_timeout=0.5))
    try:
        with Slowed(served.model, 0.05) as slowed:
            status, _, answer = post(address, "/v1/chat/completions", chat(max_tokens=200))
            assert status == 408 and answer["error"]["code"] == "request_timeout"
            with pytest.raises(openai.APIError, match="timeout"):
                for _ in client(address).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200,
                                                                 stream=True):
                    pass
            assert slowed.steps < 60, "the generations ran on after their timeout"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_shutdown_finishes_a_short_request_and_cancels_a_long_one(served):
    """uvicorn's graceful shutdown: what is in flight finishes; past timeout_graceful_shutdown it is
    cancelled: its generation stops at the next token (the thread does not run on) and it is answered
    503 with Retry-After, not uvicorn's bare 500."""
    import uvicorn

    app = create_app(served)
    address, server, thread = serve(app)
    with Slowed(served.model, 0.05) as slowed:
        with ThreadPoolExecutor(1) as pool:
            short = pool.submit(post, address, "/v1/chat/completions", chat(max_tokens=10))
            time.sleep(0.2)
            server.should_exit = True
            assert short.result(timeout=30)[0] == 200
        thread.join(timeout=10)
        assert not thread.is_alive()

        port = int(address.rsplit(":", 1)[1])
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                               timeout_graceful_shutdown=0.5))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        long = ThreadPoolExecutor(1).submit(post, address, "/v1/chat/completions", chat(max_tokens=400))
        time.sleep(0.5)
        stopped_at = time.monotonic()
        server.should_exit = True
        thread.join(timeout=20)
        steps = slowed.steps
        time.sleep(0.3)
        assert not thread.is_alive() and time.monotonic() - stopped_at < 5
        assert slowed.steps == steps, "the cancelled generation ran on after the shutdown"
        status, headers, answer = long.result(timeout=10)
        assert status == 503 and answer["error"]["code"] == "server_shutting_down" and "retry-after" in headers


def test_fuzz_from_the_openapi_schema_finds_no_5xx(served):
    """300 generated requests (schema-valid and not), against a fresh server: no 5xx, every 4xx in
    OpenAI's shape. bench/fuzz_serve.py runs the same for 10,000."""
    pytest.importorskip("schemathesis")
    address, server, thread = serve(create_app(served, request_timeout=2.0))
    try:
        result = fuzz_serve.fuzz(address, requests=300, seconds=50, seed=0, model="tiny")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert result.sent >= 100 and not result.failures, result.failures[:3]
    assert result.statuses[200] > 0 and result.statuses[400] > 0


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "required": ["city", "celsius"],
                                                           "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                                                          "celsius": {"type": "boolean"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_url(tiny_model_dir, served):
    """The same model, its tokenizer given a Hermes-style template with tool support."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = fuzz_serve.TOOL_TEMPLATE
    address, server, thread = serve(create_app(Served(served.model, tokenizer, "tiny", {}, default_max_tokens=8)))
    yield address
    server.should_exit = True
    thread.join(timeout=10)


def test_the_call_syntax_is_read_off_the_template(tiny_model_dir, tokenizer):
    from tunesmith.serve.tools import CallSyntax, call_syntax

    assert call_syntax(tokenizer) is None  # SmolLM2's template ignores tools
    with_tools = AutoTokenizer.from_pretrained(tiny_model_dir)
    with_tools.chat_template = fuzz_serve.TOOL_TEMPLATE
    assert call_syntax(with_tools) == CallSyntax('<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>")


def test_a_named_or_required_tool_call_through_the_template(tool_url):
    pytest.importorskip("xgrammar")
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    api = client(tool_url)
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    named = api.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER, CLOCK], max_tokens=150,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = named.choices[0].message.tool_calls
    assert named.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema_rs.validate(WEATHER["function"]["parameters"], json.loads(call.function.arguments))
    required = api.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER, CLOCK], max_tokens=150,
                                           tool_choice="required", temperature=1.0, seed=1)
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    answered = [*ask, named.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "4 degrees"}]
    reply = api.chat.completions.create(model="tiny", messages=answered, tools=[WEATHER], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_streamed_tool_call_arrives_in_its_delta(tool_url):
    """Streamed, the forced call comes as a tool_calls delta that the client's accumulation turns into
    the non-streamed call, with no call text leaking into the content. Planted defect seen
    failing: the content streamed without holding back where a call begins."""
    pytest.importorskip("xgrammar")
    api = client(tool_url)
    asked = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER, CLOCK],
                 max_tokens=150, temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = api.chat.completions.create(**asked)
    [want] = whole.choices[0].message.tool_calls
    calls, content, reasons = {}, "", []
    for chunk in api.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert reasons == ["tool_calls"]
    assert calls == {0: {"name": "get_weather", "arguments": want.function.arguments}}
    assert content == (whole.choices[0].message.content or "") and "tool_call" not in content


@pytest.mark.parametrize("text", ["Sure, checking.\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
                                  "\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
                                  "No call here,\n\njust words. ", "<tool_call> but not a call"])
def test_streamed_content_beside_tool_calls_equals_the_whole_reply(text):
    """Fed a reply a few characters at a time, the streamed content (and calls) are what the
    non-streamed message says: whitespace before a call is held back and dropped, not sent. Planted
    defect seen failing: "Sure, checking.\n\n" streamed where the message says "Sure, checking."."""
    from tunesmith.serve.app import _Choice, _Job
    from tunesmith.serve.handle import Completion
    from tunesmith.serve.tools import CallSyntax, parse_calls

    syntax = CallSyntax('<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>")
    job = _Job("m", True, None, None, [], 1, True, False, None, calls=syntax)
    choice, streamed = _Choice(job), ""
    for start in range(0, len(text), 3):
        streamed += choice.add(text[start:start + 3], [])
    rest, calls = choice.rest(Completion([], text, "stop", None))
    content, expected_calls = parse_calls(text, syntax)
    assert (streamed + rest) == (content or "") and len(calls) == len(expected_calls)


def test_concurrent_requests_decode_together_through_the_server(served):
    """Four chat requests at once share the engine's batch (seen in the model's forward) and each gets
    the reply it gets alone. The first request's first decoding step waits until the other three
    are queued, so that they must join it."""
    app = create_app(served, request_timeout=60)
    engine = app.state.engine
    address, server, thread = serve(app)
    sizes = []

    def hold(_, args, kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if len(sizes) == 2:  # the first request's first decoding step
            deadline = time.monotonic() + 30
            while len(engine._waiting) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)

    prompts = ["Count to 4.", "Name a fruit.", "Say hi.", "What is 2 + 2?"]
    api = client(address)

    def ask(prompt: str) -> str:
        return api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=12).choices[0].message.content

    try:
        alone = [ask(p) for p in prompts]
        sizes.clear()
        handle = served.model.register_forward_pre_hook(hold, with_kwargs=True)
        try:
            with ThreadPoolExecutor(4) as pool:
                first = pool.submit(ask, prompts[0])
                while not sizes:
                    time.sleep(0.005)
                others = [pool.submit(ask, p) for p in prompts[1:]]
                together = [future.result(60) for future in (first, *others)]
        finally:
            handle.remove()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert together == alone
    assert max(sizes) == 4, sizes


def test_tool_fields_refused_by_name_where_they_cannot_be_honoured(tool_url):
    api = client(tool_url)
    cases = [({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
              "tool_choice.function.name"),
             ({"tool_choice": "required"}, "tool_choice"),
             ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
                 "name": "get_weather", "arguments": "not json"}}]}]}, "messages[0].tool_calls[0].function.arguments")]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **fields})
        assert caught.value.param == param, fields
