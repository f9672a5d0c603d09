"""`tunesmith server` as users run it: a process on 127.0.0.1 with the embedded SmolLM2-135M-Instruct,
driven by the official openai client. The whole flow (upload, create, wait, events, checkpoints, chat
with the ft: model, cancel with a checkpoint), and a server killed mid-job whose job finishes after a
restart with no step lost or trained twice.

Planted once, and caught: the restarted queue launching without --resume (the resumed job trained
from step 1 again: the "resumed from the checkpoint" event was missing and the records of the steps
before the kill were rewritten).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from helpers import counting_rows, write_jsonl
from server_helpers import wait_for
from tunesmith.server.storage import Storage
from tunesmith.server.store import Store

pytestmark = pytest.mark.slow
FAST = {"training.batch_size": 2, "data.max_seq_len": 64, "training.log_every": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`tunesmith server` in a child process (its output in ROOT/server.log)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tunesmith", "server", "--root", str(self.root), "--port", str(self.port),
             "--model", "embedded", "--device", "cpu", "--dtype", "float32", "--shutdown-timeout", "30"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("the server did not start: " + (self.root / "server.log").read_text()[-3000:])

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def new_key(root: Path) -> str:
    return Store(Storage(root).database_url).create_key("test")[1]


def test_the_openai_client_fine_tunes_chats_cancels_and_survives_a_killed_server(embedded_dir, tmp_path):
    root = tmp_path / "root"
    key = new_key(root)
    server = Server(root).start()
    try:
        client = server.client(key)
        data = write_jsonl(tmp_path / "count.jsonl", counting_rows(16))
        upload = client.files.create(file=data.open("rb"), purpose="fine-tune")
        assert upload.filename == "count.jsonl" and upload.bytes == data.stat().st_size
        job = client.fine_tuning.jobs.create(model="embedded", training_file=upload.id, suffix="count", seed=3,
                                             hyperparameters={"n_epochs": 1, "learning_rate_multiplier": 2.0},
                                             extra_body={"tunesmith": {**FAST, "training.max_steps": 4,
                                                                       "training.save_every": 2}})
        assert job.status == "queued" and job.hyperparameters.learning_rate_multiplier == 2.0
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model.startswith("ft:") and ":count:" in done.fine_tuned_model
        assert done.trained_tokens > 0
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        steps = sorted(e.data["step"] for e in events if e.type == "metrics")
        assert steps == [1, 2, 3, 4], [e.message for e in events]
        assert events[0].message == "The job has successfully completed"  # newest first
        assert [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=2, after=events[1].id).data] == [
            e.id for e in events[2:4]]
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [4, 2]  # the final model is the last one
        assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-4"
        assert "train_loss" in checkpoints[0].metrics.model_dump(exclude_none=True)
        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=8,
                                               messages=[{"role": "user", "content": "Count to 3."}])
        assert reply.model == done.fine_tuned_model and reply.choices[0].message.content
        assert done.fine_tuned_model in [m.id for m in client.models.list()]

        long = client.fine_tuning.jobs.create(model="embedded", training_file=upload.id,
                                              extra_body={"tunesmith": {**FAST, "training.max_steps": 500,
                                                                        "training.save_every": 1000}})
        started = time.monotonic()
        while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long.id).data):
            assert time.monotonic() - started < 120, "the second job made no step"
            time.sleep(0.5)
        client.fine_tuning.jobs.cancel(long.id)
        cancelled = wait_for(client, long.id)
        assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
        kept = client.fine_tuning.jobs.checkpoints.list(long.id).data
        assert len(kept) == 1 and 1 <= kept[0].step_number < 500
        listed = client.fine_tuning.jobs.list(limit=1)
        assert [j.id for j in listed.data] == [long.id] and listed.has_more

        # Killed mid-job and started again: the job finishes, no step lost or trained twice.
        job = client.fine_tuning.jobs.create(model="embedded", training_file=upload.id, extra_body={
            "tunesmith": {**FAST, "training.max_steps": 8, "training.save_every": 1000}})
        run = Storage(root).run(job.id)
        deadline = time.monotonic() + 180
        while not any(r.get("step", 0) >= 2 for r in run.metrics()):
            assert time.monotonic() < deadline, "no second step"
            time.sleep(0.2)
        server.process.kill()  # SIGKILL: no shutdown of its own; the training gets its parent-death SIGTERM
        server.process.wait()
        deadline = time.monotonic() + 120
        while run.status().get("status") == "running":
            assert time.monotonic() < deadline, "the orphaned training did not stop"
            time.sleep(0.2)
        stopped = run.status()
        before = run.metrics()
        assert stopped["status"] == "preempted", stopped
        trained = max(r["step"] for r in before)
        assert stopped["step"] == trained < 8 and (run.checkpoints_dir / f"step-{trained:07d}").is_dir()

        server = Server(root).start()
        client = server.client(key)
        resumed = wait_for(client, job.id)
        assert resumed.status == "succeeded", resumed.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
        assert f"Fine-tuning job resumed from the checkpoint of step {trained}" in messages
        after = run.metrics()
        assert [r["step"] for r in after if "loss" in r] == list(range(1, 9))  # each step once
        assert [r for r in after if r["step"] <= trained] == before  # the steps before the kill: not trained again
        assert json.loads(run.summary_file.read_text())["steps"] == 8
        assert client.fine_tuning.jobs.retrieve(done.id).fine_tuned_model == done.fine_tuned_model  # kept
    finally:
        server.stop()
