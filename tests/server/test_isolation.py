"""API keys see only their own files, jobs and models, and no request reads or writes outside the
storage root. The server runs in this process on the tiny random model (FastAPI's TestClient, driven
by the official openai client); one real fine-tuning job trains it in a child process.

Planted once each, and caught: the key filter taken out of ``store.owned`` (bob read alice's file,
the first assertion failed); the file name used as the stored file's name (the crafted name
"../../outside.jsonl" wrote beside the root, the outside check failed).
"""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from helpers import counting_rows, write_jsonl
from server_helpers import server_flags, wait_for
from tunesmith.server.app import build_server
from tunesmith.server.storage import Storage
from tunesmith.server.store import Store

FAST = {"training.max_steps": 2, "training.batch_size": 4, "data.max_seq_len": 64, "training.log_every": 1}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, str, str]:
    root = tmp_path / "root"
    store = Store(Storage(root).database_url)
    return root, store.create_key("alice")[1], store.create_key("bob")[1]


@pytest.mark.long
def test_keys_see_only_their_own_pause_resume_delete_and_nothing_leaves_the_root(tiny_model_dir, tmp_path, keys):
    root, alice_key, bob_key = keys
    app = build_server(server_flags(tiny_model_dir, root))
    data = write_jsonl(tmp_path / "train.jsonl", counting_rows(16))
    with TestClient(app) as http:
        alice = openai.OpenAI(base_url="http://testserver/v1", api_key=alice_key, http_client=http, max_retries=0)
        bob = openai.OpenAI(base_url="http://testserver/v1", api_key=bob_key, http_client=http, max_retries=0)
        crafted = alice.files.create(file=("../../outside.jsonl", data.read_bytes()), purpose="fine-tune")
        assert crafted.filename == "outside.jsonl"
        job = alice.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=crafted.id, suffix="mine",
                                            extra_body={"tunesmith": {**FAST, "training.max_steps": 60,
                                                                      "training.save_every": 1000}})
        # Pause checkpoints and stops; resume continues from that checkpoint, each step trained once.
        run = Storage(root).run(job.id)
        deadline = time.monotonic() + 60
        while not run.metrics():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert alice.fine_tuning.jobs.pause(job.id).id == job.id
        paused = wait_for(alice, job.id, until=("paused", "succeeded"))
        assert paused.status == "paused", "the job ended before it could be paused: give it more steps"
        at = max(r["step"] for r in run.metrics())
        assert (run.checkpoints_dir / f"step-{at:07d}").is_dir()
        alice.fine_tuning.jobs.resume(job.id)
        done = wait_for(alice, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in alice.fine_tuning.jobs.list_events(job.id, limit=500).data]
        assert f"Fine-tuning job resumed from the checkpoint of step {at}" in messages
        assert [r["step"] for r in run.metrics() if "loss" in r] == list(range(1, 61))
        model = done.fine_tuned_model
        assert alice.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to 3."}],
                                             max_tokens=4).choices[0].message.content is not None

        # bob: every id of alice's answers as an unknown id does
        for call in (lambda: bob.files.retrieve(crafted.id), lambda: bob.files.content(crafted.id),
                     lambda: bob.files.delete(crafted.id), lambda: bob.fine_tuning.jobs.retrieve(job.id),
                     lambda: bob.fine_tuning.jobs.cancel(job.id), lambda: bob.fine_tuning.jobs.list_events(job.id),
                     lambda: bob.fine_tuning.jobs.checkpoints.list(job.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.NotFoundError) as hidden:
            bob.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.NotFoundError) as unknown:
            bob.chat.completions.create(model=model + "x", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=2)
        assert hidden.value.body["message"].replace(model, "M") == unknown.value.body["message"].replace(
            model + "x", "M")
        with pytest.raises(openai.BadRequestError) as borrowed:
            bob.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=crafted.id)
        assert borrowed.value.body["param"] == "training_file"
        assert [m.id for m in bob.models.list()] == [app.state.service.served_name]
        assert alice.models.retrieve(model).id == model
        with pytest.raises(openai.NotFoundError):
            bob.models.retrieve(model)
        assert model in [m.id for m in alice.models.list()]
        assert bob.files.list().data == [] and bob.fine_tuning.jobs.list().data == []

        # crafted ids and paths in URLs
        headers = {"Authorization": f"Bearer {alice_key}"}
        for path in ("/v1/files/..%2Fstore.db/content", "/v1/files/../../etc/passwd/content",
                     "/v1/files/file-..%2F..%2Fstore/content", f"/v1/files/{crafted.id}%2F..%2F..%2Fstore.db/content",
                     "/v1/fine_tuning/jobs/..%2F..%2Fstore.db/checkpoints"):
            answer = http.get(path, headers=headers)
            assert answer.status_code == 404 and "error" in answer.json(), (path, answer.status_code)
        assert http.get("/v1/files", headers={"Authorization": "Bearer tsk-wrong"}).status_code == 401
        for name in ("/etc/passwd", "..\\..\\windows.jsonl", "a/../../../b.jsonl", "\x00.jsonl"):
            stored = alice.files.create(file=(name, data.read_bytes()), purpose="fine-tune")
            assert "/" not in stored.filename and "\\" not in stored.filename

        # A deleted fine-tuned model is no longer listed or served.
        assert alice.models.delete(model).deleted
        assert model not in [m.id for m in alice.models.list()]
        with pytest.raises(openai.NotFoundError):
            alice.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            alice.models.delete(model)
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(root) and p.name not in ("train.jsonl",)]
    assert outside == [], outside
    stored = sorted(p.name for p in (root / "files").iterdir())
    assert len(stored) == 5 and all(name.startswith("file-") and name.endswith(".jsonl") for name in stored)
    assert list((root / "tmp").iterdir()) == []


def test_uploads_are_checked_and_limited(tiny_model_dir, tmp_path, keys):
    root, alice_key, _ = keys
    app = build_server(server_flags(tiny_model_dir, root, max_upload_mb=1))
    rows = counting_rows(6)
    rows[2] = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"}]}
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=alice_key, http_client=http, max_retries=0)
        with pytest.raises(openai.BadRequestError) as bad:
            client.files.create(file=("mine.jsonl", write_jsonl(tmp_path / "bad.jsonl", rows).read_bytes()),
                                purpose="fine-tune")
        assert bad.value.body["param"] == "file" and bad.value.body["code"] == "invalid_file_format"
        assert "mine.jsonl:3: messages[0].role" in bad.value.body["message"], bad.value.body["message"]
        assert str(root) not in bad.value.body["message"]
        with pytest.raises(openai.APIStatusError) as big:
            client.files.create(file=("big.jsonl", b"x" * (2 << 20)), purpose="fine-tune")
        assert big.value.status_code == 413
        with pytest.raises(openai.BadRequestError) as latin:
            client.files.create(file=("latin.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1")),
                                purpose="fine-tune")
        assert "UTF-8" in latin.value.body["message"]
        parts = [("file", ("a.jsonl", b"{}")), *[(f"x{i}", ("b", b"1")) for i in range(50)]]
        many = http.post("/v1/files", headers={"Authorization": f"Bearer {alice_key}"}, files=parts,
                         data={"purpose": "fine-tune"})
        assert many.status_code == 400 and "part 'x0'" in many.json()["error"]["message"]
        head = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--B\r\n'
                b'X-Note:\r\nContent-Disposition: form-data; name="file"; filename="h.jsonl"\r\n\r\n')
        rows_bytes = write_jsonl(tmp_path / "h.jsonl", counting_rows(3)).read_bytes()
        multipart = {"Authorization": f"Bearer {alice_key}", "Content-Type": "multipart/form-data; boundary=B"}
        whole = http.post("/v1/files", headers=multipart, content=head + rows_bytes + b"\r\n--B--\r\n")
        assert whole.status_code == 200 and whole.json()["filename"] == "h.jsonl"  # an empty header is a header
        cut = http.post("/v1/files", headers=multipart, content=head + rows_bytes[:20])
        assert cut.status_code == 400 and "cut short" in cut.json()["error"]["message"]
        assert list((root / "tmp").iterdir()) == []  # nothing left of the refused uploads
        with pytest.raises(openai.BadRequestError) as purpose:
            client.files.create(file=("ok.jsonl", write_jsonl(tmp_path / "ok.jsonl", counting_rows(4)).read_bytes()),
                                purpose="assistants")
        assert purpose.value.body["param"] == "purpose"
        pairs = [{"input": {"messages": [{"role": "user", "content": "hi"}]},
                  "preferred_output": [{"role": "assistant", "content": "hello"}],
                  "non_preferred_output": [{"role": "assistant", "content": "go away"}]}] * 4
        chat = client.files.create(file=("chat.jsonl", write_jsonl(tmp_path / "c.jsonl", counting_rows(4))
                                         .read_bytes()), purpose="fine-tune")
        prefs = client.files.create(file=("p.jsonl", write_jsonl(tmp_path / "p.jsonl", pairs).read_bytes()),
                                    purpose="fine-tune")
        with pytest.raises(openai.BadRequestError) as mismatch:
            client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=chat.id,
                                           method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
        assert mismatch.value.body["param"] == "training_file"
        with pytest.raises(openai.BadRequestError) as forbidden:
            client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=chat.id,
                                           extra_body={"tunesmith": {"data.train": "/etc/passwd"}})
        assert forbidden.value.body["param"] == "tunesmith"
        for extension in ({"method.type.x": 1}, {"method.type": "full"}):
            with pytest.raises(openai.BadRequestError) as refused:
                client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=chat.id,
                                               extra_body={"tunesmith": extension})
            assert refused.value.body["param"] == "tunesmith", extension
        with pytest.raises(openai.BadRequestError) as invalid:
            client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=chat.id,
                                           hyperparameters={"n_epochs": 0})
        assert "n_epochs" in invalid.value.body["param"]
        dpo = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=prefs.id,
                                             method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
                                             metadata={"tunesmith.training.max_steps": "1", "team": "a"})
        assert dpo.method.type == "dpo" and dpo.hyperparameters.beta == 0.2
        client.fine_tuning.jobs.cancel(dpo.id)
        assert wait_for(client, dpo.id).status == "cancelled"


def test_the_migrations_make_the_models_schema_and_keep_the_rows(tmp_path):
    """Alembic's head equals the SQLAlchemy models (a model changed without a migration fails here), and
    upgrading a store of the first schema keeps its rows."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config as AlembicConfig
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine, text

    from tunesmith.server.store import MIGRATIONS, Base, migrate

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO api_keys (id, name, digest, created_at) VALUES ('key-1', 'a', 'd', 1)"))
    migrate(url)
    migrate(url)  # again: nothing to do
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM api_keys")).scalars().all() == ["a"]
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
