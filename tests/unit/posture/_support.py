"""Software stand-ins for a device: an ECC "AK", a software EK, a measured boot, a vendor key.

Everything here is built in software (no TPM): the AK's TPM2B_PUBLIC is made with tpm2-pytss
types from a ``cryptography`` key, the TPMS_ATTEST is hand-built and signed with that key, the
event log comes from ``encode_event_log``. The real TPM path is covered by the swtpm
integration tests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_ECC_PARAMETER,
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_CLOCK_INFO,
    TPMS_QUOTE_INFO,
    TPMS_SIGNATURE_ECC,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ATTEST,
    TPMU_SIGNATURE,
)

from ztagent._proto.v1 import attestation_pb2
from ztagent.posture.eventlog import (
    EV_S_CRTM_VERSION,
    EV_SEPARATOR,
    Event,
    encode_event_log,
    measurement_event,
    replay,
)
from ztagent.posture.firmware import generate_firmware_key, load_trusted_keys, sign_manifest
from ztagent.posture.quote import pcr_composite_digest
from ztagent.posture.reference import ReferenceValues, reference_from_event_log

NOW = datetime(2030, 1, 15, 12, 0, 0, tzinfo=UTC)
FP = "aa" * 32  # the device certificate's SHA-256 fingerprint
OTHER_FP = "bb" * 32
DEVICE = "edge-001"
SELECTION = (0, 4, 7)

AK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
EK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.ADMINWITHPOLICY
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class SoftAK:
    """An ECC P-256 key posing as a TPM attestation key."""

    def __init__(self, attrs: int = int(AK_ATTRS)) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        pub = TPM2B_PUBLIC.from_pem(_pem(self.key), objectAttributes=attrs)
        scheme = pub.publicArea.parameters.eccDetail.scheme
        scheme.scheme = TPM2_ALG.ECDSA
        scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
        self.public = bytes(pub.marshal())
        self.name = bytes(pub.get_name()).hex()

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(SHA256())))
        sig = TPMT_SIGNATURE(
            sigAlg=TPM2_ALG.ECDSA,
            signature=TPMU_SIGNATURE(
                ecdsa=TPMS_SIGNATURE_ECC(
                    hash=TPM2_ALG.SHA256,
                    signatureR=TPM2B_ECC_PARAMETER(r.to_bytes(32, "big")),
                    signatureS=TPM2B_ECC_PARAMETER(s.to_bytes(32, "big")),
                )
            ),
        )
        return bytes(sig.marshal())


def make_attest(
    nonce: bytes,
    pcr_digest: bytes,
    selection: Sequence[int] = SELECTION,
    bank: str = "sha256",
    *,
    magic: int = int(TPM2_GENERATED.VALUE),
    st: int = int(TPM2_ST.ATTEST_QUOTE),
) -> bytes:
    attest = TPMS_ATTEST(
        magic=magic,
        type=st,
        extraData=TPM2B_DATA(nonce),
        clockInfo=TPMS_CLOCK_INFO(clock=123456, resetCount=2, restartCount=0, safe=1),
        firmwareVersion=0x20240101,
        attested=TPMU_ATTEST(
            quote=TPMS_QUOTE_INFO(
                pcrSelect=TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, selection))}"),
                pcrDigest=TPM2B_DIGEST(pcr_digest),
            )
        ),
    )
    return bytes(attest.marshal())


class SoftEK:
    """An ECC P-256 key posing as an endorsement key (restricted decryption, AES-128-CFB)."""

    def __init__(self, attrs: int = int(EK_ATTRS)) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES)
        sym.keyBits.aes = 128
        sym.mode.aes = TPM2_ALG.CFB
        self.tpm_public = TPM2B_PUBLIC.from_pem(
            _pem(self.key), objectAttributes=attrs, symmetric=sym
        )
        self.public = bytes(self.tpm_public.marshal())

    def activate_credential(self, ak_name_hex: str, blob: bytes, encrypted: bytes) -> bytes:
        """What TPM2_ActivateCredential does, in software (for the verifier round trip)."""
        from tpm2_pytss.internal import crypto
        from tpm2_pytss.types import (
            TPM2B_DIGEST as Digest,
        )
        from tpm2_pytss.types import (
            TPM2B_ENCRYPTED_SECRET,
            TPM2B_ID_OBJECT,
            TPMT_SENSITIVE,
        )

        public = self.tpm_public.publicArea
        sensitive = TPMT_SENSITIVE.from_pem(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        enc_secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted)
        id_object, _ = TPM2B_ID_OBJECT.unmarshal(blob)
        seed = crypto._secret_to_seed(sensitive, public, b"IDENTITY\x00", bytes(enc_secret))
        name = bytes.fromhex(ak_name_hex)
        raw = bytes(id_object.credential)
        outer, used = Digest.unmarshal(raw)
        enc_cred = raw[used:]
        halg = crypto._get_digest(public.nameAlg)
        hmackey = crypto._kdfa(public.nameAlg, seed, b"INTEGRITY", b"", b"", halg.digest_size * 8)
        crypto._check_hmac(halg, hmackey, enc_cred, name, bytes(outer))
        cipher, mode, bits = crypto._symdef_to_crypt(public.parameters.asymDetail.symmetric)
        symkey = crypto._kdfa(public.nameAlg, seed, b"STORAGE", name, b"", bits)
        credential, _ = Digest.unmarshal(crypto._decrypt(cipher, mode, symkey, enc_cred))
        return bytes(credential)


IMAGES = {
    "firmware": b"edge-fw 1.3.0 image" * 64,
    "bootloader": b"edge-boot 2.0.1 image" * 64,
    "kernel": b"linux 6.6.30-edge image" * 64,
}
VERSIONS = {
    "firmware": ("edge-fw", "1.3.0"),
    "bootloader": ("edge-boot", "2.0.1"),
    "kernel": ("linux", "6.6.30-edge"),
}


def boot_events(images: Mapping[str, bytes] = IMAGES) -> list[Event]:
    """A plausible measured boot: CRTM version, the three components, separators."""
    sep = hashlib.sha256(bytes(4)).digest()
    events = [
        Event(0, EV_S_CRTM_VERSION, {"sha256": hashlib.sha256(b"crtm 1").digest()}, b"crtm 1")
    ]
    for component in ("firmware", "bootloader", "kernel"):
        name, version = VERSIONS[component]
        events.append(measurement_event(component, name, version, images[component]))
    events += [Event(pcr, EV_SEPARATOR, {"sha256": sep}, bytes(4)) for pcr in SELECTION]
    return events


@dataclass
class Device:
    """A device with an AK, a measured boot and signed firmware, producing Evidence."""

    tmp: Path
    ak: SoftAK = field(default_factory=SoftAK)
    events: list[Event] = field(default_factory=boot_events)
    svn: int = 3
    manifest: bytes = b""
    manifest_sig: bytes = b""
    vendor_key: Path = Path()
    vendor_pub: Path = Path()

    def __post_init__(self) -> None:
        self.vendor_key, self.vendor_pub = generate_firmware_key(self.tmp, "vendor")
        self.sign_firmware(IMAGES["firmware"], svn=self.svn)

    def sign_firmware(self, image: bytes, *, svn: int, key: Path | None = None) -> None:
        self.manifest, self.manifest_sig = sign_manifest(
            key or self.vendor_key, image, name="edge-fw", version="1.3.0", svn=svn
        )

    def trusted_keys(self) -> dict[str, object]:
        return dict(load_trusted_keys([self.vendor_pub]))

    def references(self) -> ReferenceValues:
        return ReferenceValues.from_dict(reference_from_event_log(self.events))

    def pcrs(self) -> dict[int, bytes]:
        return replay(self.events, "sha256", SELECTION)

    def evidence(
        self,
        nonce: bytes,
        *,
        pcr_values: Mapping[int, bytes] | None = None,
        quoted_values: Mapping[int, bytes] | None = None,
        event_log: bytes | None = None,
        host: bytes = b'{"os": "linux", "uptime_s": 12}',
    ) -> attestation_pb2.Evidence:
        """Evidence whose quote covers ``quoted_values`` (default: the replayed PCRs)."""
        quoted = dict(quoted_values or self.pcrs())
        attest = make_attest(nonce, pcr_composite_digest(quoted, SELECTION))
        return attestation_pb2.Evidence(
            quote=attest,
            quote_signature=self.ak.sign(attest),
            pcr_bank="sha256",
            pcr_values=dict(pcr_values or quoted),
            event_log=event_log if event_log is not None else encode_event_log(self.events),
            ak_public=self.ak.public,
            firmware_manifest=self.manifest,
            firmware_signature=self.manifest_sig,
            host_facts=host,
        )


def manifest_json(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "name": "edge-fw",
        "version": "1.3.0",
        "image_sha256": "ab" * 32,
        "svn": 1,
    }
    doc.update(overrides)
    return json.dumps(doc).encode()
