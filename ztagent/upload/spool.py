"""The escalation outbox as a spool: what is pending, oldest first, and the bounded-spool rule.

The inference workload writes escalations into each calling device's storage namespace under
``outbox/<model>/<YYYYmmddTHHMMSS.ffffffZ>-<random>`` (``ztagent.workloads.inference.outbox``).
The outbox itself is the spool: nothing is copied. ``OutboxSpool`` reads it straight from the
storage workload's store on the same node (SQLite allows a second process), keeps an index of
what is pending (namespace, key, size, time), ordered oldest first across devices and models
by the timestamp in the key, and deletes a record only when told to (after the broker's
acknowledgement).

**Bounded.** When more than ``max_records`` records or ``max_bytes`` bytes (the stored values)
are pending, the oldest are deleted until both limits hold again, and each device's dropped
records become one *gap*: ``{"dropped": N, "from": key, "to": key}``, the oldest and newest
key dropped. Gaps are kept in ``<state_dir>/mqtt-gaps.json`` (written before the records are
deleted, so a crash in between cannot lose the notice; a record still present at or before a
pending gap's ``to`` is then not counted twice) until the gap itself has been delivered.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ztagent.files import KEY_MODE, write_atomic
from ztagent.workloads.inference.outbox import OUTBOX_PREFIX
from ztagent.workloads.storage.errors import RecordNotFoundError, StorageIntegrityError
from ztagent.workloads.storage.store import Store, encode_page_token

log = logging.getLogger(__name__)

GAP_FILE = "mqtt-gaps.json"
SCAN_PAGE = 500
_STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def key_stamp(key: str) -> str:
    """The timestamp part of an outbox key (``""`` for a key not in the outbox's shape)."""
    last = key.rpartition("/")[2]
    stamp = last.partition("-")[0]
    return stamp if len(stamp) == 23 and stamp.endswith("Z") else ""


def stamp_time(stamp: str) -> datetime | None:
    try:
        return datetime.strptime(stamp, _STAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


@dataclass(frozen=True, order=True)
class Entry:
    """One pending record. Ordered by (timestamp, namespace, key): oldest first."""

    stamp: str
    namespace: str
    key: str
    size: int

    @property
    def record_id(self) -> str:
        """Stable across re-sends: ``<namespace>/<key>`` (device ids hold no ``/``)."""
        return f"{self.namespace}/{self.key}"


@dataclass(frozen=True)
class Gap:
    """Records of one namespace dropped at the spool limit before they could be shipped."""

    namespace: str
    dropped: int
    first: str
    """The oldest key dropped."""
    last: str
    """The newest key dropped."""

    @property
    def gap_id(self) -> str:
        return f"{self.namespace}/gap/{self.first}/{self.last}"

    def as_payload(self) -> dict[str, Any]:
        return {
            "gap": {"dropped": self.dropped, "from": self.first, "to": self.last},
            "id": self.gap_id,
            "namespace": self.namespace,
        }


class OutboxSpool:
    """The pending outbox records of every device in ``store`` and the gaps not yet shipped."""

    def __init__(
        self,
        store: Store,
        state_dir: Path,
        *,
        max_records: int,
        max_bytes: int,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._gap_file = state_dir / GAP_FILE
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: list[Entry] = []
        self._known_revision: int | None = None
        self.unreadable: set[tuple[str, str]] = set()
        """(namespace, key) of records that failed the store's integrity check: never
        shipped, never deleted (the storage workload refuses them with DATA_LOSS too)."""
        self.gaps: dict[str, Gap] = self._load_gaps()

    # --- the index -----------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-reads the outbox if anything but our own deletes changed the store."""
        revision = self._store.revision()
        if revision == self._known_revision:
            return
        entries: list[Entry] = []
        self.unreadable = set()
        for namespace in self._store.namespaces(OUTBOX_PREFIX):
            entries.extend(self._read_namespace(namespace))
        entries.sort()
        self._entries = entries
        self._known_revision = revision

    def _read_namespace(self, namespace: str) -> list[Entry]:
        """Every readable outbox record of ``namespace``. A row that fails its integrity
        check (the store logs it) is left in place, listed in ``unreadable`` and skipped."""
        entries: list[Entry] = []
        after: str | None = None
        while True:
            try:
                page = self._store.scan(namespace, OUTBOX_PREFIX, after, SCAN_PAGE)
            except StorageIntegrityError:
                return entries + self._read_one_by_one(namespace, after)
            entries.extend(
                Entry(key_stamp(r.key), namespace, r.key, len(r.value)) for r in page.records
            )
            if page.last_key is None:
                return entries
            after = page.last_key

    def _read_one_by_one(self, namespace: str, after: str | None) -> list[Entry]:
        entries: list[Entry] = []
        token = encode_page_token(after) if after is not None else ""
        while True:
            page = self._store.list_keys(namespace, OUTBOX_PREFIX, SCAN_PAGE, token)
            for key in page.keys:
                try:
                    value = self._store.get(namespace, key).value
                except (StorageIntegrityError, RecordNotFoundError):
                    self.unreadable.add((namespace, key))
                    continue
                entries.append(Entry(key_stamp(key), namespace, key, len(value)))
            if not page.next_page_token:
                return entries
            token = page.next_page_token

    @property
    def entries(self) -> list[Entry]:
        return list(self._entries)

    def pending(self) -> tuple[int, int]:
        """(records, bytes) pending."""
        return len(self._entries), sum(e.size for e in self._entries)

    def oldest_age_s(self) -> float:
        """Seconds since the oldest pending record was written (0 when none)."""
        for entry in self._entries:
            when = stamp_time(entry.stamp)
            if when is not None:
                return max(0.0, (self._clock() - when).total_seconds())
        return 0.0

    def value(self, entry: Entry) -> bytes | None:
        """The stored value; None when the record is gone (deleted by someone else) or no
        longer passes the integrity check."""
        try:
            return self._store.get(entry.namespace, entry.key).value
        except RecordNotFoundError:
            self._forget(entry)
            return None
        except StorageIntegrityError:
            self.unreadable.add((entry.namespace, entry.key))
            self._forget(entry)
            return None

    def delete(self, entry: Entry) -> None:
        """Removes a delivered record from the outbox (and the index)."""
        revision = self._store.delete(entry.namespace, entry.key)
        self._forget(entry)
        if revision is not None and self._known_revision is not None:
            # our delete was the only change since the index was read: it stays exact
            self._known_revision = revision if revision == self._known_revision + 1 else None

    def _forget(self, entry: Entry) -> None:
        with contextlib.suppress(ValueError):
            self._entries.remove(entry)

    # --- the limit -----------------------------------------------------------------------

    def enforce_limit(self) -> int:
        """Drops the oldest records while the spool is over a limit; returns how many were
        dropped now (records already counted in a pending gap are removed, not recounted)."""
        count, size = self.pending()
        victims: list[Entry] = []
        for entry in self._entries:
            if count <= self.max_records and size <= self.max_bytes:
                break
            victims.append(entry)
            count -= 1
            size -= entry.size
        if not victims:
            return 0
        gaps = dict(self.gaps)
        counted = 0
        for entry in victims:
            gap = gaps.get(entry.namespace)
            if gap is not None and self._counted(gap, entry):
                continue
            counted += 1
            if gap is None:
                gaps[entry.namespace] = Gap(entry.namespace, 1, entry.key, entry.key)
            else:
                gaps[entry.namespace] = Gap(entry.namespace, gap.dropped + 1, gap.first, entry.key)
        self._save_gaps(gaps)  # before the deletes: a crash in between keeps the notice
        for entry in victims:
            self._store.delete(entry.namespace, entry.key)
            self._forget(entry)
        self._known_revision = None
        log.warning(
            "outbox spool over its limit (%d records / %d bytes allowed): dropped the %d "
            "oldest, %s to %s; the gap is shipped first when the broker is back",
            self.max_records,
            self.max_bytes,
            len(victims),
            victims[0].record_id,
            victims[-1].record_id,
        )
        return counted

    @staticmethod
    def _counted(gap: Gap, entry: Entry) -> bool:
        last = Entry(key_stamp(gap.last), gap.namespace, gap.last, 0)
        return (entry.stamp, entry.key) <= (last.stamp, last.key)

    # --- gaps ----------------------------------------------------------------------------

    def gap_delivered(self, gap: Gap) -> None:
        gaps = dict(self.gaps)
        if gaps.get(gap.namespace) == gap:
            del gaps[gap.namespace]
        self._save_gaps(gaps)

    def _load_gaps(self) -> dict[str, Gap]:
        try:
            doc = json.loads(self._gap_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): pending gap notices are lost", self._gap_file, exc)
            return {}
        gaps = {}
        for ns, raw in (doc.get("gaps") or {}).items() if isinstance(doc, dict) else ():
            try:
                gaps[ns] = Gap(ns, int(raw["dropped"]), str(raw["from"]), str(raw["to"]))
            except (KeyError, TypeError, ValueError):
                log.warning("%s: unreadable gap for %r skipped", self._gap_file, ns)
        return gaps

    def _save_gaps(self, gaps: dict[str, Gap]) -> None:
        if gaps == self.gaps and self._gap_file.exists() == bool(gaps):
            return
        if gaps:
            doc = {
                "version": 1,
                "gaps": {
                    ns: {"dropped": g.dropped, "from": g.first, "to": g.last}
                    for ns, g in sorted(gaps.items())
                },
            }
            write_atomic(self._gap_file, json.dumps(doc, indent=1).encode(), KEY_MODE)
        else:
            self._gap_file.unlink(missing_ok=True)
        self.gaps = gaps
