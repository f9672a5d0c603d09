"""Self-instruct synthesis: filtering and provenance, over HTTP and with the project's own generation."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunesmith.cli.main import main
from tunesmith.data.synth import SeedTask, parse_task, synthesize

SEEDS = [SeedTask("s1", "Name a primary colour.", "", "Red"),
         SeedTask("s2", "Add the two numbers.", "2 and 3", "5"),
         SeedTask("s3", "Translate to French.", "cat", "chat")]

# What the stub server answers, in order: one of each case the filters must handle.
SCRIPT = [
    "Task 4\nInstruction: Give the capital of Peru.\nInput: <none>\nOutput: Lima",
    "Instruction: Add the two numbers.\nInput: 2 and 3\nOutput: 5",  # a seed again
    "Instruction:\nInput:\nOutput:",  # empty
    "Instruction: Write a long essay.\nInput: <none>\nOutput: " + "word " * 1000,  # over-long
    "Instruction: Give the capital of Peru.\nInput: <none>\nOutput: Lima",  # a kept row again
    "Instruction: Sort the letters alphabetically.\nInput: d b a c\nOutput: a b c d",
]


class ScriptedChat(BaseHTTPRequestHandler):
    replies: list[str] = []
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        reply = type(self).replies.pop(0) if type(self).replies else ""
        payload = json.dumps({"object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        return  # keep the scripted server's access log out of the test output


@pytest.fixture
def chat_server():
    ScriptedChat.replies, ScriptedChat.requests = list(SCRIPT), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_parse_task_reads_the_three_parts():
    assert parse_task(SCRIPT[0]) == {"instruction": "Give the capital of Peru.", "input": "", "output": "Lima"}


def test_synth_over_http_filters_and_records_origin(chat_server, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": t.id, "instruction": t.instruction,
                                         "instances": [{"input": t.input, "output": t.output}]}) + "\n"
                             for t in SEEDS))
    out = tmp_path / "synth.jsonl"
    code = main(["data", "synth", "--seeds", str(seeds), "--n", "2", "--endpoint", chat_server,
                 "--endpoint-model", "stub", "--api-key", "k", "--out", str(out), "--max-chars", "500"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["Give the capital of Peru.", "Sort the letters alphabetically."]
    origin = rows[1]["_origin"]
    assert origin["generator"] == f"endpoint:{chat_server} model=stub" and origin["attempt"] == 6
    assert set(origin["seed_tasks"]) <= {"s1", "s2", "s3"} and len(origin["seed_tasks"]) == 3
    assert len(ScriptedChat.requests) == 6
    first = ScriptedChat.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer k"
    assert first["body"]["model"] == "stub" and "Task 4" in first["body"]["messages"][0]["content"]


def test_synth_counts_each_drop_reason(chat_server):
    from tunesmith.data.synth import endpoint_generator

    result = synthesize(SEEDS, endpoint_generator(chat_server, "stub", 0.8, 64), n=2, generator_name="stub",
                        max_chars=500)
    assert len(result.rows) == 2 and result.attempts == 6
    assert dict(result.dropped) == {"near-duplicate of a seed": 1, "empty instruction or output": 1,
                                    "over-long": 1, "near-duplicate of a generated row": 1}


@pytest.mark.slow
def test_synth_with_the_embedded_model(shared_data, tmp_path):
    out = tmp_path / "local.jsonl"
    code = main(["data", "synth", "--seeds", str(shared_data / "alpaca_seed_tasks.jsonl"), "--n", "2",
                 "--model", "embedded", "--out", str(out), "--max-new-tokens", "96", "--seed", "1"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows, "with the prefilled 'Instruction:' the 135M model writes usable tasks"
    for row in rows:
        assert row["instruction"].strip() and row["output"].strip()
        assert row["_origin"]["generator"] == "local:embedded"
        assert all(s.startswith("seed_task_") for s in row["_origin"]["seed_tasks"])
