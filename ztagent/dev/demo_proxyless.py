"""DEVELOPMENT ONLY: ``make run``'s proxyless leg: the storage workload serving mTLS itself
with the sidecar's admission in its own process (``ztagent workload storage --protect``).

It gets a config of its own, derived from the demo's: the same trust, tokens, policy and
posture files, but its own port, decision log and no metrics port (two processes must not
share a decision log's hash chain, or a listening port)."""

from __future__ import annotations

from pathlib import Path

import grpc

from ztagent.config import Config
from ztagent.device.transport import device_credentials

PROXYLESS_ADDRESS = "127.0.0.1:50071"
STORAGE = "ztagent.workloads.v1.Storage"


def proxyless_config(config: Config, root: Path) -> Path:
    """``var/proxyless.toml``: the demo config's checks, the proxyless process's own files."""
    tls, tokens, posture, policy = config.tls, config.tokens, config.posture, config.policy
    assert tokens is not None and tokens.jwks_file is not None and policy.path is not None
    assert posture.reference_values is not None
    firmware = ", ".join(f'"{k}"' for k in posture.firmware_keys)
    ek = f'ek_ca_bundle = "{posture.ek_ca_bundle}"' if posture.ek_ca_bundle else ""
    text = f"""# Written by make run: the storage workload in proxyless mode (see README).
[listen]
address = "{PROXYLESS_ADDRESS}"
grace_period_s = 2

[tls]
server_cert = "{tls.server_cert}"
server_key = "{tls.server_key}"
client_ca = "{tls.client_ca}"
crl = "{root / "var" / "state-proxyless" / "crl.pem"}"
{f'crl_source = "{tls.crl_source}"' if tls.crl_source else ""}
reload_interval_s = 2

[identity]
trust_domain = "{config.identity.trust_domain}"
crl_failure_mode = "closed"
crl_grace_s = 86400

[[routes]]
service = "{STORAGE}"
upstream = "unix:{root / "var" / "run" / "unused.sock"}"

[tokens]
issuer = "{tokens.policy.issuer}"
audience = "{next(iter(tokens.policy.audiences))}"
jwks_file = "{tokens.jwks_file}"

[policy]
path = "{policy.path}"

[decision_log]
path = "{root / "var" / "log" / "decisions-proxyless.jsonl"}"

[posture]
reference_values = "{posture.reference_values}"
firmware_keys = [{firmware}]
state_dir = "{root / "var" / "state-proxyless"}"
{ek}
"""
    path = root / "var" / "proxyless.toml"
    path.write_text(text)
    return path


def proxyless_call(ca_bundle: Path, device_cert: Path, token: str, bob: str) -> tuple[bool, str]:
    """A write and a read by the demo device + alice, and bob's write refused, against the
    proxyless workload."""
    from ztagent._proto.workloads.v1 import storage_pb2

    creds = device_credentials(device_cert, ca_bundle.read_bytes())
    with grpc.secure_channel(PROXYLESS_ADDRESS, creds) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            return False, (
                f"(w) proxyless: nothing serving on {PROXYLESS_ADDRESS} after 30 s "
                "(see var/log/storage-proxyless.log)"
            )
        put = channel.unary_unary(f"/{STORAGE}/Put")
        get = channel.unary_unary(f"/{STORAGE}/Get")
        auth = (("authorization", f"Bearer {token}"),)
        value = b"written without a sidecar in between"
        try:
            put(storage_pb2.PutRequest(key="direct", value=value).SerializeToString(),
                metadata=auth, timeout=10)  # fmt: skip
            request = storage_pb2.GetRequest(key="direct").SerializeToString()
            got = storage_pb2.GetResponse.FromString(get(request, metadata=auth, timeout=10))
        except grpc.RpcError as err:
            return (
                False,
                f"(w) proxyless: the allowed call failed: {err.code().name} {err.details()}",
            )
        try:
            put(storage_pb2.PutRequest(key="direct", value=b"x").SerializeToString(),
                metadata=(("authorization", f"Bearer {bob}"),), timeout=10)  # fmt: skip
            refused = "ACCEPTED"
        except grpc.RpcError as err:
            refused = f"{err.code().name} {err.details()}"
    ok = got.value == value and refused.startswith("PERMISSION_DENIED policy_denied")
    return ok, (
        f"(w) proxyless: the storage workload serving mTLS itself on {PROXYLESS_ADDRESS} with "
        f"the sidecar's admission in its process (`workload storage --protect`): device + "
        f"alice stored and read back {got.value!r}; bob's write refused: {refused}"
    )
