"""The signing seam of ``ztagent.ca.ca_keys`` with a fake ``CaKey`` (a software key behind the
same interface as the token's): certificates and CRLs assembled around an external signature,
compact ES256 JWS, checkpoints, and the refusals when the signature is not the issuer's."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import SignatureAlgorithmOID
from joserfc import jws
from joserfc.errors import BadSignatureError
from joserfc.jwk import ECKey

from ztagent.ca import builders, ca_keys
from ztagent.errors import ConfigError
from ztagent.pki.errors import CaError
from ztagent.policy.log_checkpoint import (
    CheckpointError,
    CheckpointKey,
    CheckpointReason,
    CheckpointSigner,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@dataclass
class FakeCaKey:
    """A ``CaKey`` over a software key; ``lie_with`` signs with another key instead."""

    key: ec.EllipticCurvePrivateKey
    lie_with: ec.EllipticCurvePrivateKey | None = None
    calls: int = 0

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        assert len(digest) == 32
        self.calls += 1
        signer = self.lie_with or self.key
        return signer.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    def description(self) -> str:
        return "key store fake:test"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _token_ca(lie: bool = False) -> tuple[builders.KeyPair, builders.KeyPair, FakeCaKey]:
    fake = FakeCaKey(_p256())
    root, issuing = builders.new_ca("test", now=NOW, issuing_key=fake)
    if lie:
        fake.lie_with = _p256()
    return root, issuing, fake


def test_issuing_ca_and_its_leaves_are_signed_through_the_seam() -> None:
    root, issuing, fake = _token_ca()
    assert issuing.key is fake and issuing.cert.public_key() == fake.public_key()
    issuing.cert.verify_directly_issued_by(root.cert)
    assert fake.calls == 0  # the root (a file key) signed the issuing CA

    device = builders.build_device(issuing, "ztagent.dev", "edge-1", now=NOW)
    assert fake.calls == 1
    device.cert.verify_directly_issued_by(issuing.cert)
    assert device.cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert device.cert.issuer == issuing.cert.subject

    crl = builders.build_crl(
        issuing, {7: NOW}, number=3, this_update=NOW, next_update=NOW + timedelta(days=1)
    )
    assert fake.calls == 2
    assert crl.is_signature_valid(fake.public_key())
    assert crl.get_revoked_certificate_by_serial_number(7) is not None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3


def test_a_self_signed_ca_on_the_token_verifies_with_its_own_key() -> None:
    fake = FakeCaKey(_p256())
    root = builders.build_ca("r", not_before=NOW, not_after=NOW + timedelta(days=1), key=fake)
    root.cert.verify_directly_issued_by(root.cert)


def test_a_signature_by_another_key_fails_closed() -> None:
    _, issuing, _ = _token_ca(lie=True)
    with pytest.raises(CaError, match="ca_state_invalid: the certificate signed with key store"):
        builders.build_device(issuing, "ztagent.dev", "edge-1", now=NOW)
    with pytest.raises(CaError, match="ca_state_invalid: the CRL signed with key store"):
        builders.build_crl(
            issuing, {}, number=1, this_update=NOW, next_update=NOW + timedelta(days=1)
        )


def test_assembly_keeps_the_tbs_bytes_and_the_signature() -> None:
    key = _p256()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
    )
    real = builder.sign(key, hashes.SHA256())
    der = ca_keys.assemble_certificate(
        real.tbs_certificate_bytes, real.public_bytes(Encoding.DER), real.signature
    )
    assert der == real.public_bytes(Encoding.DER)  # byte for byte what cryptography makes


def test_a_token_key_cannot_be_written_to_a_file() -> None:
    _, issuing, _ = _token_ca()
    with pytest.raises(CaError, match="key store fake:test cannot be written to a file"):
        builders.key_pem(issuing.key)


def test_compact_es256_verifies_with_joserfc() -> None:
    fake = FakeCaKey(_p256())
    token = ca_keys.sign_compact_es256(fake, {"alg": "ES256", "typ": "x"}, b'{"a":1}')
    obj = jws.deserialize_compact(token, ECKey.import_key(fake.public_key()), algorithms=["ES256"])
    assert obj.payload == b'{"a":1}'
    assert len(token.split(".")) == 3
    other = FakeCaKey(_p256())
    with pytest.raises(BadSignatureError):
        jws.deserialize_compact(token, ECKey.import_key(other.public_key()), algorithms=["ES256"])


def test_checkpoints_signed_by_a_digest_signing_key_verify() -> None:
    fake = FakeCaKey(_p256())
    signer = CheckpointSigner(fake, "fake")
    checkpoint = signer.checkpoint(
        CheckpointReason.APPEND, lines=1, head="0" * 64, file_start=1, file_prev="0" * 64, now=NOW
    )
    line = json.loads(signer.line(checkpoint))
    key = CheckpointKey.from_public_key(fake.public_key())
    assert key.kid == checkpoint.kid and checkpoint.alg == "ES256"
    assert key.verify(_unb64(line["sig"]), checkpoint.signed_message())

    fake.lie_with = _p256()
    with pytest.raises(CheckpointError, match="checkpoint_key_invalid: the signature made"):
        signer.line(checkpoint)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json", "is not JSON"),
        ("[" * 5000 + "]" * 5000, "nested too deeply to parse"),
        ('{"type": "file"}', "expected"),
        ('{"type": "pkcs11", "uri": "pkcs11:token=t"}', "expected"),
        ('{"type": "pkcs11", "uri": "u", "module": "m", "pin": "1234"}', "expected"),
    ],
)
def test_broken_records_are_refused(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / ca_keys.KEYSTORE_FILE
    path.write_text(content)
    with pytest.raises(CaError, match=f"ca_state_invalid: .*{match}"):
        ca_keys.read_record(path)


def test_a_symlinked_record_is_not_read(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text('{"type": "pkcs11", "uri": "pkcs11:token=t;object=o", "module": "m"}')
    link = tmp_path / ca_keys.KEYSTORE_FILE
    link.symlink_to(target)
    with pytest.raises(CaError, match="cannot read"):
        ca_keys.read_record(link)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("tpm", "expected file or pkcs11:token=LABEL;object=NAME"),
        ("pkcs11:serial=abc;object=k", "names no token label"),
        ("pkcs11:token=t;object=k;pin-value=1234", "the PIN must not be in the URI"),
    ],
)
def test_bad_specs_are_refused(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ca_keys.parse_token_spec(spec)
