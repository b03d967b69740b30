"""The sidecar's policy from a real bundle server: nginx on loopback (tests.fixtures.nginx).

Bundles built and signed as a publisher would (``ztagent policy build --signing-key``), the
sidecar holding the publisher's public key (``[policy.keys.publisher]``). First download at
start, 304s while nothing changes, a new revision picked up within the polling bound and
visible in the decision log's ``policy_revision``, a forged bundle (signed by another key) and
an unsigned one refused while the old revision keeps serving (health ``ztagent.policy``
NOT_SERVING; the node's copy untouched), then the server gone and the sidecar restarted: it
serves its copy of the last good bundle.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2

from tests.fixtures.nginx import NginxServer, nginx_server
from tests.integration.conftest import Pki, channel, write_config
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from ztagent.config import load_config
from ztagent.policy.authoring import build_bundle
from ztagent.policy.sources import MAX_TAR_BYTES
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration

ALLOW = 'package ztagent.authz\n\ndecision := {"allow": true, "reasons": ["%s"], "headers": {}}\n'
BROKEN = "package ztagent.authz\n\ndecision := {\n"  # does not compile


SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
ATTACKER_KEY = ec.generate_private_key(ec.SECP256R1())


def bundle(
    tmp: Path, revision: str, rego: str, key: ec.EllipticCurvePrivateKey = SIGNING_KEY
) -> bytes:
    """A signed bundle as a publisher's ``ztagent policy build --signing-key`` makes it; a
    broken policy is packed by hand (build refuses to build it)."""
    src = tmp / f"src-{revision}-{id(key)}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "authz.rego").write_text(rego)
    if rego is BROKEN:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in (
                (".manifest", json.dumps({"revision": revision}).encode()),
                ("authz.rego", rego.encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()
    return build_bundle(
        src, revision=revision, signing_key=key, signing_alg="ES256", key_id="publisher"
    ).content


@pytest.fixture
def nginx() -> Iterator[NginxServer]:
    with nginx_server() as server:
        yield server


def _config(pki: Pki, upstream: EchoUpstream, nginx: NginxServer, tmp_path: Path) -> Path:
    public = tmp_path / "publisher.pub"
    public.write_bytes(
        SIGNING_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    extra = (
        f'bundle_url = "{nginx.url("bundles/edge.tar.gz")}"\n'
        "bundle_min_delay_s = 0.1\nbundle_max_delay_s = 0.2\nbundle_timeout_s = 2\n"
        f'[policy.keys.publisher]\nkey = "{public}"\nalgorithm = "ES256"\n'
    )
    return write_config(
        pki, {SERVICE: upstream.address}, policy=tmp_path / "copy" / "edge.tar.gz",
        policy_extra=extra,
    )  # fmt: skip


def _revisions(pki: Pki) -> list[str]:
    path = pki.layout.dir.parent / "decisions.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line["policy_revision"] for line in lines if "policy_revision" in line]


async def _call(pki: Pki, car: Sidecar) -> str:
    async with channel(pki, car.port, pki.mint("cam-1")) as ch:
        await ch.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
    await asyncio.sleep(0.05)  # the decision-log writer thread
    return _revisions(pki)[-1]


def _bomb() -> bytes:
    """A PAX header declaring 1 GiB, then zeros past ``MAX_TAR_BYTES``: about 80 KB to send,
    gigabytes for a reader that trusts the header."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 1 << 30
    body = info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(MAX_TAR_BYTES + (1 << 20))
    return gzip.compress(body, compresslevel=9)


async def _policy_health(car: Sidecar) -> int:
    request = health_pb2.HealthCheckRequest(service="ztagent.policy")
    reply = await health.aio.HealthServicer.Check(car.health, request, None)
    return int(reply.status)


async def _until(condition: object, what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} did not happen within {limit_s} s")


async def test_bundles_from_nginx_new_revisions_refusals_and_the_last_good_copy(
    pki: Pki, upstream: EchoUpstream, nginx: NginxServer, tmp_path: Path
) -> None:
    path = "/bundles/edge.tar.gz"
    nginx.publish(path, bundle(tmp_path, "rev-1", ALLOW % "one"))
    config = _config(pki, upstream, nginx, tmp_path)
    car = Sidecar(load_config(config))
    await car.start()
    try:
        assert await _call(pki, car) == "rev-1"  # downloaded at start
        await _until(lambda: _async(nginx.statuses(path).count(304) >= 2), "two 304s")
        nginx.publish(path, bundle(tmp_path, "rev-2", ALLOW % "two"))

        async def on_rev2() -> bool:
            return await _call(pki, car) == "rev-2"

        await _until(on_rev2, "revision rev-2 serving")  # within the polling bound
        assert await _policy_health(car) == health_pb2.HealthCheckResponse.SERVING
        assert car.bundle_fetcher is not None
        copy = car.bundle_fetcher.dest.read_bytes()
        for forged, code in (
            (bundle(tmp_path, "rev-3", ALLOW % "forged", ATTACKER_KEY), "bundle_signature_invalid"),
            (bundle(tmp_path, "rev-4", BROKEN), "bundle_signature_missing"),
            (_bomb(), f"decompresses to more than {MAX_TAR_BYTES} bytes"),
        ):
            nginx.publish(path, forged)

            async def refused(code: str = code) -> bool:
                assert car.bundle_fetcher is not None
                return code in (car.bundle_fetcher.health().last_error or "")

            await _until(refused, f"the bundle refused {code}")
            assert await _call(pki, car) == "rev-2"  # the old revision keeps serving
            assert await _policy_health(car) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert car.bundle_fetcher.dest.read_bytes() == copy  # never installed
    finally:
        await car.stop(0)
    # the bundle server is gone; the node restarts on its copy of the last good bundle
    offline = config.read_text().replace(nginx.url(path), "http://127.0.0.1:9/bundles/edge.tar.gz")
    config.write_text(offline)
    car = Sidecar(load_config(config))
    await car.start()
    try:
        assert await _call(pki, car) == "rev-2"
    finally:
        await car.stop(0)


async def _async(value: bool) -> bool:
    return value
