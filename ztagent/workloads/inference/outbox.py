"""The escalation outbox: unsure results, appended to the storage workload for upstream shipping.

A result below the confidence threshold is queued here and written by a background task to
the storage workload through its gRPC API (``ztagent.workloads.v1.Storage/Put``), in the
namespace of the device that asked, under
``outbox/<model>/<UTC timestamp>-<random>``. The value is a JSON record (see
:func:`record_json`).

The outbox never slows or fails a prediction: the queue is bounded (a full queue drops the
record), and a write that fails is logged and counted (:class:`OutboxStats`), not retried.

Each write carries an identity assertion the workload signs itself (its ``--assertion-key``),
for the device it acts for and the decision id of the sidecar's admission of the original
call: the storage workload accepts it because it trusts that key, and only for
``Storage/Put``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from ztagent._proto.workloads.v1 import storage_pb2, storage_pb2_grpc
from ztagent.failure_log import FailureLog
from ztagent.timefmt import rfc3339
from ztagent.tokens.assertion import ASSERTION_HEADER, AssertionSigner

log = logging.getLogger(__name__)

OUTBOX_PREFIX = "outbox/"
MAX_PENDING = 1024
"""Records queued for writing before new ones are dropped."""
PUT_TIMEOUT_S = 5.0
PUT_METHOD = "/ztagent.workloads.v1.Storage/Put"


@dataclass(frozen=True)
class EscalatedResult:
    device_id: str
    spiffe_id: str
    decision_id: str
    """The sidecar's decision id for the call that produced this result."""
    model: str
    model_version: str
    label: str
    confidence: float
    scores: Sequence[tuple[str, float]]
    threshold: float
    request_id: str
    time: datetime


@dataclass
class OutboxStats:
    queued: int = 0
    written: int = 0
    failed: int = 0
    dropped: int = 0


def outbox_key(model: str, when: datetime, suffix: str) -> str:
    """``outbox/<model>/<YYYYmmddTHHMMSS.ffffffZ>-<suffix>``: sorts by time within a model."""
    return f"{OUTBOX_PREFIX}{model}/{when.astimezone(UTC):%Y%m%dT%H%M%S.%fZ}-{suffix}"


def record_json(result: EscalatedResult) -> bytes:
    """The stored value: what was decided, by which model version, for which device."""
    doc = {
        "device_id": result.device_id,
        "decision_id": result.decision_id,
        "model": result.model,
        "model_version": result.model_version,
        "label": result.label,
        "confidence": result.confidence,
        "scores": dict(result.scores),
        "threshold": result.threshold,
        "request_id": result.request_id,
        "time": rfc3339(result.time, digits=6),
    }
    return json.dumps(doc, sort_keys=True).encode("utf-8")


class Outbox:
    """Writes escalated results to the storage workload at ``target`` (loopback or unix)."""

    def __init__(
        self,
        target: str,
        signer: AssertionSigner,
        *,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.target = target
        self._signer = signer
        self._failures = FailureLog(log, f"outbox writes to the storage workload at {target}")
        self.stats = OutboxStats()
        self._clock = clock
        self._queue: asyncio.Queue[tuple[str, EscalatedResult]] = asyncio.Queue(max_pending)
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    def now(self) -> datetime:
        return self._clock()

    def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._task = asyncio.get_running_loop().create_task(self._drain(), name="outbox")

    def submit(self, result: EscalatedResult) -> str:
        """Queues ``result``; returns its key, or "" when the queue was full (dropped)."""
        key = outbox_key(result.model, result.time, secrets.token_hex(6))
        try:
            self._queue.put_nowait((key, result))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.warning("outbox full (%d queued): dropped %s", self._queue.qsize(), key)
            return ""
        self.stats.queued += 1
        return key

    async def close(self, grace: float | None) -> None:
        """Waits up to ``grace`` seconds for queued records, then stops."""
        if self._task is None:
            return
        if grace:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._channel is not None:
            await self._channel.close()
        left = self._queue.qsize()
        if left:
            self.stats.dropped += left
            log.warning("outbox stopped with %d records unwritten", left)

    def _assertion(self, result: EscalatedResult) -> str:
        return self._signer.mint(
            device_id=result.device_id,
            spiffe_id=result.spiffe_id,
            method=PUT_METHOD,
            decision_id=result.decision_id,
        )

    async def _drain(self) -> None:
        assert self._channel is not None
        stub = storage_pb2_grpc.StorageStub(self._channel)
        while True:
            key, result = await self._queue.get()
            try:
                await stub.Put(
                    storage_pb2.PutRequest(key=key, value=record_json(result)),
                    metadata=((ASSERTION_HEADER, self._assertion(result)),),
                    timeout=PUT_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as err:
                self.stats.failed += 1
                self._failures.failed(f"{key}: {err.code().name} {err.details()}")
            except Exception:
                self.stats.failed += 1
                log.exception("outbox write of %s failed", key)
            else:
                self.stats.written += 1
                self._failures.succeeded()
            finally:
                self._queue.task_done()
