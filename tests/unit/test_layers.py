"""The import rules of ztagent's layers (see the architecture note in ztagent/__init__.py).

Every ``import`` in every module counts, including the ones inside functions: a deferred
import is still a dependency. The rules are checked on the real source tree, and each rule is
shown to catch a violation on a made-up module, so the test cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import ztagent

ROOT = Path(ztagent.__file__).parent

BASE = {
    "ztagent",
    "ztagent.config",
    "ztagent.errors",
    "ztagent.files",
    "ztagent.enrollment",
    "ztagent.timefmt",
    "ztagent.addresses",
    "ztagent.schedule",
    "ztagent.failure_log",
    "ztagent.pkcs11_keys",
    "ztagent.logs",
    "ztagent.randomness",
    "ztagent.canonical_json",
    "ztagent.json_input",
    "ztagent.connection_cap",
}
"""``pkcs11_keys`` is base so that ``device/`` (key stores) and ``ca/`` (a token-held issuing
key) share one PKCS#11 session registry without importing each other."""
BASE_GRPC = {"ztagent.rpc_status", "ztagent.signals", "ztagent._proto"}
"""Below every server too, but gRPC-facing: the one error-to-status mapping, waiting for
SIGTERM, the generated stubs. Servers, sides and the face use them; checks never do."""
CHECKS = {
    "ztagent.pki",
    "ztagent.tokens",
    "ztagent.posture",
    "ztagent.policy",
    "ztagent.admission",
}
DOMAIN_POLICIES = {
    "ztagent.pki.policy",
    "ztagent.pki.errors",
    "ztagent.tokens.policy",
    "ztagent.tokens.errors",
    "ztagent.admission.headers",
}
"""The one exception to "base imports only base": the configuration builds the checks' own
policy objects (so each rule is stated once, in the domain) and wraps their errors with the
key's name. These modules import only base and their own package's errors and SPIFFE rules."""
DOMAIN_POLICY_DEPS = {"ztagent.pki.errors", "ztagent.pki.spiffe", "ztagent.tokens.errors"}
SIDES = {"ztagent.ca", "ztagent.device", "ztagent.dev"}
SERVERS = {"ztagent.sidecar", "ztagent.workloads", "ztagent.upload"}
"""``upload``: the shippers (decision logs, the MQTT outbox) are processes of their own, like
the workloads: they read what servers wrote to disk and talk to the uplink."""
FACE = {"ztagent.cli", "ztagent.__main__"}
DEMO_PREFIX = "ztagent.dev.demo"
"""The demo is face too (it starts every server), though it lives with the dev tooling."""


def _within(imported: str, modules: set[str]) -> bool:
    """``imported`` is one of ``modules`` or a name imported from one of them."""
    return any(imported == m or imported.startswith(m + ".") for m in modules)


def _area(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def imports_of(source: str, module: str, *, is_package: bool = False) -> Iterator[str]:
    """Every module ``source`` imports (absolute names; relative imports resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield name
            yield from (f"{name}.{alias.name}" for alias in node.names)


def violation(module: str, imported: str) -> str | None:
    """Why ``module`` may not import ``imported``, or None when it may."""
    if not imported.startswith("ztagent") and imported.split(".")[0] != "grpc":
        return None
    mine, theirs = _area(module), _area(imported)
    face = mine in FACE or module.startswith(DEMO_PREFIX)
    if face:
        return None if mine in FACE or theirs not in FACE else "the demo never imports the CLI"
    if imported.startswith(DEMO_PREFIX) or theirs in FACE:
        return "nothing below the face imports the CLI or the demo"
    if module in DOMAIN_POLICIES and imported.startswith("ztagent"):
        allowed = theirs in BASE or _within(imported, DOMAIN_POLICY_DEPS) or imported == "ztagent"
        return None if allowed else "domain policies import only base, errors and spiffe"
    if imported.startswith("ztagent") and imported != "ztagent" and theirs == mine:
        return None
    grpc_import = imported.split(".")[0] == "grpc"
    if mine in BASE_GRPC:
        return None if theirs in BASE | BASE_GRPC or grpc_import else "base imports only base"
    if mine in BASE or module == "ztagent":
        if grpc_import:
            return "base modules never import grpc"
        if module == "ztagent.config" and _within(imported, DOMAIN_POLICIES):
            return None
        return None if theirs in BASE or imported == "ztagent" else "base imports only base"
    if imported == "ztagent.__version__":
        return None
    if mine in CHECKS:
        if grpc_import or theirs in BASE_GRPC:
            return "checks never import grpc (nor the stubs or the status mapping)"
        allowed = BASE | CHECKS
        return None if theirs in allowed or imported == "ztagent" else "checks import only base"
    if mine in SIDES:
        if theirs in SERVERS:
            return "sides never import servers"
        if mine != "ztagent.dev" and theirs in SIDES:
            return "ca/ and device/ are independent (their shared codes are in enrollment)"
        return None
    if mine in SERVERS:
        return "servers never import dev tooling" if theirs == "ztagent.dev" else None
    return None


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        if "_proto" in rel.parts:
            continue
        name = ".".join(rel.parts)
        yield name.removesuffix(".__init__"), path


def test_every_module_keeps_the_import_rules() -> None:
    found = []
    for name, path in modules():
        for imported in imports_of(path.read_text(), name, is_package=path.name == "__init__.py"):
            why = violation(name, imported)
            if why:
                found.append(f"{name} imports {imported}: {why}")
    assert found == []


NETWORK_AND_PROCESSES = {
    "socket", "ssl", "urllib.request", "urllib.error", "http", "aiohttp", "requests", "httpx",
    "subprocess", "psutil", "multiprocessing",
}  # fmt: skip
CHECK_IO_ALLOWED = {"ztagent.policy.opa": {"aiohttp"}}
"""The OPA engine is a policy engine that answers over HTTP (DESIGN: policy/ holds the
engines); every other check takes the bytes it checks from its caller."""


def test_checks_open_no_sockets_and_start_no_processes() -> None:
    found = []
    for name, path in modules():
        if _area(name) not in CHECKS:
            continue
        for imported in imports_of(path.read_text(), name, is_package=path.name == "__init__.py"):
            top = imported.split(".")[0]
            hit = imported if imported in NETWORK_AND_PROCESSES else top
            if hit in NETWORK_AND_PROCESSES and hit not in CHECK_IO_ALLOWED.get(name, set()):
                found.append(f"{name} imports {imported}")
    assert found == []


def test_every_module_belongs_to_a_layer() -> None:
    known = BASE | BASE_GRPC | CHECKS | SIDES | SERVERS | FACE
    assert [name for name, _ in modules() if _area(name) not in known] == []


@pytest.mark.parametrize(
    ("module", "imported", "reason"),
    [
        ("ztagent.pki.verify", "grpc", "checks never import grpc"),
        ("ztagent.tokens.verify", "ztagent.sidecar.server", "checks import only base"),
        ("ztagent.posture.verifier", "ztagent.device.tpm", "checks import only base"),
        ("ztagent.policy.embedded", "ztagent.dev.issuer", "checks import only base"),
        ("ztagent.pki.verify", "ztagent._proto.v1.enrollment_pb2", "checks never import grpc"),
        ("ztagent.tokens.verifier", "ztagent.rpc_status", "checks never import grpc"),
        ("ztagent.errors", "grpc", "base modules never import grpc"),
        ("ztagent.rpc_status", "ztagent.pki.verify", "base imports only base"),
        ("ztagent.config", "ztagent.pki.verify", "base imports only base"),
        ("ztagent.errors", "ztagent.pki.policy", "base imports only base"),
        ("ztagent.tokens.policy", "ztagent.tokens.jwks", "domain policies import only base"),
        ("ztagent.device.enroll", "ztagent.ca.store", "ca/ and device/ are independent"),
        ("ztagent.ca.ca_keys", "ztagent.device.keystores", "ca/ and device/ are independent"),
        ("ztagent.pkcs11_keys", "ztagent.device.keystores", "base imports only base"),
        ("ztagent.pkcs11_keys", "ztagent.ca.ca_keys", "base imports only base"),
        ("ztagent.ca.service", "ztagent.sidecar.server", "sides never import servers"),
        ("ztagent.sidecar.server", "ztagent.dev.issuer", "servers never import dev tooling"),
        ("ztagent.upload.mqtt", "ztagent.dev.pki", "servers never import dev tooling"),
        ("ztagent.upload.mqtt", "ztagent.cli", "nothing below the face imports the CLI"),
        ("ztagent.device.enroll", "ztagent.upload.mqtt", "sides never import servers"),
        ("ztagent.sidecar.server", "ztagent.cli", "nothing below the face imports the CLI"),
        ("ztagent.dev.pki", "ztagent.dev.demo", "nothing below the face imports the CLI"),
        ("ztagent.dev.demo", "ztagent.cli", "the demo never imports the CLI"),
    ],
)
def test_each_rule_catches_a_violation(module: str, imported: str, reason: str) -> None:
    why = violation(module, imported)
    assert why is not None and why.startswith(reason)


def test_allowed_imports_pass() -> None:
    for module, imported in [
        ("ztagent.pki.verify", "ztagent.errors"),
        ("ztagent.policy.embedded", "ztagent.tokens.verify"),
        ("ztagent.device.enroll", "ztagent.enrollment"),
        ("ztagent.device.keystores", "ztagent.pkcs11_keys"),
        ("ztagent.ca.ca_keys", "ztagent.pkcs11_keys"),
        ("ztagent.dev.boot_sim", "ztagent.device.tpm"),
        ("ztagent.sidecar.server", "ztagent.device.crl_fetch"),
        ("ztagent.upload.mqtt", "ztagent.workloads.storage.store"),
        ("ztagent.upload.mqtt", "ztagent.device.device_dir"),
        ("ztagent.cli", "ztagent.dev.demo"),
        ("ztagent.ca.service", "ztagent.rpc_status"),
        ("ztagent.rpc_status", "grpc"),
        ("ztagent.config", "ztagent.tokens.policy"),
        ("ztagent.pki.policy", "ztagent.pki.spiffe"),
    ]:
        assert violation(module, imported) is None, (module, imported)


def test_relative_and_deferred_imports_are_seen() -> None:
    source = "def f():\n    import grpc\n\nfrom . import verify\nfrom ..tokens import jwks\n"
    found = set(imports_of(source, "ztagent.pki.checker"))
    assert {"grpc", "ztagent.pki.verify", "ztagent.tokens.jwks"} <= found


def test_loading_every_check_does_not_load_grpc() -> None:
    """The rule above, at run time: the whole check layer (and base) imports without grpc."""
    import subprocess
    import sys

    checks = [name for name, _ in modules() if _area(name) in CHECKS | BASE]
    program = (
        "import importlib, sys\n"
        f"for name in {checks!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    )
    assert len(checks) > 30
    assert out.stdout.strip() == "[]"
