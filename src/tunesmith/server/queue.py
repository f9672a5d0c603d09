"""The job queue: a thread that starts queued jobs as `tunesmith train` processes (one per slot of the
executor: a GPU, or this machine), follows them, and records what happens as the job's status and
events.

- A job's process is `tunesmith train JOB/config.yaml --resume`: a first start starts from the
  beginning, a later one from the newest checkpoint (no step lost, none trained twice).
- Cancel: SIGTERM to the process, which checkpoints and stops; the job is then ``cancelled`` and its
  checkpoint is listed by the checkpoints route.
- Events come from the run folder: each metrics record (training and validation loss), each new
  checkpoint, and the job's own milestones. Their ids are made from the step, so reading a run again
  after a restart never doubles an event.
- A server that stops (SIGTERM, Ctrl-C) or is killed: its trainings get SIGTERM (from ``stop``, or as
  the parent-death signal) and checkpoint. Their jobs stay ``running`` in the store; the next start
  waits for a process of the last launch that still lives, then launches the job again, resuming it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from sqlalchemy import select

from tunesmith.launch import EXIT_FINISHED, EXIT_STOPPED, Executor, Handle, train_command
from tunesmith.rundir import RunDir
from tunesmith.server.storage import Storage
from tunesmith.server.store import Job, JobEvent, Store, now

log = logging.getLogger(__name__)
MAX_LAUNCHES = 20  # a job stopped (not cancelled) this often without finishing is failed
OLD_PROCESS_WAIT_S = 300.0  # after a restart: how long a process of the last launch may take to stop


@dataclass
class _Running:
    handle: Handle
    slot: str | None
    offset: int = 0  # bytes of metrics.jsonl already read
    checkpoints: set[int] = field(default_factory=set)


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
        self.slots = executor.slots()
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._waited: set[str] = set()  # jobs whose previous launch's process is known to be gone
        self._first_wait: dict[str, float] = {}
        self._signalled: set[str] = set()
        self._launching = threading.Lock()  # a cancel and a launch of the same queued job do not cross

    # the server's side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tunesmith-jobs", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 60.0) -> None:
        """Stop following jobs: their trainings checkpoint and stop, and stay ``running`` for the next start."""
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
        self.executor.close()

    def wake(self) -> None:
        self._wakeup.set()

    def cancel(self, job_id: str) -> None:
        """Cancel: a queued job at once, a running one once its training has checkpointed and stopped."""
        self._stop_job(job_id, "cancel")

    def pause(self, job_id: str) -> None:
        """Pause: as cancel, but the job can be resumed from its checkpoint (``resume``)."""
        self._stop_job(job_id, "pause")

    def resume(self, job_id: str) -> None:
        """A paused job goes back to the queue; it continues from its checkpoint."""
        with self._launching, self.store.session() as session:
            job = session.get(Job, job_id)
            if job is not None and job.status == "paused":
                job.status = "running" if job.launches else "queued"
                self.store.add_event(session, job_id, "Job resumed: it continues from its checkpoint when a "
                                     "worker is free")
        self.wake()

    def _stop_job(self, job_id: str, action: str) -> None:
        with self._launching, self.store.session() as session, self._lock:
            job = session.get(Job, job_id)
            if job is None or job.status not in ("validating_files", "queued", "running"):
                return
            entry = self._running.get(job_id)
            if entry is None:  # queued, or waiting to be launched again: no training to stop
                self._stopped(session, job, action, started=job.launches > 0)
            elif action == "cancel":
                job.cancel_requested = True
            else:
                job.pause_requested = True
        if entry is not None:
            entry.handle.terminate()
        self.wake()

    def _stopped(self, session: Any, job: Job, action: str, started: bool) -> None:
        steps = checkpoint_steps(self.storage.run(job.id))
        where = f"; its checkpoint holds step {steps[-1]}" if steps else ""
        job.cancel_requested = job.pause_requested = False
        if action == "cancel":
            self._end(session, job, "cancelled", f"The job was cancelled{where}" if started
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
        with self._lock:
            running = list(self._running.items())
        for job_id, entry in running:
            self._ingest(job_id, entry)
            code = entry.handle.poll()
            if code is not None:
                with self._lock:
                    del self._running[job_id]
                self._ended(job_id, code)
        self._launch_waiting()

    def _launch_waiting(self) -> None:
        with self._lock:
            busy = {entry.slot for entry in self._running.values()}
            free = [slot for slot in self.slots if slot not in busy]
            taken = set(self._running)
        if not free:
            return
        with self._launching, self.store.session() as session:
            # Jobs that were running when the server stopped go first, then the queue, oldest first.
            waiting = list(session.scalars(select(Job).where(Job.status.in_(("running", "queued")))
                                           .order_by(Job.status.desc(), Job.created_at)))
            for job in waiting:
                if not free:
                    break
                if job.id in taken or self._stopping.is_set() or not self._previous_gone(job):
                    continue
                self._launch(session, job, free.pop(0))

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
            elif job.id not in self._signalled:
                self._signalled.add(job.id)
                process.terminate()  # SIGTERM: checkpoint and stop (as a rule it has had it already)
            return False
        # Elsewhere (a Ray node): its run's status.json says when it has stopped writing there.
        run = self.storage.run(job.id)
        if run.status_file.is_file() and run.status().get("status") == "running" and not late:
            return False
        self._waited.add(job.id)
        return True

    def _launch(self, session: Any, job: Job, slot: str | None) -> None:
        run = self.storage.run(job.id)
        steps = checkpoint_steps(run)
        if job.launches >= MAX_LAUNCHES:
            self._end(session, job, "failed", f"stopped {job.launches} times without finishing",
                      code="too_many_restarts")
            return
        command = train_command(self.storage.job_config(job.id))
        handle = self.executor.start(command, self.storage.job_log(job.id), slot, cwd=self.storage.root)
        pid = getattr(handle, "pid", None)
        job.pid, job.host = pid, socket.gethostname() if pid is not None else None
        job.pid_started = _create_time(pid)
        job.launches += 1
        resumed = job.status == "running"
        job.status = "running"
        self._waited.discard(job.id)
        self._first_wait.pop(job.id, None)
        self._signalled.discard(job.id)
        message = (f"Fine-tuning job resumed from the checkpoint of step {steps[-1]}" if resumed and steps
                   else "Fine-tuning job restarted from the beginning (no checkpoint)" if resumed
                   else "Fine-tuning job started")
        self.store.add_event(session, job.id, message, data={"launch": job.launches,
                                                             "resumed_from_step": steps[-1] if steps else 0})
        with self._lock:
            self._running[job.id] = _Running(handle, slot, checkpoints=set(steps))
        log.info("job %s: launched (slot %s): %s", job.id, slot, message)

    def _ingest(self, job_id: str, entry: _Running) -> None:
        """New metrics records and checkpoints of the job's run, as events."""
        run = self.storage.run(job_id)
        records: list[dict[str, Any]] = []
        if run.metrics_file.is_file():
            with run.metrics_file.open("rb") as handle:
                size = run.metrics_file.stat().st_size
                if size < entry.offset:  # rewritten (a resume rewinds it): read it again
                    entry.offset = 0
                handle.seek(entry.offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            entry.offset += len(complete)
            records = _records(complete)
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

    def _metric_event(self, session: Any, job: Job, record: dict[str, Any], total: int | None) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        of = f"/{total}" if total else ""
        if "loss" in record:
            data = {"step": step, "train_loss": record["loss"], "total_steps": total}
            if "tokens" in record:
                data["tokens"] = record["tokens"]
            self._once(session, job.id, event_id(job.id, "s", step),
                       f"Step {step}{of}: training loss={record['loss']:.4f}", data, kind="metrics")
            job.events_step = max(job.events_step, step)
        elif "eval_loss" in record:
            self._once(session, job.id, event_id(job.id, "e", step),
                       f"Step {step}{of}: validation loss={record['eval_loss']:.4f}",
                       {"step": step, "valid_loss": record["eval_loss"], "total_steps": total}, kind="metrics")

    def _once(self, session: Any, job_id: str, ident: str, message: str, data: dict[str, Any],
              kind: str = "message") -> None:
        if session.scalar(select(JobEvent.seq).where(JobEvent.id == ident)) is None:
            session.add(JobEvent(id=ident, job_id=job_id, created_at=now(), level="info", message=message,
                                 type=kind, data=data))

    def _ended(self, job_id: str, code: int) -> None:
        run = self.storage.run(job_id)
        status = run.status() if run.status_file.is_file() else {}
        with self.store.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            job.pid = None
            if code == EXIT_FINISHED and run.finished:
                summary = run.summary() or {}
                job.fine_tuned_model = self.model_name(job)
                job.trained_tokens = summary.get("tokens_seen")
                self.store.add_event(session, job_id, f"New fine-tuned model created: {job.fine_tuned_model}")
                self._end(session, job, "succeeded", "The job has successfully completed")
            elif code == EXIT_STOPPED and (job.cancel_requested or job.pause_requested):
                self._stopped(session, job, "cancel" if job.cancel_requested else "pause", started=True)
            elif code == EXIT_STOPPED:
                if not self._stopping.is_set():
                    self.store.add_event(session, job_id, "The training was stopped (SIGTERM) with a checkpoint; "
                                         "it resumes", level="warn")
            else:
                reason = status.get("reason") or _last_error(self.storage.job_log(job_id))
                self._end(session, job, "failed", f"Training failed: {reason}", code="training_failed")
        self.wake()

    def _end(self, session: Any, job: Job, status: str, message: str, code: str | None = None) -> None:
        job.status, job.finished_at = status, now()
        if status == "failed":
            job.error = {"code": code or "failed", "message": message, "param": None}
        self.store.add_event(session, job.id, message, level="error" if status == "failed" else "info")


def _records(chunk: bytes) -> list[dict[str, Any]]:
    import json

    records = []
    for line in chunk.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


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


def _last_error(log_path: Any, lines: int = 400) -> str:
    """The training log's last "error:" line (tunesmith's own message), else its last line."""
    try:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return "it ended without a log"
    for line in reversed(tail):
        if line.startswith(("error:", "stopped:")):
            return line.partition(":")[2].strip()
    return tail[-1].strip() if tail else "it ended without a word (killed?)"
