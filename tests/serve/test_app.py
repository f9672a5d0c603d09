"""The OpenAI client against `tunesmith serve`'s app, on 127.0.0.1 in this process."""

import re
import socket
import threading
import time
import urllib.request

import openai
import pytest
import uvicorn

from tunesmith.config.load import build_config
from tunesmith.generate.sample import SamplingConfig, generate_reply
from tunesmith.models.inference import load_for_inference
from tunesmith.recipes.sft import run_sft
from tunesmith.serve.app import create_app
from tunesmith.serve.load import build_served
from helpers import tiny_tree

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from helpers import counting_rows, write_jsonl

    folder = tmp_path_factory.mktemp("serve-runs")
    data = write_jsonl(folder / "d.jsonl", counting_rows())
    made = {}
    for name, seed in (("first", 0), ("second", 1)):
        tree = tiny_tree(tiny_model_dir, data, folder / "runs", "lora", max_steps=10, seed=seed)
        tree["name"] = name
        made[name] = run_sft(build_config(tree)).run_dir
    return made


@pytest.fixture(scope="module")
def server(runs):
    served = build_served(str(runs["first"]), {"second": str(runs["second"])}, "cpu", max_tokens=16)
    app = create_app(served, api_key=KEY, max_concurrency=1)
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", served
    instance.should_exit = True
    thread.join(timeout=10)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "Count to 4."}]


def test_chat_stream_and_train_serve_parity(server, runs):
    url, served = server
    api = client(url)
    assert [m.id for m in api.models.list().data] == served.names
    assert served.names[1:] == ["first", "second"]
    reply = api.chat.completions.create(model="first", messages=MESSAGES, temperature=0, max_tokens=12)
    text = reply.choices[0].message.content
    chunks = api.chat.completions.create(model="first", messages=MESSAGES, temperature=0, max_tokens=12,
                                         stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    model, tokenizer = load_for_inference(str(runs["first"]), "cpu")
    assert text == generate_reply(model, tokenizer, MESSAGES, SamplingConfig(max_new_tokens=12))
    assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")


def test_the_model_field_picks_the_adapter(server, runs):
    url, served = server
    api = client(url)
    replies = {name: api.chat.completions.create(model=name, messages=MESSAGES, temperature=0,
                                                 max_tokens=12).choices[0].message.content
               for name in ("first", "second", served.base_name)}
    model, tokenizer = load_for_inference(str(runs["second"]), "cpu")
    assert replies["second"] == generate_reply(model, tokenizer, MESSAGES, SamplingConfig(max_new_tokens=12))
    with model.disable_adapter():
        assert replies[served.base_name] == generate_reply(model, tokenizer, MESSAGES, SamplingConfig(max_new_tokens=12))
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=MESSAGES)


def test_completions_stop_strings_and_errors(server):
    url, _ = server
    api = client(url)
    done = api.completions.create(model="first", prompt="1 2 3", temperature=0, max_tokens=8)
    assert done.object == "text_completion" and isinstance(done.choices[0].text, str)
    full = api.chat.completions.create(model="first", messages=MESSAGES, temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    if len(text) > 2:
        stop = text[1:3]
        cut = api.chat.completions.create(model="first", messages=MESSAGES, temperature=0, max_tokens=12, stop=stop)
        assert cut.choices[0].message.content == text[: text.find(stop)]
        streamed = "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(
            model="first", messages=MESSAGES, temperature=0, max_tokens=12, stop=stop, stream=True) if c.choices)
        assert streamed == cut.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").chat.completions.create(model="first", messages=MESSAGES)
    with urllib.request.urlopen(f"{url}/health") as response:  # no key needed
        assert response.status == 200
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="first", messages=MESSAGES, max_tokens=100_000)
    assert caught.value.code == "context_length_exceeded"


def test_a_full_queue_answers_429(server):
    url, _ = server
    api = client(url)
    stream = api.chat.completions.create(model="first", messages=MESSAGES, temperature=0, max_tokens=16,
                                         stream=True)
    first = next(iter(stream))  # the first request now holds the only place
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            api.chat.completions.create(model="first", messages=MESSAGES, max_tokens=4)
        assert caught.value.response.headers["retry-after"] == "1"
    finally:
        for _ in stream:  # drain the first stream so its place in the queue is given back
            continue
    assert first.choices[0].delta.role == "assistant"


def test_data_synth_against_tunesmith_serve(server, tmp_path, capsys):
    """`tunesmith data synth --endpoint` over HTTP against the project's own server."""
    from tunesmith.cli.main import main

    url, _ = server
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "a", "instruction": "Count to 3.", "instances": [{"input": "", "output": "1 2 3"}]}\n'
                     '{"id": "b", "instruction": "Count to 2.", "instances": [{"input": "", "output": "1 2"}]}\n')
    out = tmp_path / "synth.jsonl"
    code = main(["-q", "data", "synth", "--seeds", str(seeds), "--n", "1", "--endpoint", url, "--endpoint-model",
                 "first", "--api-key", KEY, "--out", str(out), "--max-new-tokens", "12", "--temperature", "0"])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    # Whatever the random 2-layer model wrote, every attempt is either a kept row or a counted drop.
    match = re.search(r"wrote (\d+) rows .* after (\d+) attempts; dropped: (.*)", printed)
    kept, attempts = int(match.group(1)), int(match.group(2))
    dropped = sum(int(part.split()[0]) for part in match.group(3).split(", ") if part != "none")
    assert kept + dropped == attempts and attempts >= 1
    assert len(out.read_text().splitlines()) == kept


def test_body_limit_and_a_disconnect_cancels_generation(runs):
    """413 over the body limit; a streaming client that goes away stops its generation early."""
    import http.client
    import json as jsonlib

    served = build_served(str(runs["first"]), {}, "cpu", max_tokens=16)
    steps = []
    inner = served.model.get_base_model()  # generate() runs the wrapped model's forward once per token
    original = inner.forward

    def counting_forward(*args, **kwargs):
        steps.append(1)
        return original(*args, **kwargs)

    inner.forward = counting_forward
    app = create_app(served, max_body_bytes=2000)
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    while not instance.started:
        time.sleep(0.05)
    try:
        big = jsonlib.dumps({"model": "first", "messages": [{"role": "user", "content": "x" * 5000}]})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/chat/completions", big, {"Content-Type": "application/json"})
        assert connection.getresponse().status == 413
        connection.close()

        request = {"model": "first", "messages": MESSAGES, "max_tokens": 400, "temperature": 0}
        full = client(f"http://127.0.0.1:{port}", "unused").chat.completions.create(**request)
        uncancelled = len(steps)
        assert full.usage.completion_tokens > 200, "the model stops early by itself: the test would prove nothing"
        steps.clear()
        body = jsonlib.dumps({**request, "stream": True})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        response.read(64)  # the first event has arrived: generation is under way
        connection.sock.close()
        connection.close()
        deadline = time.monotonic() + 30
        while app_queue(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert app_queue(port) == 0, "the abandoned request still holds its place"
        # A 1-token request takes the model lock only once the abandoned generation has really ended.
        client(f"http://127.0.0.1:{port}", "unused").chat.completions.create(**{**request, "max_tokens": 1})
        abandoned = len(steps) - 1
        assert abandoned < uncancelled / 2, f"{abandoned} of {uncancelled} steps ran for a client that left"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


def app_queue(port: int) -> int:
    import json as jsonlib

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as response:
        return jsonlib.loads(response.read())["queued"]
