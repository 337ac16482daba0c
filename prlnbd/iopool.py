"""A bounded pool of threads for disk work, so the event loop never waits on storage.

os.preadv, os.pwritev, os.fdatasync and fallocate release the GIL, so blocking
calls in these threads proceed in parallel with each other and with the event
loop. Completions are handed back to the loop in batches: a worker wakes the
loop only when it finds the completion queue empty, so a burst of finished
requests costs one wake-up, not one each.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

# One worker per request the device can usefully have queued: enough for a QD32 reader on
# NVMe-class storage, small enough that idle threads cost little (they block on the queue).
DEFAULT_WORKERS = 32

Callback = Callable[[Any, BaseException | None], None]


class IoPool:
    """Runs blocking functions in worker threads; results come back on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int = DEFAULT_WORKERS) -> None:
        if workers < 1:
            raise ValueError(f"an I/O pool needs at least one worker, not {workers}")
        self._loop = loop
        self._max = workers
        self._threads: list[threading.Thread] = []
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Callback] | None] = (
            queue.SimpleQueue()
        )
        self._done: collections.deque[tuple[Callback, Any, BaseException | None]] = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._busy = 0  # jobs submitted and not yet completed on the loop
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._closed = False

    @property
    def workers(self) -> int:
        """How many worker threads the pool may run."""
        return self._max

    @property
    def busy(self) -> int:
        """How many jobs are queued or running (their callbacks not yet run)."""
        return self._busy

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], callback: Callback) -> None:
        """Run FN(*ARGS) in a worker; then CALLBACK(result, None) or CALLBACK(None, exc) on the loop."""
        if self._closed:
            raise RuntimeError("the I/O pool is shut down")
        self._busy += 1
        # A new thread only while every existing one may be busy: an idle pool stays small.
        if len(self._threads) < min(self._max, self._busy):
            t = threading.Thread(target=self._work, name=f"prlnbd-io-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()
        self._jobs.put((fn, args, callback))

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """FN(*ARGS) in a worker, as a future to await."""
        fut: asyncio.Future[Any] = self._loop.create_future()

        def settle(result: Any, exc: BaseException | None) -> None:
            if fut.cancelled():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        self.submit(fn, args, settle)
        return fut

    async def idle(self) -> None:
        """Wait until no job is queued or running."""
        if self._busy:
            fut: asyncio.Future[None] = self._loop.create_future()
            self._idle_waiters.append(fut)
            await fut

    def shutdown(self) -> None:
        """Stop the workers once the queued jobs are done (call when idle)."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads.clear()

    # ---- worker threads

    def _work(self) -> None:
        jobs = self._jobs
        done = self._done
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, args, callback = job
            try:
                result, exc = fn(*args), None
            except BaseException as e:  # handed to the loop, whose error boundary decides
                result, exc = None, e
            done.append((callback, result, exc))
            with self._lock:
                if self._wake_pending:
                    continue
                self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._complete)
            except RuntimeError:  # the loop is closed: nobody is waiting for the result
                return

    # ---- the event loop

    def _complete(self) -> None:
        with self._lock:
            self._wake_pending = False
        done = self._done
        while done:
            callback, result, exc = done.popleft()
            self._busy -= 1
            try:
                callback(result, exc)
            except Exception as e:  # a callback's own failure must not strand the others
                self._loop.call_exception_handler({"message": "I/O completion callback failed", "exception": e})
        if not self._busy and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
