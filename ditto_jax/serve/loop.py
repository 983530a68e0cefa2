"""The engine loop of a server: one thread owns the ``SamplingEngine`` and steps it while requests are in flight;
request handlers (asyncio) submit requests, read token deltas and cancel, through the engine's incremental API
(``submit`` / ``step`` / ``cancel``, see ``ditto_jax.sampling.SamplingEngine``). Concurrent requests therefore
share continuous batching and the prefix cache."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from typing import Any

from ditto_jax.sampling import Request, Result


@dataclasses.dataclass
class Handle:
    """One submitted request as seen by its handler: ``events`` receives ``("tokens", ids)`` after each decode
    chunk and ``("done", Result)`` once (or ``("error", message)``)."""

    id: str
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop

    def put(self, item: tuple[str, Any]) -> None:
        """Thread-safe delivery from the engine thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EngineLoop:
    """A background thread stepping ``engine`` whenever it is busy."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = False
        self._handles: dict[str, Handle] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.error: str | None = None
        self.cancelled = 0  # requests whose client went away (their slots were freed)
        self.finished = 0
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        """Start the loop thread."""
        self.thread.start()

    def stop(self) -> None:
        """Ask the loop to end and wait for it."""
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=30)

    def new_id(self, prefix: str) -> str:
        """A request id unique in this server."""
        return f"{prefix}-{next(self._ids)}"

    def submit(self, request: Request) -> Handle:
        """Queue ``request``; returns its handle (call from the event loop)."""
        handle = Handle(request.id, asyncio.Queue(), asyncio.get_running_loop())
        with self._lock:
            self._handles[request.id] = handle
        try:
            self.engine.submit(request, on_token=self._on_token)
        except Exception:
            with self._lock:
                self._handles.pop(request.id, None)
            raise
        self._wake.set()
        return handle

    def cancel(self, request_id: str) -> None:
        """Free the request's slot (a client that went away)."""
        if self.engine.cancel(request_id):
            self._wake.set()

    def _on_token(self, request_id: str, new_ids: list[int]) -> None:
        handle = self._handles.get(request_id)
        if handle is not None:
            handle.put(("tokens", list(new_ids)))

    def in_flight(self) -> int:
        """Requests submitted and not finished."""
        with self._lock:
            return len(self._handles)

    def _finish(self, result: Result) -> None:
        self.finished += 1
        self.cancelled += int(result.finish_reason == "cancelled")
        with self._lock:
            handle = self._handles.pop(result.id, None)
        if handle is not None:
            handle.put(("done", result))

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.busy():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                for result in self.engine.step():
                    self._finish(result)
            except Exception as exc:  # a failing step fails every request in flight, visibly
                self.error = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    handles, self._handles = list(self._handles.values()), {}
                for handle in handles:
                    handle.put(("error", self.error))
                    self.engine.cancel(handle.id)
