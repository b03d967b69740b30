"""Codes are data: every family's codes are a registry checked at construction, and every
code the source raises with a literal is in its family's registry (so a typo cannot ship)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import ztagent
from ztagent.errors import ZtagentError
from ztagent.pki.errors import CertCode, CertError
from ztagent.tokens.errors import TokenCode, TokenError

ROOT = Path(ztagent.__file__).parent

FAMILIES = {
    "CertError": "ztagent.pki.errors",
    "CaError": "ztagent.pki.errors",
    "TokenError": "ztagent.tokens.errors",
    "JwksError": "ztagent.tokens.errors",
    "DevIssuerError": "ztagent.tokens.errors",
    "PostureError": "ztagent.posture.errors",
    "EnrollError": "ztagent.enrollment",
    "EnrollClientError": "ztagent.device.errors",
    "TlsError": "ztagent.device.errors",
    "KeyStoreError": "ztagent.device.keystores",
    "TpmError": "ztagent.device.tpm",
    "PolicyError": "ztagent.policy.errors",
    "PolicyLoadError": "ztagent.policy.errors",
    "DecisionLogError": "ztagent.policy.decision_log",
    "CheckpointError": "ztagent.policy.log_checkpoint",
    "AssertionError_": "ztagent.tokens.assertion",
    "InvalidRequestError": "ztagent.workloads.storage.errors",
    "KeyFileError": "ztagent.workloads.storage.errors",
    "BackendError": "ztagent.workloads.storage.errors",
    "InvalidInputError": "ztagent.workloads.inference.errors",
    "ModelLoadError": "ztagent.workloads.inference.errors",
    "InferenceBusyError": "ztagent.workloads.inference.errors",
}


def _family(name: str) -> type[ZtagentError]:
    cls = getattr(importlib.import_module(FAMILIES[name]), name)
    assert issubclass(cls, ZtagentError)
    return cls


def literal_codes() -> dict[str, set[str]]:
    """Every ``SomeError("literal_code", ...)`` in the source, by class name."""
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if name in FAMILIES and isinstance(first, ast.Constant):
                found.setdefault(name, set()).add(str(first.value))
    return found


def test_every_family_has_a_registry() -> None:
    assert [n for n in FAMILIES if _family(n).codes is None] == []


def test_every_literal_code_is_registered() -> None:
    found = literal_codes()
    assert len(found) >= 15
    missing = {
        name: sorted(codes - set(_family(name).codes or ()))
        for name, codes in found.items()
        if codes - set(_family(name).codes or ())
    }
    assert missing == {}


def test_an_unregistered_code_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown CertError code 'cert_expried'"):
        CertError("cert_expried", "a typo")
    assert CertError(CertCode.CERT_EXPIRED, "x").code == "cert_expired"
    assert TokenError(TokenCode.TOKEN_EXPIRED, "x").as_dict() == {
        "code": "token_expired",
        "message": "x",
    }


def test_received_and_expected_are_fields() -> None:
    err = TokenError("token_wrong_issuer", "iss 'a' (expected 'b')", received="a", expected="b")
    assert err.as_dict() == {
        "code": "token_wrong_issuer",
        "message": "iss 'a' (expected 'b')",
        "received": "a",
        "expected": "b",
    }
    assert str(err) == "token_wrong_issuer: iss 'a' (expected 'b')"
