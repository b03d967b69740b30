"""``DeviceChecker``: the per-request device check with a bounded cache.

The sidecar gets the leaf PEM from the TLS session on every call; the same bytes give the
same answer until the time moves out of the window in which that answer holds, or the
trust material changes (``replace_trust`` drops the whole cache).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from ztagent.pki.device_check import VerifiedDevice, verify_with_expiry
from ztagent.pki.errors import CertError
from ztagent.pki.policy import DevicePolicy
from ztagent.pki.trust import TrustMaterial

_MIN = datetime.min.replace(tzinfo=UTC)
_MAX = datetime.max.replace(tzinfo=UTC)
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class _Entry:
    result: VerifiedDevice | CertError
    valid_from: datetime
    valid_until: datetime
    """The result is reused only while ``valid_from <= now <= valid_until``."""


class DeviceChecker:
    """Checks device certs given as PEM bytes; caches successes and failures (LRU)."""

    def __init__(
        self, trust: TrustMaterial, policy: DevicePolicy, max_entries: int = 10_000
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._trust = trust
        self._policy = policy
        self._max_entries = max_entries
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def trust(self) -> TrustMaterial:
        return self._trust

    @property
    def policy(self) -> DevicePolicy:
        return self._policy

    def __len__(self) -> int:
        return len(self._cache)

    def replace_trust(self, trust: TrustMaterial) -> None:
        """Use a new CA bundle / CRL from now on; every cached answer is dropped."""
        with self._lock:
            self._trust = trust
            self._cache = OrderedDict()
            self._generation += 1

    def check_pem(self, leaf_pem: bytes, now: datetime) -> VerifiedDevice:
        """The ``VerifiedDevice`` for this leaf PEM at ``now``; raise ``CertError``."""
        if now.tzinfo is None:
            raise ValueError("validation time must be timezone-aware")
        with self._lock:
            entry = self._cache.get(leaf_pem)
            if entry is not None and entry.valid_from <= now <= entry.valid_until:
                self._cache.move_to_end(leaf_pem)
                return _unwrap(entry.result)
            trust, generation = self._trust, self._generation
        entry = self._compute(leaf_pem, trust, now)
        with self._lock:
            if generation == self._generation:
                self._cache[leaf_pem] = entry
                self._cache.move_to_end(leaf_pem)
                while len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
        return _unwrap(entry.result)

    def _compute(self, leaf_pem: bytes, trust: TrustMaterial, now: datetime) -> _Entry:
        try:
            leaf = x509.load_pem_x509_certificate(leaf_pem)
        except ValueError as exc:
            err = CertError("cert_malformed", f"client certificate is not PEM: {exc}")
            return _Entry(err, _MIN, _MAX)
        try:
            device, valid_until = verify_with_expiry(leaf, trust, self._policy, now)
        except CertError as err:
            return _Entry(err, *_failure_window(err, leaf, trust, self._policy))
        return _Entry(device, device.not_before, valid_until)


def _failure_window(
    err: CertError, leaf: x509.Certificate, trust: TrustMaterial, policy: DevicePolicy
) -> tuple[datetime, datetime]:
    """The times at which a failure for this leaf would repeat."""
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if err.code == "cert_not_yet_valid":
        return _MIN, not_before - _TICK
    if err.code == "cert_expired":
        return not_after + _TICK, _MAX
    updates = [
        c.next_update_utc + policy.crl_grace for c in trust.crls if c.next_update_utc is not None
    ]
    if err.code == "crl_expired":
        # It repeats only while the clock stays past the CRL's usable end: after a clock
        # correction back before it, the answer is computed again (it used to be kept for
        # the leaf's whole validity, refusing every device until the trust files changed).
        return (max(updates) + _TICK if updates else _MIN), not_after
    if updates and not policy.crl_fail_open:
        not_after = min(not_after, *updates)
    return not_before, not_after


def _unwrap(result: VerifiedDevice | CertError) -> VerifiedDevice:
    if isinstance(result, CertError):
        # a fresh exception (no stale traceback), with the same fields
        raise CertError(
            result.code, result.message, received=result.received, expected=result.expected
        )
    return result
