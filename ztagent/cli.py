"""The ``ztagent`` command: a thin layer that parses flags and calls library functions.

Exit codes: 0 ok, 1 rejected / denied / failed check, 2 usage or configuration error.
Only ``ZtagentError`` is caught here; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ztagent import __version__, json_input
from ztagent.errors import EXIT_OK, EXIT_REJECTED, ConfigError, ZtagentError, exit_code_for

Handler = Callable[[argparse.Namespace], int]
JSON_HELP = "print the result as JSON"


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _log_format(args: argparse.Namespace, configured: str = "text") -> None:
    """A long-running command's log format: ``--log-format``, else ``[logging] format`` of
    its config file, else text."""
    from ztagent.logs import configure_logging

    configure_logging(args.log_level, getattr(args, "log_format", None) or configured)


def _log_format_argument(p: argparse.ArgumentParser, *, config: bool = False) -> None:
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines on stderr: text, or json (one object per line: time, level, logger, "
        "message and the record's fields)"
        + ("; default: [logging] format of --config, else text" if config else "; default: text"),
    )


LINKED_DISTRIBUTIONS = (
    ("grpcio", "grpcio"),
    ("regorus", "gordon-to-regorus"),
    ("cryptography", "cryptography"),
    ("psycopg", "psycopg"),
    ("paho-mqtt", "paho-mqtt"),
)
"""What ``--version`` reports besides ztagent (as ``opa version`` does): (name, distribution);
psycopg and paho-mqtt only when installed."""


def version_text() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    lines = [
        f"ztagent {__version__}",
        f"Python: {platform.python_version()} ({platform.python_implementation()})",
        f"Platform: {sys.platform}/{platform.machine()}",
    ]
    for name, distribution in LINKED_DISTRIBUTIONS:
        try:
            found = version(distribution)
        except PackageNotFoundError:
            if name in ("psycopg", "paho-mqtt"):
                continue
            found = "not installed"
        label = name if name == distribution else f"{name} ({distribution})"
        lines.append(f"{label}: {found}")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None,
    False, an empty list) or the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def _with_help_formatter(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_help_formatter(sub)


class _VersionAction(argparse.Action):
    """``--version``: versions are looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", 0)
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_text())
        parser.exit()


# -- ca ---------------------------------------------------------------------------------------


def cmd_ca_init(args: argparse.Namespace) -> int:
    from ztagent.ca.ca_keys import keystore_path
    from ztagent.dev.pki import init_dev_pki

    made = init_dev_pki(
        args.dir,
        args.trust_domain,
        force=args.force,
        db=args.db,
        key_store=args.key_store,
        pin_file=args.pin_file,
    )
    print(f"dev PKI created in {args.dir} (trust domain {args.trust_domain})")
    on_token = args.key_store != "file"
    for name, path in sorted(vars(made.layout).items()):
        if on_token and name == "issuing_key":
            store_file = keystore_path(made.layout.dir)
            print(f"  {name:<18} on the token: {args.key_store} (recorded in {store_file})")
        else:
            print(f"  {name:<18} {path}")
    issuer = made.issuer
    print(f"  {'token_issuer':<18} {issuer.jwks_path} (DEVELOPMENT ONLY: {issuer.issuer})")
    print(
        f"  {'firmware_vendor':<18} {made.firmware_vendor_key} "
        "(DEVELOPMENT ONLY firmware signing key)"
    )
    print(
        f"  {'tpm_manufacturer':<18} {made.tpm_manufacturer_cert} "
        "(DEVELOPMENT ONLY EK certificate CA for swtpm)"
    )
    print(
        f"  {'model_publisher':<18} {made.model_publisher_key} (DEVELOPMENT ONLY model signing key)"
    )
    return EXIT_OK


def cmd_ca_issue(args: argparse.Namespace) -> int:
    from ztagent.ca import builders
    from ztagent.ca import store as ca_store

    cert = ca_store.issue_device_cert(
        args.dir, args.device_id, args.out, days=args.days, db=args.db
    )
    from ztagent.timefmt import rfc3339

    until = rfc3339(cert.not_valid_after_utc)
    print(
        f"issued {args.out} for device {args.device_id} "
        f"(serial {builders.serial_hex(cert.serial_number)}, valid until {until})"
    )
    return EXIT_OK


def _db_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        metavar="DSN",
        help="the CA's state: postgresql://user@host/db (several `ca serve` replicas share "
        "it), or a SQLite file; default <dir>/ca.db",
    )


def _device_id(text: str) -> str:
    """``--device-id``: parsed into a ``DeviceId`` once, here at the edge."""
    from ztagent.pki.spiffe import DeviceId

    try:
        return DeviceId(text)
    except ZtagentError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def _trust_domain(text: str) -> str:
    from ztagent.pki.spiffe import TrustDomain

    try:
        return TrustDomain(text)
    except ZtagentError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def _parse_serial(text: str) -> int:
    from ztagent.ca.builders import parse_serial

    try:
        return parse_serial(text)
    except ZtagentError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def cmd_ca_revoke(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from ztagent.ca import builders
    from ztagent.ca import store as ca_store
    from ztagent.ca.audit import audit_revocation

    if not 1 <= args.crl_validity <= 365:
        raise ConfigError("--crl-validity", f"{args.crl_validity} days (expected 1 to 365)")
    serial = ca_store.revoke(
        args.dir,
        serial=args.serial,
        cert_path=args.cert,
        crl_validity=timedelta(days=args.crl_validity),
        db=args.db,
    )
    audit_revocation(args.dir, serial, db=args.db)
    print(f"revoked serial {builders.serial_hex(serial)}; CRL rewritten at {args.dir / 'crl.pem'}")
    return EXIT_OK


def cmd_ca_token(args: argparse.Namespace) -> int:
    from ztagent.ca.bootstrap import issue_bootstrap_token

    print(issue_bootstrap_token(args.dir, args.device_id, ttl_s=args.ttl, db=args.db))
    return EXIT_OK


def cmd_ca_serve(args: argparse.Namespace) -> int:
    from ztagent.ca.service import run_ca_server

    _log_format(args)
    asyncio.run(
        run_ca_server(
            args.dir,
            crl_http=args.crl_http,
            listen=args.listen,
            renew_listen=args.renew_listen,
            lifetime_days=args.lifetime_days,
            ek_ca_bundle=args.ek_ca_bundle,
            crl_validity_days=args.crl_validity,
            db=args.db,
        )
    )
    return EXIT_OK


def cmd_ca_migrate(args: argparse.Namespace) -> int:
    from ztagent.ca.migrate import migrate_from_json

    report = migrate_from_json(args.from_json, db=args.db)
    print(
        f"imported {args.from_json}: {report.issued} certificates, {report.revoked} revocations, "
        f"{report.tokens} used bootstrap tokens, CRL number {report.crl_number} -> "
        f"{report.location}"
    )
    return EXIT_OK


def cmd_enroll(args: argparse.Namespace) -> int:
    from ztagent.device.enroll import enroll
    from ztagent.device.keystores import resolve_pin
    from ztagent.timefmt import rfc3339

    token = sys.stdin.read().strip() if args.token == "-" else args.token  # noqa: S105
    pin = resolve_pin(args.pin_file) if args.key_store.startswith("pkcs11:") else None
    tpm = None
    if args.tpm:
        from ztagent.device.tpm import DeviceTpm

        tpm = DeviceTpm(args.tpm)
    result = asyncio.run(
        enroll(
            args.server,
            token,
            args.ca_bundle,
            args.out,
            args.key_store,
            pin=pin,
            force=args.force,
            renew_server=args.renew_server,
            tpm=tpm,
        )
    )
    verb = "re-enrolled (expired certificate recovered)" if result.recovered else "enrolled"
    print(
        f"{verb} device {result.device_id} ({result.spiffe_id}): serial {result.serial}, "
        f"valid until {rfc3339(result.not_after)}, key in {result.key_store}"
    )
    print(f"  files in {result.dir}: device.pem, ca-bundle.pem, keystore.json, enrollment.json")
    if tpm is not None:
        print("  TPM attestation key bound into the certificate (ztagent attest needs no binding)")
    return EXIT_OK


def cmd_renew(args: argparse.Namespace) -> int:
    from ztagent.device.enroll import renew, renew_watch
    from ztagent.device.keystores import resolve_pin
    from ztagent.timefmt import rfc3339

    pin = resolve_pin(args.pin_file)
    rotate = not args.keep_key
    if args.watch:
        _log_format(args)
        results = asyncio.run(renew_watch(args.dir, pin=pin, rotate_key=rotate, server=args.server))
        print(f"renew --watch ended after {len(results)} renewal(s)")
        return EXIT_OK
    result = asyncio.run(renew(args.dir, pin=pin, rotate_key=rotate, server=args.server))
    print(
        f"renewed device {result.device_id}: serial {result.previous_serial} -> {result.serial}, "
        f"valid until {rfc3339(result.not_after)}" + (", new key" if result.key_rotated else "")
    )
    return EXIT_OK


# -- serve / verify ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from ztagent.config import load_config
    from ztagent.sidecar.server import WorkerSlot, run_sidecar

    config = load_config(args.config, listen_address=args.listen)
    _log_format(args, config.logging.format)
    if args.worker_index is not None:  # one worker of a supervisor
        from ztagent.sidecar.workers import die_with_supervisor

        die_with_supervisor()
        worker = WorkerSlot(args.worker_index, args.worker_count or config.listen.workers)
        asyncio.run(run_sidecar(config, worker=worker, ready_fd=args.ready_fd))
        return EXIT_OK
    if config.listen.workers > 1:
        from ztagent.sidecar.workers import supervise

        return supervise(
            args.config,
            config,
            log_level=args.log_level,
            log_format=getattr(args, "log_format", None),
        )
    asyncio.run(run_sidecar(config))
    return EXIT_OK


def cmd_cert_verify(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from ztagent.config import check_files, load_config
    from ztagent.pki.errors import CertError
    from ztagent.pki.trust_files import TrustFiles
    from ztagent.pki.verify import explain

    config = load_config(args.config)
    check_files(config)
    trust = TrustFiles(config.tls.client_ca, config.tls.crl).load()
    try:
        cert_bytes = args.cert.read_bytes()
        chain = args.chain.read_bytes() if args.chain else None
    except OSError as exc:
        raise ConfigError(str(exc.filename), f"cannot read: {exc.strerror}") from exc
    try:
        device = explain(cert_bytes, chain, trust, config.identity.policy, datetime.now(UTC))
    except CertError as err:
        if args.json:
            _print_json({"accepted": False, "error": err.as_dict()})
        else:
            print(f"REJECTED {args.cert}: {err.code}: {err.message}")
        return EXIT_REJECTED
    if args.json:
        _print_json({"accepted": True, "device": device.as_input()})
    else:
        print(f"ACCEPTED {args.cert}: device {device.device_id} ({device.spiffe_id})")
        for key, value in device.as_input().items():
            print(f"  {key:<20} {value}")
    return EXIT_OK


# -- tokens ------------------------------------------------------------------------------------


def _parse_duration(text: str) -> int:
    """'900', '90s', '15m', '2h', '1d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = int(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 900, 15m or 2h, got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return value


def cmd_token_mint(args: argparse.Namespace) -> int:
    from ztagent.dev.issuer import mint_token

    print(
        mint_token(
            args.dir,
            sub=args.sub,
            scope=args.scope,
            roles=args.roles,
            ttl_s=args.ttl,
            bind_cert=args.bind_cert,
            audience=args.audience,
        )
    )
    return EXIT_OK


def cmd_token_verify(args: argparse.Namespace) -> int:
    from ztagent.config import load_config
    from ztagent.sidecar.token_setup import verifier_from_config
    from ztagent.tokens.errors import TokenError
    from ztagent.tokens.verify import cert_thumbprint

    config = load_config(args.config)
    if config.tokens is None:
        raise ConfigError("tokens", f"{args.config} has no [tokens] section")
    thumbprint = None
    if args.cert is not None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        try:
            cert = x509.load_pem_x509_certificate(args.cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(str(args.cert), f"cannot read a PEM certificate: {exc}") from exc
        thumbprint = cert_thumbprint(cert.public_bytes(Encoding.DER))
    token = sys.stdin.read().strip() if args.token == "-" else args.token  # noqa: S105
    verifier = verifier_from_config(config.tokens)
    try:
        user = asyncio.run(verifier.verify(token, thumbprint))
    except TokenError as err:
        if args.json:
            _print_json({"accepted": False, "error": err.as_dict()})
        else:
            print(f"REJECTED: {err.code}: {err.message}")
        return EXIT_REJECTED
    doc = user.as_input()
    if args.json:
        _print_json({"accepted": True, "user": doc})
    else:
        print(f"ACCEPTED: sub {doc['sub']!r} from {doc['iss']}")
        for key in ("aud", "scope", "roles", "cert_bound"):
            print(f"  {key:<11} {doc[key]}")
    return EXIT_OK


# -- policy ------------------------------------------------------------------------------------


def _verification_keys(args: argparse.Namespace) -> Any:
    """Bundle verification keys from ``--config`` ([policy.keys]) and/or
    ``--verification-key`` (OPA's flag names); None when neither is given."""
    from ztagent.policy.bundle_sign import BundleKeyError, VerificationKey
    from ztagent.policy.sources import load_bundle_keys

    keys: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        from ztagent.config import load_config

        keys.update(load_bundle_keys(load_config(args.config).policy.keys))
    if getattr(args, "verification_key", None) is not None:
        key_id = args.verification_key_id
        try:
            keys[key_id] = VerificationKey.from_pem(
                key_id, args.verification_key.read_bytes(), args.verification_alg
            )
        except BundleKeyError as exc:
            raise ConfigError(str(args.verification_key), str(exc)) from None
    return keys or None


def _signature_line(path: Path, keys: Any) -> tuple[str, dict[str, Any]]:
    from ztagent.policy.authoring import signature_status

    status = signature_status(path, keys=keys)
    return f"signature: {status}", {
        "status": status.status,
        "key_id": status.key_id,
        "error": status.error,
        "dry_run": status.dry_run,
    }


def cmd_policy_test(args: argparse.Namespace) -> int:
    from ztagent.policy.authoring import run_tests

    keys = _verification_keys(args)
    report = run_tests(args.dir, coverage=args.coverage, keys=keys)
    signature_text, signature = _signature_line(args.dir, keys)
    if args.json:
        _print_json(
            {
                "ok": report.ok,
                "signature": signature,
                "results": [vars(r) for r in report.results],
                "coverage": None
                if report.coverage is None
                else {f.file: f.percent for f in report.coverage.files},
            }
        )
        return EXIT_OK if report.ok else EXIT_REJECTED
    for r in report.results:
        package = r.package if r.package.startswith("data.") else f"data.{r.package}"
        line = f"{r.status:<5} {package}.{r.name} ({r.file})"
        print(line + (f": {r.message}" if r.message else ""))
    passed, failed, errors = report.count("PASS"), report.count("FAIL"), report.count("ERROR")
    print(signature_text)
    print(f"{passed} passed, {failed} failed, {errors} errors")
    if report.coverage is not None:
        for f in report.coverage.files:
            missing = ", ".join(str(n) for n in f.not_covered) or "-"
            print(f"coverage {f.percent:5.1f}% {f.file} (not covered: {missing})")
        print(f"coverage {report.coverage.percent:5.1f}% total")
    return EXIT_OK if report.ok else EXIT_REJECTED


def cmd_policy_check(args: argparse.Namespace) -> int:
    from ztagent.policy.authoring import check

    keys = _verification_keys(args)
    problems = check(args.dir, keys=keys)
    signature_text, signature = _signature_line(args.dir, keys)
    if args.json:
        _print_json(
            {"ok": not problems, "problems": [vars(p) for p in problems], "signature": signature}
        )
    else:
        for problem in problems:
            print(problem)
        print(signature_text)
        print(f"{args.dir}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return EXIT_REJECTED if problems else EXIT_OK


def cmd_policy_build(args: argparse.Namespace) -> int:
    from ztagent.files import write_atomic
    from ztagent.policy.authoring import build_bundle
    from ztagent.policy.bundle_sign import BundleKeyError, load_signing_key

    signing_key = None
    if args.signing_key is not None:
        try:
            signing_key = load_signing_key(args.signing_key.read_bytes(), args.signing_alg)
        except BundleKeyError as exc:
            raise ConfigError(str(args.signing_key), str(exc)) from None
    built = build_bundle(
        args.dir,
        revision=args.revision,
        roots=args.roots,
        signing_key=signing_key,
        signing_alg=args.signing_alg,
        key_id=args.keyid or "",
        dry_run=args.shadow,
    )
    write_atomic(args.out, built.content, 0o644)
    signed = "unsigned"
    if built.signed_by:
        signed = f"signed by key {built.signed_by} ({args.signing_alg})"
    shadow = ", SHADOW (decisions logged, not enforced)" if args.shadow else ""
    if args.json:
        _print_json(
            {
                "out": str(args.out),
                "revision": built.revision,
                "files": list(built.files),
                "signed_by": built.signed_by,
                "dry_run": args.shadow,
                "bytes": len(built.content),
            }
        )
    else:
        print(f"{args.out}: revision {built.revision}, {len(built.files)} files, {signed}{shadow}")
    return EXIT_OK


def _read_json(path: Path) -> object:
    try:
        return json_input.loads(path.read_bytes(), max_depth=None)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from exc
    except ValueError as exc:  # also not UTF-8, nested too deep to parse
        raise ConfigError(str(path), str(exc)) from exc


def cmd_policy_eval(args: argparse.Namespace) -> int:
    from ztagent.policy.authoring import evaluate_input

    input_doc = _read_json(args.input)
    if not isinstance(input_doc, dict):
        raise ConfigError(str(args.input), "expected a JSON object (the policy input)")
    result = evaluate_input(args.policy, input_doc, explain=args.explain, data_path=args.data)
    decision = result.decision
    if args.json:
        _print_json(
            {
                "decision": None
                if decision is None
                else {
                    "allow": decision.allow,
                    "reasons": list(decision.reasons),
                    "headers": dict(decision.headers),
                },
                "error": result.error,
                "explanation": list(result.explanation),
                "prints": list(result.prints),
            }
        )
    else:
        if decision is None:
            print(f"NO DECISION: {result.error or 'undefined'}")
        else:
            verdict = "ALLOW" if decision.allow else "DENY"
            print(f"{verdict} reasons={list(decision.reasons)} headers={dict(decision.headers)}")
        for line in result.explanation:
            print(f"  {line}")
        for line in result.prints:
            print(f"  print: {line}")
    if decision is None:
        return EXIT_REJECTED
    return EXIT_OK if decision.allow else EXIT_REJECTED


def cmd_policy_replay(args: argparse.Namespace) -> int:
    from ztagent.policy.authoring import replay

    keys = _verification_keys(args)
    report = replay(args.log, args.policy, keys=keys)
    signature_text, signature = _signature_line(args.policy, keys)
    if args.json:
        _print_json(
            {
                "signature": signature,
                "total": report.total,
                "refused": report.refused,
                "truncated": report.truncated,
                "revision": report.revision,
                "changed": [vars(c) for c in report.changed],
                "errors": [vars(e) for e in report.errors],
            }
        )
    else:
        for c in report.changed:
            old = "allow" if c.old_allow else "deny"
            new = "allow" if c.new_allow else "deny"
            print(
                f"line {c.line_no} {c.decision_id}: {old} {list(c.old_reasons)} -> "
                f"{new} {list(c.new_reasons)}"
            )
        for e in report.errors:
            print(f"line {e.line_no}: error: {e.message}")
        print(signature_text)
        print(
            f"{report.total} decisions replayed against {args.policy} "
            f"(revision {report.revision}): {len(report.changed)} would change, "
            f"{len(report.errors)} errors, {report.refused} refused before the policy and "
            f"{report.truncated} with a truncated input (skipped)"
        )
    return EXIT_OK if not report.errors else EXIT_REJECTED


def cmd_log_verify(args: argparse.Namespace) -> int:
    from ztagent.policy.log_checkpoint import (
        CHECKPOINT_PREFIX,
        CheckpointKey,
        verify_checkpoints,
    )
    from ztagent.policy.log_verify import log_files, verify_files

    keys = []
    for key_file in args.key or []:
        try:
            keys.append(CheckpointKey.from_pem(key_file.read_bytes(), str(key_file)))
        except OSError as exc:
            raise ConfigError("--key", f"{key_file}: {exc.strerror or exc}") from None
    paths = [p for path in args.files for p in (log_files(path) if args.rotated else [path])]
    report = verify_files(paths)
    anchors = verify_checkpoints(paths, keys, live=args.live) if keys and report.ok else None
    if args.json:
        out: dict[str, object] = {"chain": vars(report)}
        if anchors is not None:
            out["checkpoints"] = vars(anchors)
        out["ok"] = report.ok and (anchors is None or anchors.ok)
        _print_json(out)
    elif not report.ok:
        print(f"BROKEN {report.code}: {report.reason}")
    elif anchors is None:
        print(f"OK: {report.lines} lines, hash chain intact ({', '.join(map(str, paths))})")
        if report.chain_continues_from:
            print(f"  chain continues from {report.chain_continues_from} (an earlier file)")
        marked = sum(_count_lines_with(p, CHECKPOINT_PREFIX) for p in paths)
        print(
            f"  checkpoints NOT verified ({marked} checkpoint lines): pass --key PUB "
            "(the signer's certificate or public key) to check signatures, positions and the tail"
        )
    elif not anchors.ok:
        print(f"BROKEN {anchors.code}: {anchors.reason}")
    else:
        print(
            f"OK: {report.lines} lines, hash chain intact, {anchors.checkpoints} checkpoints "
            f"verified ({', '.join(map(str, paths))})"
        )
        if anchors.rotated_away:
            print(
                f"  rotated away: the first {anchors.rotated_away} lines of the chain are in "
                f"files deleted by rotation; {paths[0]} continues from line "
                f"{anchors.rotated_away + 1} (prev {report.chain_continues_from})"
            )
        elif report.chain_continues_from:
            print(f"  chain continues from {report.chain_continues_from} (an earlier file)")
        last = anchors.last_checkpoint
        if anchors.sealed and last is not None:
            print(f"  sealed: ends with a {last.reason} checkpoint written {last.time}")
        elif last is not None and anchors.last_checkpoint_at is not None:
            at_path, at_line = anchors.last_checkpoint_at
            print(
                f"  live: {anchors.unanchored} lines after the last checkpoint ({at_path} line "
                f"{at_line}, {last.reason}, {last.time}) are unanchored (no signature covers "
                "them yet)"
            )
        elif anchors.lines:
            print(f"  live: no checkpoint yet, {anchors.unanchored} lines are unanchored")
    ok = report.ok and (anchors is None or anchors.ok)
    return EXIT_OK if ok else EXIT_REJECTED


def _count_lines_with(path: Path, prefix: bytes) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.startswith(prefix))
    except OSError:
        return 0


# -- posture ------------------------------------------------------------------------------------


def _print_attestation(outcome: object) -> None:
    from ztagent.timefmt import rfc3339_from_timestamp

    if isinstance(outcome, ZtagentError):
        print(f"FAILED {outcome.code}: {outcome.message}")
        return
    response: Any = outcome
    if response.verified:
        until = rfc3339_from_timestamp(response.posture_expires_at)
        print(f"VERIFIED attestation {response.attestation_id}; posture valid until {until}")
    else:
        for failure in response.failures:
            print(f"REFUSED {failure.code}: {failure.message}")


def _attestation_reporter(server: str) -> Callable[[object], None]:
    """``attest --every``: a verified round is printed; failed ones go through a
    ``FailureLog`` (one WARNING when they start, a summary every 5 minutes, one on recovery;
    no traceback), so a sidecar that stays down does not print a line per retry."""
    from ztagent.failure_log import FailureLog

    failing = FailureLog(logging.getLogger("ztagent.attest"), f"attestation at {server}")

    def report(outcome: object) -> None:
        response: Any = outcome
        if isinstance(outcome, ZtagentError):
            failing.failed(f"{outcome.code}: {outcome.message}")
        elif not response.verified:
            failing.failed("; ".join(f"{f.code}: {f.message}" for f in response.failures))
        else:
            failing.succeeded()
            _print_attestation(outcome)

    return report


def cmd_attest(args: argparse.Namespace) -> int:
    from ztagent.device.attest import (
        attest_loop,
        attest_once,
        load_evidence_inputs,
        open_sidecar_channel,
    )
    from ztagent.device.host_facts import collect_host_facts
    from ztagent.device.keystores import resolve_pin
    from ztagent.device.tpm import DeviceTpm

    cert = args.cert or args.dir / "device.pem"
    key = args.key or (cert.with_suffix(".key") if args.cert else None)
    ca_bundle = args.ca_bundle or args.dir / "ca-bundle.pem"
    inputs = load_evidence_inputs(
        args.dir,
        event_log=args.event_log,
        firmware=args.firmware,
        firmware_signature=args.firmware_sig,
    )
    tpm = DeviceTpm(args.tpm)
    pcrs = tuple(args.pcrs)
    pin = resolve_pin(args.pin_file)
    if args.every is not None:
        _log_format(args)

    def host_facts() -> dict[str, Any]:
        return collect_host_facts(args.require_process, args.forbid_process)

    async def run() -> int:
        async with open_sidecar_channel(
            args.server, cert, key, ca_bundle, args.dir, pin
        ) as channel:
            if args.every is not None:
                await attest_loop(
                    channel,
                    tpm,
                    state_dir=args.dir,
                    pcrs=pcrs,
                    inputs=inputs,
                    host_facts=host_facts,
                    on_result=_attestation_reporter(args.server),
                    every_s=float(args.every),
                )
            response = await attest_once(
                channel,
                tpm,
                state_dir=args.dir,
                pcrs=pcrs,
                event_log=inputs.event_log,
                firmware_manifest=inputs.firmware_manifest,
                firmware_signature=inputs.firmware_signature,
                host_facts=host_facts(),
            )
        _print_attestation(response)
        return EXIT_OK if response.verified else EXIT_REJECTED

    return asyncio.run(run())


def cmd_posture_reference(args: argparse.Namespace) -> int:
    from ztagent.posture.eventlog import parse_event_log
    from ztagent.posture.reference import reference_from_event_log, write_reference_values

    try:
        raw = args.eventlog.read_bytes()
    except OSError as exc:
        raise ConfigError(str(args.eventlog), f"cannot read: {exc.strerror}") from exc
    existing = _read_json(args.out) if args.merge and args.out.exists() else None
    data = reference_from_event_log(
        parse_event_log(raw),
        existing=existing,  # type: ignore[arg-type]
    )
    write_reference_values(args.out, data)
    components = data.get("components", {})
    for name, comp in sorted(components.items()):
        versions = ", ".join(a["version"] for a in comp["allowed"])
        print(f"  {name:<11} PCR {comp['pcr']:<2} allowed: {versions}")
    print(f"reference values written to {args.out}")
    return EXIT_OK


def cmd_posture_simulate_boot(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ztagent.dev.boot_sim import demo_components, simulate_boot
    from ztagent.device.tpm import DeviceTpm
    from ztagent.files import write_atomic

    components = demo_components(args.firmware_version, tamper_kernel=args.tamper_kernel)
    if args.firmware_image is not None:
        components[0] = replace(components[0], image=args.firmware_image.read_bytes())
    log = simulate_boot(DeviceTpm(args.tpm), components)
    write_atomic(args.out, log)
    for c in components:
        print(f"  measured {c.component:<10} {c.name} {c.version} into PCR {c.pcr}")
    print(f"event log written to {args.out}")
    return EXIT_OK


def cmd_firmware_keygen(args: argparse.Namespace) -> int:
    from ztagent.posture.firmware import generate_firmware_key

    private, public = generate_firmware_key(args.out, args.name, alg=args.alg)
    print(f"DEVELOPMENT vendor key: private {private} (0600), public {public}")
    print("list the public key in [posture] firmware_keys of the sidecar config")
    return EXIT_OK


def cmd_firmware_sign(args: argparse.Namespace) -> int:
    from ztagent.files import write_atomic
    from ztagent.posture.firmware import sign_manifest

    manifest, signature = sign_manifest(
        args.key, args.image, name=args.name, version=args.version, svn=args.svn
    )
    out = args.out or args.image.with_suffix(".manifest.json")
    write_atomic(out, manifest)
    write_atomic(out.with_suffix(".sig"), signature)
    print(f"manifest {out}, signature {out.with_suffix('.sig')}")
    return EXIT_OK


def cmd_model_sign(args: argparse.Namespace) -> int:
    from ztagent.workloads.inference.errors import ModelLoadError
    from ztagent.workloads.inference.models import sign_manifest_file

    for path in args.manifests:
        try:
            out = sign_manifest_file(path, args.key)
        except ModelLoadError as err:
            if err.code == "model_file_missing":  # an unreadable input: a usage error (exit 2)
                raise ConfigError("manifest", err.message) from None
            raise
        print(f"signed {path} -> {out}")
    return EXIT_OK


# -- workloads / demo -------------------------------------------------------------------------


def cmd_workload_storage(args: argparse.Namespace) -> int:
    from ztagent.workloads.storage.server import run_storage, run_storage_protected

    _log_format(args)
    if args.protect is not None:  # proxyless: its own mTLS port and admission
        asyncio.run(run_storage_protected(args.protect, args.data, listen=args.listen))
        return EXIT_OK
    asyncio.run(
        run_storage(
            args.listen,
            args.data,
            trust_keys=args.trust_key,
            socket_group=args.socket_group,
            max_value_bytes=args.max_value_bytes,
        )
    )
    return EXIT_OK


def cmd_workload_inference(args: argparse.Namespace) -> int:
    from ztagent.workloads.inference.__main__ import run

    _log_format(args)
    run(args)
    return EXIT_OK


def cmd_ship(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    from ztagent.config import load_config
    from ztagent.upload.run import run_ship

    config = load_config(args.config)
    _log_format(args, config.logging.format)
    asyncio.run(run_ship(config, version("ztagent")))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ztagent.dev.demo import run_demo

    return run_demo(args.config, args.ca_dir)


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztagent", description="Zero-trust security agent for edge nodes."
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version of ztagent and of the libraries it links (grpcio, regorus, "
        "cryptography, psycopg, paho-mqtt) and exit",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe log level written to stderr",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ca = sub.add_parser("ca", help="development certificate authority").add_subparsers(
        dest="ca_command", required=True, metavar="SUBCOMMAND"
    )
    p = ca.add_parser("init", help="create root CA, issuing CA, server cert, CRL, demo device")
    p.add_argument("--dir", type=Path, required=True, help="the CA directory to create")
    p.add_argument(
        "--trust-domain", type=_trust_domain, default="ztagent.dev", help="SPIFFE trust domain"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing CA")
    p.add_argument(
        "--key-store",
        default="file",
        help="where the issuing CA key lives: file (default) or pkcs11:token=LABEL;object=NAME",
    )
    p.add_argument("--pin-file", type=Path, help="PKCS#11 user PIN (or env ZTAGENT_PKCS11_PIN)")
    _db_argument(p)
    p.set_defaults(func=cmd_ca_init)
    p = ca.add_parser("issue", help="sign a device certificate directly (dev/test)")
    p.add_argument("--dir", type=Path, required=True, help="the CA directory")
    p.add_argument("--device-id", type=_device_id, required=True, help="the device's id")
    p.add_argument("--out", type=Path, required=True, help="certificate path; key goes to .key")
    p.add_argument("--days", type=int, default=30, help="certificate lifetime in days")
    _db_argument(p)
    p.set_defaults(func=cmd_ca_issue)
    p = ca.add_parser("revoke", help="revoke a certificate and rewrite the CRL")
    p.add_argument("--dir", type=Path, required=True, help="the CA directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", type=_parse_serial, help="serial number in hex")
    which.add_argument("--cert", type=Path, help="PEM certificate to revoke")
    p.add_argument(
        "--crl-validity", type=float, default=62, help="validity of the re-signed CRL, in days"
    )
    _db_argument(p)
    p.set_defaults(func=cmd_ca_revoke)

    p = ca.add_parser("token", help="a signed one-time bootstrap token for enrollment")
    p.add_argument("--dir", type=Path, required=True, help="the CA directory")
    p.add_argument("--device-id", type=_device_id, required=True, help="the device's id")
    p.add_argument(
        "--ttl",
        type=_parse_duration,
        default=900,
        help="token lifetime: seconds, or with a unit (15m, 1h)",
    )
    _db_argument(p)
    p.set_defaults(func=cmd_ca_token)
    p = ca.add_parser("serve", help="the enrollment service (Enroll, Renew, GetCACerts, GetCRL)")
    p.add_argument("--dir", type=Path, required=True, help="the CA directory (from `ca init`)")
    p.add_argument("--listen", default="127.0.0.1:8444", help="enrollment port (server-auth TLS)")
    p.add_argument("--renew-listen", default="127.0.0.1:8445", help="renewal port (mTLS)")
    p.add_argument(
        "--lifetime-days",
        type=int,
        default=90,
        help="issued lifetime in days (max 90; renewal at 2/3 leaves 30 days for an outage)",
    )
    p.add_argument(
        "--crl-validity",
        type=float,
        default=62,
        help="CRL validity in days (1-365); re-signed when half is left",
    )
    p.add_argument(
        "--ek-ca-bundle",
        type=Path,
        help="TPM-manufacturer CA certificates (PEM): TPM enrollment then needs an EK certificate",
    )
    _db_argument(p)
    p.add_argument(
        "--crl-http",
        metavar="ADDR",
        help="also serve the CRL over HTTPS at HOST:PORT (/crl.der, /crl.pem)",
    )
    _log_format_argument(p)
    p.set_defaults(func=cmd_ca_serve)
    p = ca.add_parser(
        "migrate", help="import a CA from before the database (ca.json, bootstrap-used.json)"
    )
    p.add_argument("--from-json", type=Path, required=True, metavar="DIR", help="the CA directory")
    _db_argument(p)
    p.set_defaults(func=cmd_ca_migrate)

    p = sub.add_parser("enroll", help="device onboarding with a one-time bootstrap token")
    p.add_argument("--server", required=True, help="CA enrollment address (host:port)")
    p.add_argument("--token", required=True, help="bootstrap token from `ca token` (- = stdin)")
    p.add_argument("--ca-bundle", type=Path, required=True, help="CA bundle to trust the CA")
    p.add_argument("--out", type=Path, required=True, help="device directory")
    p.add_argument("--key-store", default="file", help="file (default), pkcs11:URI (HSM), or tpm")
    p.add_argument("--pin-file", type=Path, help="PKCS#11 user PIN (or env ZTAGENT_PKCS11_PIN)")
    p.add_argument("--renew-server", help="CA renewal address (default: same host, port 8445)")
    p.add_argument("--force", action="store_true", help="replace a valid enrollment")
    p.add_argument(
        "--tpm",
        metavar="TCTI",
        help="prove the TPM at enrollment and bind its attestation key into the certificate, "
        "e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321",
    )
    p.set_defaults(func=cmd_enroll)
    p = sub.add_parser("renew", help="renew the device certificate over mTLS")
    p.add_argument("--dir", type=Path, required=True, help="device directory")
    p.add_argument("--watch", action="store_true", help="keep renewing at 2/3 of the lifetime")
    p.add_argument("--server", help="CA renewal address (default: from enrollment.json)")
    p.add_argument("--keep-key", action="store_true", help="renew without rotating the key")
    p.add_argument("--pin-file", type=Path, help="PKCS#11 user PIN (or env ZTAGENT_PKCS11_PIN)")
    _log_format_argument(p)
    p.set_defaults(func=cmd_renew)

    p = sub.add_parser("serve", help="run the mTLS sidecar")
    p.add_argument("--config", type=Path, required=True, help="the sidecar's ztagent.toml")
    p.add_argument("--listen", help="override listen.address")
    # Set by the supervisor when listen.workers > 1 (ztagent/sidecar/workers.py).
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    _log_format_argument(p, config=True)
    p.set_defaults(func=cmd_serve)

    cert = sub.add_parser("cert", help="certificate checks").add_subparsers(
        dest="cert_command", required=True, metavar="SUBCOMMAND"
    )
    p = cert.add_parser("verify", help="explain whether the sidecar accepts a device cert")
    p.add_argument("cert", type=Path, help="the device certificate (PEM)")
    p.add_argument("--chain", type=Path, help="extra intermediate certificates (PEM)")
    p.add_argument("--config", type=Path, required=True, help="the sidecar's ztagent.toml")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_cert_verify)

    tok = sub.add_parser("token", help="user tokens").add_subparsers(
        dest="token_command", required=True, metavar="SUBCOMMAND"
    )
    p = tok.add_parser("verify", help="explain whether the sidecar accepts a user token")
    p.add_argument("token", help="the JWT, or - to read it from stdin")
    p.add_argument("--config", type=Path, required=True, help="the sidecar's ztagent.toml")
    p.add_argument("--cert", type=Path, help="client certificate the token must be bound to")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_token_verify)
    p = tok.add_parser(
        "mint",
        help="DEVELOPMENT ONLY: sign a user token with the dev issuer made by `ca init`",
        description="DEVELOPMENT ONLY. Signs an access token with the development issuer key "
        "in --dir. Never use the dev issuer outside development and tests.",
    )
    p.add_argument(
        "--dir", type=Path, default=Path("certs-dev"), help="the dev CA directory (`ca init`)"
    )
    p.add_argument("--sub", required=True, help="the token's subject (the user)")
    p.add_argument("--scope", nargs="*", default=[], help="scope values (space-separated)")
    p.add_argument("--roles", nargs="*", default=[], help="role names (a roles claim)")
    p.add_argument(
        "--ttl",
        type=_parse_duration,
        default=900,
        help="token lifetime: seconds, or with a unit (15m, 2h)",
    )
    p.add_argument("--bind-cert", type=Path, help="bind to this client cert (cnf.x5t#S256)")
    p.add_argument("--audience", help="the aud claim (default: the dev issuer's audience)")
    p.set_defaults(func=cmd_token_mint)

    pol = sub.add_parser("policy", help="Rego policy authoring").add_subparsers(
        dest="policy_command", required=True, metavar="SUBCOMMAND"
    )

    def verification_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="verify bundles with its [policy.keys]")
        p.add_argument("--verification-key", type=Path, help="PEM public key (as opa run)")
        p.add_argument("--verification-key-id", default="default", help="its key id")
        p.add_argument("--verification-alg", default="RS256", help="its algorithm")

    p = pol.add_parser("test", help="run every test_* rule (like opa test)")
    p.add_argument(
        "dir", type=Path, nargs="?", default=Path("policies"), help="policy directory or bundle"
    )
    p.add_argument("--coverage", action="store_true", help="report line coverage per file")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    verification_flags(p)
    p.set_defaults(func=cmd_policy_test)
    p = pol.add_parser("eval", help="evaluate the decision for an input document")
    p.add_argument("--input", type=Path, required=True, help="the input document (JSON)")
    p.add_argument(
        "--policy", type=Path, default=Path("policies"), help="policy directory or bundle"
    )
    p.add_argument("--data", type=Path, help="extra data (JSON) merged at the data root")
    p.add_argument("--explain", action="store_true", help="list the rules that were evaluated")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_policy_eval)
    p = pol.add_parser("check", help="report parse and compile errors as file:line:col")
    p.add_argument(
        "dir", type=Path, nargs="?", default=Path("policies"), help="policy directory or bundle"
    )
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    verification_flags(p)
    p.set_defaults(func=cmd_policy_check)
    p = pol.add_parser("build", help="write an OPA bundle (.tar.gz), signed like opa build")
    p.add_argument("dir", type=Path, help="the policy directory (modules and data)")
    p.add_argument("--out", type=Path, required=True, help="the bundle to write (.tar.gz)")
    p.add_argument("--signing-key", type=Path, help="PEM private key")
    p.add_argument("--signing-alg", default="RS256", help="JWS algorithm (default RS256)")
    p.add_argument("--keyid", help="key id in the JWT (required with --signing-key)")
    p.add_argument("--revision", help="manifest revision (default: a digest of the content)")
    p.add_argument("--roots", nargs="+", help="manifest roots (default: everything)")
    p.add_argument("--shadow", action="store_true", help="metadata.ztagent.dry_run = true")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_policy_build)
    p = pol.add_parser("replay", help="re-evaluate logged decisions against a candidate policy")
    p.add_argument("--log", type=Path, required=True, help="decision log (JSON lines)")
    p.add_argument("--policy", type=Path, required=True, help="candidate policy dir or bundle")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    verification_flags(p)
    p.set_defaults(func=cmd_policy_replay)

    lg = sub.add_parser("log", help="decision log tools").add_subparsers(
        dest="log_command", required=True, metavar="SUBCOMMAND"
    )
    p = lg.add_parser(
        "verify", help="check the hash chain and signed checkpoints of a decision or audit log"
    )
    p.add_argument("files", type=Path, nargs="+", help="log files, oldest first")
    p.add_argument("--rotated", action="store_true", help="also check FILE.N ... FILE.1")
    p.add_argument(
        "--key",
        type=Path,
        action="append",
        metavar="PUB",
        help="PEM certificate or public key of the checkpoint signer (the sidecar's server.pem,"
        " the CA's issuing-ca.pem); repeat for a key change. Without it checkpoints are not"
        " verified",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="the log is still being written: lines after the last checkpoint and a missing"
        " closing checkpoint are reported, not refused",
    )
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_log_verify)

    p = sub.add_parser("attest", help="device side of posture attestation (TPM quote)")
    p.add_argument("--server", required=True, help="sidecar host:port")
    p.add_argument(
        "--dir", type=Path, required=True, help="device state dir (AK binding, event log)"
    )
    p.add_argument(
        "--tpm", default="device:/dev/tpmrm0", help="TCTI, e.g. swtpm:host=127.0.0.1,port=2321"
    )
    p.add_argument("--cert", type=Path, help="device certificate (default DIR/device.pem)")
    p.add_argument(
        "--key",
        type=Path,
        help="device key file (default: where DIR/keystore.json says, else next to the cert)",
    )
    p.add_argument("--pin-file", type=Path, help="PKCS#11 PIN for a pkcs11 key store")
    p.add_argument("--ca-bundle", type=Path, help="sidecar CA bundle (default DIR/ca-bundle.pem)")
    p.add_argument("--event-log", type=Path, help="measured-boot log (default DIR/event-log.bin)")
    p.add_argument("--firmware", type=Path, help="signed firmware manifest (JSON)")
    p.add_argument("--firmware-sig", type=Path, help="its signature")
    p.add_argument("--pcrs", type=int, nargs="+", default=[0, 4, 7], help="PCRs to quote")
    p.add_argument(
        "--require-process",
        action="append",
        default=[],
        metavar="NAME",
        help="a process that must run (host facts; repeatable)",
    )
    p.add_argument(
        "--forbid-process",
        action="append",
        default=[],
        metavar="NAME",
        help="a process that must not run (host facts; repeatable)",
    )
    p.add_argument("--every", type=float, help="re-attest every N seconds (and before expiry)")
    _log_format_argument(p)
    p.set_defaults(func=cmd_attest)

    pos = sub.add_parser("posture", help="posture tooling").add_subparsers(
        dest="posture_command", required=True, metavar="SUBCOMMAND"
    )
    p = pos.add_parser("reference", help="reference values from a known-good event log")
    p.add_argument("--eventlog", type=Path, required=True, help="TCG event log of a good boot")
    p.add_argument("--out", type=Path, required=True, help="reference values file (JSON)")
    p.add_argument("--merge", action="store_true", help="add to the allowed values in --out")
    p.set_defaults(func=cmd_posture_reference)
    p = pos.add_parser(
        "simulate-boot", help="DEVELOPMENT: measured boot on a (fresh) swtpm + event log"
    )
    p.add_argument("--tpm", required=True, help="TCTI of a freshly started TPM")
    p.add_argument("--out", type=Path, required=True, help="event log to write")
    p.add_argument("--firmware-version", default="1.3.0", help="firmware version to measure")
    p.add_argument("--firmware-image", type=Path, help="measure this image as the firmware")
    p.add_argument("--tamper-kernel", action="store_true", help="measure a modified kernel")
    p.set_defaults(func=cmd_posture_simulate_boot)

    fw = sub.add_parser("firmware", help="firmware signing (vendor side, dev)").add_subparsers(
        dest="firmware_command", required=True, metavar="SUBCOMMAND"
    )
    p = fw.add_parser("keygen", help="DEVELOPMENT: a firmware signing key pair")
    p.add_argument("--out", type=Path, required=True, help="directory")
    p.add_argument("--name", default="vendor", help="key file name (NAME.key, NAME.pub)")
    p.add_argument(
        "--alg", choices=["Ed25519", "ES256"], default="Ed25519", help="signature algorithm"
    )
    p.set_defaults(func=cmd_firmware_keygen)
    p = fw.add_parser("sign", help="sign a firmware image's manifest")
    p.add_argument("image", type=Path, help="the firmware image")
    p.add_argument("--key", type=Path, required=True, help="the vendor's private key (PEM)")
    p.add_argument("--name", required=True, help="firmware name in the manifest")
    p.add_argument("--version", required=True, help="firmware version in the manifest")
    p.add_argument("--svn", type=int, required=True, help="security version number")
    p.add_argument("--out", type=Path, help="manifest path (signature next to it, .sig)")
    p.set_defaults(func=cmd_firmware_sign)

    mdl = sub.add_parser("model", help="model manifests (publisher side)").add_subparsers(
        dest="model_command", required=True, metavar="SUBCOMMAND"
    )
    p = mdl.add_parser("sign", help="sign inference model manifests (<name>.manifest.sig)")
    p.add_argument("manifests", type=Path, nargs="+", help="*.manifest.json files")
    p.add_argument("--key", type=Path, required=True, help="PEM private key (Ed25519 or P-256)")
    p.set_defaults(func=cmd_model_sign)

    wl = sub.add_parser("workload", help="reference local services").add_subparsers(
        dest="workload", required=True, metavar="WORKLOAD"
    )
    p = wl.add_parser("storage", help="encrypted key-value storage over gRPC")
    p.add_argument("--listen", default="127.0.0.1:50061", help="loopback host:port or unix:PATH")
    p.add_argument("--data", type=Path, default=Path("var/storage"), help="data directory")
    p.add_argument(
        "--max-value-bytes", type=int, default=4 * 1024 * 1024, help="largest value, in bytes"
    )
    from ztagent.workloads.identity import add_trust_arguments

    add_trust_arguments(p)
    p.add_argument(
        "--protect",
        type=Path,
        metavar="CONFIG",
        help="proxyless: serve mTLS on --listen (in place of CONFIG's [listen] address) with "
        "the sidecar's own admission in this process (device cert + CRL, posture, token, "
        "policy, decision log); --trust-key and --socket-group are then unused",
    )
    _log_format_argument(p)
    p.set_defaults(func=cmd_workload_storage)

    p = wl.add_parser(
        "inference", help="TorchScript anomaly classifiers over gRPC (needs ztagent[inference])"
    )
    from ztagent.workloads.inference.__main__ import add_arguments

    add_arguments(p)
    _log_format_argument(p)
    p.set_defaults(func=cmd_workload_inference)

    p = sub.add_parser(
        "ship", help="send decision logs and escalations upstream ([upload]), until SIGTERM"
    )
    p.add_argument(
        "--config", type=Path, default=Path("ztagent.toml"), help="the sidecar's config file"
    )
    _log_format_argument(p, config=True)
    p.set_defaults(func=cmd_ship)

    p = sub.add_parser("demo", help="run the whole stack and show allowed and refused calls")
    p.add_argument(
        "--config", type=Path, default=Path("ztagent.toml"), help="the sidecar's config file"
    )
    p.add_argument("--ca-dir", type=Path, default=Path("certs-dev"), help="the dev CA directory")
    p.set_defaults(func=cmd_demo)
    _with_help_formatter(parser)
    return parser


def _final_error(text: str, code: str | None) -> None:
    """The one line a failed command ends with: a JSON log object when the command logs JSON
    (a log pipeline then gets no stray text line), else ``ztagent: error: ...`` on stderr."""
    from ztagent.logs import logs_json

    if logs_json():
        extra = {"code": code} if code is not None else {}
        logging.getLogger("ztagent").error("error: %s", text, extra=extra)
    else:
        print(f"ztagent: error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from ztagent.logs import configure_logging, quiet_native_logs

    quiet_native_logs(os.environ)  # before grpc and tpm2-tss start: they log by themselves
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, getattr(args, "log_format", None) or "text")
    handler: Handler = args.func
    try:
        return handler(args)
    except ZtagentError as err:
        _final_error(f"{err.code}: {err.message}", err.code)
        return exit_code_for(err)
    except OSError as exc:  # a file the command was told to read or write: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        _final_error(f"{where}{exc.strerror or exc}", None)
        return 1
    except KeyboardInterrupt:
        return 130
