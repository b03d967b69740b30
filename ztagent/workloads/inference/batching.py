"""Dynamic batching: concurrent requests for one model share one forward pass.

A :class:`Batcher` per model collects pending inputs on the event loop. The first input of a
batch waits at most ``max_wait_s`` for company; a batch leaves as soon as it holds
``max_batch`` inputs or the wait is over. Forward passes run on the workload's single worker
thread, in order, never on the event loop. Each input carries its own future: row ``i`` of
the batch's output resolves the future of input ``i`` and nothing else. A caller that gave up
(cancelled) is skipped, so its input is not run if its batch had not left yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from ztagent.workloads.inference.errors import InferenceBusyError, InferenceError
from ztagent.workloads.inference.models import LoadedModel

log = logging.getLogger(__name__)


def _shutting_down() -> InferenceBusyError:
    return InferenceBusyError("shutting_down", "inference workload is shutting down")


@dataclass(frozen=True)
class RowResult:
    """One input's softmax probabilities and the batch it ran in."""

    probabilities: list[float]
    batch_size: int
    elapsed_s: float


@dataclass
class _Job:
    tensor: torch.Tensor
    future: asyncio.Future[RowResult]
    enqueued: float


class Batcher:
    """Batches one model's inputs; start it with :meth:`start`, end it with :meth:`close`."""

    def __init__(
        self,
        model: LoadedModel,
        executor: Executor,
        *,
        max_batch: int,
        max_wait_s: float,
        max_pending: int,
    ) -> None:
        self.model = model
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_pending = max_pending
        self._pending: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0
        """Forward passes run so far (for tests and logs)."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"batcher-{self.model.name}"
        )

    async def predict(self, tensor: torch.Tensor) -> RowResult:
        """Queues ``tensor`` and waits for its own row of a batch's output."""
        if self._closed:
            raise _shutting_down()
        if len(self._pending) >= self._max_pending:
            raise InferenceBusyError(
                "overloaded",
                f"model {self.model.name!r} has {len(self._pending)} inputs queued (maximum "
                f"{self._max_pending}); retry later",
            )
        loop = asyncio.get_running_loop()
        job = _Job(tensor, loop.create_future(), loop.time())
        self._pending.append(job)
        self._wake.set()
        if len(self._pending) >= self._max_batch:
            self._full.set()
        return await job.future

    async def close(self) -> None:
        """Stops batching; inputs still queued fail with ``shutting_down``."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(_shutting_down())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if not self._pending:
                self._wake.clear()
                continue
            if len(self._pending) < self._max_batch:
                self._full.clear()
                delay = self._pending[0].enqueued + self._max_wait_s - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._full.wait()
            batch: list[_Job] = []
            while self._pending and len(batch) < self._max_batch:
                job = self._pending.popleft()
                if not job.future.done():  # skip callers that gave up
                    batch.append(job)
            if not self._pending:
                self._wake.clear()
            if batch:
                await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        try:
            output = await loop.run_in_executor(
                self._executor, self.model.run, [job.tensor for job in batch]
            )
        except asyncio.CancelledError:  # close() while this batch runs: its callers must not hang
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(_shutting_down())
            raise
        except Exception as exc:
            log.exception("model %s failed on a batch of %d", self.model.name, len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(
                        InferenceError(
                            "inference_failed",
                            f"model {self.model.name!r} failed ({type(exc).__name__})",
                        )
                    )
            return
        self.batches += 1
        for job, row in zip(batch, output.probabilities, strict=True):
            if not job.future.done():
                job.future.set_result(RowResult(row, len(batch), output.elapsed_s))
