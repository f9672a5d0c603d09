"""Property-based fuzz of `tunesmith serve` from its own OpenAPI schema (schemathesis on hypothesis).

    python bench/fuzz_serve.py --requests 10000 --seconds 3000

Serves a tiny random model (the embedded tokenizer, a 1-layer 16-wide Llama: it generates fast)
on 127.0.0.1, then sends schemathesis' generated requests, both schema-valid and schema-violating,
to every route. A failure is any 5xx, any 4xx whose body is not OpenAI's error shape, or a stream
that carries a server error event. Prints the count of each status code; exits 1 on a failure.
The test suite runs the same fuzz, bounded (tests/serve/test_api.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ERROR_KEYS = {"message", "type", "param", "code"}

TOOL_TEMPLATE = (  # Hermes-style ChatML with tool support (ours)
    "{%- if tools %}{{ '<|im_start|>system\nYou may call these tools:\n<tools>' }}"
    "{%- for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}{{ '<|im_start|>assistant\n' }}"
    "{%- for call in message.tool_calls %}{{ '<tool_call>\n{\"name\": \"' + call.function.name + '\", \"arguments\": '"
    " + (call.function.arguments | tojson) + '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def stub_app(request_timeout: float = 2.0, max_concurrency: int = 4, tools: bool = False) -> Any:
    """The server over a random 1-layer Llama with the embedded tokenizer (fast, and it still runs
    every path: chat template, grammars, logprobs, stop strings, streams); ``tools``: with a chat
    template that has tool support."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunesmith.models.load import prepare_embedded
    from tunesmith.serve.app import Served, create_app

    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded())
    if tools:
        tokenizer.chat_template = TOOL_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    served = Served(model, tokenizer, "stub", {}, default_max_tokens=8)
    return create_app(served, max_concurrency=max_concurrency, request_timeout=request_timeout)


def start_server(app: Any) -> tuple[str, Any, threading.Thread]:
    """``app`` under uvicorn on a free loopback port, in a thread: (url, server, thread)."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def is_openai_error(body: Any) -> bool:
    return (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
            and set(body["error"]) == ERROR_KEYS and isinstance(body["error"]["message"], str)
            and isinstance(body["error"]["type"], str))


def problem(status: int, content_type: str, text: str) -> str | None:
    """Why a response fails the property, or None."""
    if status >= 500:
        return f"{status}"
    if status >= 400:
        try:
            body = json.loads(text)
        except ValueError:
            return f"{status} without a JSON body"
        return None if is_openai_error(body) else f"{status} not in OpenAI's error shape"
    if content_type.startswith("text/event-stream") and '"server_error"' in text:
        return "a stream with a server error event"
    return None


# Fields whose every non-null value is refused (400): half the bodies go without them, to reach generation.
REFUSED = ("audio", "prediction", "web_search_options", "functions", "function_call", "reasoning_effort",
           "verbosity", "modalities", "tools", "tool_choice", "suffix", "best_of", "stream_options", "top_logprobs")


def served_model(case: Any, dice: int, model: str, refused: tuple[str, ...] = REFUSED) -> Any:
    """Nine bodies in ten name the served model (a random name only reaches the 404); half go
    without the fields that are always refused."""
    if isinstance(case.body, dict):
        if dice and "model" in case.body:
            case.body["model"] = model
        if dice >= 5:
            for name in refused:
                case.body.pop(name, None)
    return case


@dataclass
class FuzzResult:
    statuses: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (what failed, the request as curl)
    sent: int = 0
    seconds: float = 0.0


def fuzz(url: str, requests: int, seconds: float, seed: int = 0, verbose: bool = False, model: str = "stub",
         tools: bool = False) -> FuzzResult:
    """``requests`` generated requests (fewer if ``seconds`` run out) against the server at ``url``."""
    import requests as http
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as seeded
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    refused = tuple(name for name in REFUSED if not (tools and name in ("tools", "tool_choice")))
    generated = st.one_of(schema.as_strategy(schemathesis.GenerationMode.POSITIVE),
                          schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    cases = st.tuples(generated, st.integers(0, 2**16)).map(lambda pair: served_model(pair[0], pair[1] % 10, model, refused))
    result, started, session = FuzzResult(), time.monotonic(), http.Session()

    @settings(max_examples=requests, deadline=None, database=None, derandomize=False, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seeded(seed)
    @given(cases)
    def send(case: Any) -> None:
        if time.monotonic() - started > seconds:
            return
        try:
            response = case.call(base_url=url, session=session, timeout=60)
        except Exception as err:  # the connection itself failed: the server broke it
            result.failures.append((f"no response: {err!r}"[:200], case.as_curl_command()))
            return
        result.sent += 1
        result.statuses[response.status_code] += 1
        if verbose:
            print(response.status_code, response.text[:150].replace("\n", " "))
        content_type = response.headers.get("content-type") or ""
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        found = problem(response.status_code, content_type, response.text)
        if found is not None:
            result.failures.append((f"{found}: {response.text[:200]}", case.as_curl_command()[:2000]))

    send()
    result.seconds = time.monotonic() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3000.0, help="stop sending after this long")
    parser.add_argument("--timeout", type=float, default=2.0, help="the server's per-request timeout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print each status and the start of its body")
    parser.add_argument("--tools", action="store_true", help="a chat template with tool support")
    args = parser.parse_args()
    url, server, thread = start_server(stub_app(args.timeout, tools=args.tools))
    try:
        result = fuzz(url, args.requests, args.seconds, args.seed, args.verbose, tools=args.tools)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    print(f"{result.sent} requests in {result.seconds:.0f} s")
    print("status counts: " + ", ".join(f"{code}: {count}" for code, count in sorted(result.statuses.items())))
    print(f"failures: {len(result.failures)}")
    for what, curl in result.failures[:20]:
        print(f"- {what}\n  {curl}")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
