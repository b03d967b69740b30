"""TPM2 quotes, verifier side: parse the signed ``TPMS_ATTEST``, check its signature, names.

No TPM is needed: the marshalled structures are parsed with tpm2-pytss's unmarshallers and the
signature is checked with ``cryptography``. Every tpm2-pytss failure is wrapped here into
``PostureError("evidence_malformed")``; nothing from tpm2-pytss escapes this module.

The quote's ``pcrDigest`` is the hash of the concatenated selected PCR values in selection
order (ascending PCR index), with the signing scheme's hash (SHA-256 for ECDSA-P256-SHA256).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import (  # type: ignore[import-untyped, unused-ignore]
    TPM2_ALG,
    TPM2_GENERATED,
    TPM2_ST,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (  # type: ignore[import-untyped, unused-ignore]
    TPM2B_PUBLIC,
    TPMS_ATTEST,
    TPMT_SIGNATURE,
)

from ztagent.posture.errors import PostureError, short_hex

MAX_STRUCT_BYTES = 4096
# TPM_ALG_ID -> hash name, for PCR banks and signature hashes.
HASH_ALGS: Mapping[int, str] = {
    0x0004: "sha1",
    0x000B: "sha256",
    0x000C: "sha384",
    0x000D: "sha512",
}
_CRYPTO_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
AK_REQUIRED_ATTRIBUTES = ("fixedtpm", "restricted", "sign")


@dataclass(frozen=True)
class Quote:
    """A parsed ``TPMS_ATTEST`` of type ``TPM_ST_ATTEST_QUOTE`` (signature not yet checked)."""

    attest: bytes
    pcr_select: tuple[int, ...]
    bank: str
    pcr_digest: bytes
    extra_data: bytes
    qualified_signer: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int


def _unmarshal(cls: Any, raw: bytes, what: str) -> Any:
    if not raw:
        raise PostureError("evidence_malformed", f"{what} is empty")
    if len(raw) > MAX_STRUCT_BYTES:
        raise PostureError(
            "evidence_malformed", f"{what} is {len(raw)} bytes, limit {MAX_STRUCT_BYTES}"
        )
    try:
        value, used = cls.unmarshal(bytes(raw))
    except Exception as exc:  # tpm2-pytss raises TSS2_Exception and others; wrap them all
        raise PostureError("evidence_malformed", f"{what} does not unmarshal: {exc}") from exc
    if used != len(raw):
        raise PostureError(
            "evidence_malformed", f"{what} has {len(raw) - used} trailing bytes after {used}"
        )
    return value


def _selected(select: bytes, size: int) -> tuple[int, ...]:
    return tuple(
        byte_index * 8 + bit
        for byte_index, byte in enumerate(select[:size])
        for bit in range(8)
        if byte & (1 << bit)
    )


def parse_quote(attest: bytes) -> Quote:
    """Parse a marshalled ``TPMS_ATTEST``; it must be a TPM-generated quote over one bank."""
    value = _unmarshal(TPMS_ATTEST, attest, "quote")
    if int(value.magic) != int(TPM2_GENERATED.VALUE):
        raise PostureError(
            "evidence_malformed",
            f"quote magic {int(value.magic):#010x}, expected {int(TPM2_GENERATED.VALUE):#010x}",
        )
    if int(value.type) != int(TPM2_ST.ATTEST_QUOTE):
        raise PostureError(
            "evidence_malformed",
            f"attestation type {int(value.type):#06x}, expected ATTEST_QUOTE "
            f"{int(TPM2_ST.ATTEST_QUOTE):#06x}",
        )
    info = value.attested.quote
    selection = info.pcrSelect
    if int(selection.count) != 1:
        raise PostureError(
            "evidence_malformed", f"quote selects {int(selection.count)} banks, expected 1"
        )
    sel = selection.pcrSelections[0]
    bank = HASH_ALGS.get(int(sel.hash))
    if bank is None:
        raise PostureError("evidence_malformed", f"quote bank {int(sel.hash):#06x} is unknown")
    clock = value.clockInfo
    return Quote(
        attest=bytes(attest),
        pcr_select=_selected(bytes(sel.pcrSelect), int(sel.sizeofSelect)),
        bank=bank,
        pcr_digest=bytes(info.pcrDigest),
        extra_data=bytes(value.extraData),
        qualified_signer=bytes(value.qualifiedSigner),
        clock=int(clock.clock),
        reset_count=int(clock.resetCount),
        restart_count=int(clock.restartCount),
        safe=bool(clock.safe),
        firmware_version=int(value.firmwareVersion),
    )


def parse_public(public: bytes, what: str = "AK public") -> Any:
    """A marshalled ``TPM2B_PUBLIC`` as a tpm2-pytss object (``evidence_malformed`` if not)."""
    return _unmarshal(TPM2B_PUBLIC, public, what)


def ak_name(ak_public: bytes) -> str:
    """Hex TPM name of a key: ``nameAlg`` (u16, big-endian) || H_nameAlg(``TPMT_PUBLIC``)."""
    try:
        return bytes(parse_public(ak_public).get_name()).hex()
    except PostureError:
        raise
    except Exception as exc:
        raise PostureError("evidence_malformed", f"AK public has no TPM name: {exc}") from exc


def check_ak_attributes(ak_public: bytes) -> None:
    """An attestation key must be a restricted signing key that never leaves its TPM.

    Only a restricted key guarantees that what it signs starting with ``TPM_GENERATED_VALUE``
    was produced by the TPM itself. Raises ``ak_binding_failed`` otherwise.
    """
    area = parse_public(ak_public).publicArea
    attrs = int(area.objectAttributes)
    required = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT
    if attrs & int(required) != int(required) or attrs & int(TPMA_OBJECT.DECRYPT):
        raise PostureError(
            "ak_binding_failed",
            f"AK attributes {TPMA_OBJECT(attrs)!s}, expected fixedtpm|restricted|sign "
            f"and not decrypt",
        )


def _public_key(public: Any, what: str = "AK public") -> Any:
    try:
        return serialization.load_der_public_key(public.to_der())
    except Exception as exc:
        raise PostureError("evidence_malformed", f"{what} is not a usable key: {exc}") from exc


def p256_public_key(public: bytes, what: str) -> ec.EllipticCurvePublicKey:
    """The ECC P-256 key of a marshalled ``TPM2B_PUBLIC`` (``evidence_malformed`` if it is
    not one)."""
    key = _public_key(parse_public(public, what), what)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PostureError(
            "evidence_malformed", f"{what} is a {type(key).__name__}, expected ECC NIST P-256"
        )
    return key


def verify_quote_signature(attest: bytes, signature: bytes, ak_public: bytes) -> None:
    """Check the marshalled ``TPMT_SIGNATURE`` over ``attest`` with the AK.

    Supported: ECDSA (SHA-256/384/512) with an EC AK, RSASSA-PKCS1-v1_5 and RSA-PSS with an RSA
    AK. A parse failure is ``evidence_malformed``; anything that does not verify, including an
    unsupported scheme or a key of another type, is ``quote_bad_signature``.
    """
    sig = _unmarshal(TPMT_SIGNATURE, signature, "quote signature")
    key = _public_key(parse_public(ak_public))
    alg = int(sig.sigAlg)
    try:
        if alg == int(TPM2_ALG.ECDSA) and isinstance(key, ec.EllipticCurvePublicKey):
            detail = sig.signature.ecdsa
            hash_cls = _sig_hash(int(detail.hash))
            der = encode_dss_signature(
                int.from_bytes(bytes(detail.signatureR), "big"),
                int.from_bytes(bytes(detail.signatureS), "big"),
            )
            key.verify(der, bytes(attest), ec.ECDSA(hash_cls()))
        elif alg in (int(TPM2_ALG.RSASSA), int(TPM2_ALG.RSAPSS)) and isinstance(
            key, rsa.RSAPublicKey
        ):
            detail = sig.signature.rsassa if alg == int(TPM2_ALG.RSASSA) else sig.signature.rsapss
            hash_cls = _sig_hash(int(detail.hash))
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if alg == int(TPM2_ALG.RSASSA)
                else padding.PSS(padding.MGF1(hash_cls()), padding.PSS.AUTO)
            )
            key.verify(bytes(detail.sig), bytes(attest), pad, hash_cls())
        else:
            raise PostureError(
                "quote_bad_signature",
                f"signature algorithm {alg:#06x} with a {type(key).__name__} AK is not "
                f"supported, expected ECDSA with EC or RSASSA/RSAPSS with RSA",
            )
    except InvalidSignature as exc:
        raise PostureError(
            "quote_bad_signature",
            f"quote signature does not verify with AK {short_hex(ak_name(ak_public))}",
        ) from exc


def signature_hash(signature: bytes) -> str:
    """The hash of a marshalled ``TPMT_SIGNATURE`` (the quote's ``pcrDigest`` uses it too)."""
    sig = _unmarshal(TPMT_SIGNATURE, signature, "quote signature")
    alg = int(sig.sigAlg)
    if alg == int(TPM2_ALG.ECDSA):
        detail = sig.signature.ecdsa
    elif alg == int(TPM2_ALG.RSASSA):
        detail = sig.signature.rsassa
    elif alg == int(TPM2_ALG.RSAPSS):
        detail = sig.signature.rsapss
    else:
        raise PostureError(
            "quote_bad_signature",
            f"signature algorithm {alg:#06x}, expected ECDSA, RSASSA or RSAPSS",
        )
    _sig_hash(int(detail.hash))
    return HASH_ALGS[int(detail.hash)]


def _sig_hash(alg: int) -> type[hashes.HashAlgorithm]:
    name = HASH_ALGS.get(alg, f"{alg:#06x}")
    cls = _CRYPTO_HASHES.get(name)
    if cls is None:
        raise PostureError(
            "quote_bad_signature",
            f"signature hash {name}, expected one of {sorted(_CRYPTO_HASHES)}",
        )
    return cls


def pcr_composite_digest(
    values: Mapping[int, bytes], order: Iterable[int], hash_name: str = "sha256"
) -> bytes:
    """H(value[order[0]] || value[order[1]] || ...): what the quote's ``pcrDigest`` holds."""
    h = hashlib.new(hash_name)
    for index in order:
        if index not in values:
            raise PostureError("evidence_malformed", f"no value for PCR {index}")
        h.update(values[index])
    return h.digest()
