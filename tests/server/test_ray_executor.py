"""`RayExecutor` on a real one-node Ray cluster started by the test (2 CPUs, no GPU): a job of `tunesmith server --ray`
through an actor, SIGTERM through the actor, one slot per CPU node, a lost actor, and what a driver that
disconnects leaves its trainings (SIGTERM, so that they checkpoint, not SIGKILL).

The head runs as ``ray start --head --block`` in a child process and is stopped by SIGTERM to that
process: ``ray stop`` would stop every Ray on this machine, other people's included.

Planted once each, and caught:
- the actor's ``terminate`` doing nothing: the SIGTERM file never appeared and poll() stayed None;
- ``ACTOR_ENV`` emptied (Ray's default: SIGKILL to a dying worker's children): after ``close()`` the
  child never wrote its SIGTERM file, i.e. a training of a server that dies would lose its last steps;
- a died actor read as still running (``_answer`` returning None for ``RayActorError``): poll() stayed
  None instead of `EXIT_LOST`;
- ``slots()`` counting CPUs instead of nodes: two slots on the one-node cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import counting_rows, write_jsonl
from server_helpers import server_flags, wait_for
from tunesmith.errors import TunesmithError
from tunesmith.launch import EXIT_STOPPED
from tunesmith.server.ray_executor import EXIT_LOST, RayExecutor, RayTraining

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")

# A stand-in for `tunesmith train`: on SIGTERM it writes OUT and exits 143; otherwise it sleeps.
SLEEPER = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    def stop(number, frame):
        out.write_text("SIGTERM")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    out.with_suffix(".started").write_text("started")
    while True:
        time.sleep(0.05)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """The address of a one-node Ray cluster with 2 CPUs, started for this module (Ray's socket paths must
    be short: its folder is /tmp/rt-XXXX, not pytest's tmp_path)."""
    pytest.importorskip("ray", reason="Ray is the optional extra: pip install 'tunesmith[ray]'")
    if not RAY.is_file():
        pytest.skip(f"{RAY}: no ray command beside this interpreter")
    folder = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    port = free_port()
    output = (folder / "head.log").open("wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--disable-usage-stats",
                             "--include-dashboard=false", f"--temp-dir={folder}", "--block"],
                            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (folder / "head.log").read_text(errors="replace"):
            assert head.poll() is None and time.monotonic() < deadline, (folder / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        output.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def executor(ray_head: str) -> Iterator[RayExecutor]:
    executor = RayExecutor(ray_head)
    yield executor
    executor.close()


def wait_for_exit(handle: RayTraining, timeout_s: float = 60.0) -> int | None:
    """The exit code, polled as the job queue polls; None if it still runs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = handle.poll()
        if code is not None:
            return code
        time.sleep(0.2)
    return None


def start_sleeper(executor: RayExecutor, folder: Path) -> tuple[RayTraining, Path]:
    """The sleeper started through ``executor``, once it runs; and the file its SIGTERM handler writes."""
    script = folder / "sleeper.py"
    script.write_text(SLEEPER)
    out = folder / "sigterm.txt"
    handle = executor.start([sys.executable, str(script), str(out)], folder / "sleeper.log", executor.slots()[0])
    deadline = time.monotonic() + 60
    while not out.with_suffix(".started").is_file():
        assert handle.poll() is None, (folder / "sleeper.log").read_text()
        assert time.monotonic() < deadline, "the sleeper did not start within 60 s"
        time.sleep(0.1)
    return handle, out


def test_the_server_runs_a_job_on_ray(ray_head: str, tiny_model_dir: Path, tmp_path: Path):
    """`tunesmith server --ray ADDRESS`: a job created with the openai client trains through a Ray actor
    (its run folder finished, its log written) and its model is served."""
    import openai
    from fastapi.testclient import TestClient

    from tunesmith.server.app import build_server
    from tunesmith.server.storage import Storage
    from tunesmith.server.store import Store

    root = tmp_path / "root"
    key = Store(Storage(root).database_url).create_key("ray")[1]
    app = build_server(server_flags(tiny_model_dir, root, ray=ray_head))
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
        upload = client.files.create(file=("c.jsonl", write_jsonl(tmp_path / "c.jsonl", counting_rows(8))
                                           .read_bytes()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=upload.id, extra_body={
            "tunesmith": {"training.max_steps": 3, "training.batch_size": 4, "data.max_seq_len": 64}})
        done = wait_for(client, job.id)
        assert done.status == "succeeded", (done.error, Storage(root).job_log(job.id).read_text()[-3000:])
        run = Storage(root).run(job.id)
        assert run.finished and [r["step"] for r in run.metrics() if "loss" in r] == [1, 2, 3]
        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2,
                                               messages=[{"role": "user", "content": "Count to 2."}])
        assert reply.model == done.fine_tuned_model


def test_terminate_reaches_the_child_through_the_actor(executor: RayExecutor, tmp_path: Path):
    handle, out = start_sleeper(executor, tmp_path)
    handle.terminate()
    assert wait_for_exit(handle) == EXIT_STOPPED
    assert out.read_text() == "SIGTERM"


def test_slots_are_one_per_node_without_gpus(executor: RayExecutor):
    import ray

    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    assert executor.slots() == nodes and len(nodes) == 1


def test_an_actor_that_died_reads_as_lost(executor: RayExecutor, tmp_path: Path):
    import ray

    handle, _ = start_sleeper(executor, tmp_path)
    ray.kill(handle.actor)  # as if its node were lost
    assert wait_for_exit(handle) == EXIT_LOST
    assert "the Ray actor running this training died" in (tmp_path / "sleeper.log").read_text()


def test_a_driver_that_disconnects_leaves_its_trainings_a_sigterm(ray_head: str, tmp_path: Path):
    """Ray kills a driver's actors when it disconnects (or dies); the child must get SIGTERM (it
    checkpoints), not Ray's default SIGKILL of a dying worker's children."""
    executor = RayExecutor(ray_head)
    try:
        _, out = start_sleeper(executor, tmp_path)
    finally:
        executor.close()
    deadline = time.monotonic() + 30
    while not out.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert out.is_file() and out.read_text() == "SIGTERM"


def test_no_cluster_at_the_address_is_a_clear_error(ray_head: str):
    started = time.monotonic()
    with pytest.raises(TunesmithError, match="cannot reach the Ray cluster at 127.0.0.1:.*ray start --head"):
        RayExecutor(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 10  # ray.init alone retries for minutes


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(TunesmithError, match=r"pip install 'tunesmith\[ray\]'"):
        RayExecutor("127.0.0.1:6379")
