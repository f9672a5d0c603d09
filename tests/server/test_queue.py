"""The job queue's state changes, driven tick by tick with a scripted executor (no training): a job
that cannot start fails alone, servers sharing a store launch a job once, a cancel or pause asked for
while the server is stopping or a job has no process is not lost, a paused job can be cancelled.

Planted once each, and caught: the claim's UPDATE without its status/claimant condition (both queues
launched the job); ``stop`` without recording the cancel (the restarted queue relaunched the job).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tunesmith.launch import EXIT_STOPPED
from tunesmith.server.queue import JobQueue
from tunesmith.server.storage import Storage
from tunesmith.server.store import Job, JobEvent, Store, new_id, now


class Scripted:
    """A training that runs until terminate(), then exits 143 (as `tunesmith train` does on SIGTERM)."""

    def __init__(self):
        self.code: int | None = None
        self.pid = None

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.code = EXIT_STOPPED


class FakeExecutor:
    def __init__(self, slots: int = 1, refuse: set[str] = frozenset()):
        self._slots, self.refuse = [None] * slots, refuse
        self.started: list[str] = []
        self.handles: dict[str, Scripted] = {}

    def slots(self):
        return list(self._slots)

    def start(self, command, log, slot, cwd=None, env=None):
        job_id = Path(command[-2]).parent.name  # .../jobs/JOB_ID/config.yaml --resume
        if job_id in self.refuse:
            raise RuntimeError("no node can take it")
        self.started.append(job_id)
        self.handles[job_id] = Scripted()
        return self.handles[job_id]

    def close(self):
        pass


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Store, Storage, str]:
    storage = Storage(tmp_path / "root")
    store = Store(storage.database_url)
    return store, storage, store.create_key("a")[0]


def add_job(store: Store, storage: Storage, owner: str, created: int) -> str:
    job_id = new_id("ftjob-")
    storage.job_dir(job_id).mkdir(parents=True)
    with store.session() as session:
        session.add(Job(id=job_id, owner=owner, model="m", status="queued", request={"model": "m",
                        "training_file": "file-0"}, config={"task": "sft", "training": {}}, created_at=created,
                        cancel_requested=False, launches=0))
    return job_id


def job(store: Store, job_id: str) -> Job:
    with store.session() as session:
        return session.get(Job, job_id)


def queue_of(store: Store, storage: Storage, executor: FakeExecutor, server: str | None = None) -> JobQueue:
    queue = JobQueue(store, storage, executor, lambda j: f"ft:m:{j.id}")
    if server is not None:
        queue.server = server
    return queue


def test_a_job_that_cannot_start_fails_alone(setup):
    store, storage, owner = setup
    first, second = add_job(store, storage, owner, 1), add_job(store, storage, owner, 2)
    executor = FakeExecutor(refuse={first})
    queue = queue_of(store, storage, executor)
    queue._tick()
    queue._tick()
    assert job(store, first).status == "failed" and job(store, first).error["code"] == "launch_failed"
    assert executor.started == [second] and job(store, second).status == "running"


def test_servers_sharing_a_store_launch_a_job_once(setup):
    store, storage, owner = setup
    job_id = add_job(store, storage, owner, 1)
    one, two = FakeExecutor(), FakeExecutor()
    first = queue_of(store, storage, one)
    other = queue_of(store, storage, two, server="elsewhere:1:0")  # another machine's server
    seen = job(store, job_id)  # both servers read the job as queued at the same moment: one claim wins
    assert first._claim(seen) and not other._claim(seen)
    with store.session() as session:
        session.get(Job, job_id).claimed_by = None
    first._tick()
    other._tick()
    first._tick()
    assert one.started == [job_id] and two.started == [] and job(store, job_id).launches == 1
    # a claimant that has gone on this machine (its process ended): the job passes on at once, not after the lease
    with store.session() as session:
        session.get(Job, job_id).claimed_by = f"{socket.gethostname()}:{2**22 + 12345}:0"  # no such process
        session.get(Job, job_id).heartbeat = now()
    first._running.clear()
    third = FakeExecutor()
    queue_of(store, storage, third, server="elsewhere:2:0")._tick()
    assert third.started == [job_id]
    # the claimant gone (no heartbeat for long, on another machine): the job passes to the other server
    with store.session() as session:
        session.get(Job, job_id).claimed_by = "this-host-is-not-it:1:0"
        session.get(Job, job_id).heartbeat = now() - 3600  # and its heartbeat long stale
    first._running.clear()
    other._tick()
    assert two.started == [job_id] and job(store, job_id).claimed_by == "elsewhere:1:0"


def test_a_cancel_during_shutdown_is_kept_and_a_paused_job_cancels(setup):
    store, storage, owner = setup
    running, paused = add_job(store, storage, owner, 1), add_job(store, storage, owner, 2)
    executor = FakeExecutor()
    queue = queue_of(store, storage, executor)
    queue._tick()
    assert job(store, running).status == "running"
    queue.pause(paused)  # queued: paused at once
    assert job(store, paused).status == "paused"
    queue.cancel(paused)
    assert job(store, paused).status == "cancelled"
    queue.cancel(running)  # flagged; the tick sends SIGTERM ...
    queue.stop(grace_s=1)  # ... but the server stops first: stop() sends it and records the cancel
    assert job(store, running).status == "cancelled"
    restarted = queue_of(store, storage, FakeExecutor())
    restarted._tick()
    assert restarted.executor.started == []
    with store.session() as session:
        ends = session.query(JobEvent).filter(JobEvent.job_id == running, JobEvent.message.like("%cancelled%")).count()
    assert ends == 1


def test_a_stopped_server_leaves_its_job_to_the_next_start(setup):
    store, storage, owner = setup
    job_id = add_job(store, storage, owner, 1)
    queue = queue_of(store, storage, FakeExecutor())
    queue._tick()
    queue.stop(grace_s=1)  # SIGTERM: the training checkpoints and stops (143); the job stays running
    assert job(store, job_id).status == "running" and job(store, job_id).claimed_by is None
    executor = FakeExecutor()
    restarted = queue_of(store, storage, executor)
    restarted._tick()
    assert executor.started == [job_id] and job(store, job_id).launches == 2


def test_a_job_whose_training_cannot_be_polled_does_not_stop_the_queue(setup):
    store, storage, owner = setup
    first, second = add_job(store, storage, owner, 1), add_job(store, storage, owner, 2)
    executor = FakeExecutor(slots=2)
    queue = queue_of(store, storage, executor)
    queue._tick()
    assert executor.started == [first, second]
    executor.handles[first].poll = lambda: 1 / 0  # e.g. a Ray handle whose cluster went away
    executor.handles[second].code = 0  # ended (not finished: no model) -> failed
    queue._tick()
    assert job(store, second).status == "failed" and job(store, first).status == "running"

