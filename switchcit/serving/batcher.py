"""Dynamic batching for the gateway's routing: a bounded queue → batches → one worker thread."""
import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from switchcit.serving.openai import ApiError

__all__ = ["Batcher"]

logger = logging.getLogger(__name__)


Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    future: asyncio.Future
    arrived: float


class Batcher(Generic[Item, Result]):
    """Bounded queue → batches → ``run_batch(items) -> results`` on one worker thread.

    Runs in the event loop (``start`` in the app's lifespan). A batch closes when it holds
    ``max_batch_size`` items or ``batch_window_s`` after its oldest item arrived. One batch runs at a
    time: the model and its routing context are not shared between threads. A batch that raises is
    run again item by item, so an item that fails fails alone (its own exception) and the others of
    its batch get their results.
    """

    def __init__(self, run_batch: Callable[[list[Item]], list[Result]], *, max_batch_size: int,
                 batch_window_s: float, max_queue: int, drain_timeout_s: float):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if batch_window_s < 0 or drain_timeout_s < 0:
            raise ValueError("batch_window_s and drain_timeout_s must not be negative")
        self.run_batch = run_batch
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self.max_queue, self.drain_timeout_s = max_queue, drain_timeout_s
        self.accepting = True
        self.in_batch = 0
        self._pending: deque[_Pending[Item]] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="switchcit-batch")
        self._collector: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def submit(self, item: Item) -> Result:
        if not self.accepting:
            raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
        if len(self._pending) >= self.max_queue:
            raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                           code="queue_full", kind="rate_limit_error")
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), loop.time())
        self._pending.append(pending)
        self._arrived.set()
        return await pending.future

    def stop_accepting(self) -> None:
        """Shutdown starts: refuse new items; fail those still queued after the drain timeout."""
        self.accepting = False
        asyncio.get_running_loop().call_later(self.drain_timeout_s, self._fail_queued)

    async def close(self) -> None:
        self._fail_queued()
        if self._collector is not None:
            self._collector.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _fail_queued(self) -> None:
        while self._pending:
            future = self._pending.popleft().future
            if not future.done():
                future.set_exception(ApiError(503, "the server shut down before this request was served",
                                              code="shutting_down", kind="server_error"))

    async def _collect(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.in_batch = len(batch)
            try:
                await self._answer(batch)
            finally:
                self.in_batch = 0

    async def _answer(self, batch: list[_Pending[Item]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, [p.item for p in batch])
            answered = list(zip(batch, results, strict=True))
        except Exception as error:
            if len(batch) == 1:  # the endpoint raises it: a 500 whose traceback the server logs
                if not batch[0].future.done():
                    batch[0].future.set_exception(error)
                return
            logger.warning("a batch of %d failed (%r): running its requests one by one", len(batch), error)
            for pending in batch:
                if not pending.future.done():  # its client may be gone
                    await self._answer([pending])
            return
        for pending, result in answered:
            if not pending.future.done():
                pending.future.set_result(result)

    async def _next_batch(self) -> list[_Pending[Item]]:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._pending[0].arrived + self.batch_window_s
        while len(self._pending) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return [p for p in self._take_batch() if not p.future.done()]  # skip requests cancelled meanwhile

    def _take_batch(self) -> list[_Pending[Item]]:
        """Which queued items form the next batch: the oldest ones (subclasses may choose otherwise)."""
        return [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
