"""OpenAI's fine-tuning routes: /v1/files and /v1/fine_tuning/jobs (create, list, retrieve, cancel,
pause, resume, events, checkpoints), with OpenAI's objects and error bodies. Every route reads only
the calling key's rows (``store.owned``): another key's ids answer exactly as unknown ids do.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from transformers import PreTrainedTokenizerBase

from tunesmith.data.inspect import validate_file
from tunesmith.errors import DataError
from tunesmith.io import write_text_atomic
from tunesmith.serve.errors import OpenAIError
from tunesmith.serve.live import model_not_found
from tunesmith.server import jobspec
from tunesmith.server.queue import JobQueue, checkpoint_steps
from tunesmith.server.storage import Storage
from tunesmith.server.store import File, Job, JobEvent, Store, new_id, now, owned

PREFERENCE_FORMATS = {"openai_preference", "preference", "hh"}
SUPERVISED_FORMATS = {"openai", "sharegpt", "alpaca", "completion", "qa", "text"}
LIST_LIMIT = 10_000


@dataclass
class Service:
    """What the routes work with."""

    store: Store
    storage: Storage
    queue: JobQueue
    tokenizer: PreTrainedTokenizerBase
    base_model: str  # what jobs train on (as `tunesmith train` reads it: 'embedded', a folder...)
    model_names: set[str]  # the names a create request may give for it
    served_name: str  # the base's name in ft: ids
    max_upload_bytes: int = 512 << 20
    max_seq_len: int = 1024
    job_defaults: dict[str, Any] = field(default_factory=lambda: dict(jobspec.JOB_DEFAULTS))


def owner_of(request: Request) -> str:
    return request.state.owner


def fine_tuned_name(service: Service, job: Job) -> str:
    """``ft:BASE:SUFFIX:ID`` (``ft:BASE:ID`` without a suffix); ID is the job id's first 8 hex digits."""
    suffix = job.request.get("suffix")
    short = job.id.removeprefix("ftjob-")[:8]
    return f"ft:{service.served_name}:{suffix}:{short}" if suffix else f"ft:{service.served_name}:{short}"


def install(app: FastAPI, service: Service) -> None:
    router = APIRouter(prefix="/v1")
    _file_routes(router, service)
    _job_routes(router, service)
    app.include_router(router)


# files
def _file_object(row: File) -> dict[str, Any]:
    return {"object": "file", "id": row.id, "bytes": row.bytes, "created_at": row.created_at,
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


def _page(items: list[Any], after: str | None, limit: int, ident: Any) -> tuple[list[Any], bool]:
    """OpenAI's cursor pages: the ``limit`` items after the one whose id is ``after``."""
    if not 1 <= limit <= LIST_LIMIT:
        raise OpenAIError(400, f"limit: {limit}; use 1 to {LIST_LIMIT}", "limit", "invalid_value")
    if after is not None:
        ids = [ident(item) for item in items]
        if after not in ids:
            raise OpenAIError(400, f"after: {after!r} is not in this list", "after", "invalid_value")
        items = items[ids.index(after) + 1:]
    return items[:limit], len(items) > limit


def _listing(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _file_routes(router: APIRouter, service: Service) -> None:
    @router.post("/files")
    async def upload(request: Request) -> dict[str, Any]:
        owner = owner_of(request)
        folder = service.storage.receiving()
        try:
            received = await _receive_upload(request, service, folder)
            purpose = received.fields.get("purpose")
            if purpose != "fine-tune":
                raise OpenAIError(400, f"purpose: {purpose!r}; this server takes purpose 'fine-tune'", "purpose",
                                  "invalid_value")
            filename = _display_name(received.filename or "")
            rows, kind = await asyncio.to_thread(_check_upload, service, received.path, filename)
            file_id = new_id("file-")
            size = received.path.stat().st_size
            service.storage.keep(received.path, file_id)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row = File(id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=size, rows=rows, kind=kind,
                   created_at=now())
        await asyncio.to_thread(_add, service, row)
        return _file_object(row)

    @router.get("/files")
    def list_files(request: Request, purpose: str | None = None, limit: int = LIST_LIMIT,
                         order: str = "desc", after: str | None = None) -> dict[str, Any]:
        if order not in ("asc", "desc"):
            raise OpenAIError(400, f"order: {order!r}; use asc or desc", "order", "invalid_value")
        with service.store.session() as session:
            query = select(File).where(File.owner == owner_of(request))
            if purpose is not None:
                query = query.where(File.purpose == purpose)
            newest = File.created_at.desc() if order == "desc" else File.created_at.asc()
            rows = list(session.scalars(query.order_by(newest, File.id)))
        page, more = _page(rows, after, limit, lambda row: row.id)
        return _listing([_file_object(row) for row in page], more)

    @router.get("/files/{file_id}")
    def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
        return _file_object(_own_file(service, request, file_id))

    @router.get("/files/{file_id}/content")
    def file_content(request: Request, file_id: str) -> FileResponse:
        row = _own_file(service, request, file_id)
        return FileResponse(service.storage.file_path(row.id), media_type="application/jsonl")

    @router.delete("/files/{file_id}")
    def delete_file(request: Request, file_id: str) -> dict[str, Any]:
        row = _own_file(service, request, file_id)
        with service.store.session() as session:
            active = session.scalars(select(Job).where(Job.owner == row.owner, Job.status.in_(
                ("validating_files", "queued", "running", "paused"))))
            using = next((job.id for job in active if row.id in (job.request.get("training_file"),
                                                                 job.request.get("validation_file"))), None)
            if using is not None:
                raise OpenAIError(400, f"{row.id} is a file of {using}, which has not ended; cancel "
                                  "it first", "file_id", "file_in_use")
            session.delete(session.get(File, row.id))
        service.storage.delete_file(row.id)
        return {"object": "file", "id": row.id, "deleted": True}


def _add(service: Service, row: File) -> None:
    with service.store.session() as session:
        session.add(row)


def _own_file(service: Service, request: Request, file_id: str) -> File:
    with service.store.session() as session:
        row = owned(session, File, file_id, owner_of(request))
    if row is None:
        raise OpenAIError(404, f"No such File object: {file_id}", "file_id", "file_not_found")
    return row


class _Upload:
    """A multipart upload parsed as it streams in (python-multipart's parser, our handling of its parts):
    the one ``file`` part written to ``folder``, a short ``purpose`` field kept, any other part refused
    as its headers end, so that a body cannot make the server hold many files or large fields."""

    FIELD_LIMIT = 256

    def __init__(self, folder: Path):
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.path = folder / "upload.jsonl"
        self._headers: list[list[bytes]] = []
        self._name: str | None = None
        self._value = bytearray()
        self._output: Any = None
        self.file_complete = self.body_complete = False  # python-multipart's finalize() checks neither

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_header_begin": self._header, "on_header_field": self._field,
                "on_header_value": self._value_of, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end, "on_end": self._body_end}

    def _begin(self) -> None:
        self._headers, self._name, self._value = [], None, bytearray()

    def _header(self) -> None:
        self._headers.append([b"", b""])

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._headers[-1][0] += data[start:end]

    def _value_of(self, data: bytes, start: int, end: int) -> None:
        self._headers[-1][1] += data[start:end]

    def _headers_done(self) -> None:
        disposition = next((value for name, value in self._headers if name.lower() == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "file" and self.filename is None:
            self.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
            self._output = self.path.open("wb")
        elif name != "purpose" or name in self.fields:
            raise OpenAIError(400, f"the upload has a part {name!r}; it takes one 'file' and one 'purpose'", "file")
        self._name = name

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._output is not None:
            self._output.write(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > self.FIELD_LIMIT:
            raise OpenAIError(400, f"{self._name}: over {self.FIELD_LIMIT} bytes", self._name)

    def _end(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None
            self.file_complete = True
        elif self._name is not None:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def _body_end(self) -> None:
        self.body_complete = True

    def close(self) -> None:
        if self._output is not None:
            self._output.close()


async def _receive_upload(request: Request, service: Service, folder: Path) -> _Upload:
    """The multipart body, streamed: the file part into ``folder`` (in the storage root's tmp/; never
    memory, never another folder), counted against the upload limit as it arrives."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise OpenAIError(400, "an upload is multipart/form-data with the fields file and purpose", "file")
    limit = service.max_upload_bytes
    too_large = OpenAIError(413, f"the file is over this server's upload limit ({limit} bytes)", "file",
                            "file_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 65536:
        raise too_large
    upload = _Upload(folder)
    parser = MultipartParser(options[b"boundary"], upload.callbacks())
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + 65536:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except OpenAIError:
        raise
    except Exception as err:  # the multipart parser's errors: a malformed body
        raise OpenAIError(400, f"the multipart body cannot be read: {err}", "file") from None
    finally:
        upload.close()
    if upload.filename is None:
        raise OpenAIError(400, "the upload needs a file part named 'file'", "file")
    if not (upload.file_complete and upload.body_complete):
        raise OpenAIError(400, "the multipart body ends before its closing boundary: the upload was cut short",
                          "file")
    if upload.path.stat().st_size > limit:
        raise too_large
    return upload


def _display_name(name: str) -> str:
    """The client's file name, for showing back only: its last path part, printable, at most 255 chars."""
    base = re.split(r"[\\/]", name)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip() or "upload.jsonl"
    return base[:255]


def _check_upload(service: Service, path: Path, filename: str) -> tuple[int, str]:
    """tunesmith's data checks on an upload: (rows, supervised | preference); 400 naming the line and
    field of the first problems."""
    try:
        report = validate_file(str(path), "auto", service.tokenizer, service.max_seq_len)
    except DataError as err:  # the file as a whole cannot be read
        shown = "; ".join(problem.replace(str(path), filename) for problem in err.problems[:5])
        raise OpenAIError(400, f"the file cannot be read: {shown}", "file", "invalid_file_format") from None
    except UnicodeDecodeError as err:
        raise OpenAIError(400, f"{filename}: not UTF-8 text (byte {err.start}): upload JSONL in UTF-8", "file",
                          "invalid_file_format") from None
    errors = [f for f in report.findings if f.severity == "error"]
    if errors:
        shown = "; ".join(_finding(filename, f) for f in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise OpenAIError(400, f"the file has {len(errors)} problem{'s' if len(errors) > 1 else ''}: {shown}{more}",
                          "file", "invalid_file_format")
    formats = set(report.formats.values())
    if report.rows == 0:
        raise OpenAIError(400, f"{filename}: no rows", "file", "invalid_file_format")
    if formats <= PREFERENCE_FORMATS:
        return report.rows, "preference"
    if formats <= SUPERVISED_FORMATS:
        return report.rows, "supervised"
    raise OpenAIError(400, f"{filename}: rows of the formats {sorted(formats)}; fine-tuning takes chat rows "
                      "(supervised) or preference pairs (dpo)", "file", "invalid_file_format")


def _finding(filename: str, finding: Any) -> str:
    where = f"{filename}:{finding.line}" if finding.line is not None else filename
    return f"{where}: {finding.field}: {finding.message}" if finding.field else f"{where}: {finding.message}"


# jobs
def job_object(service: Service, job: Job) -> dict[str, Any]:
    request = jobspec.JobRequest.model_validate(job.request)
    hyper = jobspec.resolved_hyperparameters(request, job.config)
    kind = request.kind()
    return {"object": "fine_tuning.job", "id": job.id, "model": job.model, "created_at": job.created_at,
            "finished_at": job.finished_at, "fine_tuned_model": job.fine_tuned_model,
            "organization_id": job.owner, "result_files": [], "status": job.status,
            "training_file": request.training_file, "validation_file": request.validation_file,
            "hyperparameters": hyper, "trained_tokens": job.trained_tokens, "error": job.error,
            "seed": job.config["training"].get("seed", 0), "estimated_finish": None, "integrations": [],
            "metadata": request.metadata, "user_provided_suffix": request.suffix,
            "method": {"type": kind, kind: {"hyperparameters": hyper}},
            "tunesmith": {"config": json.loads(service.storage.scrub(json.dumps(job.config))),
                          "launches": job.launches}}


def _act(service: Service, request: Request, job_id: str, action: Callable[[str], None],
         allowed: tuple[str, ...], refusal: str, code: str) -> dict[str, Any]:
    """Cancel, pause or resume the key's job ``job_id`` when its status is one of ``allowed``; the job after."""
    job = _own_job(service, request, job_id)
    if job.status not in allowed:
        raise OpenAIError(400, f"{job_id} is {job.status}: it {refusal}", "fine_tuning_job_id", code)
    action(job_id)
    return job_object(service, _own_job(service, request, job_id))


def _own_job(service: Service, request: Request, job_id: str) -> Job:
    with service.store.session() as session:
        job = owned(session, Job, job_id, owner_of(request))
    if job is None:
        raise OpenAIError(404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "job_not_found")
    return job


def _job_routes(router: APIRouter, service: Service) -> None:
    @router.post("/fine_tuning/jobs")
    def create_job(body: jobspec.JobRequest, request: Request) -> dict[str, Any]:
        job = _create_job(service, body, owner_of(request))
        service.queue.wake()
        return job_object(service, job)

    @router.get("/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        with service.store.session() as session:
            jobs = list(session.scalars(select(Job).where(Job.owner == owner_of(request))
                                        .order_by(Job.created_at.desc(), Job.id.desc())))
        page, more = _page(jobs, after, limit, lambda job: job.id)
        return _listing([job_object(service, job) for job in page], more)

    @router.get("/fine_tuning/jobs/{job_id}")
    def retrieve_job(request: Request, job_id: str) -> dict[str, Any]:
        return job_object(service, _own_job(service, request, job_id))

    @router.post("/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
        return _act(service, request, job_id, service.queue.cancel, ("queued", "running", "paused"),
                    "has already ended", "job_already_ended")

    @router.post("/fine_tuning/jobs/{job_id}/pause")
    def pause_job(request: Request, job_id: str) -> dict[str, Any]:
        return _act(service, request, job_id, service.queue.pause, ("queued", "running"),
                    "cannot be paused: only a queued or running job can", "invalid_job_status")

    @router.post("/fine_tuning/jobs/{job_id}/resume")
    def resume_job(request: Request, job_id: str) -> dict[str, Any]:
        return _act(service, request, job_id, service.queue.resume, ("paused",),
                    "cannot be resumed: only a paused job can", "invalid_job_status")

    @router.get("/models/{model:path}")
    def retrieve_model(request: Request, model: str) -> dict[str, Any]:
        if model not in request.app.state.access.listed(request):  # a plain route: it runs in a worker thread
            raise model_not_found(model)
        return {"id": model, "object": "model", "created": 0, "owned_by": "tunesmith"}

    @router.delete("/models/{model:path}")
    async def delete_model(request: Request, model: str) -> dict[str, Any]:
        if not await asyncio.to_thread(_delete_model, service, owner_of(request), model):
            raise model_not_found(model)
        if model in request.app.state.access.served.adapters:
            await request.app.state.remove_adapter(model)
        return {"id": model, "object": "model", "deleted": True}

    @router.get("/fine_tuning/jobs/{job_id}/events")
    def job_events(request: Request, job_id: str, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        job = _own_job(service, request, job_id)
        with service.store.session() as session:
            events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)
                                          .order_by(JobEvent.seq.desc())))
        page, more = _page(events, after, limit, lambda event: event.id)
        return {"object": "list", "has_more": more, "data": [
            {"object": "fine_tuning.job.event", "id": e.id, "created_at": e.created_at, "level": e.level,
             "message": e.message, "type": e.type, "data": e.data or {}} for e in page]}

    @router.get("/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(request: Request, job_id: str, after: str | None = None,
                              limit: int = 10) -> dict[str, Any]:
        job = _own_job(service, request, job_id)
        run = service.storage.run(job.id)
        steps = checkpoint_steps(run)
        final = (run.summary() or {}).get("steps") if job.status == "succeeded" else None
        if isinstance(final, int) and final not in steps:  # the final model is the last epoch's checkpoint
            steps.append(final)
        items = [_checkpoint_object(service, job, step, final == step) for step in reversed(steps)]
        page, more = _page(items, after, limit, lambda item: item["id"])
        return _listing(page, more)


def _delete_model(service: Service, owner: str, model: str) -> bool:
    """Mark ``owner``'s fine-tuned model ``model`` deleted; False if the key has no such model."""
    with service.store.session() as session:
        job = session.scalar(select(Job).where(Job.fine_tuned_model == model, Job.owner == owner,
                                               Job.model_deleted.is_(False)))
        if job is None:
            return False
        job.model_deleted = True
        return True


def _create_job(service: Service, body: jobspec.JobRequest, owner: str) -> Job:
    if body.model not in service.model_names:
        raise OpenAIError(400, f"model: {body.model!r} is not fine-tuned by this server; it fine-tunes "
                          f"{', '.join(sorted(service.model_names))}", "model", "model_not_available")
    if body.integrations:
        raise OpenAIError(400, "integrations: not supported; each job's run is tracked in MLflow in the server's "
                          "storage", "integrations", "unsupported_parameter")
    job_id = new_id("ftjob-")
    with service.store.session() as session:
        train = owned(session, File, body.training_file, owner)
        valid = owned(session, File, body.validation_file, owner) if body.validation_file else None
    if train is None:
        raise OpenAIError(400, f"training_file: no file {body.training_file}", "training_file", "file_not_found")
    if body.validation_file and valid is None:
        raise OpenAIError(400, f"validation_file: no file {body.validation_file}", "validation_file",
                          "file_not_found")
    wanted = "preference" if body.kind() == "dpo" else "supervised"
    for name, row in (("training_file", train), ("validation_file", valid)):
        if row is not None and row.kind != wanted:
            raise OpenAIError(400, f"{name}: {row.id} holds {row.kind} rows; method {body.kind()} trains on "
                              f"{wanted} rows", name, "invalid_file_format")
    try:
        config = jobspec.build_config(body, job_id, service.base_model, str(service.storage.file_path(train.id)),
                                      train.rows, str(service.storage.file_path(valid.id)) if valid else None,
                                      str(service.storage.runs_dir), service.job_defaults)
    except jobspec.RequestProblem as problem:
        raise OpenAIError(400, str(problem), problem.param, "invalid_value") from None
    folder = service.storage.job_dir(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(service.storage.job_config(job_id), yaml.safe_dump(config, sort_keys=False))
    job = Job(id=job_id, owner=owner, model=body.model, status="queued", created_at=now(),
              request=body.model_dump(mode="json", exclude_none=True), config=config, cancel_requested=False,
              launches=0)
    with service.store.session() as session:
        session.add(job)
        service.store.add_event(session, job_id, f"Created fine-tuning job: {job_id}")
        service.store.add_event(session, job_id, f"Validated training file: {train.id} ({train.rows} rows)")
        service.store.add_event(session, job_id, "Job queued")
    return job


def _checkpoint_object(service: Service, job: Job, step: int, final: bool = False) -> dict[str, Any]:
    run = service.storage.run(job.id)
    folder = run.model_dir if final else run.checkpoints_dir / f"step-{step:07d}"
    metrics: dict[str, Any] = {"step": step}
    for record in run.metrics():
        if record.get("step") == step and "loss" in record:
            metrics["train_loss"] = record["loss"]
        if record.get("step") == step and "eval_loss" in record:
            metrics["valid_loss"] = record["eval_loss"]
    try:
        created = int(os.stat(folder).st_mtime)
    except OSError:
        created = job.created_at
    return {"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job.id.removeprefix('ftjob-')}-{step}",
            "created_at": created, "fine_tuning_job_id": job.id, "step_number": step, "metrics": metrics,
            "fine_tuned_model_checkpoint": f"{fine_tuned_name(service, job)}:ckpt-step-{step}"}
