"""AsyncEngine: one engine thread stepping `LLM`, many asyncio request handlers awaiting its deltas.

The engine is synchronous and not reentrant; `LLM.add_request` / `abort` are thread-safe inbox posts, so the
handlers (on the event loop) post, and the engine thread steps and hands each delta to its request's
`asyncio.Queue` with `call_soon_threadsafe`. A handler that stops listening (client disconnect, stop string,
exception) aborts its request in a `finally`, which frees its KV before the next step.

Admission: at most `max_num_seqs + max_queue` requests in flight; the next one gets `QueueFull` (HTTP 429)
rather than an unbounded wait.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable

from mimo.engine import LLM, SamplingParams
from mimo.engine.llm import RequestDelta


def _deliver(items: list[tuple[asyncio.Queue, RequestDelta]]) -> None:
    for q, d in items:
        q.put_nowait(d)


class QueueFull(Exception):
    pass


class EngineDead(Exception):
    pass


class AsyncEngine:
    def __init__(self, llm: LLM, max_queue: int = 256,
                 on_step: Callable[[list[RequestDelta], float], None] | None = None):
        self.llm = llm
        self.limit = llm.config.max_num_seqs + max_queue
        self._on_step = on_step
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="mimo-engine", daemon=True)
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._queues)

    def _loop(self) -> None:
        while not self._stopping:
            if not self.llm.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                deltas = self.llm.step()
            except BaseException as e:  # the engine's state is unknown now: fail everyone, admit no one
                traceback.print_exc()
                self._error = e
                with self._lock:
                    queues = list(self._queues.values())
                for loop, q in queues:
                    loop.call_soon_threadsafe(q.put_nowait, e)
                return
            if self._on_step is not None:
                self._on_step(deltas, time.perf_counter() - t0)
            # one wake-up of each event loop per step, not one per request: at 64 requests a step's deltas
            # would otherwise cost 64 cross-thread calls
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            with self._lock:
                for d in deltas:
                    target = self._queues.get(d.request_id)
                    if target is not None:
                        by_loop.setdefault(target[0], []).append((target[1], d))
            for loop, items in by_loop.items():
                loop.call_soon_threadsafe(_deliver, items)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, num_speculative_tokens: int | None = None,
                       arrival_time: float | None = None, request_id: str | None = None
                       ) -> AsyncIterator[RequestDelta]:
        """Yield the request's deltas (all n samples interleaved) until every sample has finished.

        ValueError (bad parameters, prompt too long) is raised before anything is queued."""
        if self._error is not None or self._stopping:
            raise EngineDead("the engine is not running" if self._stopping else f"the engine failed: {self._error}")
        rid = request_id or f"r{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._queues) >= self.limit:
                raise QueueFull(f"{len(self._queues)} requests in flight (max_num_seqs + max_queue = {self.limit})")
            if rid in self._queues:
                raise ValueError(f"request id {rid!r} is already in use")
            self._queues[rid] = (asyncio.get_running_loop(), q)
        left = params.n
        try:
            self.llm.add_request(rid, prompt_ids, params, num_speculative_tokens=num_speculative_tokens,
                                 arrival_time=arrival_time)
            self._wake.set()
            while left:
                d = await q.get()
                if isinstance(d, BaseException):
                    raise EngineDead(f"the engine failed: {d}") from d
                left -= d.finished
                yield d
        finally:
            with self._lock:
                self._queues.pop(rid, None)
            if left:
                self.llm.abort(rid)
                self._wake.set()

    def abort(self, request_id: str, index: int | None = None, reason: str = "abort") -> None:
        self.llm.abort(request_id, index, reason)
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is still in flight and stop the engine thread."""
        with self._lock:
            rids = list(self._queues)
        for rid in rids:
            self.llm.abort(rid)
        deadline = time.monotonic() + timeout
        while self.llm.has_unfinished_requests() and self._thread.is_alive() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.01)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
