"""Quote parsing and signature checks on hand-built TPMS_ATTEST structures."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tpm2_pytss.constants import TPM2_ALG, TPM2_ST
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_PUBLIC_KEY_RSA,
    TPMS_SIGNATURE_RSA,
    TPMT_SIGNATURE,
    TPMU_SIGNATURE,
)

from tests.unit.posture._support import AK_ATTRS, SoftAK, make_attest
from ztagent.posture.errors import PostureError
from ztagent.posture.quote import (
    ak_name,
    check_ak_attributes,
    parse_quote,
    pcr_composite_digest,
    verify_quote_signature,
)


def test_parse_quote_fields() -> None:
    quote = parse_quote(make_attest(b"n" * 32, b"d" * 32, (0, 4, 7, 16)))
    assert quote.pcr_select == (0, 4, 7, 16)
    assert quote.bank == "sha256"
    assert quote.extra_data == b"n" * 32
    assert quote.pcr_digest == b"d" * 32
    assert (quote.clock, quote.reset_count, quote.safe) == (123456, 2, True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"magic": 0x12345678}, "magic 0x12345678"),
        ({"st": int(TPM2_ST.ATTEST_CERTIFY)}, "expected ATTEST_QUOTE"),
    ],
)
def test_not_a_tpm_quote(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(PostureError, match=match) as info:
        parse_quote(make_attest(b"n", b"d" * 32, **kwargs))
    assert info.value.code == "evidence_malformed"


@pytest.mark.parametrize("raw", [b"", b"\xff\x54\x43\x47", b"x" * 5000])
def test_junk_quote_is_malformed(raw: bytes) -> None:
    with pytest.raises(PostureError, match="evidence_malformed"):
        parse_quote(raw)


def test_trailing_bytes_are_malformed() -> None:
    with pytest.raises(PostureError, match="trailing bytes"):
        parse_quote(make_attest(b"n", b"d" * 32) + b"\x00")


def test_ecdsa_signature_verifies_and_detects_change() -> None:
    ak = SoftAK()
    attest = make_attest(b"n" * 32, b"d" * 32)
    verify_quote_signature(attest, ak.sign(attest), ak.public)
    changed = make_attest(b"m" * 32, b"d" * 32)
    with pytest.raises(PostureError, match="quote_bad_signature"):
        verify_quote_signature(changed, ak.sign(attest), ak.public)
    with pytest.raises(PostureError, match="quote_bad_signature"):
        verify_quote_signature(attest, SoftAK().sign(attest), ak.public)


def test_signature_junk_is_malformed() -> None:
    ak = SoftAK()
    with pytest.raises(PostureError, match="evidence_malformed: quote signature"):
        verify_quote_signature(b"x", b"\x00\x18", ak.public)


def test_rsassa_signature() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = bytes(TPM2B_PUBLIC.from_pem(pem, objectAttributes=AK_ATTRS).marshal())
    attest = make_attest(b"n", b"d" * 32)
    raw = key.sign(attest, padding.PKCS1v15(), hashes.SHA256())
    sig = TPMT_SIGNATURE(
        sigAlg=TPM2_ALG.RSASSA,
        signature=TPMU_SIGNATURE(
            rsassa=TPMS_SIGNATURE_RSA(hash=TPM2_ALG.SHA256, sig=TPM2B_PUBLIC_KEY_RSA(raw))
        ),
    )
    verify_quote_signature(attest, bytes(sig.marshal()), public)
    # an ECDSA signature presented for an RSA AK is refused
    with pytest.raises(PostureError, match=r"quote_bad_signature.*not supported"):
        verify_quote_signature(attest, SoftAK().sign(attest), public)


def test_composite_digest_is_in_selection_order() -> None:
    values = {0: b"\x00" * 32, 4: b"\x04" * 32}
    assert pcr_composite_digest(values, (0, 4)) == hashlib.sha256(values[0] + values[4]).digest()
    assert pcr_composite_digest(values, (4, 0)) != pcr_composite_digest(values, (0, 4))
    with pytest.raises(PostureError, match="no value for PCR 7"):
        pcr_composite_digest(values, (0, 7))


def test_ak_name_is_name_alg_and_hash_of_public_area() -> None:
    ak = SoftAK()
    public, _ = TPM2B_PUBLIC.unmarshal(ak.public)
    area = bytes(public.publicArea.marshal())
    assert ak_name(ak.public) == "000b" + hashlib.sha256(area).hexdigest()


def test_ak_must_be_restricted_signing() -> None:
    check_ak_attributes(SoftAK().public)
    loose = SoftAK(attrs=int(AK_ATTRS) & ~0x10000)  # without RESTRICTED
    with pytest.raises(PostureError, match="ak_binding_failed: AK attributes"):
        check_ak_attributes(loose.public)
