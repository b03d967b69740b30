"""Real servers on loopback: a dev CA, an echo upstream, and the sidecar, started per test."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from tests.integration.echo_upstream import RAW_SERVICE, SERVICE, EchoUpstream
from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.config import load_config
from ztagent.dev.swtpm import SwtpmProcess
from ztagent.sidecar.server import Sidecar

TRUST_DOMAIN = "ztagent.dev"
CLIENT_AUTH = [ExtendedKeyUsageOID.CLIENT_AUTH]


def _load_pair(cert: Path, key: Path) -> builders.KeyPair:
    k = serialization.load_pem_private_key(key.read_bytes(), None)
    assert isinstance(k, ec.EllipticCurvePrivateKey)
    return builders.KeyPair(x509.load_pem_x509_certificate(cert.read_bytes()), k)


@dataclass(frozen=True)
class Pki:
    layout: ca_store.CaLayout
    root: builders.KeyPair
    issuing: builders.KeyPair

    def mint(
        self,
        device_id: str = "dev-1",
        *,
        issuer: builders.KeyPair | None = None,
        uris: Sequence[str] | None = None,
        eku: Sequence[ObjectIdentifier] | None = CLIENT_AUTH,
        not_before: timedelta = timedelta(hours=-1),
        not_after: timedelta = timedelta(days=29),
    ) -> builders.KeyPair:
        """A device leaf, valid now by default; offsets are relative to the current time."""
        now = datetime.now(UTC)
        return builders.build_leaf(
            issuer or self.issuing,
            subject_cn=device_id,
            uris=list(uris)
            if uris is not None
            else [f"spiffe://{TRUST_DOMAIN}/device/{device_id}"],
            eku=eku,
            not_before=now + not_before,
            not_after=now + not_after,
        )

    def revoke(self, pair: builders.KeyPair, number: int) -> None:
        """Writes the CRL file the sidecar reads: ``pair`` revoked a minute ago (CRL number
        ``number``, valid a week), in place of whatever it held."""
        now = datetime.now(UTC)
        crl = builders.build_crl(
            self.issuing, {pair.cert.serial_number: now - timedelta(minutes=1)}, number=number,
            this_update=now - timedelta(minutes=1), next_update=now + timedelta(days=7),
        )  # fmt: skip
        self.layout.crl.write_bytes(crl.public_bytes(Encoding.PEM))


@pytest.fixture(scope="session")
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca_store.init_ca(tmp_path_factory.mktemp("pki") / "ca", TRUST_DOMAIN).dir


@pytest.fixture
def pki(session_ca: Path, tmp_path: Path) -> Pki:
    """A private copy of the session CA, so a test may revoke and rewrite the CRL."""
    target = tmp_path / "ca"
    shutil.copytree(session_ca, target)
    layout = ca_store.CaLayout(target)
    return Pki(
        layout,
        _load_pair(layout.root_cert, layout.root_key),
        _load_pair(layout.issuing_cert, layout.issuing_key),
    )


@pytest.fixture
async def upstream() -> AsyncIterator[EchoUpstream]:
    echo = EchoUpstream()
    await echo.start()
    yield echo
    await echo.stop()


ALLOW_ALL = Path(__file__).parent / "policy_allow_all"
SHIPPED_POLICIES = Path(__file__).resolve().parents[2] / "policies"


def write_config(
    pki: Pki,
    routes: dict[str, str],
    *,
    extra: str = "",
    policy: Path = ALLOW_ALL,
    policy_extra: str = "",
    posture_extra: str = "",
    log_extra: str = "",
) -> Path:
    route_text = "".join(
        f'[[routes]]\nservice = "{service}"\nupstream = "{address}"\n'
        for service, address in routes.items()
    )
    text = f"""
[listen]
address = "127.0.0.1:0"
grace_period_s = 5

[tls]
server_cert = "{pki.layout.server_cert}"
server_key = "{pki.layout.server_key}"
client_ca = "{pki.layout.bundle}"
crl = "{pki.layout.crl}"
reload_interval_s = 0.1

[policy]
path = "{policy}"
reload_interval_s = 0.1
{policy_extra}

[decision_log]
path = "{pki.layout.dir.parent / "decisions.jsonl"}"
{log_extra}

[posture]
reference_values = "{SHIPPED_POLICIES / "data" / "reference-values.json"}"
state_dir = "{pki.layout.dir.parent / "state"}"
{posture_extra}

{extra}
{route_text}
"""
    path = pki.layout.dir.parent / "ztagent.toml"
    path.write_text(text)
    return path


def sidecar_assertion_pub(pki: Pki) -> Path:
    """The public key of the assertions a sidecar on ``write_config(pki, ...)`` signs (made
    in its posture.state_dir at its first start): what its workloads' trust_keys name."""
    return pki.layout.dir.parent / "state" / "assertion.pub"


StartSidecar = Callable[..., "AsyncIterator[Sidecar]"]


@pytest.fixture
async def sidecar(pki: Pki, upstream: EchoUpstream) -> AsyncIterator[Sidecar]:
    """The sidecar routing test.v1.Echo (unary fast path for its unary methods) and
    test.v1.EchoRaw (always the stream-stream path) to the echo upstream."""
    routes = {SERVICE: upstream.address, RAW_SERVICE: upstream.address}
    car = Sidecar(load_config(write_config(pki, routes)))
    await car.start()
    yield car
    await car.stop(0)


def channel(
    pki: Pki,
    port: int,
    pair: builders.KeyPair | None,
    *,
    extra_chain: Sequence[x509.Certificate] = (),
) -> grpc.aio.Channel:
    """An mTLS client channel presenting ``pair`` (None: no client certificate)."""
    roots = pki.layout.bundle.read_bytes()
    if pair is None:
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=builders.key_pem(pair.key),
            certificate_chain=builders.cert_pem(pair.cert, *extra_chain),
        )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


@pytest.fixture
def swtpms() -> Iterator[list[SwtpmProcess]]:
    """Software TPMs a test starts (``swtpms.append(start_swtpm(...))``); stopped after it."""
    started: list[SwtpmProcess] = []
    yield started
    for proc in started:
        proc.stop()
