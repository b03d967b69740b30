"""AK binding, verifier side: TPM2 MakeCredential now, compare the returned secret later.

``begin_binding`` checks that the AK is a restricted signing key fixed to its TPM and the EK a
restricted decryption key, then encrypts a random secret to the EK with the AK's name
(``tpm2_pytss.utils.make_credential``, pure software). Only the TPM that holds that EK *and*
has that AK loaded can recover it with ActivateCredential, so a matching answer proves the
AK lives in the same TPM as the EK. ``complete_binding`` compares in constant time.

Not done here: whether the EK belongs to a genuine TPM. That is ``ztagent.posture.ek_cert``
(the EK certificate against the manufacturer CAs), which callers run first when configured;
otherwise the EK is trusted on first use for the device certificate that asked.
``PendingBindings`` keeps outstanding bindings (single use, bound to the caller's
certificate fingerprint, expiring ``ttl_s`` after they are added) and names them.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tpm2_pytss.constants import TPMA_OBJECT  # type: ignore[import-untyped, unused-ignore]
from tpm2_pytss.types import TPM2B_NAME  # type: ignore[import-untyped, unused-ignore]
from tpm2_pytss.utils import make_credential  # type: ignore[import-untyped, unused-ignore]

from ztagent.posture.errors import PostureError, short_hex
from ztagent.posture.quote import ak_name, check_ak_attributes, parse_public

SECRET_BYTES = 32
DEFAULT_TTL_S = 60


@dataclass(frozen=True)
class PendingBinding:
    """A MakeCredential challenge waiting for its answer (stored in ``PendingBindings``)."""

    secret: bytes
    ak_name: str
    ak_public: bytes
    ek_public: bytes


def _check_ek(ek_public: bytes) -> None:
    attrs = int(parse_public(ek_public, "EK public").publicArea.objectAttributes)
    required = int(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)
    if attrs & required != required or attrs & int(TPMA_OBJECT.SIGN_ENCRYPT):
        raise PostureError(
            "ak_binding_failed",
            f"EK attributes {TPMA_OBJECT(attrs)!s}, expected fixedtpm|restricted|decrypt "
            f"and not sign",
        )


def begin_binding(
    ek_public: bytes,
    ak_public: bytes,
    *,
    rng: Callable[[int], bytes] = secrets.token_bytes,
) -> tuple[PendingBinding, bytes, bytes]:
    """(pending binding, marshalled TPM2B_ID_OBJECT, marshalled TPM2B_ENCRYPTED_SECRET).

    ``ak_binding_failed`` when the AK is not a restricted signing key fixed to its TPM, the EK
    not a restricted decryption key, or MakeCredential cannot encrypt to the EK;
    ``evidence_malformed`` when either public area does not unmarshal.
    """
    check_ak_attributes(ak_public)
    _check_ek(ek_public)
    name_hex = ak_name(ak_public)
    secret = rng(SECRET_BYTES)
    if len(secret) != SECRET_BYTES:
        raise RuntimeError("the secret generator returned a short value")
    try:
        blob, encrypted = make_credential(
            parse_public(ek_public, "EK public"), secret, TPM2B_NAME(bytes.fromhex(name_hex))
        )
        blob_bytes, encrypted_bytes = bytes(blob.marshal()), bytes(encrypted.marshal())
    except Exception as exc:  # unsupported EK type/symmetric: wrap whatever tpm2-pytss raises
        raise PostureError("ak_binding_failed", f"MakeCredential to this EK failed: {exc}") from exc
    pending = PendingBinding(
        secret=secret, ak_name=name_hex, ak_public=bytes(ak_public), ek_public=bytes(ek_public)
    )
    return pending, blob_bytes, encrypted_bytes


def complete_binding(pending: PendingBinding, returned_secret: bytes) -> str:
    """The AK name, when the device returned the secret ActivateCredential recovers."""
    if not hmac.compare_digest(pending.secret, bytes(returned_secret)):
        raise PostureError(
            "ak_binding_failed",
            f"returned secret does not match for AK {short_hex(pending.ak_name)}; expected "
            f"the secret ActivateCredential recovers",
        )
    return pending.ak_name


@dataclass(frozen=True)
class _Slot:
    pending: PendingBinding
    cert_fingerprint: str
    expires_at: datetime


class PendingBindings:
    """binding id -> pending binding; bounded, single use, per certificate, expiring.

    When full, the oldest binding is dropped (its completion then fails; never accepts).
    """

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_pending: int = 1000,
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._ttl = timedelta(seconds=ttl_s)
        self._max = max_pending
        self._rng = rng
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def add(self, pending: PendingBinding, cert_fingerprint: str, now: datetime) -> str:
        """Keep ``pending`` for ``cert_fingerprint`` until ``now + ttl_s``; its binding id."""
        with self._lock:
            for binding_id in [k for k, s in self._slots.items() if s.expires_at <= now]:
                del self._slots[binding_id]
            while len(self._slots) >= self._max:
                del self._slots[next(iter(self._slots))]
            binding_id = self._rng(16).hex()
            self._slots[binding_id] = _Slot(pending, cert_fingerprint, now + self._ttl)
            return binding_id

    def take(self, binding_id: str, cert_fingerprint: str, now: datetime) -> PendingBinding:
        """Remove and return the binding; unknown, another certificate's or expired fail."""
        with self._lock:
            slot = self._slots.get(binding_id)
            if slot is not None and slot.cert_fingerprint == cert_fingerprint:
                del self._slots[binding_id]
        if slot is None:
            raise PostureError(
                "ak_binding_failed", f"binding {binding_id!r} is unknown or already completed"
            )
        if slot.cert_fingerprint != cert_fingerprint:
            raise PostureError(
                "ak_binding_failed",
                f"binding was begun by certificate {short_hex(slot.cert_fingerprint)}, "
                f"completed by {short_hex(cert_fingerprint)}",
            )
        if now >= slot.expires_at:
            raise PostureError(
                "ak_binding_failed",
                f"binding expired at {slot.expires_at.isoformat()}, now {now.isoformat()}",
            )
        return slot.pending
