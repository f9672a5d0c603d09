"""The job queue: a thread that starts queued jobs as `tunesmith train` processes (one per slot of the
executor: a GPU, or this machine), follows them, and records what happens as the job's status and
events.

- A job's process is `tunesmith train JOB/config.yaml --resume`: a first start starts from the
  beginning, a later one from the newest checkpoint (no step lost, none trained twice).
- Cancel and pause: SIGTERM to the process, which checkpoints and stops; the job is then ``cancelled``
  (its checkpoint listed) or ``paused`` (``resume`` queues it again, to continue from that checkpoint).
  A request is a flag in the store, so that the server running the job acts on it whichever server
  took the request; a job with no process (queued, paused, waiting to be launched again) ends at once.
- Events come from the run folder: each metrics record (training and validation loss), each new
  checkpoint, and the job's own milestones. Their ids are made from the step, so reading a run again
  after a restart never doubles an event.
- A server that stops (SIGTERM, Ctrl-C) or is killed: its trainings get SIGTERM (from ``stop``, or as
  the parent-death signal) and checkpoint. Their jobs stay ``running`` in the store; the next start
  waits for a process of the last launch that still lives (its slot held meanwhile), then launches the
  job again, resuming it.
- Servers sharing one store (a database URL) take a job only by claiming it in one UPDATE, and renew
  their claims with a heartbeat; a running job passes to another server only once its claimant has
  gone (its process ended, on this machine, or its heartbeat is older than ``LEASE_S``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from tunesmith.launch import EXIT_FINISHED, EXIT_STOPPED, Executor, Handle, train_command
from tunesmith.rundir import RunDir
from tunesmith.server.storage import Storage
from tunesmith.server.store import Job, JobEvent, Store, now

log = logging.getLogger(__name__)
OLD_PROCESS_WAIT_S = 300.0  # after a restart: how long a process of the last launch may take to stop
LEASE_S = 60  # a claim not renewed for this long is a gone server's
HEARTBEAT_S = 10.0
SLOTS_REFRESH_S = 30.0  # the executor's slots are asked again (a Ray cluster's nodes come and go)
ACTIVE = ("queued", "running", "paused")


@dataclass
class _Running:
    handle: Handle
    slot: int  # index into JobQueue.slots
    offset: int = 0  # bytes of metrics.jsonl already read
    checkpoints: set[int] = field(default_factory=set)
    signalled: float | None = None  # when SIGTERM was sent for a cancel or pause


def server_id() -> str:
    """This server process: host, pid and start time (a pid alone may be reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.0f}"


def _claimant_gone(claimant: str | None) -> bool:
    """Whether the server ``claimant`` has ended, as far as this machine can tell (another host's: no)."""
    if claimant is None:
        return True
    host, _, rest = claimant.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return _same_process(int(pid), float(started) if started else None) is None


def held_elsewhere(job: Job, server: str) -> bool:
    """Whether another server that is still there holds ``job``: its claimant has not ended (as far as this
    machine can tell) and has sent a heartbeat within ``LEASE_S``."""
    return job.claimed_by not in (None, server) and not _claimant_gone(job.claimed_by) \
        and job.heartbeat >= now() - LEASE_S


def checkpoint_steps(run: RunDir) -> list[int]:
    """The steps of the run's complete checkpoints, oldest first (a folder being written is a .tmp-)."""
    if not run.checkpoints_dir.is_dir():
        return []
    steps = []
    for folder in run.checkpoints_dir.glob("step-*"):
        if folder.name[5:].isdigit() and (folder / "trainer_state.json").is_file():
            steps.append(int(folder.name[5:]))
    return sorted(steps)


def event_id(job_id: str, kind: str, step: int) -> str:
    """The id of the event of ``kind`` at ``step``: the same each time the run is read."""
    return f"ftevent-{job_id.removeprefix('ftjob-')}-{kind}{step}"


class JobQueue:
    def __init__(self, store: Store, storage: Storage, executor: Executor, model_name: Callable[[Job], str],
                 poll_s: float = 0.5):
        self.store, self.storage, self.executor = store, storage, executor
        self.model_name, self.poll_s = model_name, poll_s
        self.server = server_id()
        self.slots = executor.slots()
        self._slots_read = time.monotonic()
        self._running: dict[str, _Running] = {}
        # One lock for every change of a job's state in this process: the thread's launches and ends, and
        # the routes' cancel, pause and resume, never cross.
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._waited: set[str] = set()  # jobs whose previous launch's process is known to be gone
        self._first_wait: dict[str, float] = {}
        self._signalled_old: set[str] = set()
        self._beat = 0.0

    # the server's side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tunesmith-jobs", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 60.0) -> None:
        """Stop following jobs: their trainings checkpoint and stop, stay ``running``, and are released for
        the next start (or another server) to resume. What ended meanwhile is recorded as it ended."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            running = list(self._running.items())
            for _, entry in running:
                entry.handle.terminate()
        deadline = time.monotonic() + grace_s
        for job_id, entry in running:
            while entry.handle.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            self._ingest(job_id, entry)
            code = entry.handle.poll()
            with self._lock:
                self._running.pop(job_id, None)
                if code is not None:
                    self._finish(job_id, code)
        with self.store.session() as session:
            session.execute(update(Job).where(Job.claimed_by == self.server).values(claimed_by=None, heartbeat=0))
        self.executor.close()

    def wake(self) -> None:
        self._wakeup.set()

    def cancel(self, job_id: str) -> None:
        """A queued or paused job ends at once; a running one once its training has checkpointed and stopped."""
        self._request(job_id, "cancel")

    def pause(self, job_id: str) -> None:
        """As cancel, but the job can be resumed from its checkpoint (``resume``)."""
        self._request(job_id, "pause")

    def resume(self, job_id: str) -> None:
        """A paused job goes back to the queue; it continues from its checkpoint."""
        with self._lock, self.store.session() as session:
            job = session.get(Job, job_id)
            if job is not None and job.status == "paused":
                job.status, job.claimed_by = ("running" if job.launches else "queued"), None
                self.store.add_event(session, job_id, "Job resumed: it continues from its checkpoint when a "
                                     "worker is free")
        self.wake()

    def _request(self, job_id: str, action: str) -> None:
        with self._lock, self.store.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.status not in ACTIVE or (job.status == "paused" and action == "pause"):
                return
            if job_id not in self._running and not held_elsewhere(job, self.server) and self._claim(job):
                session.refresh(job)
                self._stopped(session, job, action)  # no training runs it: it ends (or pauses) now
                return
            if action == "cancel":
                job.cancel_requested = True
            else:
                job.pause_requested = True
        self.wake()  # the thread of the server running it sends the SIGTERM

    def _stopped(self, session: Session, job: Job, action: str) -> None:
        """The job's training (if any) has stopped for a cancel or a pause: record it."""
        steps = checkpoint_steps(self.storage.run(job.id))
        where = f"; its checkpoint holds step {steps[-1]}" if steps else ""
        job.cancel_requested = job.pause_requested = False
        job.claimed_by = None
        if action == "cancel":
            self._end(session, job, "cancelled", f"The job was cancelled{where}" if job.launches
                      else "The job was cancelled before it started")
        else:
            job.status = "paused"
            self.store.add_event(session, job.id, f"The job was paused{where}")

    # the thread
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # the queue goes on; the next tick tries again
                log.exception("the job queue's tick failed")
            self._wakeup.wait(self.poll_s)
            self._wakeup.clear()

    def _tick(self) -> None:
        self._heartbeat()
        with self._lock:
            running = list(self._running.items())
        requests = self._requests([job_id for job_id, _ in running])
        for job_id, entry in running:
            try:
                self._follow(job_id, entry, job_id in requests)
            except Exception:  # one job's trouble (a lost Ray connection...) does not stop the others
                log.exception("job %s: following its training failed", job_id)
        self._apply_requests()
        self._launch_waiting()

    def _follow(self, job_id: str, entry: _Running, requested: bool) -> None:
        self._ingest(job_id, entry)
        with self._lock:
            if requested and entry.signalled is None:
                entry.signalled = time.monotonic()
                entry.handle.terminate()
            elif entry.signalled is not None and time.monotonic() - entry.signalled > OLD_PROCESS_WAIT_S:
                kill = getattr(entry.handle, "kill", None)  # it did not stop on SIGTERM
                if kill is not None:
                    log.warning("job %s: its training did not stop within %.0f s of SIGTERM: killed", job_id,
                                OLD_PROCESS_WAIT_S)
                    kill()
            code = entry.handle.poll()
            if code is not None:
                del self._running[job_id]
                self._finish(job_id, code)

    def _apply_requests(self) -> None:
        """Cancels and pauses of jobs no live server runs (left running by a server that has gone): now."""
        with self._lock, self.store.session() as session:
            flagged = list(session.scalars(select(Job).where(Job.status.in_(ACTIVE), or_(
                Job.cancel_requested.is_(True), Job.pause_requested.is_(True)))))
            for job in flagged:
                if job.id not in self._running and not held_elsewhere(job, self.server) and self._claim(job):
                    session.refresh(job)
                    self._stopped(session, job, "cancel" if job.cancel_requested else "pause")

    def _heartbeat(self) -> None:
        if time.monotonic() - self._beat < HEARTBEAT_S:
            return
        self._beat = time.monotonic()
        with self.store.session() as session:
            session.execute(update(Job).where(Job.claimed_by == self.server, Job.status.in_(("queued", "running")))
                            .values(heartbeat=now()))

    def _requests(self, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` have a cancel or pause request."""
        if not job_ids:
            return set()
        with self.store.session() as session:
            return set(session.scalars(select(Job.id).where(Job.id.in_(job_ids), or_(
                Job.cancel_requested.is_(True), Job.pause_requested.is_(True)))))

    def _free_slots(self) -> list[int]:
        if time.monotonic() - self._slots_read > SLOTS_REFRESH_S and not self._running:
            self.slots, self._slots_read = self.executor.slots(), time.monotonic()
        busy = {entry.slot for entry in self._running.values()}
        return [index for index in range(len(self.slots)) if index not in busy]

    def _launch_waiting(self) -> None:
        with self._lock:
            free = self._free_slots()
            if not free or self._stopping.is_set():
                return
            with self.store.session() as session:
                # Jobs left running (a restart) go first, then the queue, oldest first. A running job of
                # another server's is passed over below unless that server has gone.
                waiting = list(session.scalars(select(Job).where(Job.status.in_(("queued", "running")))
                                               .order_by(Job.status.desc(), Job.created_at)))
            for job in waiting:
                if not free or self._stopping.is_set():
                    break
                if job.id in self._running:
                    continue
                if held_elsewhere(job, self.server):
                    continue
                if not self._claim(job):
                    continue  # another server took it first
                self._start_claimed(job, free)

    def _claim(self, job: Job) -> bool:
        """Take ``job`` for this server in one UPDATE that fails if another server changed it since it was read."""
        with self.store.session() as session:
            done = session.execute(update(Job).where(
                Job.id == job.id, Job.status == job.status,
                Job.claimed_by.is_(None) if job.claimed_by is None else Job.claimed_by == job.claimed_by)
                .values(claimed_by=self.server, heartbeat=now()))
            return done.rowcount == 1

    def _start_claimed(self, job: Job, free: list[int]) -> None:
        with self.store.session() as session:
            # First a write that holds only while the claim does: it keeps the row (PostgreSQL) or the database
            # (SQLite) locked against another server's claim until this launch is recorded.
            held = session.execute(update(Job).where(Job.id == job.id, Job.claimed_by == self.server,
                                                     Job.status.in_(("queued", "running")))
                                   .values(heartbeat=now())).rowcount == 1
            if not held:
                return  # a cancel, or another server, came first
            job = session.get(Job, job.id)
            if job.cancel_requested or job.pause_requested:  # asked while it had no process
                self._stopped(session, job, "cancel" if job.cancel_requested else "pause")
                return
            if not self._previous_gone(job):
                free.pop(0)  # held for it while its old process stops: no other job starts there meanwhile
                return
            try:
                self._launch(session, job, free[0])
            except Exception as err:  # it cannot start (the executor refused): the job fails, the queue goes on
                log.exception("job %s: could not start", job.id)
                self._end(session, job, "failed", f"The training could not be started: {err}", code="launch_failed")
                return
            free.pop(0)

    def _previous_gone(self, job: Job) -> bool:
        """Whether the process of the job's last launch has ended. After a restart it may still be
        checkpointing (it had SIGTERM as its parent died): it is waited for, and killed when it
        outlives OLD_PROCESS_WAIT_S."""
        if job.id in self._waited or job.launches == 0:
            return True
        first = self._first_wait.setdefault(job.id, time.monotonic())
        late = time.monotonic() - first > OLD_PROCESS_WAIT_S
        if job.pid is not None and job.host == socket.gethostname():
            process = _same_process(job.pid, job.pid_started)
            if process is None:
                self._waited.add(job.id)
                return True
            if late:
                log.warning("job %s: the process of its last launch (%d) did not stop: killed", job.id, job.pid)
                process.kill()
            elif job.id not in self._signalled_old:
                self._signalled_old.add(job.id)
                process.terminate()  # SIGTERM: checkpoint and stop (as a rule it has had it already)
            return False
        # Elsewhere (a Ray node): its run's status.json says when it has stopped writing there.
        run = self.storage.run(job.id)
        if run.status_file.is_file() and run.status().get("status") == "running" and not late:
            return False
        self._waited.add(job.id)
        return True

    def _launch(self, session: Session, job: Job, slot: int) -> None:
        steps = checkpoint_steps(self.storage.run(job.id))
        command = train_command(self.storage.job_config(job.id))
        handle = self.executor.start(command, self.storage.job_log(job.id), self.slots[slot], cwd=self.storage.root,
                                     env=self.storage.child_environment())
        pid = getattr(handle, "pid", None)
        job.pid, job.host = pid, socket.gethostname() if pid is not None else None
        job.pid_started = _create_time(pid)
        resumed = job.launches > 0
        job.launches += 1
        job.status = "running"
        for memo in (self._waited, self._signalled_old):
            memo.discard(job.id)
        self._first_wait.pop(job.id, None)
        message = (f"Fine-tuning job resumed from the checkpoint of step {steps[-1]}" if resumed and steps
                   else "Fine-tuning job restarted from the beginning (no checkpoint)" if resumed
                   else "Fine-tuning job started")
        self.store.add_event(session, job.id, message, data={"launch": job.launches,
                                                             "resumed_from_step": steps[-1] if steps else 0})
        self._running[job.id] = _Running(handle, slot, checkpoints=set(steps))
        log.info("job %s: launched (slot %s): %s", job.id, self.slots[slot], message)

    def _ingest(self, job_id: str, entry: _Running) -> None:
        """New metrics records and checkpoints of the job's run, as events."""
        run = self.storage.run(job_id)
        records, entry.offset = run.metrics_after(entry.offset)
        new_checkpoints = [s for s in checkpoint_steps(run) if s not in entry.checkpoints]
        entry.checkpoints.update(new_checkpoints)
        if not records and not new_checkpoints:
            return
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            total = job.config.get("training", {}).get("max_steps")
            for record in records:
                self._metric_event(session, job, record, total)
            for step in new_checkpoints:
                self._once(session, job_id, event_id(job_id, "c", step), f"Checkpoint created at step {step}",
                           {"step": step})

    def _metric_event(self, session: Session, job: Job, record: dict[str, Any], total: int | None) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        of = f"/{total}" if total else ""
        if isinstance(record.get("loss"), (int, float)):
            data = {"step": step, "train_loss": record["loss"], "total_steps": total}
            if "tokens" in record:
                data["tokens"] = record["tokens"]
            self._once(session, job.id, event_id(job.id, "s", step),
                       f"Step {step}{of}: training loss={record['loss']:.4f}", data, kind="metrics")
        elif isinstance(record.get("eval_loss"), (int, float)):
            self._once(session, job.id, event_id(job.id, "e", step),
                       f"Step {step}{of}: validation loss={record['eval_loss']:.4f}",
                       {"step": step, "valid_loss": record["eval_loss"], "total_steps": total}, kind="metrics")

    def _once(self, session: Session, job_id: str, ident: str, message: str, data: dict[str, Any],
              kind: str = "message") -> None:
        if session.scalar(select(JobEvent.seq).where(JobEvent.id == ident)) is None:
            session.add(JobEvent(id=ident, job_id=job_id, created_at=now(), level="info", message=message,
                                 type=kind, data=data))

    def _finish(self, job_id: str, code: int) -> None:
        """The job's training process ended with ``code``: its job's new state (under ``_lock``)."""
        run = self.storage.run(job_id)
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.status != "running":
                return  # already ended
            job.pid = None
            if code == EXIT_FINISHED and run.finished:
                summary = run.summary() or {}
                job.fine_tuned_model = self.model_name(job)
                job.trained_tokens = summary.get("tokens_seen")
                self.store.add_event(session, job_id, f"New fine-tuned model created: {job.fine_tuned_model}")
                self._end(session, job, "succeeded", "The job has successfully completed")
            elif code == EXIT_STOPPED and (job.cancel_requested or job.pause_requested):
                self._stopped(session, job, "cancel" if job.cancel_requested else "pause")
            elif code == EXIT_STOPPED:
                if not self._stopping.is_set():
                    self.store.add_event(session, job_id, "The training was stopped (SIGTERM) with a checkpoint; "
                                         "it resumes", level="warn")
            else:
                status = run.status() if run.status_file.is_file() else {}
                reason = status.get("reason") or _last_error(self.storage.job_log(job_id), self.storage)
                self._end(session, job, "failed", f"Training failed: {reason}", code="training_failed")
        self.wake()

    def _end(self, session: Session, job: Job, status: str, message: str, code: str | None = None) -> None:
        if job.status not in ACTIVE:
            return
        job.status, job.finished_at, job.claimed_by = status, now(), None
        if status == "failed":
            job.error = {"code": code or "failed", "message": message, "param": None}
        self.store.add_event(session, job.id, message, level="error" if status == "failed" else "info")


def _same_process(pid: int, started: float | None) -> psutil.Process | None:
    """The live process ``pid`` if it is the one started at ``started`` (not a reused pid), else None."""
    try:
        process = psutil.Process(pid)
        if started is not None and abs(process.create_time() - started) > 1.0:
            return None
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.Error:
        return None


def _create_time(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _last_error(log_path: Any, storage: Storage, lines: int = 400, shown: int = 6) -> str:
    """The training log's last "error:" message (tunesmith's own, with the lines that follow it), else its
    last line; the storage root's path taken out."""
    try:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return "it ended without a log"
    for index in range(len(tail) - 1, -1, -1):
        if tail[index].startswith(("error:", "stopped:")):
            message = " ".join(line.strip() for line in tail[index:index + shown]).partition(":")[2].strip()
            return storage.scrub(message)
    return storage.scrub(tail[-1].strip()) if tail else "it ended without a word (killed?)"
