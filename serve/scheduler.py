"""Gathers requests from concurrent callers into mixed-adapter batches for one engine.

One worker thread owns the engine's batches: callers `submit` and wait on a future. Requests
that arrive while a batch runs form the next batch (batch-level, not yet iteration-level:
a request does not join a batch already generating).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from serve.engine import ChatRequest, ChatResult, Engine

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 32, gather_s: float = 0.002):
        self.engine, self.max_batch, self.gather_s = engine, max_batch, gather_s
        self._queue: queue.Queue[tuple[ChatRequest, Future] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._worker.start()

    def submit(self, request: ChatRequest) -> Future:
        future: Future = Future()
        self._queue.put((request, future))
        return future

    def generate(self, request: ChatRequest, timeout: float | None = None) -> ChatResult:
        return self.submit(request).result(timeout)

    def _gather(self, first) -> list:
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=self.gather_s)
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # let the loop see the stop signal after this batch
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._gather(first)
            try:
                results = self.engine.generate([request for request, _ in batch])
            except Exception as err:  # the engine failed as a whole: fail this batch, keep serving
                log.exception("batch failed")
                for _, future in batch:
                    future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)
