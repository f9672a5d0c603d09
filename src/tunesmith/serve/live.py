"""Which models an app serves while it runs: adapters loaded and removed without a restart
(``LiveAdapters``, behind ``app.state.load_adapter`` and ``app.state.remove_adapter``), and which of them
each request may see (``ModelAccess``; ``tunesmith server`` gives each API key its own fine-tuned models).
A model a request may not see is answered as one that does not exist (``model_not_found``).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Protocol

from fastapi import Request

from tunesmith.serve.engine import Engine
from tunesmith.serve.errors import OpenAIError
from tunesmith.serve.served import Served


def model_not_found(model: str) -> OpenAIError:
    """OpenAI's 404 for a model the request may not use: the same words whether or not it exists for
    another key."""
    return OpenAIError(404, f"The model `{model}` does not exist or you do not have access to it.", "model",
                       "model_not_found")


class ModelAccess(Protocol):
    """Which models a request sees, for a server with per-key visibility (``create_app(access=...)``)."""

    def listed(self, request: Request) -> list[str]:
        """The ids /v1/models lists for this request: all of them, the base model's too when it should."""
        ...

    async def prepare(self, request: Request, model: str) -> None:
        """Called before a chat or completions request for ``model`` is checked: raise
        ``model_not_found(model)`` when this request may not use it; may first load it
        (``await app.state.load_adapter(model, folder)``), to serve it in this same request."""
        ...


class LiveAdapters:
    """Adapters loaded and removed while the app serves (``app.state.load_adapter`` and ``remove_adapter``):
    the engine changes its model on its own thread, then, on the event loop, the public name is
    registered in ``served.adapters`` (and ``served.model`` follows a wrapped or unwrapped model)."""

    def __init__(self, served: Served, engine: Engine | None):
        self.served, self.engine = served, engine
        self.loading: dict[str, asyncio.Future[None]] = {}
        self.count = 0

    async def load(self, name: str, folder: Path | str) -> None:
        """Serve the adapter in ``folder`` as model ``name``; done once requests for it can be made. A name
        served already returns at once (its folder not compared); concurrent loads of one name load once.
        ValueError for a folder the engine refuses; the app serves on as before."""
        if name in self.served.adapters:
            return
        if self.engine is None:
            raise ValueError(f"model {name!r}: adapters load live on the built-in engine only, not with vLLM")
        if name == self.served.base_name:
            raise ValueError(f"model {name!r}: the base model's name; choose another")
        loading = self.loading.get(name)
        if loading is None:
            loading = self.loading[name] = asyncio.ensure_future(self._load(name, Path(folder)))
            loading.add_done_callback(lambda done: self._loaded(name, done))
        await asyncio.shield(loading)  # a request that goes away leaves the load to the others

    async def _load(self, name: str, folder: Path) -> None:
        assert self.engine is not None
        adapter = self._peft_name(name)
        await asyncio.wrap_future(self.engine.add_adapter(adapter, folder))
        self.served.adapters[name] = adapter
        self.served.model = self.engine.model

    def _loaded(self, name: str, done: asyncio.Future[None]) -> None:
        del self.loading[name]
        if not done.cancelled():
            done.exception()  # retrieved: a failure no request waits for any more is not logged as lost

    def _peft_name(self, name: str) -> str:
        """An adapter name peft takes (no '.', which module names cannot hold) that is no part of another
        one (peft matches adapter names in state-dict keys as substrings): ``live<n>_<hash of name>``."""
        assert self.engine is not None
        while True:
            self.count += 1
            adapter = f"live{self.count}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
            if adapter not in (self.engine.adapters or ()):
                return adapter

    async def remove(self, name: str) -> None:
        """Stop serving model ``name``: its requests are refused (404) from now on, and the engine unloads it
        once those in flight have finished. ValueError for a model not loaded."""
        if name not in self.served.adapters or self.engine is None:
            raise ValueError(f"model {name!r} is not an adapter served by the built-in engine")
        adapter = self.served.adapters.pop(name)
        await asyncio.wrap_future(self.engine.remove_adapter(adapter))
        self.served.model = self.engine.model
