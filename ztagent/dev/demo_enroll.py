"""The onboarding part of `make run`: devices enroll with one-time bootstrap tokens at the
dev CA (`ztagent ca serve`), and a revocation at the CA cuts off a connected device.
DEVELOPMENT ONLY (dev CA)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from ztagent._proto.v1 import enrollment_pb2, enrollment_pb2_grpc
from ztagent.ca import store as ca_store
from ztagent.ca.audit import audit_revocation
from ztagent.ca.bootstrap import issue_bootstrap_token
from ztagent.device.enroll import EnrollResult, enroll
from ztagent.device.tpm import DeviceTpm
from ztagent.errors import ZtagentError


def wait_for_ca(
    address: str, bundle: Path, alive: Callable[[], bool], timeout_s: float = 30
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=bundle.read_bytes())
    deadline = time.monotonic() + timeout_s
    with grpc.secure_channel(address, creds) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError("the CA (ztagent ca serve) exited")
            try:
                stub.GetCACerts(enrollment_pb2.GetCACertsRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.2)
    raise RuntimeError(f"the CA did not answer on {address} within {timeout_s:.0f} s")


def enroll_device(
    ca_address: str,
    ca_dir: Path,
    device_dir: Path,
    device_id: str,
    *,
    tpm: DeviceTpm | None = None,
    key_store: str = "file",
) -> tuple[EnrollResult, str]:
    """A fresh bootstrap token, then `ztagent enroll` into ``device_dir`` (re-enrolls on every
    demo run; TPM-bound when ``tpm`` is given); returns the result and the (now used) token."""
    token = issue_bootstrap_token(ca_dir, device_id, ttl_s=900)
    bundle = ca_dir / "ca-bundle.pem"
    result = asyncio.run(
        enroll(ca_address, token, bundle, device_dir, key_store, force=True, tpm=tpm)
    )
    return result, token


def reuse_token(ca_address: str, ca_dir: Path, device_dir: Path, token: str) -> str:
    """Enrolling again with a used token: the CA's refusal code ('' if it was accepted)."""
    try:
        asyncio.run(
            enroll(ca_address, token, ca_dir / "ca-bundle.pem", device_dir, "file", force=True)
        )
    except ZtagentError as err:
        return f"{err.code}: {err.message}"
    return ""


def revoke_and_wait(
    ca_dir: Path, cert_path: Path, call: Callable[[], None], timeout_s: float = 20
) -> tuple[float, str]:
    """Revokes ``cert_path`` at the CA, then repeats ``call`` (on an already-open connection)
    until the sidecar refuses it; returns (seconds until cut off, the refusal)."""
    serial = ca_store.revoke(ca_dir, cert_path=cert_path)
    audit_revocation(ca_dir, serial, actor="demo")
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            call()
        except grpc.RpcError as err:
            return time.monotonic() - started, f"{err.code().name} {err.details()}"
        time.sleep(0.1)
    return time.monotonic() - started, ""
