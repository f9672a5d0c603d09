"""What the engine gives back for a submitted request (``engine.py``): a ``Handle`` that streams the
request's ``Piece``s and gives its ``Completion``s (their tokens, text, finish reason and, when asked for,
a ``TokenLogprob`` per token), or raises ``EngineError`` when the request could not finish.

The engine's thread writes a handle (its ``_emit``, ``_complete`` and ``_fail``); the request's reader
reads it, from a thread (``for piece in handle``, ``handle.result()``) or from an event loop
(``async for piece in handle.stream()``, ``await handle.wait()``).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

FinishReason = Literal["stop", "length", "cancelled"]


class EngineError(RuntimeError):
    """A request could not finish: the engine closed, or a forward failed (the cause is chained)."""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # log-softmax of the model's logits (before temperature and top-p)
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), most likely first


@dataclass
class Completion:
    token_ids: list[int]  # the new tokens, the stop token excluded
    text: str  # the decoded tokens, cut before the first stop string
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None  # one per token id, when the request asked for them


class Piece(NamedTuple):
    """Streamed output of one completion: its next text, the logprobs of the tokens that text
    covers (when asked for), and, on its last piece, the finished completion."""

    index: int  # which of the request's ``n`` completions
    text: str
    logprobs: list[TokenLogprob] = []
    finished: Completion | None = None


class Handle:
    """One submitted request. Its streamed pieces, whose texts concatenate to each completion's text,
    are read once: by iterating it (a thread waits) or ``async for piece in handle.stream()`` (no
    thread waits: for an asyncio server, whose thread pool would otherwise cap the requests in
    flight). ``result()`` or ``await wait()`` gives all ``n`` completions."""

    def __init__(self, n: int, cancel: threading.Event):
        self._pieces: queue.Queue[Piece | None] = queue.Queue()
        self._completions: list[Completion | None] = [None] * n
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._cancel = cancel
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._wakers_lock = threading.Lock()

    def __iter__(self) -> Iterator[Piece]:
        while not self._read_all() and (piece := self._pieces.get()) is not None:
            yield piece
        self._raise_error()

    def _read_all(self) -> bool:
        """Whether the pieces have all been read (the end marker included): a second reading ends at once."""
        return self._done.is_set() and self._pieces.empty()

    async def stream(self) -> AsyncIterator[Piece]:
        """The pieces, awaited on the running event loop (the engine's thread wakes it)."""
        waker = (asyncio.get_running_loop(), asyncio.Event())
        with self._wakers_lock:
            self._wakers.append(waker)
        try:
            while not self._read_all():
                waker[1].clear()  # before looking: a piece put after the look sets it again
                try:
                    piece = self._pieces.get_nowait()
                except queue.Empty:
                    await waker[1].wait()
                    continue
                if piece is None:
                    break
                yield piece
        finally:
            with self._wakers_lock:
                self._wakers.remove(waker)
        self._raise_error()

    def result(self, timeout: float | None = None) -> list[Completion]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        self._raise_error()
        return list(self._completions)  # type: ignore[arg-type]

    async def wait(self) -> list[Completion]:
        """``result()`` for asyncio: the completions, once all are done (reads the pieces)."""
        async for _ in self.stream():
            pass
        return self.result(0)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise EngineError(f"the request failed: {self._error}") from self._error

    def _put(self, piece: Piece | None) -> None:
        self._pieces.put(piece)
        with self._wakers_lock:
            for loop, event in self._wakers:
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # the reader's event loop has closed: nothing to wake
                    pass

    def _emit(self, index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        if text or logprobs:
            self._put(Piece(index, text, logprobs))

    def _complete(self, index: int, completion: Completion, text: str, logprobs: list[TokenLogprob]) -> None:
        if self._done.is_set():  # the request has failed already: nothing more is streamed
            return
        self._completions[index] = completion
        self._put(Piece(index, text, logprobs, completion))
        if all(c is not None for c in self._completions):
            self._finish()

    def _fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._finish()

    def _finish(self) -> None:
        self._done.set()
        self._put(None)

