"""Dynamic batching: inputs of concurrent requests share one forward pass.

Each input joins an asyncio queue with a future. One task on the event loop takes inputs off the
queue into a batch until it holds max_batch_size inputs or the oldest has waited max_wait_ms (default
0: whatever queued while the model was busy, as text-embeddings-inference does; batches grow with the
load and an idle server adds no delay), then hands the batch to a single worker thread (the model is never run on the event loop, and never twice
at once: its own intra-op threads already use the cores). Past max_queue admitted inputs a request
is refused at once instead of joining an unbounded queue.

Failures stay local: when a batch fails, its inputs are run again one by one, so one bad input fails
only its own request. If the batching task itself ever dies, every input it holds fails with
BatcherDown at once (never a request that waits forever) and `alive` turns false for /readyz.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable


class QueueFull(Exception):
    """More inputs admitted than max_queue: the client should retry later (429)."""


class ModelError(Exception):
    """The model raised on an input (500): it is logged, the server goes on."""


class BatcherDown(Exception):
    """The batching task has ended (stopped or crashed): nothing will answer (503)."""


@dataclass
class _Item:
    input: Any
    future: asyncio.Future
    enqueued: float


_STOP = object()
log = logging.getLogger("bertforge.serve")


class Batcher:
    def __init__(self, run_batch: Callable[[list], list], max_batch_size: int = 32, max_wait_ms: float = 0.0,
                 max_queue: int = 512, metrics=None):
        self.run_batch = run_batch  # list of inputs -> list of answers (an Exception instance fails that input)
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        self.model_calls = 0
        self.pending = 0  # inputs admitted and not yet answered
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bertforge-model")
        self.busy_since: float | None = None  # when the batch now on the model started (None: idle)
        self.failure: BaseException | None = None  # why the batching task died
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._batch: list[_Item] = []  # the batch being run, failed too if the task dies under it

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def stalled_for(self) -> float:
        """Seconds the current batch has been running (0 when idle): a stuck model shows here."""
        return time.perf_counter() - self.busy_since if self.busy_since is not None else 0.0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="bertforge-batcher")

    async def stop(self) -> None:
        """Answer everything already queued, then stop the worker."""
        if self.alive:
            self._queue.put_nowait(_STOP)
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self.executor.shutdown(wait=True)

    async def run_in_worker(self, fn: Callable, *args):
        """Run `fn` on the model thread (warm-up goes through here so it never overlaps a batch)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def submit(self, inputs: list) -> list:
        """Answers for `inputs`, in order. Raises QueueFull, BatcherDown, or the first failed input's exception."""
        if not self.alive:
            raise BatcherDown(f"batcher is not running ({self.failure!r})" if self.failure else "batcher is not running")
        n = len(inputs)
        if self.pending + n > self.max_queue:
            raise QueueFull(f"{self.pending} inputs in flight, limit {self.max_queue}")
        loop = asyncio.get_running_loop()
        self._admit(n)
        try:
            futures = [loop.create_future() for _ in inputs]
            now = time.perf_counter()
            for x, f in zip(inputs, futures):
                self._queue.put_nowait(_Item(x, f, now))
            self._set_queue_depth()
            answers = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            self._admit(-n)
        for a in answers:
            if isinstance(a, BaseException):
                raise a
        return answers

    def _admit(self, n: int) -> None:
        self.pending += n
        if self.metrics:
            self.metrics.in_flight.set(self.pending)

    def _set_queue_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self._queue.qsize())

    async def _loop(self) -> None:
        try:
            await self._batches()
        except BaseException as e:  # cancelled, or a bug: nothing may be left waiting on a dead task
            log.error("batcher died: %r; failing every queued input", e)
            self.failure = e
            down = BatcherDown(f"batcher died: {e!r}")
            for item in self._batch:
                if not item.future.done():
                    item.future.set_exception(down)
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not _STOP and not item.future.done():
                    item.future.set_exception(down)
            raise

    async def _batches(self) -> None:
        while True:
            first = await self._queue.get()
            if first is _STOP:
                return
            batch, stop = [first], False
            self._batch = batch  # failed with the rest if the task dies while the batch fills
            # The wait counts from when the oldest input arrived: inputs that queued while the model
            # was busy have waited already and go straight in.
            deadline = first.enqueued + self.max_wait
            while len(batch) < self.max_batch_size:
                if self._queue.empty():
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                        break
                else:
                    item = self._queue.get_nowait()
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._set_queue_depth()
            await self._run(batch)
            if stop:
                return

    async def _run(self, batch: list[_Item]) -> None:
        batch = [item for item in batch if not item.future.done()]  # a cancelled request needs no answer
        if not batch:
            return
        self._batch = batch
        answers = await self._call([item.input for item in batch])
        if isinstance(answers, Exception) and len(batch) > 1:
            # One input may have failed the whole batch: run each alone, so only it fails.
            answers = [None if item.future.done() else await self._call([item.input]) for item in batch]
            answers = [a if a is None or isinstance(a, Exception) else a[0] for a in answers]
        elif isinstance(answers, Exception):
            answers = [answers]
        self._batch = []  # (left set if the task dies above: _loop fails them)
        for item, answer in zip(batch, answers):
            if item.future.done():
                continue
            if isinstance(answer, BaseException):
                item.future.set_exception(answer)
            else:
                item.future.set_result(answer)

    async def _call(self, inputs: list) -> list | Exception:
        """One model call on the worker thread: its answers, or the exception it raised."""
        start = self.busy_since = time.perf_counter()
        try:
            return await self.run_in_worker(self.run_batch, inputs)
        except Exception as e:  # the model failed on these inputs; the server goes on
            log.exception("model call on %d inputs failed", len(inputs))
            return ModelError(f"{type(e).__name__}: {e}")
        finally:
            self.busy_since = None
            self.model_calls += 1
            if self.metrics:
                self.metrics.model_calls.inc()
                self.metrics.batch_size.observe(len(inputs))
                self.metrics.batch_seconds.observe(time.perf_counter() - start)
