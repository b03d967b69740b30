"""The device's TPM: EK, a stable attestation key, quotes, PCRs, credential activation.

``DeviceTpm`` talks to a TPM 2.0 through tpm2-pytss (``ESAPI`` over a TCTI such as
``swtpm:host=127.0.0.1,port=P`` or ``device:/dev/tpmrm0``). Every operation opens its own
ESAPI context, flushes every transient object and session it created, and closes the
connection again: swtpm has no resource manager (a TPM holds only a few transient objects,
and a leak ends in "out of memory for object contexts"), and swtpm serves one connection at
a time, so holding one open would block every other client (``tpm2_*`` tools, a second
``DeviceTpm``).

The attestation key (AK) is an ECC P-256 restricted signing key (ECDSA-SHA256) created once
under the ECC endorsement key and made **persistent** at ``AK_PERSISTENT_HANDLE``. Persistent
rather than blobs on disk because the TPM is then the only place the AK lives: it survives
agent reinstalls and lost device directories, every later operation is a handle lookup
(no EK re-derivation and policy session per quote), and a TPM clear removes it together with
everything bound to it. The handle lies in the owner range (``0x81000000``-``0x8100FFFF``)
and avoids the TCG-registered EK handles (``0x81010001`` RSA EK, ``0x81010002`` ECC EK) and
the usual SRK (``0x81000001``). A persistent object at that handle that does not match the
AK template is refused, never overwritten.

``start_swtpm`` runs a software TPM for tests and the demo (``make run``).

``TpmError`` codes: ``tpm_key_missing`` (no identity key at its handle), ``tpm_unavailable``
(no TPM or swtpm reachable, TCTI failure),
``tpm_error`` (the TPM or the TSS refused an operation; the message carries the TSS text).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HT,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPMA_NV,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_NV_PUBLIC,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TSS2_Exception,
)
from tpm2_pytss.utils import (
    NoSuchIndex,
    NVReadEK,
    create_ek_template,
)

from ztagent.errors import TransportError

AK_PERSISTENT_HANDLE = 0x81000A4B
"""Where the AK lives (owner persistent range; see the module docstring)."""

EK_CERT_NV_INDEX = 0x01C0000A
"""TCG EK Credential Profile: where the certificate of the ECC NIST P-256 EK is stored."""
NV_WRITE_CHUNK = 512

IDENTITY_KEY_HANDLES = (0x81000A4C, 0x81000A4D)
"""Persistent handles of the device identity key (``tpm`` key store): the current key and
the slot a rotated key is made in (renewal alternates between them)."""
IDENTITY_TEMPLATE = "ecc256:ecdsa-sha256"
IDENTITY_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"
SRK_TEMPLATE = "ecc256:aes128cfb"
SRK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt"

AK_TEMPLATE = "ecc256:ecdsa-sha256:null"
AK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
EK_TEMPLATE = "EK-ECC256"

PCR_BANKS = {
    "sha1": (TPM2_ALG.SHA1, 20),
    "sha256": (TPM2_ALG.SHA256, 32),
    "sha384": (TPM2_ALG.SHA384, 48),
    "sha512": (TPM2_ALG.SHA512, 64),
}
MAX_PCR = 23
_PCR_READ_CHUNK = 8
"""TPM2_PCR_Read returns at most 8 digests (TPML_DIGEST) per call."""

_LAYER_MASK = 0xFF0000
_TCTI_LAYER = 0x0A0000
_UNREACHABLE_BASE_RCS = {0x8, 0x9, 0xA}  # NO_CONNECTION, TRY_AGAIN, IO_ERROR


class TpmCode(StrEnum):
    """Every ``TpmError`` code."""

    TPM_ERROR = "tpm_error"
    TPM_KEY_MISSING = "tpm_key_missing"
    TPM_UNAVAILABLE = "tpm_unavailable"


class TpmError(TransportError):
    """The TPM could not be reached (``tpm_unavailable``) or refused (``tpm_error``)."""

    codes = frozenset(TpmCode)


def _wrap(what: str, exc: TSS2_Exception) -> TpmError:
    rc = int(exc.rc)
    layer = rc & _LAYER_MASK
    unreachable = layer == _TCTI_LAYER or (layer != 0 and (rc & 0xFFFF) in _UNREACHABLE_BASE_RCS)
    code = "tpm_unavailable" if unreachable else "tpm_error"
    return TpmError(code, f"{what}: {exc} (TSS rc 0x{rc:x})")


class QuoteResult(NamedTuple):
    """A TPM2_Quote result: ``attest`` is the marshalled TPMS_ATTEST the TPM signed (the
    contents of TPM2B_ATTEST), ``signature`` the marshalled TPMT_SIGNATURE over it."""

    attest: bytes
    signature: bytes


@dataclass
class _Op:
    """One ESAPI connection plus the handles to release when the operation ends."""

    esapi: Any
    flush: list[Any] = field(default_factory=list)
    """Transient objects and sessions: ``flush_context`` (frees the TPM slot)."""
    close: list[Any] = field(default_factory=list)
    """ESYS_TRs of persistent objects: ``tr_close`` (frees only the ESAPI metadata)."""


class DeviceTpm:
    """The device's TPM behind one TCTI. Thread-safe; every call is one short connection."""

    def __init__(self, tcti: str, *, ak_handle: int = AK_PERSISTENT_HANDLE) -> None:
        name = tcti.split(":", 1)[0]
        if not name:
            raise ValueError(f"TCTI must look like 'swtpm:host=H,port=P' (got {tcti!r})")
        if not 0x81000000 <= ak_handle <= 0x81FFFFFF:
            raise ValueError(f"AK handle must be a persistent handle (got 0x{ak_handle:x})")
        self.tcti = tcti
        self.ak_handle = ak_handle
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DeviceTpm({self.tcti!r}, ak_handle=0x{self.ak_handle:08x})"

    # --- public operations ----------------------------------------------------------------

    def ek_public(self) -> bytes:
        """Marshalled TPM2B_PUBLIC of the ECC P-256 EK (TCG template ``EK-ECC256``)."""
        with self._op("create EK") as op:
            _, public = _create_ek(op)
            return bytes(public.marshal())

    def ek_certificate(self) -> bytes | None:
        """The EK certificate its manufacturer stored in NV (``EK_CERT_NV_INDEX``), DER; None
        when the TPM has none (swtpm unless provisioned)."""
        with self._op("read EK certificate") as op:
            try:
                return _nv_reader(op.esapi)(EK_CERT_NV_INDEX)
            except NoSuchIndex:
                return None

    def provision_ek_certificate(self, der: bytes) -> None:
        """Store ``der`` as the EK certificate, as a TPM manufacturer does at the factory:
        a platform-created NV index, written with platform authorization, readable by anyone.
        For swtpm in tests and the demo; a real TPM ships with its certificate."""
        if not der:
            raise ValueError("empty EK certificate")
        attributes = (
            TPMA_NV.PPWRITE
            | TPMA_NV.PPREAD
            | TPMA_NV.OWNERREAD
            | TPMA_NV.AUTHREAD
            | TPMA_NV.NO_DA
            | TPMA_NV.PLATFORMCREATE
        )
        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=EK_CERT_NV_INDEX,
                nameAlg=TPM2_ALG.SHA256,
                attributes=attributes,
                dataSize=len(der),
            )
        )
        with self._op("provision EK certificate") as op:
            if EK_CERT_NV_INDEX in _handles(op.esapi, TPM2_HT.NV_INDEX << 24):
                old = op.esapi.tr_from_tpmpublic(EK_CERT_NV_INDEX)
                op.esapi.nv_undefine_space(old, auth_handle=ESYS_TR.RH_PLATFORM)
            index = op.esapi.nv_define_space(None, public, auth_handle=ESYS_TR.RH_PLATFORM)
            op.close.append(index)
            for offset in range(0, len(der), NV_WRITE_CHUNK):
                chunk = der[offset : offset + NV_WRITE_CHUNK]
                op.esapi.nv_write(index, chunk, offset, auth_handle=ESYS_TR.RH_PLATFORM)

    # --- the device identity key (the ``tpm`` key store) -----------------------------------

    def create_identity_key(self, handle: int) -> bytes:
        """A new ECC P-256 signing key (unrestricted: it signs TLS handshakes and CSRs) under
        the owner storage key, persisted at ``handle`` (replacing a key there); its marshalled
        TPM2B_PUBLIC. The private part never leaves the TPM."""
        _check_identity_handle(handle)
        with self._op("create identity key") as op:
            _evict(op, handle)
            srk = _create_srk(op)
            template = TPM2B_PUBLIC.parse(IDENTITY_TEMPLATE, objectAttributes=IDENTITY_ATTRIBUTES)
            private, public, _, _, _ = op.esapi.create(srk, None, template)
            transient = op.esapi.load(srk, private, public)
            op.flush.append(transient)
            persistent = op.esapi.evict_control(ESYS_TR.OWNER, transient, handle)
            op.close.append(persistent)
            return bytes(public.marshal())

    def identity_public(self, handle: int) -> bytes:
        """Marshalled TPM2B_PUBLIC of the identity key at ``handle`` (``TpmError``
        ``tpm_key_missing`` when there is none)."""
        _check_identity_handle(handle)
        with self._op("read identity key") as op:
            key = self._identity(op, handle)
            public, _, _ = op.esapi.read_public(key)
            return bytes(public.marshal())

    def sign_digest(self, handle: int, digest: bytes) -> tuple[int, int]:
        """ECDSA (r, s) over a SHA-256 ``digest`` with the identity key at ``handle``."""
        _check_identity_handle(handle)
        if len(digest) != 32:
            raise ValueError(f"expected a 32-byte SHA-256 digest, got {len(digest)} bytes")
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self._op("sign with identity key") as op:
            key = self._identity(op, handle)
            signature = op.esapi.sign(key, TPM2B_DIGEST(digest), scheme, ticket)
            ecdsa = signature.signature.ecdsa
            r = int.from_bytes(bytes(ecdsa.signatureR.buffer), "big")
            s = int.from_bytes(bytes(ecdsa.signatureS.buffer), "big")
            return r, s

    def delete_identity_key(self, handle: int) -> None:
        """Evicts the identity key at ``handle``; nothing to do when there is none."""
        _check_identity_handle(handle)
        with self._op("delete identity key") as op:
            _evict(op, handle)

    def _identity(self, op: _Op, handle: int) -> Any:
        if handle not in _persistent_handles(op.esapi):
            raise TpmError(
                "tpm_key_missing",
                f"no key at persistent handle 0x{handle:08x} in the TPM at {self.tcti!r} "
                f"(expected the device identity key made by `ztagent enroll --key-store tpm`)",
            )
        key = op.esapi.tr_from_tpmpublic(handle)
        op.close.append(key)
        return key

    def ak_public(self) -> bytes:
        """Marshalled TPM2B_PUBLIC of the AK; creates and persists it on first use."""
        with self._op("load AK") as op:
            _, public = self._ensure_ak(op)
            return bytes(public.marshal())

    def ak_name(self) -> bytes:
        """The AK's TPM name: nameAlg (u16, big-endian) || H_nameAlg(TPMT_PUBLIC)."""
        public, _ = TPM2B_PUBLIC.unmarshal(self.ak_public())
        return bytes(public.get_name())

    def quote(self, nonce: bytes, pcrs: Sequence[int], bank: str = "sha256") -> QuoteResult:
        """Quote ``pcrs`` of ``bank`` with the AK over ``nonce`` (TPMS_ATTEST.extraData)."""
        if not 1 <= len(nonce) <= 64:
            raise ValueError(f"nonce must be 1..64 bytes (got {len(nonce)})")
        selection = _selection(pcrs, bank)
        with self._op("quote") as op:
            ak, _ = self._ensure_ak(op)
            attest, signature = op.esapi.quote(
                ak, selection, TPM2B_DATA(nonce), TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            )
            return QuoteResult(bytes(attest), bytes(signature.marshal()))

    def read_pcrs(self, pcrs: Sequence[int], bank: str = "sha256") -> dict[int, bytes]:
        """Current values of ``pcrs`` in ``bank``, by index."""
        _selection(pcrs, bank)  # validates
        wanted = sorted(set(pcrs))
        values: dict[int, bytes] = {}
        with self._op("read PCRs") as op:
            for start in range(0, len(wanted), _PCR_READ_CHUNK):
                chunk = wanted[start : start + _PCR_READ_CHUNK]
                _, selected, digests = op.esapi.pcr_read(_selection(chunk, bank))
                returned = _selected_indices(selected)
                if returned != chunk or len(digests) != len(chunk):
                    raise TpmError(
                        "tpm_error",
                        f"PCR read returned PCRs {returned} (expected {chunk}); "
                        f"is the {bank} bank allocated?",
                    )
                for index, digest in zip(chunk, digests, strict=True):
                    values[index] = bytes(digest)
        return values

    def extend(self, pcr: int, sha256_digest: bytes) -> None:
        """PCR_Extend ``pcr`` in the sha256 bank with ``sha256_digest``."""
        _check_pcr(pcr)
        if len(sha256_digest) != 32:
            raise ValueError(f"SHA-256 digest must be 32 bytes (got {len(sha256_digest)})")
        ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        ha.digest.sha256 = sha256_digest
        with self._op(f"extend PCR {pcr}") as op:
            op.esapi.pcr_extend(ESYS_TR(pcr), TPML_DIGEST_VALUES([ha]))

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """ActivateCredential with the AK and EK; the secret the verifier sealed to them.

        ``credential_blob`` and ``encrypted_secret`` are the marshalled TPM2B_ID_OBJECT and
        TPM2B_ENCRYPTED_SECRET from MakeCredential. The TPM only opens them when the EK is
        this TPM's and the name in the blob is this AK's.
        """
        blob = _unmarshal_exact(TPM2B_ID_OBJECT, credential_blob, "credential_blob")
        secret = _unmarshal_exact(TPM2B_ENCRYPTED_SECRET, encrypted_secret, "encrypted_secret")
        with self._op("activate credential") as op:
            ak, _ = self._ensure_ak(op)
            ek, _ = _create_ek(op)
            session = _ek_policy_session(op)
            cert_info = op.esapi.activate_credential(
                ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
            )
            return bytes(cert_info)

    # --- internals ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _op(self, what: str) -> Iterator[_Op]:
        with self._lock:
            try:
                esapi = ESAPI(self.tcti)
            except TSS2_Exception as exc:
                raise _wrap(f"connect to TPM at {self.tcti!r}", exc) from exc
            op = _Op(esapi)
            try:
                yield op
            except TSS2_Exception as exc:
                raise _wrap(what, exc) from exc
            finally:
                for handle in reversed(op.flush):
                    with contextlib.suppress(TSS2_Exception):
                        esapi.flush_context(handle)
                for handle in op.close:
                    with contextlib.suppress(TSS2_Exception):
                        esapi.tr_close(handle)
                esapi.close()

    def _ensure_ak(self, op: _Op) -> tuple[Any, Any]:
        """The persistent AK (ESYS_TR, TPM2B_PUBLIC), created under the EK if absent."""
        if self.ak_handle in _persistent_handles(op.esapi):
            handle = op.esapi.tr_from_tpmpublic(self.ak_handle)
            op.close.append(handle)
            public, _, _ = op.esapi.read_public(handle)
            _check_ak_public(public, self.ak_handle)
            return handle, public
        ek, _ = _create_ek(op)
        template = TPM2B_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES)
        private, public, _, _, _ = op.esapi.create(
            ek, None, template, session1=_ek_policy_session(op)
        )
        transient = op.esapi.load(ek, private, public, session1=_ek_policy_session(op))
        op.flush.append(transient)
        handle = op.esapi.evict_control(ESYS_TR.OWNER, transient, self.ak_handle)
        op.close.append(handle)
        return handle, public


# --- helpers (no connection of their own) ------------------------------------------------


def _check_pcr(pcr: int) -> None:
    if not isinstance(pcr, int) or not 0 <= pcr <= MAX_PCR:
        raise ValueError(f"PCR index must be 0..{MAX_PCR} (got {pcr!r})")


def _selection(pcrs: Sequence[int], bank: str) -> Any:
    if bank not in PCR_BANKS:
        raise ValueError(f"PCR bank must be one of {sorted(PCR_BANKS)} (got {bank!r})")
    if not pcrs:
        raise ValueError("at least one PCR must be selected")
    for pcr in pcrs:
        _check_pcr(pcr)
    return TPML_PCR_SELECTION.parse(f"{bank}:{','.join(str(p) for p in sorted(set(pcrs)))}")


def _selected_indices(selection: Any) -> list[int]:
    indices: list[int] = []
    for sel in selection.pcrSelections[: selection.count]:
        bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
        for byte_index, byte in enumerate(bitmap):
            indices.extend(byte_index * 8 + bit for bit in range(8) if byte & (1 << bit))
    return sorted(indices)


def _unmarshal_exact(cls: Any, data: bytes, what: str) -> Any:
    try:
        value, used = cls.unmarshal(data)
    except (TSS2_Exception, ValueError, TypeError) as exc:
        raise TpmError("tpm_error", f"{what} is not a marshalled {cls.__name__}: {exc}") from exc
    if used != len(data):
        raise TpmError(
            "tpm_error",
            f"{what} has {len(data) - used} trailing bytes after the {cls.__name__}",
        )
    return value


def _persistent_handles(esapi: Any) -> set[int]:
    return _handles(esapi, TPM2_HT.PERSISTENT << 24)


def _handles(esapi: Any, first: int) -> set[int]:
    found: set[int] = set()
    more = True
    start = first
    while more:
        more, data = esapi.get_capability(TPM2_CAP.HANDLES, start, 64)
        batch = [int(h) for h in data.data.handles]
        found.update(h for h in batch if h >> 24 == first >> 24)
        if not batch:
            break
        start = max(batch) + 1
    return found


def _nv_reader(esapi: Any) -> Callable[[int], bytes]:
    """An NV read callback for ``create_ek_template`` that checks which indices exist first
    (so the TSS does not log an error for every EK-certificate index a swtpm lacks)."""
    defined = _handles(esapi, TPM2_HT.NV_INDEX << 24)
    inner = NVReadEK(esapi)

    def read(index: int) -> bytes:
        if int(index) not in defined:
            raise NoSuchIndex(index)
        return bytes(inner(index))

    return read


def _check_identity_handle(handle: int) -> None:
    if handle not in IDENTITY_KEY_HANDLES:
        raise ValueError(
            f"identity key handle 0x{handle:x} is not one of "
            f"{', '.join(f'0x{h:08x}' for h in IDENTITY_KEY_HANDLES)}"
        )


def _evict(op: _Op, handle: int) -> None:
    """Removes the persistent object at ``handle``; nothing to do when there is none."""
    if handle in _persistent_handles(op.esapi):
        key = op.esapi.tr_from_tpmpublic(handle)
        op.esapi.evict_control(ESYS_TR.OWNER, key, handle)


def _create_srk(op: _Op) -> Any:
    """The owner hierarchy's storage primary key (deterministic from the owner seed)."""
    template = TPM2B_PUBLIC.parse(SRK_TEMPLATE, objectAttributes=SRK_ATTRIBUTES)
    handle, _, _, _, _ = op.esapi.create_primary(None, template, ESYS_TR.OWNER)
    op.flush.append(handle)
    return handle


def _create_ek(op: _Op) -> tuple[Any, Any]:
    _, template = create_ek_template(EK_TEMPLATE, _nv_reader(op.esapi))
    handle, public, _, _, _ = op.esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
    op.flush.append(handle)
    return handle, public


def _ek_policy_session(op: _Op) -> Any:
    """A policy session satisfying the EK's policy (PolicySecret of the endorsement
    hierarchy, empty auth); usable for one command."""
    session = op.esapi.start_auth_session(
        ESYS_TR.NONE,
        ESYS_TR.NONE,
        TPM2_SE.POLICY,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )
    op.flush.append(session)
    op.esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
    return session


def _check_ak_public(public: Any, handle: int) -> None:
    expected = TPM2B_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES).publicArea
    got = public.publicArea
    same = (
        got.type == expected.type
        and got.nameAlg == expected.nameAlg
        and got.objectAttributes == expected.objectAttributes
        and got.parameters.eccDetail.curveID == expected.parameters.eccDetail.curveID
        and got.parameters.eccDetail.scheme.scheme == expected.parameters.eccDetail.scheme.scheme
    )
    if not same:
        raise TpmError(
            "tpm_error",
            f"persistent handle 0x{handle:08x} holds a key that is not a ztagent AK "
            f"(got type {got.type}, attributes {got.objectAttributes}; expected "
            f"{AK_TEMPLATE} with {AK_ATTRIBUTES}); pick another handle or evict it",
        )
