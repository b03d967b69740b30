"""Import a CA from before the database: ``ca.json`` and ``bootstrap-used.json``.

``ztagent ca migrate --from-json DIR [--db DSN]`` reads what a file CA knew — trust domain,
CRL number, every issued certificate, every revocation, every used bootstrap token — and
writes it into the CA database in one transaction, so no revocation and no used token is
lost. The files are then renamed ``*.migrated`` (kept, never read again). A CA directory
whose SQLite database does not exist yet is migrated the same way on first use
(``open_ca_database``), so an upgrade needs no manual step on the default engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ztagent import json_input
from ztagent.ca.db import IssuedEntry, RevokedEntry, open_database
from ztagent.ca.store import CaLayout
from ztagent.pki.errors import CaError
from ztagent.timefmt import parse_rfc3339

log = logging.getLogger("ztagent.ca")

LEGACY_VERSION = 1
REPLAY_FILE = "bootstrap-used.json"


@dataclass(frozen=True)
class MigrationReport:
    location: str
    issued: int
    revoked: int
    tokens: int
    crl_number: int


def _read_json(path: Path) -> Any:
    try:
        return json_input.loads(path.read_bytes(), max_depth=None)
    except OSError as exc:
        raise CaError("ca_state_invalid", f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CaError("ca_state_invalid", f"{path} is not JSON: {exc}") from None


def _legacy_state(
    path: Path,
) -> tuple[str, int, list[IssuedEntry], list[RevokedEntry]]:
    doc = _read_json(path)
    try:
        if doc.get("version") != LEGACY_VERSION:
            raise ValueError(f"version {doc.get('version')!r} (expected {LEGACY_VERSION})")
        issued = [
            IssuedEntry(
                int(i["serial"], 16), str(i["kind"]), i.get("device_id"),
                parse_rfc3339(i["not_after"]), i.get("ak_name"),
            )
            for i in doc["issued"]
        ]  # fmt: skip
        revoked = [
            RevokedEntry(int(r["serial"], 16), parse_rfc3339(r["revoked_at"]))
            for r in doc["revoked"]
        ]
        return str(doc["trust_domain"]), int(doc["crl_number"]), issued, revoked
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CaError("ca_state_invalid", f"{path}: cannot read CA state: {exc}") from None


def _legacy_tokens(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    doc = _read_json(path)
    used = doc.get("used") if isinstance(doc, dict) else None
    if not isinstance(used, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in used.items()
    ):
        raise CaError("ca_state_invalid", f"{path}: 'used' is not an object of jti -> exp")
    return dict(used)


def migrate_from_json(ca_dir: Path, *, db: str | None = None) -> MigrationReport:
    """Import ``ca_dir``'s ``ca.json`` (and ``bootstrap-used.json``) into the CA database
    ``db`` (default ``ca_dir/ca.db``); refused (``ca_exists``) when it already holds a CA."""
    layout = CaLayout(ca_dir)
    if not layout.legacy_state.exists():
        raise CaError("ca_missing", f"no {layout.legacy_state.name} in {ca_dir} to import")
    td, crl_number, issued, revoked = _legacy_state(layout.legacy_state)
    known = {e.serial for e in issued}
    lost = [r for r in revoked if r.serial not in known]
    # a revocation of a serial ca.json no longer lists is kept: as an issued entry of its own
    issued += [IssuedEntry(r.serial, "device", None, r.revoked_at) for r in lost]
    tokens = _legacy_tokens(ca_dir / REPLAY_FILE)
    store = open_database(ca_dir, db)
    try:
        store.import_state(td, crl_number, issued, revoked, tokens, datetime.now(UTC))
        location = store.location
    finally:
        store.close()
    for path in (layout.legacy_state, ca_dir / REPLAY_FILE):
        if path.exists():
            path.rename(path.with_name(path.name + ".migrated"))
    log.warning(
        "imported %s into %s: %d certificates, %d revocations, %d used tokens",
        layout.legacy_state, location, len(issued), len(revoked), len(tokens),
    )  # fmt: skip
    return MigrationReport(location, len(issued), len(revoked), len(tokens), crl_number)
