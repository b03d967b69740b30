"""The gRPC face of the inference workload: ``ztagent.workloads.v1.Inference`` plus health.

Models are TorchScript files verified against their manifests at start (``models.py``); a
model that fails is refused and logged, the others are served. Every call needs the
sidecar's ``x-ztagent-device-id``. A request's tensor is checked from its declared dtype,
shape and byte length before anything is allocated for it (``tensors.py``), then decoded and
checked for NaN/Inf. Concurrent inputs for one model are batched (``batching.py``) and run on
one worker thread under ``torch.inference_mode()``. A result below the confidence threshold
is returned with ``escalate`` and queued to the storage outbox (``outbox.py``).

The policy decides posture for critical models on the ``x-model`` metadata, so the servicer
binds the two: ``x-model``, when sent, must name the requested model, and a critical model is
served only when ``x-model`` names it. The workload binds loopback or a unix socket only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ztagent._proto.workloads.v1 import inference_pb2, inference_pb2_grpc
from ztagent.addresses import local_target
from ztagent.admission.context import admitted
from ztagent.admission.core import Admitted
from ztagent.errors import ConfigError, ZtagentError
from ztagent.posture.firmware import load_trusted_keys
from ztagent.rpc_status import error_trailers, grpc_status_for
from ztagent.signals import wait_for_stop_signal
from ztagent.tokens.assertion import AssertedIdentity, AssertionSigner, AssertionVerifier
from ztagent.workloads.identity import bind_local, caller, trust_verifier
from ztagent.workloads.inference.batching import Batcher
from ztagent.workloads.inference.errors import (
    InvalidInputError,
    ModelHeaderRequiredError,
    ModelNotFoundError,
)
from ztagent.workloads.inference.models import LoadedModel, decode_tensor, load_models
from ztagent.workloads.inference.outbox import EscalatedResult, Outbox
from ztagent.workloads.inference.tensors import MAX_TENSOR_BYTES, check_tensor

log = logging.getLogger(__name__)

Caller = AssertedIdentity | Admitted
"""Who a call is for: the sidecar's verified assertion, or proxyless, admission's verdict."""

SERVICE_NAME = "ztagent.workloads.v1.Inference"
MODEL_HEADER = "x-model"
"""The metadata the shipped policy reads to decide whether a call needs verified posture."""
DEFAULT_LISTEN = "127.0.0.1:50062"
STOP_GRACE_S = 5.0
"""Seconds in-flight calls get to finish on SIGTERM/SIGINT."""
RECEIVE_HEADROOM_BYTES = 64 * 1024
"""The gRPC receive limit is the largest tensor plus this, so an oversized tensor reaches the
workload's own check (INVALID_ARGUMENT) rather than gRPC's (RESOURCE_EXHAUSTED)."""
STREAM_WINDOW = 64
"""Windows of one PredictStream in flight at once; past that the stream stops reading."""
MAX_PENDING_PER_MODEL = 1024
"""Inputs queued for one model before new ones are refused with UNAVAILABLE."""
MAX_BATCH_LIMIT = 1024
MAX_WAIT_MS_LIMIT = 1000.0
MAX_THREADS = 64


@dataclass(frozen=True)
class InferenceOptions:
    """The workload's tunables, validated by :meth:`check` before any socket opens."""

    confidence_threshold: float = 0.8
    """Results with a lower top probability are escalated (0 disables escalation)."""
    max_batch: int = 16
    """Most inputs in one forward pass."""
    max_wait_ms: float = 2.0
    """Longest the first input of a batch waits for company, in milliseconds."""
    threads: int = 1
    """torch intra-op threads for the forward passes."""

    def check(self) -> None:
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ConfigError(
                "confidence_threshold", f"got {self.confidence_threshold}, expected 0.0 to 1.0"
            )
        if not 1 <= self.max_batch <= MAX_BATCH_LIMIT:
            raise ConfigError("max_batch", f"got {self.max_batch}, expected 1 to {MAX_BATCH_LIMIT}")
        if not 0.0 <= self.max_wait_ms <= MAX_WAIT_MS_LIMIT:
            raise ConfigError(
                "max_wait_ms", f"got {self.max_wait_ms}, expected 0 to {MAX_WAIT_MS_LIMIT} ms"
            )
        if not 1 <= self.threads <= MAX_THREADS:
            raise ConfigError("threads", f"got {self.threads}, expected 1 to {MAX_THREADS}")


def model_header(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The single ``x-model`` value, or None when the caller sent none."""
    values = [value for key, value in metadata or () if key == MODEL_HEADER]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise InvalidInputError(
            "model_mismatch", f"got {len(values)} {MODEL_HEADER} values, expected at most one"
        )
    return values[0]


def check_model_binding(model: LoadedModel, header: str | None) -> None:
    """``x-model`` (what the policy saw) must name the model served; critical ones need it."""
    if header is not None and header != model.name:
        raise InvalidInputError(
            "model_mismatch",
            f"{MODEL_HEADER} metadata names {header[:80]!r} but the request asks for "
            f"{model.name!r}; they must be the same",
        )
    if header is None and model.manifest.critical:
        raise ModelHeaderRequiredError(
            "model_header",
            f"model {model.name!r} is critical: name it in the {MODEL_HEADER} metadata so the "
            "policy can check device posture",
        )


async def _abort(context: grpc.aio.ServicerContext, err: ZtagentError) -> NoReturn:
    await context.abort(grpc_status_for(err), err.message, error_trailers(err))
    raise AssertionError("context.abort returned")  # pragma: no cover


@dataclass
class Counters:
    predictions: int = 0
    escalated: int = 0
    refused: int = 0
    active_streams: int = 0


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Implements ``ztagent.workloads.v1.Inference`` over batchers, one per model."""

    def __init__(
        self,
        batchers: dict[str, Batcher],
        outbox: Outbox | None,
        threshold: float,
        verifier: AssertionVerifier | None,
    ) -> None:
        self._verifier = verifier
        self._batchers = batchers
        self._outbox = outbox
        self._threshold = threshold
        self.counters = Counters()

    def _caller(self, context: grpc.aio.ServicerContext, method: str) -> Caller:
        """The sidecar's verified assertion; proxyless (no verifier): the device the
        in-process admission admitted."""
        if self._verifier is None:
            return admitted()
        return caller(self._verifier, context, f"/{SERVICE_NAME}/{method}")

    def _admit(
        self, request: inference_pb2.PredictRequest, header: str | None
    ) -> tuple[Batcher, torch.Tensor]:
        """The request's model and its decoded input, or an error saying what is wrong."""
        batcher = self._batchers.get(request.model)
        if batcher is None:
            raise ModelNotFoundError(request.model, list(self._batchers))
        check_model_binding(batcher.model, header)
        if not request.HasField("input"):
            raise InvalidInputError(
                "missing_input",
                f"request has no input tensor, expected FLOAT32 of shape "
                f"{list(batcher.model.manifest.input_shape)}",
            )
        tensor = request.input
        expected = batcher.model.manifest.input_shape
        check_tensor(tensor.dtype, tensor.shape, len(tensor.data), expected)
        return batcher, decode_tensor(tensor.data, tensor.shape)

    async def _predict(
        self, batcher: Batcher, tensor: torch.Tensor, request_id: str, who: Caller
    ) -> inference_pb2.PredictResponse:
        row = await batcher.predict(tensor)
        manifest = batcher.model.manifest
        best = max(range(len(row.probabilities)), key=row.probabilities.__getitem__)
        confidence = row.probabilities[best]
        response = inference_pb2.PredictResponse(
            request_id=request_id,
            model=manifest.name,
            model_version=manifest.version,
            label=manifest.labels[best],
            confidence=confidence,
            scores=[
                inference_pb2.ClassScore(label=label, score=score)
                for label, score in zip(manifest.labels, row.probabilities, strict=True)
            ],
            inference_time_us=round(row.elapsed_s * 1e6),
            batch_size=row.batch_size,
            escalate=confidence < self._threshold,
        )
        self.counters.predictions += 1
        if response.escalate:
            self.counters.escalated += 1
            if self._outbox is not None:
                response.outbox_key = self._outbox.submit(
                    EscalatedResult(
                        device_id=who.device_id,
                        spiffe_id=who.spiffe_id,
                        decision_id=who.decision_id,
                        model=manifest.name,
                        model_version=manifest.version,
                        label=response.label,
                        # the float32 values the caller receives, not the doubles
                        confidence=response.confidence,
                        scores=[(s.label, s.score) for s in response.scores],
                        threshold=self._threshold,
                        request_id=request_id,
                        time=self._outbox.now(),
                    )
                )
        return response

    async def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.PredictResponse:
        try:
            metadata = context.invocation_metadata()
            who = self._caller(context, "Predict")
            batcher, tensor = self._admit(request, model_header(metadata))
            return await self._predict(batcher, tensor, request.request_id, who)
        except ZtagentError as err:
            self.counters.refused += 1
            await _abort(context, err)

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[inference_pb2.PredictRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.PredictResponse]:
        """Results in the order the windows came; up to STREAM_WINDOW of them in flight."""
        try:
            metadata = context.invocation_metadata()
            who = self._caller(context, "PredictStream")
            header = model_header(metadata)
        except ZtagentError as err:
            await _abort(context, err)
        # Each queued item is a running prediction, an error ending the stream, or None (EOF).
        queue: asyncio.Queue[asyncio.Task[inference_pb2.PredictResponse] | Exception | None] = (
            asyncio.Queue(STREAM_WINDOW)
        )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    batcher, tensor = self._admit(request, header)
                    await queue.put(
                        asyncio.ensure_future(
                            self._predict(batcher, tensor, request.request_id, who)
                        )
                    )
            except Exception as exc:  # a bad window, or the client's stream failing
                await queue.put(exc)
                return
            await queue.put(None)

        self.counters.active_streams += 1
        reader = asyncio.get_running_loop().create_task(read(), name="predict-stream-reader")
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    if isinstance(item, ZtagentError):
                        self.counters.refused += 1
                        await _abort(context, item)
                    raise item
                try:
                    response = await item
                except ZtagentError as err:
                    await _abort(context, err)
                yield response
        finally:
            self.counters.active_streams -= 1
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            while not queue.empty():
                left = queue.get_nowait()
                if isinstance(left, asyncio.Task):
                    left.cancel()

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        try:
            self._caller(context, "ListModels")
        except ZtagentError as err:
            await _abort(context, err)
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelInfo(
                    name=m.name,
                    version=m.version,
                    input_shape=m.input_shape,
                    labels=m.labels,
                    sha256=m.sha256,
                    critical=m.critical,
                    description=m.description,
                )
                for m in (b.model.manifest for _, b in sorted(self._batchers.items()))
            ]
        )


# -- starting and stopping ------------------------------------------------------------------


@dataclass
class _Running:
    server: grpc.aio.Server
    parts: _Parts
    health: Any


_RUNNING: dict[int, _Running] = {}


def servicer_of(server: grpc.aio.Server) -> InferenceServicer:
    """The servicer behind a running server (its counters, for tests and the demo)."""
    return _RUNNING[id(server)].parts.servicer


def outbox_of(server: grpc.aio.Server) -> Outbox | None:
    return _RUNNING[id(server)].parts.outbox


@dataclass
class _Parts:
    """What both ways of serving share: the servicer, its batchers, outbox and thread."""

    servicer: InferenceServicer
    batchers: list[Batcher]
    outbox: Outbox | None
    executor: ThreadPoolExecutor
    models: list[str]

    def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()
        if self.outbox is not None:
            self.outbox.start()

    async def close(self, grace: float | None) -> None:
        for batcher in self.batchers:
            await batcher.close()
        if self.outbox is not None:
            await self.outbox.close(grace)
        self.executor.shutdown(wait=True)


async def _open_parts(
    models_dir: Path,
    verifier: AssertionVerifier | None,
    *,
    storage_target: str | None,
    confidence_threshold: float,
    max_batch: int,
    max_wait_ms: float,
    threads: int,
    model_keys: Sequence[Path],
    assertion_key: Path | None,
) -> _Parts:
    trusted = load_trusted_keys(model_keys, "model_keys") if model_keys else None
    options = InferenceOptions(confidence_threshold, max_batch, max_wait_ms, threads)
    options.check()
    outbox_target = None
    if storage_target is not None:
        outbox_target = local_target(storage_target, "storage_target")
    signer = None
    if storage_target is not None:
        if assertion_key is None:
            raise ConfigError(
                "assertion_key",
                "the outbox writes to storage on the device's behalf: give --assertion-key "
                "(and the storage workload the matching .pub in --trust-key)",
            )
        try:
            signer = AssertionSigner.from_file(assertion_key)
        except (OSError, ValueError) as exc:
            raise ConfigError("assertion_key", f"{assertion_key}: {exc}") from None

    loop = asyncio.get_running_loop()
    # set_num_threads is per OpenMP thread: set it where the forward passes run.
    executor = ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="ztagent-inference",
        initializer=torch.set_num_threads,
        initargs=(threads,),
    )
    try:
        loaded = await loop.run_in_executor(executor, load_models, models_dir, trusted)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    if not loaded.models:
        executor.shutdown(wait=False)
        reasons = "; ".join(r.error.message for r in loaded.refused) or "no *.manifest.json"
        raise ConfigError("models", f"no model can be served from {models_dir}: {reasons}")

    batchers = [
        Batcher(
            model,
            executor,
            max_batch=max_batch,
            max_wait_s=max_wait_ms / 1000.0,
            max_pending=MAX_PENDING_PER_MODEL,
        )
        for model in loaded.models.values()
    ]
    outbox = (
        Outbox(outbox_target, signer) if outbox_target is not None and signer is not None else None
    )
    servicer = InferenceServicer(
        {b.model.name: b for b in batchers}, outbox, confidence_threshold, verifier
    )
    return _Parts(servicer, batchers, outbox, executor, sorted(loaded.models))


async def start_inference_server(
    listen: str,
    models_dir: Path,
    *,
    storage_target: str | None,
    confidence_threshold: float = 0.8,
    max_batch: int = 16,
    max_wait_ms: float = 2.0,
    threads: int = 1,
    model_keys: Sequence[Path] = (),
    trust_keys: Sequence[Path],
    socket_group: str | None = None,
    assertion_key: Path | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Loads the models in ``models_dir`` and starts serving on ``listen``.

    ``storage_target`` is the storage workload's loopback or unix address for the escalation
    outbox (None: escalated results are only returned). Returns the started server and its
    bound port (0 for a unix socket). Stop it with :func:`stop_inference_server`.
    ``model_keys``: PEM public keys of trusted model signers; when given, only models whose
    manifest carries a valid signature by one of them are served.
    ``trust_keys``: whose identity assertions are accepted (the sidecar's assertion.pub);
    ``assertion_key``: the key the outbox signs its writes to storage with (required with
    ``storage_target``; made if missing).
    """
    address = local_target(listen, "listen")
    parts = await _open_parts(
        models_dir,
        trust_verifier(trust_keys),
        storage_target=storage_target,
        confidence_threshold=confidence_threshold,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        threads=threads,
        model_keys=model_keys,
        assertion_key=assertion_key,
    )
    limit = MAX_TENSOR_BYTES + RECEIVE_HEADROOM_BYTES
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(parts.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    from grpc_reflection.v1alpha import reflection

    # Reflection (grpcurl list / describe), like health without an assertion: it names only
    # the schema, and this port is loopback or a unix socket the sidecar reaches.
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    running = _Running(server, parts, health_servicer)
    try:
        parts.start()
        port = bind_local(server, address, group=socket_group)
        await server.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await _shutdown(running, grace=None)
        raise
    _RUNNING[id(server)] = running
    bound = port
    log.info(
        "inference workload serving %s on %s (port %d); outbox %s",
        parts.models,
        address,
        bound,
        storage_target or "off",
    )
    return server, bound


async def stop_inference_server(
    server: grpc.aio.Server, grace: float | None = STOP_GRACE_S
) -> None:
    """Reports NOT_SERVING, stops with ``grace`` seconds, flushes the outbox, frees the thread."""
    running = _RUNNING.pop(id(server), None)
    if running is None:
        await server.stop(grace)
        return
    await _shutdown(running, grace)


async def _shutdown(running: _Running, grace: float | None) -> None:
    with contextlib.suppress(Exception):
        await running.health.enter_graceful_shutdown()
    await running.server.stop(grace)
    await running.parts.close(grace)


async def run_inference(
    listen: str,
    models_dir: Path,
    *,
    storage_target: str | None = None,
    confidence_threshold: float = 0.8,
    max_batch: int = 16,
    max_wait_ms: float = 2.0,
    threads: int = 1,
    model_keys: Sequence[Path] = (),
    trust_keys: Sequence[Path],
    socket_group: str | None = None,
    assertion_key: Path | None = None,
) -> None:
    """Serves until SIGTERM or SIGINT, then stops with a 5 s grace."""
    server, _ = await start_inference_server(
        listen,
        models_dir,
        storage_target=storage_target,
        confidence_threshold=confidence_threshold,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        threads=threads,
        model_keys=model_keys,
        trust_keys=trust_keys,
        socket_group=socket_group,
        assertion_key=assertion_key,
    )
    try:
        await wait_for_stop_signal()
        log.info("inference workload stopping")
    finally:
        await stop_inference_server(server, STOP_GRACE_S)


async def run_inference_protected(
    config: Path,
    models_dir: Path,
    *,
    listen: str | None = None,
    storage_target: str | None = None,
    confidence_threshold: float = 0.8,
    max_batch: int = 16,
    max_wait_ms: float = 2.0,
    threads: int = 1,
    model_keys: Sequence[Path] = (),
    assertion_key: Path | None = None,
) -> None:
    """Proxyless: the inference service on ``config``'s ``[listen]`` mTLS port (or
    ``listen``), every call through the same admission as the sidecar's
    (``ztagent.sidecar.proxyless``); the caller is the admitted device. The escalation outbox
    still writes to a local storage workload with ``assertion_key``. Serves until SIGTERM or
    SIGINT."""
    from ztagent.config import load_config
    from ztagent.sidecar.proxyless import protected_server

    loaded = load_config(config, listen_address=listen)
    parts = await _open_parts(
        models_dir,
        None,
        storage_target=storage_target,
        confidence_threshold=confidence_threshold,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        threads=threads,
        model_keys=model_keys,
        assertion_key=assertion_key,
    )
    guard = protected_server(
        loaded,
        add_services=lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(
            parts.servicer, s
        ),
    )
    try:
        parts.start()
        await guard.start()
        log.info(
            "inference workload serving %s proxyless on port %d; outbox %s",
            parts.models,
            guard.port,
            storage_target or "off",
        )
        await wait_for_stop_signal()
        log.info("inference workload stopping")
    finally:
        await guard.stop()
        await parts.close(STOP_GRACE_S)


__all__ = [
    "DEFAULT_LISTEN",
    "MODEL_HEADER",
    "SERVICE_NAME",
    "InferenceOptions",
    "run_inference",
    "run_inference_protected",
    "servicer_of",
    "start_inference_server",
    "stop_inference_server",
]
