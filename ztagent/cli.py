"""The ``ztagent`` command: a thin layer that parses flags and calls library functions.

Exit codes: 0 ok, 1 rejected / denied / failed check, 2 usage or configuration error.
Only ``ZtagentError`` is caught here; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ztagent import __version__
from ztagent.errors import EXIT_OK, EXIT_REJECTED, ConfigError, ZtagentError, exit_code_for

Handler = Callable[[argparse.Namespace], int]


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# -- ca ---------------------------------------------------------------------------------------


def cmd_ca_init(args: argparse.Namespace) -> int:
    from ztagent.pki import ca

    layout = ca.init_ca(args.dir, args.trust_domain, force=args.force)
    print(f"dev PKI created in {args.dir} (trust domain {args.trust_domain})")
    for name, path in sorted(vars(layout).items()):
        print(f"  {name:<18} {path}")
    return EXIT_OK


def cmd_ca_issue(args: argparse.Namespace) -> int:
    from ztagent.pki import ca

    cert = ca.issue_device_cert(args.dir, args.device_id, args.out, days=args.days)
    until = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    print(
        f"issued {args.out} for device {args.device_id} "
        f"(serial {ca.serial_hex(cert.serial_number)}, valid until {until})"
    )
    return EXIT_OK


def _parse_serial(text: str) -> int:
    from ztagent.pki.ca import parse_serial

    try:
        return parse_serial(text)
    except ZtagentError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def cmd_ca_revoke(args: argparse.Namespace) -> int:
    from ztagent.pki import ca

    serial = ca.revoke(args.dir, serial=args.serial, cert_path=args.cert)
    print(f"revoked serial {ca.serial_hex(serial)}; CRL rewritten at {args.dir / 'crl.pem'}")
    return EXIT_OK


# -- serve / verify ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from ztagent.config import load_config
    from ztagent.sidecar.server import run_sidecar

    config = load_config(args.config, listen_address=args.listen)
    asyncio.run(run_sidecar(config))
    return EXIT_OK


def cmd_cert_verify(args: argparse.Namespace) -> int:
    from ztagent.config import check_files, load_config
    from ztagent.pki.errors import CertError
    from ztagent.pki.trust_files import TrustFiles
    from ztagent.pki.verify import explain
    from ztagent.sidecar.admission import utc_now
    from ztagent.sidecar.server import device_policy

    config = load_config(args.config)
    check_files(config)
    trust = TrustFiles(config.tls.client_ca, config.tls.crl).load()
    try:
        cert_bytes = args.cert.read_bytes()
        chain = args.chain.read_bytes() if args.chain else None
    except OSError as exc:
        raise ConfigError(str(exc.filename), f"cannot read: {exc.strerror}") from exc
    try:
        device = explain(cert_bytes, chain, trust, device_policy(config), utc_now())
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


# -- workloads / demo -------------------------------------------------------------------------


def cmd_workload_storage(args: argparse.Namespace) -> int:
    from ztagent.workloads.storage.server import run_storage

    asyncio.run(run_storage(args.listen, args.data, max_value_bytes=args.max_value_bytes))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ztagent.demo import run_demo

    return run_demo(args.config, args.ca_dir)


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztagent", description="Zero-trust security agent for edge nodes."
    )
    parser.add_argument("--version", action="version", version=f"ztagent {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ca = sub.add_parser("ca", help="development certificate authority").add_subparsers(
        dest="ca_command", required=True, metavar="SUBCOMMAND"
    )
    p = ca.add_parser("init", help="create root CA, issuing CA, server cert, CRL, demo device")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--trust-domain", default="ztagent.dev")
    p.add_argument("--force", action="store_true", help="overwrite an existing CA")
    p.set_defaults(func=cmd_ca_init)
    p = ca.add_parser("issue", help="sign a device certificate directly (dev/test)")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--device-id", required=True)
    p.add_argument("--out", type=Path, required=True, help="certificate path; key goes to .key")
    p.add_argument("--days", type=int, default=30)
    p.set_defaults(func=cmd_ca_issue)
    p = ca.add_parser("revoke", help="revoke a certificate and rewrite the CRL")
    p.add_argument("--dir", type=Path, required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", type=_parse_serial, help="serial number in hex")
    which.add_argument("--cert", type=Path, help="PEM certificate to revoke")
    p.set_defaults(func=cmd_ca_revoke)

    p = sub.add_parser("serve", help="run the mTLS sidecar")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--listen", help="override listen.address")
    p.set_defaults(func=cmd_serve)

    cert = sub.add_parser("cert", help="certificate checks").add_subparsers(
        dest="cert_command", required=True, metavar="SUBCOMMAND"
    )
    p = cert.add_parser("verify", help="explain whether the sidecar accepts a device cert")
    p.add_argument("cert", type=Path)
    p.add_argument("--chain", type=Path, help="extra intermediate certificates (PEM)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cert_verify)

    wl = sub.add_parser("workload", help="reference local services").add_subparsers(
        dest="workload", required=True, metavar="WORKLOAD"
    )
    p = wl.add_parser("storage", help="encrypted key-value storage over gRPC")
    p.add_argument("--listen", default="127.0.0.1:50061", help="loopback host:port or unix:PATH")
    p.add_argument("--data", type=Path, default=Path("var/storage"))
    p.add_argument("--max-value-bytes", type=int, default=4 * 1024 * 1024)
    p.set_defaults(func=cmd_workload_storage)

    p = sub.add_parser("demo", help="run the whole stack and show allowed and refused calls")
    p.add_argument("--config", type=Path, default=Path("ztagent.toml"))
    p.add_argument("--ca-dir", type=Path, default=Path("certs-dev"))
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.func
    try:
        return handler(args)
    except ZtagentError as err:
        print(f"ztagent: error: {err.code}: {err.message}", file=sys.stderr)
        return exit_code_for(err)
    except KeyboardInterrupt:
        return 130
