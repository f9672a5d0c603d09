"""`tunesmith serve --engine vllm`: vLLM's own server (its CPU build here) behind tunesmith's front, the
embedded SmolLM2-135M as the base and a LoRA adapter through vLLM's multi-LoRA. The official client
gets the routes, the fields and the error bodies it gets from the built-in engines, and the prompt
vLLM templates has as many tokens as tunesmith's own template gives (the training-time template).

vLLM runs from its own environment (`make vllm` builds .venv-vllm; TUNESMITH_VLLM_PYTHON names
another): the test skips, saying so, where there is none. Its error mapping is checked without vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tunesmith.generate import vllm
from tunesmith.serve.app import VLLMFront, _from_vllm, create_app

REPO = Path(__file__).resolve().parents[2]
ASK = [{"role": "user", "content": "Leila is a 76-year-old electrician who lives in Porto."}]


def test_vllm_errors_get_this_servers_body():
    """vLLM's `type` is a class name and its `param` starts with "body."; its 5xx details stay in the log."""
    error = _from_vllm(400, json.dumps({"error": {"message": "bad n", "type": "BadRequestError",
                                                  "param": "body.n", "code": 400}}).encode())
    assert error.body() == {"error": {"message": "bad n", "type": "invalid_request_error", "param": "n", "code": None}}
    hidden = _from_vllm(500, b'{"error": {"message": "CUDA out of memory at /secret/path"}}')
    assert hidden.status == 500 and "secret" not in hidden.message and hidden.kind == "server_error"
    assert _from_vllm(404, b"not json").body()["error"]["message"] == "the vLLM engine answered 404"


def test_forwarded_messages_are_the_ones_this_server_templates():
    """vLLM would keep 'developer' and join content parts with newlines; what is forwarded is what the
    built-in engines template: 'system', parts joined as ChatMessage.text joins them, tool calls kept
    in OpenAI's shape. Planted defect seen failing: the raw messages forwarded."""
    from tunesmith.serve.app import _forwarded_messages
    from tunesmith.serve.protocol import ChatRequest

    body = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "parts."}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"}]})
    messages = _forwarded_messages(body)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": body.messages[1].text()} and "\n" not in messages[1]["content"]
    assert messages[2]["tool_calls"] == [{"id": "c1", "type": "function",
                                         "function": {"name": "f", "arguments": "{\"x\": 1}"}}]
    assert messages[3]["tool_call_id"] == "c1"


def test_the_command_line_names_every_adapter_and_a_rank_that_holds_them():
    models = vllm.VLLMModels("/m", "base", "/tok", {"a": "/a", "b": "/b"}, max_lora_rank=12, context_length=4096)
    line = vllm.command("py", models, 9000, 16, "hermes", ["--dtype=float32"], cpu=True)
    assert line[line.index("--max-lora-rank") + 1] == "16" and line[line.index("--max-loras") + 1] == "2"
    assert "a=/a" in line and "b=/b" in line and line[line.index("--tool-call-parser") + 1] == "hermes"
    assert "bfloat16" not in line, "the user's --dtype wins"
    plain = vllm.command("py", vllm.VLLMModels("/m", "base", "/m"), 9000, 8, None, [], cpu=True)
    assert "--enable-lora" not in plain and plain[plain.index("--dtype") + 1] == "bfloat16"


def _vllm_python() -> str | None:
    try:
        return vllm.find_python()
    except vllm.VLLMError:
        return None


def _fuzz_serve():
    spec = importlib.util.spec_from_file_location("fuzz_serve_for_vllm", REPO / "bench" / "fuzz_serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, embedded_dir) -> Path:
    """A LoRA adapter of rank 8 on the embedded model, random enough to change its replies."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init (no change); large enough here to change the replies
                parameter.normal_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def through_vllm(tmp_path_factory, embedded_dir, lora_dir):
    """(the front's URL, the tunesmith tokenizer, the vLLM process) for the embedded base plus "quick"."""
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed here: `make vllm` builds .venv-vllm (vLLM's CPU build pins a "
                    "transformers older than tunesmith's, so it has its own environment)")
    from tunesmith.serve.load import build_for_vllm

    served, models = build_for_vllm("embedded", {"quick": str(lora_dir)}, max_tokens=16)
    line = vllm.command(python, models, vllm.free_port(), 8, None, [], cpu=True)
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with vllm.VLLMProcess(line, vllm.environment(cpu=True), log, startup_timeout=300, progress=False) as process:
        app = create_app(served, api_key="k", request_timeout=120, vllm=VLLMFront(process.url))
        address, server, thread = _fuzz_serve().start_server(app)
        yield address, served, process
        server.should_exit = True
        thread.join(timeout=10)
    assert process.process is None


def test_vllm_serves_the_base_and_a_lora_adapter_behind_the_same_front(through_vllm):
    address, served, process = through_vllm
    api = openai.OpenAI(base_url=f"{address}/v1", api_key="k", max_retries=0, timeout=120)
    assert [m.id for m in api.models.list().data] == [served.base_name, "quick"]

    base = api.chat.completions.create(model=served.base_name, messages=ASK, temperature=0, max_tokens=12)
    quick = api.chat.completions.create(model="quick", messages=ASK, temperature=0, max_tokens=12)
    assert base.choices[0].message.content != quick.choices[0].message.content, "the adapter changed nothing"
    from tunesmith.data.tokenize import encode_prompt

    assert base.usage.prompt_tokens == encode_prompt(served.tokenizer, ASK).shape[1]  # the same template
    parts = [{"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "text", "text": "Leila is 76. "}, {"type": "text", "text": "Age?"}]}]
    checked = api.chat.completions.create(model=served.base_name, messages=parts, temperature=0, max_tokens=2)
    ours = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Leila is 76. Age?"}]
    assert checked.usage.prompt_tokens == encode_prompt(served.tokenizer, ours).shape[1]

    seeded = dict(model="quick", messages=ASK, temperature=1.0, seed=5, n=2, max_tokens=8)
    first, again = api.chat.completions.create(**seeded), api.chat.completions.create(**seeded)
    assert len(first.choices) == 2 and [c.message.content for c in first.choices] == \
        [c.message.content for c in again.choices]

    scored = api.chat.completions.create(model=served.base_name, messages=ASK, temperature=0, max_tokens=4,
                                         logprobs=True, top_logprobs=2)
    entries = scored.choices[0].logprobs.content
    assert len(entries) == scored.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    shaped = api.chat.completions.create(model=served.base_name, messages=ASK, temperature=0, max_tokens=60,
                                         response_format={"type": "json_schema", "json_schema": {
                                             "name": "person", "schema": schema, "strict": True}})
    person = json.loads(shaped.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)

    chunks = list(api.chat.completions.create(model="quick", messages=ASK, temperature=0, max_tokens=12,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == quick.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == quick.usage.completion_tokens


def test_vllm_requests_are_refused_and_guarded_as_the_built_in_engines_refuse_them(through_vllm):
    address, served, _ = through_vllm
    api = openai.OpenAI(base_url=f"{address}/v1", api_key="k", max_retries=0, timeout=120)
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="nope", messages=ASK)
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as unknown:
        api.chat.completions.create(model="quick", messages=ASK, extra_body={"min_p": 0.1})
    assert unknown.value.body["param"] == "min_p"
    with pytest.raises(openai.BadRequestError) as too_long:
        api.chat.completions.create(model="quick", messages=ASK, max_tokens=10**6)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as tools:  # started without a tool-call parser
        api.chat.completions.create(model="quick", messages=ASK, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object"}}}])
    assert tools.value.body["param"] == "tools"
    deep: dict = {"type": "object"}
    for _ in range(300):  # valid JSON the validator takes, nested deeper than the serializer goes
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="quick", messages=ASK, max_tokens=2, response_format={
            "type": "json_schema", "json_schema": {"name": "deep", "schema": deep}})
    assert httpx.get(f"{address}/health").json()["queued"] == 0, "the refused request kept its place in the queue"
    wrong_key = openai.OpenAI(base_url=f"{address}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
