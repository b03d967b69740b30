"""Signed checkpoints in hash-chained JSON-lines logs (the decision log and the CA audit log).

A checkpoint is one line of the log itself, chained like any other line::

    {"checkpoint":{"v":1,"reason":"interval","lines":1000,"head":"<64 hex>","file_start":1,
     "file_prev":"<64 hex>","time":"2026-11-26T12:00:00.000Z","kid":"<64 hex>","alg":"ES256"},
     "sig":"<base64url>","prev_sha256":"<64 hex>"}

(one line in the file). Fields of ``checkpoint``:

- ``lines``: how many lines of the chain precede this one, counted from the chain's first
  line (the genesis line, whose ``prev_sha256`` is 64 zeros), checkpoints included: the
  checkpoint itself is line ``lines + 1`` of the chain;
- ``head``: the SHA-256 of the line before it, which is also its own ``prev_sha256``;
- ``file_start``: the chain position (1-based) of the first line of the file it is in, and
  ``file_prev``: that first line's ``prev_sha256``: so the oldest file left after rotation
  says where it continues from, and dropped lines at the start of a file are visible;
- ``reason``: ``interval`` (every N lines), ``rotate`` (the last line of a file before it is
  rotated), ``close`` (the writer stopped cleanly) or ``append`` (the CA audit log seals
  every event); ``close`` and ``append`` seal the log: nothing should follow them until the
  next writer starts;
- ``time``: when it was written (RFC 3339 UTC); ``kid``: hex SHA-256 of the signing key's DER
  SubjectPublicKeyInfo (``openssl pkey -pubin -outform DER | sha256sum``); ``alg``:
  ``ES256`` (EC P-256), ``ES384`` (EC P-384) or ``EdDSA`` (Ed25519).

``sig`` is the base64url (no padding) signature, JOSE style (ECDSA as raw ``r || s``), over
``SIGNING_CONTEXT`` followed by the ``checkpoint`` object serialised with sorted keys and
compact separators. A checkpoint line has exactly the three keys above.

``verify_checkpoints`` walks a log (a rotated set, oldest first) whose hash chain was already
checked (``log_verify.verify_files``) and checks every checkpoint against the given public
keys, the positions and heads it states, and how the log ends. Its report codes are
``CheckpointCode``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ztagent import json_input
from ztagent.errors import ZtagentError
from ztagent.policy.decision_record import format_time

FORMAT_VERSION: Final = 1
SIGNING_CONTEXT: Final = b"ztagent-log-checkpoint.v1\n"
"""Prefix of every signed message: a checkpoint signature means nothing in another protocol."""
CHECKPOINT_PREFIX: Final = b'{"checkpoint":'
"""Every checkpoint line the writers produce starts with this (decision lines never do)."""
DEFAULT_EVERY: Final = 1000
_TAIL_CHUNK: Final = 64 * 1024
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_FIELDS: Final = ("v", "reason", "lines", "head", "file_start", "file_prev", "time", "kid", "alg")


class CheckpointReason(StrEnum):
    INTERVAL = "interval"
    ROTATE = "rotate"
    CLOSE = "close"
    APPEND = "append"


SEALING: Final = frozenset({CheckpointReason.CLOSE, CheckpointReason.APPEND})
"""Reasons after which a log is complete (a clean stop; an audit event and its seal)."""


class CheckpointCode(StrEnum):
    """Every ``CheckpointError`` code, and the report codes of ``verify_checkpoints``."""

    CHECKPOINT_KEY_INVALID = "checkpoint_key_invalid"
    CHECKPOINT_MALFORMED = "checkpoint_malformed"
    CHECKPOINT_WRONG_KEY = "checkpoint_wrong_key"
    CHECKPOINT_BAD_SIGNATURE = "checkpoint_bad_signature"
    CHECKPOINT_HEAD_MISMATCH = "checkpoint_head_mismatch"
    CHECKPOINT_POSITION_MISMATCH = "checkpoint_position_mismatch"
    DROPPED_HEAD = "dropped_head"
    NO_CHECKPOINT = "no_checkpoint"
    TAIL_UNANCHORED = "tail_unanchored"
    TAIL_UNSEALED = "tail_unsealed"
    UNREADABLE = "unreadable"


class CheckpointError(ZtagentError):
    """A checkpoint key cannot be used (``checkpoint_key_invalid``) or a checkpoint line is
    refused (the other codes)."""

    codes = frozenset(CheckpointCode)


# --- keys -------------------------------------------------------------------------------------

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class DigestSigningKey(Protocol):
    """An EC key held elsewhere (an HSM: the CA's token-held issuing key) that signs digests:
    ``sign_digest`` gets the digest of the message under the curve's hash (SHA-256 for P-256)
    and returns the DER ``ECDSA-Sig-Value``."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_digest(self, digest: bytes) -> bytes: ...


_EC_ALGS: Final = {
    "secp256r1": ("ES256", hashes.SHA256, 32),
    "secp384r1": ("ES384", hashes.SHA384, 48),
}


def key_id(public_key: PublicKey) -> str:
    """Hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _alg_of(public_key: object, source: str) -> str:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in _EC_ALGS:
        return _EC_ALGS[public_key.curve.name][0]
    raise CheckpointError(
        "checkpoint_key_invalid",
        f"{source}: expected an EC P-256 / P-384 or Ed25519 key, got {type(public_key).__name__}",
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class CheckpointKey:
    """A public key checkpoints are verified with."""

    public_key: PublicKey
    kid: str
    alg: str

    @classmethod
    def from_public_key(cls, public_key: object, source: str = "key") -> CheckpointKey:
        alg = _alg_of(public_key, source)
        assert isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
        return cls(public_key, key_id(public_key), alg)

    @classmethod
    def from_pem(cls, data: bytes, source: str = "key") -> CheckpointKey:
        """A PEM public key, or a PEM certificate (the first one of a chain file such as the
        sidecar's ``server.pem``, or ``issuing-ca.pem``)."""
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                public_key: object = x509.load_pem_x509_certificate(data).public_key()
            else:
                public_key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise CheckpointError(
                "checkpoint_key_invalid",
                f"{source}: not a PEM public key or certificate ({exc})",
            ) from None
        return cls.from_public_key(public_key, source)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            if isinstance(self.public_key, ed25519.Ed25519PublicKey):
                self.public_key.verify(signature, message)
                return True
            _, hash_cls, size = _EC_ALGS[self.public_key.curve.name]
            if len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            self.public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hash_cls()))
        except InvalidSignature:
            return False
        return True


class CheckpointSigner:
    """Signs checkpoint lines with one private key (the writer thread's only crypto), or with
    a ``DigestSigningKey`` (an EC key on a token; each signature is checked before use)."""

    def __init__(self, private_key: PrivateKey | DigestSigningKey, source: str = "key") -> None:
        self._key = private_key
        public = CheckpointKey.from_public_key(private_key.public_key(), source)
        external = not isinstance(
            private_key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        )
        if external and not isinstance(public.public_key, ec.EllipticCurvePublicKey):
            raise CheckpointError(
                "checkpoint_key_invalid", f"{source}: a digest-signing key must be EC"
            )
        self.kid = public.kid
        self.alg = public.alg
        self.public = public

    @classmethod
    def from_pem(cls, data: bytes, source: str = "key") -> CheckpointSigner:
        """An unencrypted PEM private key (EC P-256 / P-384 or Ed25519)."""
        try:
            key = serialization.load_pem_private_key(data, None)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(
                "checkpoint_key_invalid", f"{source}: not an unencrypted PEM private key ({exc})"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise CheckpointError(
                "checkpoint_key_invalid",
                f"{source}: expected an EC P-256 / P-384 or Ed25519 key, got {type(key).__name__}",
            )
        return cls(key, source)

    def sign(self, message: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(message)
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            _, hash_cls, size = _EC_ALGS[self._key.curve.name]
            r, s = decode_dss_signature(self._key.sign(message, ec.ECDSA(hash_cls())))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return self._sign_external(self._key, message)

    def _sign_external(self, key: DigestSigningKey, message: bytes) -> bytes:
        _, hash_cls, size = _EC_ALGS[key.public_key().curve.name]
        digest = hashes.Hash(hash_cls())
        digest.update(message)
        r, s = decode_dss_signature(key.sign_digest(digest.finalize()))
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if not self.public.verify(signature, message):
            raise CheckpointError(
                "checkpoint_key_invalid",
                f"the signature made with key {self.kid[:16]}… does not verify with it",
            )
        return signature

    def checkpoint(
        self,
        reason: CheckpointReason,
        *,
        lines: int,
        head: str,
        file_start: int,
        file_prev: str,
        now: datetime,
    ) -> Checkpoint:
        return Checkpoint(
            reason=str(reason),
            lines=lines,
            head=head,
            file_start=file_start,
            file_prev=file_prev,
            time=format_time(now),
            kid=self.kid,
            alg=self.alg,
        )

    def line(self, checkpoint: Checkpoint) -> bytes:
        """The checkpoint line (no newline): its ``prev_sha256`` is the checkpoint's head."""
        doc = {
            "checkpoint": checkpoint.payload(),
            "sig": _b64(self.sign(checkpoint.signed_message())),
            "prev_sha256": checkpoint.head,
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


# --- the line format --------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    reason: str
    lines: int
    head: str
    file_start: int
    file_prev: str
    time: str
    kid: str
    alg: str
    version: int = FORMAT_VERSION

    def payload(self) -> dict[str, object]:
        return {
            "v": self.version,
            "reason": self.reason,
            "lines": self.lines,
            "head": self.head,
            "file_start": self.file_start,
            "file_prev": self.file_prev,
            "time": self.time,
            "kid": self.kid,
            "alg": self.alg,
        }

    def signed_message(self) -> bytes:
        body = json.dumps(self.payload(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return SIGNING_CONTEXT + body.encode()


@dataclass(frozen=True)
class CheckpointLine:
    checkpoint: Checkpoint
    signature: bytes
    prev_sha256: str


def _hex64(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _posint(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_checkpoint(doc: object) -> bool:
    """``doc`` (a parsed log line) claims to be a checkpoint."""
    return isinstance(doc, dict) and "checkpoint" in doc


def parse_checkpoint(doc: dict[str, object]) -> CheckpointLine:
    """A parsed checkpoint line; ``CheckpointError(checkpoint_malformed)`` saying what is wrong."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError("checkpoint_malformed", what)

    if set(doc) != {"checkpoint", "sig", "prev_sha256"}:
        raise bad(f"keys {sorted(doc)}, expected ['checkpoint', 'prev_sha256', 'sig']")
    body, sig, prev = doc["checkpoint"], doc["sig"], doc["prev_sha256"]
    if not isinstance(body, dict) or set(body) != set(_FIELDS):
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise bad(f"checkpoint fields {got}, expected {sorted(_FIELDS)}")
    if body["v"] != FORMAT_VERSION:
        raise bad(f"version {body['v']!r}, expected {FORMAT_VERSION}")
    if body["reason"] not in set(CheckpointReason):
        raise bad(
            f"reason {body['reason']!r}, expected one of {[str(r) for r in CheckpointReason]}"
        )
    for name, minimum in (("lines", 0), ("file_start", 1)):
        if not _posint(body[name], minimum):
            raise bad(f"{name} {body[name]!r}, expected an integer >= {minimum}")
    for name in ("head", "file_prev", "kid"):
        if not _hex64(body[name]):
            raise bad(f"{name} {body[name]!r}, expected 64 lowercase hex characters")
    if not isinstance(body["time"], str) or not isinstance(body["alg"], str):
        raise bad("time and alg must be strings")
    if not isinstance(sig, str) or not _hex64(prev):
        raise bad("sig must be a string and prev_sha256 64 lowercase hex characters")
    try:
        signature = _unb64(sig)
    except ValueError:
        raise bad(f"sig {sig[:16]!r}… is not base64url") from None
    checkpoint = Checkpoint(
        reason=str(body["reason"]),
        lines=int(str(body["lines"])),
        head=str(body["head"]),
        file_start=int(str(body["file_start"])),
        file_prev=str(body["file_prev"]),
        time=str(body["time"]),
        kid=str(body["kid"]),
        alg=str(body["alg"]),
    )
    return CheckpointLine(checkpoint, signature, str(prev))


def check_signature(line: CheckpointLine, keys: Sequence[CheckpointKey]) -> CheckpointKey:
    """The key that signed ``line``; ``checkpoint_wrong_key`` when its ``kid`` is none of
    ``keys``, ``checkpoint_bad_signature`` when the signature does not verify."""
    cp = line.checkpoint
    key = next((k for k in keys if k.kid == cp.kid), None)
    if key is None:
        expected = ", ".join(f"{k.kid[:16]}…" for k in keys)
        raise CheckpointError(
            "checkpoint_wrong_key",
            f"signed by key {cp.kid[:16]}…, not by the given key ({expected})",
            received=cp.kid,
            expected=[k.kid for k in keys],
        )
    if cp.alg != key.alg or not key.verify(line.signature, cp.signed_message()):
        raise CheckpointError(
            "checkpoint_bad_signature",
            f"the {cp.alg} signature does not verify with key {key.kid[:16]}… "
            "(the checkpoint was changed or forged)",
        )
    return key


# --- reading a file's tail (the writers' restart) -------------------------------------------


@dataclass(frozen=True)
class TailPosition:
    """What a writer needs to continue a file's checkpoint positions."""

    checkpoint: Checkpoint | None
    """The last checkpoint in the file (None: none, or it cannot be parsed)."""
    after: int
    """Lines after it (every line when there is none)."""
    first_prev: str | None
    """``prev_sha256`` of the file's first line (None: empty file or not parsable)."""


def _lines_backwards(fd: int, size: int) -> Iterator[bytes]:
    """The complete lines of ``[0, size)`` (which ends with a newline), last first."""
    pos = size - 1  # the final newline
    buf = b""
    hi = 0  # buf[:hi] is not yet yielded
    while True:
        i = buf.rfind(b"\n", 0, hi)
        while i >= 0:
            yield buf[i + 1 : hi]
            hi = i
            i = buf.rfind(b"\n", 0, hi)
        if pos <= 0:
            if hi > 0:
                yield buf[:hi]
            return
        start = max(0, pos - _TAIL_CHUNK)
        buf = os.pread(fd, pos - start, start) + buf[:hi]
        hi = len(buf)
        pos = start


def _first_prev(fd: int) -> str | None:
    first = b""
    offset = 0
    while b"\n" not in first:
        chunk = os.pread(fd, _TAIL_CHUNK, offset)
        if not chunk:
            break
        first += chunk
        offset += len(chunk)
    try:
        doc = json_input.loads(first.split(b"\n", 1)[0], max_depth=None)
    except ValueError:
        return None
    prev = doc.get("prev_sha256") if isinstance(doc, dict) else None
    return prev if _hex64(prev) else None


def read_tail_position(fd: int, size: int) -> TailPosition:
    """Scan ``fd`` (complete lines only, ``size`` bytes) backwards to its last checkpoint."""
    if size == 0:
        return TailPosition(None, 0, None)
    after = 0
    found: Checkpoint | None = None
    for line in _lines_backwards(fd, size):
        if line.startswith(CHECKPOINT_PREFIX):
            try:
                doc = json_input.loads(line, max_depth=None)
                found = parse_checkpoint(doc).checkpoint if isinstance(doc, dict) else None
            except (ValueError, CheckpointError):
                found = None
            if found is not None:
                break
        after += 1
    return TailPosition(found, after, _first_prev(fd))


def tail_position_of(path: Path) -> TailPosition | None:
    """``read_tail_position`` of a (rotated) file, read-only and never through a symlink;
    None when it cannot be read. Only its complete lines count."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            nl = _last_newline(fd, size)
            size = nl + 1
        return read_tail_position(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def _last_newline(fd: int, end: int) -> int:
    pos = end
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        i = os.pread(fd, pos - start, start).rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def position_after(tail: TailPosition) -> int | None:
    """The chain position of the file's last line, when its last checkpoint tells it."""
    if tail.checkpoint is None:
        return None
    return tail.checkpoint.lines + 1 + tail.after


# --- verifying a log --------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointReport:
    """What ``verify_checkpoints`` found. ``ok`` False: ``code`` (a ``CheckpointCode``),
    ``reason`` naming the file and line, ``file`` / ``line`` (1-based, within the file)."""

    ok: bool
    code: str | None
    reason: str | None
    file: Path | None
    line: int | None
    lines: int
    """Lines read (every line when ``ok``)."""
    checkpoints: int
    """Checkpoints verified."""
    rotated_away: int
    """Lines of the chain before the first file, which its checkpoints account for (older
    files deleted by rotation): not tampering."""
    unanchored: int
    """Lines after the last checkpoint: no signature covers them yet."""
    sealed: bool
    """The last line is a ``close`` or ``append`` checkpoint."""
    last_checkpoint: Checkpoint | None
    last_checkpoint_at: tuple[Path, int] | None
    live: bool = False
    """The log was checked as one still being written (``--live``): an unanchored or unsealed
    tail is reported, not refused."""


@dataclass
class _Walk:
    keys: Sequence[CheckpointKey]
    live: bool
    read: int = 0
    position: int | None = None
    """Chain position of the last line read, once a checkpoint told it."""
    first_position: int | None = None
    checkpoints: int = 0
    since: int = 0
    last: Checkpoint | None = None
    last_at: tuple[Path, int] | None = None
    # the current file
    file: Path | None = None
    file_line: int = 0
    file_first_prev: str | None = None

    def report(
        self, code: str | None = None, reason: str | None = None, *, line: int | None = None
    ) -> CheckpointReport:
        sealed = self.since == 0 and self.last is not None and self.last.reason in SEALING
        return CheckpointReport(
            ok=code is None,
            code=code,
            reason=reason,
            file=self.file if code is not None else None,
            line=line,
            lines=self.read,
            checkpoints=self.checkpoints,
            rotated_away=(self.first_position or 1) - 1,
            unanchored=self.since,
            sealed=sealed,
            last_checkpoint=self.last,
            last_checkpoint_at=self.last_at,
            live=self.live,
        )

    def since_last(self) -> str:
        if self.last_at is None:
            return f"lines 1 to {self.file_line - 1} of {self.file}"
        path, line = self.last_at
        where = f"line {line}" if path == self.file else f"{path} line {line}"
        return f"the lines between the checkpoint on {where} and this one"

    def check(self, cp: Checkpoint) -> tuple[str, str] | None:
        """Position checks of one checkpoint whose signature verified."""
        here = cp.lines + 1  # the chain position this checkpoint says it has
        in_file_before = self.file_line - 1
        if cp.file_prev != self.file_first_prev:
            missing = (here - cp.file_start) - in_file_before
            count = f"{missing} lines" if missing > 0 else "lines"
            return (
                "dropped_head",
                f"the checkpoint says this file starts at line {cp.file_start} of the chain "
                f"with prev_sha256 {cp.file_prev[:12]}…, but its first line has prev_sha256 "
                f"{(self.file_first_prev or '?')[:12]}…: {count} at the start of the file were "
                "removed (dropped head)",
            )
        if self.position is not None and here != self.position:
            diff = self.position - here
            what = f"{diff} lines inserted" if diff > 0 else f"{-diff} lines removed"
            return (
                "checkpoint_position_mismatch",
                f"the checkpoint says it is line {here} of the chain, it is line "
                f"{self.position}: {what} among {self.since_last()}",
            )
        if here - in_file_before != cp.file_start:
            return (
                "checkpoint_position_mismatch",
                f"the checkpoint says this file starts at line {cp.file_start} of the chain, "
                f"so {here - cp.file_start} lines should precede it in the file, "
                f"{in_file_before} do: lines were removed or inserted",
            )
        if self.position is None and here - (self.read - 1) < 1:
            return (
                "checkpoint_position_mismatch",
                f"the checkpoint says it is line {here} of the chain, but {self.read - 1} "
                "lines precede it: lines were inserted",
            )
        return None

    def head_check(self, line: CheckpointLine) -> tuple[str, str] | None:
        if line.checkpoint.head != line.prev_sha256:
            return (
                "checkpoint_head_mismatch",
                f"the signed head is {line.checkpoint.head[:12]}…, the chain gives "
                f"{line.prev_sha256[:12]}…: a line among {self.since_last()} was changed and "
                "the hashes after it recomputed",
            )
        return None


def verify_checkpoints(
    paths: Sequence[Path], keys: Sequence[CheckpointKey], *, live: bool = False
) -> CheckpointReport:
    """Check the checkpoints of a log (one file, or a rotated set oldest first) whose hash
    chain ``log_verify.verify_files`` already accepted.

    Refusals (the first one found): ``checkpoint_malformed``, ``checkpoint_wrong_key`` (not
    signed by any of ``keys``), ``checkpoint_bad_signature``, ``checkpoint_head_mismatch`` (a
    line before it was edited and the hashes after it recomputed), ``dropped_head`` (lines at
    the start of a file were removed), ``checkpoint_position_mismatch`` (lines removed or
    inserted), then, unless ``live``: ``no_checkpoint``, ``tail_unanchored`` (lines after the
    last checkpoint: a crash, or lines appended or edited since, or a dropped tail together
    with the closing checkpoint) and ``tail_unsealed`` (the log ends at an ``interval`` or
    ``rotate`` checkpoint: the lines after it and the closing checkpoint may have been
    removed). Files deleted by rotation are not a refusal: ``rotated_away`` counts them.
    """
    if not keys:
        raise ValueError("verify_checkpoints needs at least one key")
    walk = _Walk(keys, live)
    for path in paths:
        walk.file, walk.file_line, walk.file_first_prev = path, 0, None
        try:
            with path.open("rb") as f:
                for raw in f:
                    found = _step(walk, raw.rstrip(b"\n"))
                    if found is not None:
                        return walk.report(*found, line=walk.file_line)
        except OSError as exc:
            return walk.report("unreadable", f"{path}: cannot read: {exc.strerror or exc}")
    return _tail(walk)


def _step(walk: _Walk, line: bytes) -> tuple[str, str] | None:
    walk.read += 1
    walk.file_line += 1
    doc: object = None
    if walk.file_line == 1 or b'"checkpoint"' in line:
        try:
            doc = json_input.loads(line, max_depth=None)
        except ValueError:
            doc = None
        if walk.file_line == 1 and isinstance(doc, dict):
            prev = doc.get("prev_sha256")
            walk.file_first_prev = prev if isinstance(prev, str) else None
    if not is_checkpoint(doc):
        walk.since += 1
        if walk.position is not None:
            walk.position += 1
        return None
    assert isinstance(doc, dict)
    where = f"{walk.file} line {walk.file_line}"
    try:
        parsed = parse_checkpoint(doc)
        check_signature(parsed, walk.keys)
    except CheckpointError as err:
        return err.code, f"{where}: checkpoint: {err.message}"
    if walk.position is not None:
        walk.position += 1
    cp = parsed.checkpoint
    problem = walk.check(cp) or walk.head_check(parsed)
    if problem is not None:
        return problem[0], f"{where}: checkpoint: {problem[1]}"
    if walk.position is None:  # the first checkpoint fixes every position read so far
        walk.position = cp.lines + 1
        walk.first_position = walk.position - (walk.read - 1)
    walk.checkpoints += 1
    walk.since = 0
    walk.last = cp
    assert walk.file is not None
    walk.last_at = (walk.file, walk.file_line)
    return None


def _tail(walk: _Walk) -> CheckpointReport:
    ok = walk.report()
    if walk.live:
        return ok
    if walk.last is None:
        if walk.read == 0:
            return ok
        return walk.report(
            "no_checkpoint",
            f"{walk.file}: no checkpoint in {walk.read} lines: nothing is signed (a log "
            "written without checkpoints, or the writer is still running: --live)",
        )
    assert walk.last_at is not None
    path, line = walk.last_at
    if walk.since:
        return walk.report(
            "tail_unanchored",
            f"{walk.since} lines after the last checkpoint ({path} line {line}) are unanchored: "
            "no signature covers them, and no closing checkpoint follows them (the writer "
            "crashed or is still running: --live; or lines after them were removed, or they "
            "were added or changed)",
        )
    if walk.last.reason not in SEALING:
        return walk.report(
            "tail_unsealed",
            f"the log ends at the {walk.last.reason} checkpoint on {path} line {line} "
            f"(written {walk.last.time}), with no closing checkpoint: lines after it may have "
            "been removed (dropped tail), or the writer is still running (--live)",
        )
    return ok
