"""Mixed traffic through the sidecar: all four RPC kinds, allowed and refused calls, and
attestation rounds, from a few threads; every call becomes a ``CallRecord``.

Users: alice (writer, storage.write + storage.read), bob (reader), carol (inference); a
forged token (alice's, payload edited) and no token. Writes go to unique keys of the three
long-lived devices, so each acknowledged one can be read back at the end.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc

from soak.history import CallRecord, Expect, History, ReadBack, Write
from soak.oracle import CALL_HEADER
from soak.stack import INFERENCE, STORAGE, Device, Stack
from ztagent._proto.workloads.v1 import inference_pb2, storage_pb2
from ztagent.dev.issuer import mint_token
from ztagent.device.attest import attest_once
from ztagent.device.transport import device_credentials
from ztagent.rpc_status import ERROR_CODE_HEADER

WRITERS = ("soak-file", "soak-hsm", "soak-tpm")
TIMEOUT_S = 10.0
MODEL = "vibration-anomaly-int8"


class Tokens:
    """Current tokens per user; re-minted after a JWKS rotation and before they expire."""

    USERS = {
        "alice": {"roles": ["writer"], "scope": ["storage.write", "storage.read"]},
        "bob": {"roles": ["reader"], "scope": ["storage.read"]},
        "carol": {"roles": [], "scope": ["inference"]},
    }

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._minted = 0.0
        self.skew_s = 0.0
        """The issuer's clock against the node's (a clock step within ``tokens.leeway_s``)."""
        self.refresh()

    def refresh(self) -> None:
        now = datetime.now(UTC) + timedelta(seconds=self.skew_s)
        fresh = {
            user: mint_token(self._stack.ca_dir, sub=user, ttl_s=1800, now=now, **claims)  # type: ignore[arg-type]
            for user, claims in self.USERS.items()
        }
        fresh["forged"] = _forge(fresh["alice"])
        with self._lock:
            self._tokens, self._minted = fresh, time.monotonic()

    def get(self, user: str) -> str:
        if time.monotonic() - self._minted > 600:
            self.refresh()
        with self._lock:
            return self._tokens[user]


def _forge(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin", "writer"]
    claims["sub"] = "forged"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


@dataclass(frozen=True)
class Outcome:
    status: str
    code: str
    details: str
    reply: object = None


class Traffic:
    def __init__(self, stack: Stack, history: History, tokens: Tokens, seed: int = 0) -> None:
        self.stack = stack
        self.history = history
        self.tokens = tokens
        self.victims: list[str] = []
        """Devices enrolled by the fault schedule to be revoked (kept calling afterwards)."""
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._channels: dict[tuple[str, int], grpc.Channel] = {}
        self._retired: list[grpc.Channel] = []
        self._stop = threading.Event()
        self._rng = random.Random(seed)  # noqa: S311 (test traffic, not secrets)
        self._roots = stack.bundle.read_bytes()
        self._threads: list[threading.Thread] = []
        self._window: bytes | None = None

    # --- plumbing ------------------------------------------------------------------------

    def _channel(self, device: Device) -> grpc.Channel:
        key = (device.name, device.generation)
        with self._lock:
            channel = self._channels.get(key)
        if channel is not None:
            return channel
        with device.lock:
            pin = "1234" if device.key_store == "pkcs11" else None
            creds = device_credentials(device.cert, self._roots, pin)
        channel = grpc.secure_channel(self.stack.sidecar_address, creds)
        with self._lock:
            # a renewed device's older channel stays open (another thread may be calling on
            # it) until close(); the server ends its idle connection at max_connection_age
            self._retired += [
                self._channels.pop(k) for k in list(self._channels) if k[0] == device.name
            ]
            self._channels[key] = channel
        return channel

    def _new_id(self) -> str:
        return f"c{next(self._ids)}"

    def _record(
        self,
        device: str,
        user: str,
        method: str,
        kind: str,
        run: Callable[[list[tuple[str, str]]], object],
        expect: Expect = "any",
    ) -> tuple[CallRecord, object]:
        call_id = self._new_id()
        metadata = [(CALL_HEADER, call_id)]
        if user:
            metadata.append(("authorization", f"Bearer {self.tokens.get(user)}"))
        t0 = time.time()
        outcome = _outcome(lambda: run(metadata))
        record = CallRecord(
            call_id, device, user, method, kind, t0, time.time(),
            outcome.status, outcome.code, outcome.details, expect,
        )  # fmt: skip
        with self._lock:
            self.history.calls.append(record)
        return record, outcome.reply

    # --- calls ----------------------------------------------------------------------------

    def put(self, device: Device, user: str = "alice", expect: Expect = "any") -> None:
        key = f"k/{self._new_id()}"
        value = f"{device.name}:{key}:{self._rng.getrandbits(64):016x}"
        request = storage_pb2.PutRequest(key=key, value=value.encode()).SerializeToString()
        method = f"/{STORAGE}/Put"
        channel = self._channel(device)
        record, _ = self._record(
            device.name, user, method, "unary",
            lambda md: channel.unary_unary(method)(request, timeout=TIMEOUT_S, metadata=md),
            expect,
        )  # fmt: skip
        if record.status == "OK":
            with self._lock:
                self.history.writes.append(Write(key, value, device.name, record.t1))

    def bulk_put(self, device: Device) -> None:
        items = []
        for _ in range(3):
            key = f"b/{self._new_id()}"
            items.append((key, f"{device.name}:{key}:{self._rng.getrandbits(64):016x}"))
        requests = [
            storage_pb2.PutRequest(key=k, value=v.encode()).SerializeToString() for k, v in items
        ]
        method = f"/{STORAGE}/BulkPut"
        channel = self._channel(device)
        record, _ = self._record(
            device.name, "alice", method, "client_stream",
            lambda md: channel.stream_unary(method)(iter(requests), timeout=TIMEOUT_S, metadata=md),
        )  # fmt: skip
        if record.status == "OK":
            with self._lock:
                self.history.writes.extend(Write(k, v, device.name, record.t1) for k, v in items)

    def unary(self, device: Device, user: str, method: str, request: bytes, **kw: object) -> None:
        channel = self._channel(device)
        expect: Expect = "refuse" if kw.get("refuse") else "any"
        extra = [("x-model", MODEL)] if method.startswith(f"/{INFERENCE}/") else []
        self._record(
            device.name, user, method, "unary",
            lambda md: channel.unary_unary(method)(request, timeout=TIMEOUT_S, metadata=md + extra),
            expect,
        )  # fmt: skip

    def watch(self, device: Device, user: str) -> None:
        method = f"/{STORAGE}/Watch"
        channel = self._channel(device)
        request = storage_pb2.WatchRequest(prefix="k/").SerializeToString()

        def run(md: list[tuple[str, str]]) -> object:
            stream = channel.unary_stream(method)(request, timeout=0.6, metadata=md)
            try:
                for _ in stream:
                    pass
            except grpc.RpcError as err:
                # the stream stayed open (admitted) until our own deadline: allowed
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not _code_of(err):
                    return None
                raise
            return None

        self._record(device.name, user, method, "server_stream", run)

    def predict_stream(self, device: Device) -> None:
        method = f"/{INFERENCE}/PredictStream"
        channel = self._channel(device)
        request = self._predict_request()

        def run(md: list[tuple[str, str]]) -> object:
            replies = channel.stream_stream(method)(
                iter([request, request]), timeout=TIMEOUT_S, metadata=[*md, ("x-model", MODEL)]
            )
            return sum(1 for _ in replies)

        self._record(device.name, "carol", method, "bidi", run)

    def attest(self, device: Device) -> None:
        assert device.tpm is not None and device.evidence is not None
        event_log, manifest, signature = device.evidence
        t0 = time.time()

        tpm = device.tpm

        async def run() -> object:
            with device.lock:
                creds = device_credentials(device.cert, self._roots)
            async with grpc.aio.secure_channel(self.stack.sidecar_address, creds) as channel:
                return await attest_once(
                    channel, tpm, state_dir=device.dir, pcrs=(0, 4, 7),
                    event_log=event_log, firmware_manifest=manifest,
                    firmware_signature=signature, host_facts={"os": "soak"},
                )  # fmt: skip

        outcome = _outcome(lambda: asyncio.run(run()))
        status = outcome.status
        code = outcome.code
        reply = outcome.reply
        if status == "OK" and reply is not None and not getattr(reply, "verified", False):
            status, code = "REFUSED", ",".join(f.code for f in reply.failures)  # type: ignore[attr-defined]
        record = CallRecord(
            self._new_id(), device.name, "", "/ztagent.v1.Attestation/Attest", "attest",
            t0, time.time(), status, code, outcome.details,
        )  # fmt: skip
        with self._lock:
            self.history.calls.append(record)

    def _predict_request(self) -> bytes:
        if self._window is None:
            from ztagent.workloads.inference.models import encode_tensor
            from ztagent.workloads.inference.sensors import example_window

            shape, data = encode_tensor(example_window("normal"))
            tensor = inference_pb2.Tensor(
                dtype=inference_pb2.Tensor.FLOAT32, shape=shape, data=data
            )
            self._window = inference_pb2.PredictRequest(
                model=MODEL, input=tensor
            ).SerializeToString()
        return self._window

    # --- the mix --------------------------------------------------------------------------

    def _writers(self) -> list[Device]:
        return [self.stack.devices[n] for n in WRITERS if n in self.stack.devices]

    def one(self, rng: random.Random) -> None:
        writer = rng.choice(self._writers())
        get = storage_pb2.GetRequest(key="k/none").SerializeToString()
        lst = storage_pb2.ListRequest(prefix="k/").SerializeToString()
        roll = rng.random()
        if roll < 0.25:
            self.put(writer)
        elif roll < 0.32:
            self.bulk_put(writer)
        elif roll < 0.40:
            self.unary(writer, rng.choice(["alice", "bob"]), f"/{STORAGE}/Get", get)
        elif roll < 0.45:
            self.unary(writer, "bob", f"/{STORAGE}/List", lst)
        elif roll < 0.50:
            self.watch(writer, "bob")
        elif roll < 0.56:
            self.unary(writer, "carol", f"/{INFERENCE}/Predict",
                       self._predict_request())  # fmt: skip
        elif roll < 0.60:
            self.predict_stream(writer)
        elif roll < 0.63:
            delete = storage_pb2.DeleteRequest(key="scratch").SerializeToString()
            self.unary(self.stack.devices["soak-tpm"], "alice", f"/{STORAGE}/Delete", delete)
        elif roll < 0.68:
            self.put(writer, "bob", expect="refuse")  # reader: role_required under every revision
        elif roll < 0.72:
            self.put(writer, "forged", expect="refuse")  # token_bad_signature
        elif roll < 0.75:
            self.put(writer, "", expect="refuse")  # user_unauthenticated
        elif roll < 0.85:
            self.unary(self.stack.devices["soak-denied"], "alice", f"/{STORAGE}/Get", get)
        else:
            with self._lock:
                victims = list(self.victims[-4:])
            if victims:
                self.unary(self.stack.devices[rng.choice(victims)], "bob", f"/{STORAGE}/Get", get)

    def add_victim(self, name: str) -> None:
        with self._lock:
            self.victims.append(name)

    def _loop(self, seed: int, pause_s: float) -> None:
        rng = random.Random(seed)  # noqa: S311
        while not self._stop.is_set():
            self.one(rng)
            self._stop.wait(pause_s)

    def _attest_loop(self, every_s: float) -> None:
        device = self.stack.devices["soak-tpm"]
        while not self._stop.is_set():
            self.attest(device)
            self._stop.wait(every_s)

    def start(self, threads: int = 3, pause_s: float = 0.02, attest_every_s: float = 20) -> None:
        for i in range(threads):
            t = threading.Thread(target=self._loop, args=(i, pause_s), daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._attest_loop, args=(attest_every_s,), daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def read_back(self) -> None:
        """Every acknowledged write, read through the sidecar by its own device and alice."""
        by_device: dict[str, list[Write]] = {}
        for write in self.history.writes:
            by_device.setdefault(write.namespace, []).append(write)
        for name, writes in by_device.items():
            channel = self._channel(self.stack.devices[name])
            call = channel.unary_unary(f"/{STORAGE}/Get")
            md = [("authorization", f"Bearer {self.tokens.get('alice')}")]
            for write in writes:
                request = storage_pb2.GetRequest(key=write.key).SerializeToString()
                value, error = _read(call, request, md)
                self.history.reads.append(ReadBack(write.key, name, value, error))

    def close(self) -> None:
        with self._lock:
            for channel in [*self._channels.values(), *self._retired]:
                channel.close()
            self._channels.clear()
            self._retired.clear()


def _read(
    call: grpc.UnaryUnaryMultiCallable, request: bytes, metadata: list[tuple[str, str]]
) -> tuple[str | None, str]:
    for attempt in range(5):  # a read during a worker restart is retried, not counted lost
        try:
            reply = storage_pb2.GetResponse.FromString(
                call(request, timeout=TIMEOUT_S, metadata=metadata)
            )
        except grpc.RpcError as err:
            if attempt == 4 or err.code() != grpc.StatusCode.UNAVAILABLE:
                return None, f"{err.code().name} {_code_of(err)} {err.details()}"
            time.sleep(1)
            continue
        return reply.value.decode(), ""
    return None, "unreachable"


def _code_of(err: grpc.RpcError) -> str:
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == ERROR_CODE_HEADER:
            return str(value)
    return ""


def _outcome(fn: Callable[[], object]) -> Outcome:
    try:
        reply = fn()
    except grpc.RpcError as err:
        details = (err.details() or "").splitlines()[0] if err.details() else ""
        return Outcome(err.code().name, _code_of(err), details[:300])
    except Exception as exc:  # a client-side failure (the TPM, a half-renewed file): recorded
        return Outcome("CLIENT_ERROR", "", f"{type(exc).__name__}: {exc}"[:300])
    return Outcome("OK", "", "", reply)
