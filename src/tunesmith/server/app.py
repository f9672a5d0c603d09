"""`tunesmith server`: one FastAPI app with the serving routes of ``serve/app.py`` (the base model and
the fine-tuned ones, through the batching engine) and the fine-tuning routes of ``api.py``, behind
hashed API keys, with the job queue running beside it for the app's lifetime."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from tunesmith.config.commands import ServerCommandConfig
from tunesmith.config.load import read_yaml
from tunesmith.launch import Executor, LocalExecutor
from tunesmith.serve.app import create_app
from tunesmith.serve.errors import OpenAIError
from tunesmith.serve.live import model_not_found
from tunesmith.serve.load import build_served
from tunesmith.serve.served import Served
from tunesmith.server import api, jobspec
from tunesmith.server.queue import JobQueue
from tunesmith.server.storage import Storage
from tunesmith.server.store import Job, Store


class KeyAuth:
    """Pure ASGI: ``Authorization: Bearer KEY`` looked up by its hash; the key's id becomes
    ``request.state.owner``. /health is open."""

    def __init__(self, app: Any, store: Store):
        self.app, self.store = app, store

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        key = header[7:].decode("latin-1").strip() if header[:7].lower() == b"bearer " else ""
        owner = await run_in_threadpool(self.store.key_owner, key) if key else None
        if owner is None:
            error = OpenAIError(401, "Incorrect API key provided (Authorization: Bearer KEY; keys come from "
                                "`tunesmith server key create NAME`)", code="invalid_api_key")
            return await error.response()(scope, receive, send)
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)


class JobModels:
    """Which models a key sees: the base, and the fine-tuned models of its own succeeded jobs; each is
    loaded into the serving engine the first time it is asked for (no restart)."""

    def __init__(self, service: api.Service, served: Served):
        self.service, self.served = service, served
        self.app: FastAPI | None = None

    def listed(self, request: Request) -> list[str]:
        with self.service.store.session() as session:
            names = session.scalars(select(Job.fine_tuned_model).where(
                Job.owner == request.state.owner, Job.status == "succeeded", Job.fine_tuned_model.is_not(None),
                Job.model_deleted.is_(False))
                .order_by(Job.created_at))
            return [self.served.base_name, *names]

    async def prepare(self, request: Request, name: str) -> None:
        if name == self.served.base_name:
            return
        job = await asyncio.to_thread(self._job_of, request.state.owner, name)
        if job is None:
            raise model_not_found(name)
        if name not in self.served.adapters:
            try:
                await self.app.state.load_adapter(name, self.service.storage.run(job.id).model_dir)
            except ValueError as err:  # the engine refused it (another adapter kind than those loaded, ...)
                raise OpenAIError(400, f"model {name!r} cannot be served here: {err}", "model",
                                  "model_not_servable") from None

    def _job_of(self, owner: str, name: str) -> Job | None:
        with self.service.store.session() as session:
            return session.scalar(select(Job).where(Job.fine_tuned_model == name, Job.owner == owner,
                                                    Job.status == "succeeded", Job.model_deleted.is_(False)))


def _executor(flags: ServerCommandConfig) -> Executor:
    if flags.ray is not None:
        from tunesmith.server.ray_executor import RayExecutor

        return RayExecutor(flags.ray)
    return LocalExecutor(flags.workers)


def build_server(flags: ServerCommandConfig, executor: Executor | None = None) -> FastAPI:
    storage = Storage(flags.root)
    storage.clear_uploads()
    store = Store(flags.db or storage.database_url)
    defaults = copy.deepcopy(jobspec.JOB_DEFAULTS)
    if flags.job_defaults is not None:
        defaults = read_yaml(Path(flags.job_defaults))
    served = build_served(flags.model, {}, flags.device, flags.max_tokens, flags.dtype)
    holder: dict[str, api.Service] = {}
    queue = JobQueue(store, storage, executor or _executor(flags),
                     lambda job: api.fine_tuned_name(holder["service"], job))
    service = holder["service"] = api.Service(
        store, storage, queue, served.tokenizer, flags.model, {flags.model, served.base_name}, served.base_name,
        max_upload_bytes=flags.max_upload_mb << 20,
        max_seq_len=int(defaults.get("data", {}).get("max_seq_len", 1024)), job_defaults=defaults)
    access = JobModels(service, served)
    app = create_app(served, None, flags.max_concurrency, 1 << 20, flags.request_timeout, flags.shutdown_timeout,
                     flags.max_batch_size, access=access, unbuffered={"/v1/files"})
    access.app = app
    api.install(app, service)
    app.add_middleware(KeyAuth, store=store)
    app.state.root, app.state.service, app.state.access = storage.root, service, access
    serving = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        try:
            async with serving(app):
                yield
        finally:
            await asyncio.to_thread(queue.stop, flags.shutdown_timeout)

    app.router.lifespan_context = lifespan
    return app
