"""How ztagent's processes write their log: text (the default) or one JSON object per line.

``json`` is for log pipelines (Loki, Elasticsearch, journald): every record becomes one line::

    {"time": "2026-12-01T21:13:54.120Z", "level": "WARNING", "logger": "ztagent.crl",
     "message": "CRL fetch from ca://... failing: ...", "code": "crl_fetch_failed"}

with ``time`` (RFC 3339 UTC, milliseconds, from ``ztagent.timefmt``), ``level``, ``logger``,
``message``, then the structured fields the record carries (``extra={"code": ...,
"device_id": ..., "decision_id": ...}``; ``code`` also from a ``ZtagentError`` among the
message's arguments) and, when the record has one, ``exception`` (the traceback as text).
Fields whose name looks like a credential (authorization, token, password, secret, pin,
cookie, api key, private key) are written as ``"[redacted]"``, and a ``Bearer ...`` value
inside a message is cut to ``Bearer [redacted]``.

gRPC's C core writes its own lines (``E1201 ... add_port.cc:83] ...``) straight to stderr;
Python cannot reroute them. ``quiet_native_logs`` sets ``GRPC_VERBOSITY=ERROR`` unless the
operator set ``GRPC_VERBOSITY``, so only its errors appear there, unformatted. The TPM
library (tpm2-tss) does the same for every structure it fails to unmarshal — and the sidecar
unmarshals what devices send (``ERROR:marshal:src/tss2-mu/...``), so any device could write
such lines at will; ``TSS2_LOG=all+NONE`` silences it unless the operator set ``TSS2_LOG``
(ztagent reports each failure itself, with its code).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

from ztagent.errors import ZtagentError
from ztagent.timefmt import rfc3339

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"

_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
"""What every LogRecord has; anything else on a record came in through ``extra=``."""

_CREDENTIAL_WORDS = (
    "authorization",
    "token",
    "password",
    "passwd",
    "passphrase",
    "secret",
    "cookie",
    "apikey",
    "api_key",
    "credential",
    "private_key",
    "privatekey",
)
_CREDENTIAL_PARTS = frozenset({"pin", "auth", "jwt", "bearer"})
"""Whole parts of a name (split at ``_``, ``-``, ``.``): ``pin`` but not ``ping``."""
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")


def is_credential_name(name: str) -> bool:
    """True for field names such as ``authorization``, ``bootstrap_token``, ``pin``,
    ``user-password`` or ``signing_key``."""
    lowered = name.lower()
    if any(word in lowered for word in _CREDENTIAL_WORDS):
        return True
    return any(part in _CREDENTIAL_PARTS for part in re.split(r"[_\-.\s]+", lowered))


def scrub(value: Any) -> Any:
    """``value`` with every credential-named entry of every nested mapping redacted, as
    something ``json.dumps`` can write (unknown objects become their ``str``)."""
    if isinstance(value, dict):
        return {
            str(k): REDACTED if is_credential_name(str(k)) else scrub(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _BEARER.sub(r"\1 " + REDACTED, value)
    return _BEARER.sub(r"\1 " + REDACTED, str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": rfc3339(datetime.fromtimestamp(record.created, UTC), digits=3),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for arg in record.args if isinstance(record.args, tuple) else ():
            if isinstance(arg, ZtagentError):  # log.info("refused %s: %s", method, err)
                doc["code"] = arg.code
                break
        for key, value in vars(record).items():
            if key in _RECORD_ATTRIBUTES or key in doc or key.startswith("_"):
                continue
            doc[key] = REDACTED if is_credential_name(key) else scrub(value)
        if record.exc_info:
            doc["exception"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            doc["exception"] = scrub(record.exc_text)
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def configure_logging(
    level: str,
    log_format: str,
    stream: TextIO | None = None,
    *,
    root: logging.Logger | None = None,
) -> None:
    """The root logger writes to ``stream`` (stderr) at ``level`` in ``log_format``
    (``text`` or ``json``; ``root``: another logger, for tests). Called again, it replaces
    its own handler (a config file read later may choose the format). Like
    ``logging.basicConfig``, it leaves a root logger that someone else configured (a test
    runner, an embedding program) alone."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}, expected one of {', '.join(LOG_FORMATS)}")
    root = root if root is not None else logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, _MARK, False)]
    if len(ours) != len(root.handlers):
        return
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _MARK, True)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    for old in ours:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


_MARK = "_ztagent_handler"


def logs_json(root: logging.Logger | None = None) -> bool:
    """Whether ``configure_logging`` set the root logger to JSON lines."""
    root = root if root is not None else logging.getLogger()
    return any(
        getattr(h, _MARK, False) and isinstance(h.formatter, JsonFormatter) for h in root.handlers
    )


def quiet_native_logs(environ: MutableMapping[str, str]) -> None:
    """gRPC's C core and tpm2-tss log to stderr by themselves, unformatted: gRPC's kept to
    its errors (``GRPC_VERBOSITY=ERROR``), tpm2-tss's off (``TSS2_LOG=all+NONE``; its lines
    repeat what the raised error says, and a device's malformed quote would write them),
    unless the operator set the variable. Call it before either library starts (each reads
    its variable once)."""
    environ.setdefault("GRPC_VERBOSITY", "ERROR")
    environ.setdefault("TSS2_LOG", "all+NONE")
