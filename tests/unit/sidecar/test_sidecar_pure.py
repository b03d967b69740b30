"""The sidecar's pure helpers: what reaches the policy, the upstream and the client."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from ztagent.admission.core import policy_headers
from ztagent.admission.headers import InputHeaders, InputHeadersError
from ztagent.admission.policy_input import (
    build_input,
    request_metadata,
    split_method,
    unverified_posture,
)
from ztagent.policy.types import Decision
from ztagent.sidecar.proxy import forwardable
from ztagent.sidecar.upstreams import service_of
from ztagent.tokens.verify import anonymous_user_input

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[3] / "policies" / "input.schema.json").read_text()
)


def test_credentials_never_reach_the_policy_input() -> None:
    sent = [
        ("authorization", "Bearer secret"),
        ("cookie", "session=1"),
        ("x-refresh-token", "r"),
        ("x-auth-token", "a"),
        ("api-key", "k"),
        ("x-ztagent-device-id", "forged"),
        (":authority", "localhost"),
        ("grpc-timeout", "1S"),
        ("x-app", "a"),
        ("x-app", "b"),
        ("trace-bin", b"\x00\x01"),
        ("x-model", "vibration-anomaly"),
        ("x-junk", "j" * 7000),
    ]
    # the default allow-list: what the shipped policy reads, nothing else
    assert request_metadata(sent) == {"x-model": "vibration-anomaly"}
    listed = InputHeaders(frozenset({"x-app", "trace-bin", "x-junk"}))
    md = request_metadata(sent, listed)
    assert md["x-app"] == "a,b"
    assert md["trace-bin"] == base64.b64encode(b"\x00\x01").decode()
    assert md["x-junk"] == "j" * 256  # values are capped
    assert set(md) == {"x-app", "trace-bin", "x-junk"}


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("x-refresh-token", "looks like a credential"),
        ("x-auth-token", "looks like a credential"),
        ("api-key", "looks like a credential"),
        ("authorization", "looks like a credential"),
        ("session-id", "looks like a credential"),
        ("x-ztagent-device-id", "reserved"),
        ("grpc-timeout", "reserved"),
        ("X-Model", "not a lowercase header name"),
    ],
)
def test_the_allow_list_refuses_credentials_and_reserved_names(name: str, why: str) -> None:
    with pytest.raises(InputHeadersError, match=why):
        InputHeaders(frozenset({name}))


def test_client_identity_headers_are_not_forwarded() -> None:
    sent = [
        ("x-ztagent-device-id", "forged"),
        ("x-ztagent-anything", "x"),
        ("user-agent", "ua"),
        ("grpc-accept-encoding", "gzip"),
        ("authorization", "Bearer t"),
        ("x-app", "kept"),
    ]
    assert forwardable(sent) == [("authorization", "Bearer t"), ("x-app", "kept")]
    assert forwardable(None) == []


def test_method_names() -> None:
    assert split_method("/pkg.v1.Svc/Method") == ("pkg.v1.Svc", "Method")
    assert service_of("/pkg.v1.Svc/Method") == "pkg.v1.Svc"
    assert split_method("/_p.v2._Svc/Get_1") == ("_p.v2._Svc", "Get_1")
    bad_names = ("", "/", "pkg.Svc/Method", "/pkg.Svc/", "//M", "/a/b/c", "/pkg..Svc/M")
    odd_characters = ("/pkg.Svc/Method\x00", "/pkg.Svc/Me thod", "/pkg.Svc/M\n", "/pkg.Svc/Mé")
    for bad in (*bad_names, *odd_characters, "/pkg.Svc/Method/", "/1pkg.Svc/M", "/pkg.Svc/M-1"):
        assert split_method(bad) == ("", "")
        assert service_of(bad) == ""


def test_policy_headers_cannot_override_identity() -> None:
    decision = Decision(
        allow=True,
        headers={
            "x-ztagent-user": "alice",
            "x-ztagent-device-id": "forged",
            "X-Upper": "no",
            "not-x": "no",
            "x-newline": "a\nb",
        },
    )
    assert policy_headers(decision) == [("x-ztagent-user", "alice")]


def test_built_input_matches_the_published_schema() -> None:
    doc = build_input(
        device={
            "id": "cam-1",
            "spiffe_id": "spiffe://ztagent.dev/device/cam-1",
            "serial": "ab",
            "fingerprint_sha256": hashlib.sha256(b"x").hexdigest(),
            "issuer": "CN=issuing",
            "not_before": "2026-11-26T00:00:00Z",
            "not_after": "2026-12-26T00:00:00Z",
        },
        posture=unverified_posture(),
        user=anonymous_user_input(),
        full_method="/ztagent.workloads.v1.Storage/Get",
        metadata={"x-app": "v"},
        peer="ipv4:127.0.0.1:5000",
        now=datetime(2026, 11, 26, 19, 0, 0, 123456, tzinfo=UTC),
        node="edge-01",
    )
    jsonschema.validate(doc, SCHEMA)
    assert doc["request"] == {
        "service": "ztagent.workloads.v1.Storage",
        "method": "Get",
        "full_method": "/ztagent.workloads.v1.Storage/Get",
        "metadata": {"x-app": "v"},
        "peer": "ipv4:127.0.0.1:5000",
    }
    assert doc["context"]["time"] == "2026-11-26T19:00:00.123Z"
    assert doc["posture"]["verified"] is False
