"""deploy/k3s-ca: the CA replicas on PostgreSQL parse and agree with each other.

Pure file checks, no cluster (like test_deploy.py): the CA runs as several replicas on one
database named by a Service in the same kustomization, the database password reaches it only
through a Secret (never in a DSN or an argument), each replica has a persistent volume of its
own for its audit chain, the CA keys come read-only from a Secret, and the containers run
locked down. They do not prove the manifests apply to a live cluster.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from ztagent.ca.db import is_postgres

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "k3s-ca"


@functools.cache
def documents() -> tuple[dict[str, Any], ...]:
    docs: list[dict[str, Any]] = []
    for path in sorted(ROOT.glob("*.yaml")):
        with path.open(encoding="utf-8") as fh:
            docs.extend(d for d in yaml.safe_load_all(fh) if d)
    return tuple(docs)


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_the_kustomization_lists_every_file() -> None:
    kustomization = yaml.safe_load((ROOT / "kustomization.yaml").read_text())
    files = {p.name for p in ROOT.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_several_ca_replicas_share_the_database_service() -> None:
    ca = resource("StatefulSet", "ztagent-ca")
    assert ca["spec"]["replicas"] >= 2
    container = ca["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["ca", "serve"]
    dsn = args[args.index("--db") + 1]
    assert is_postgres(dsn)
    userinfo, host = dsn.split("://", 1)[1].split("@", 1)
    assert ":" not in userinfo, "the password must not be in the DSN"
    db_service = resource("Service", "ztagent-ca-db")
    assert host.split("/")[0] == f"ztagent-ca-db:{db_service['spec']['ports'][0]['port']}"
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ztagent-ca-db"
    postgres = resource("StatefulSet", "ztagent-ca-db")["spec"]["template"]["spec"]
    pg_env = {e["name"]: e for e in postgres["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ztagent-ca-db"
    assert dsn.rsplit("/", 1)[1] == pg_env["POSTGRES_DB"]["value"]
    assert userinfo == pg_env["POSTGRES_USER"]["value"]


def test_each_replica_keeps_its_own_audit_chain_and_reads_keys_from_a_secret() -> None:
    ca = resource("StatefulSet", "ztagent-ca")
    claims = [c["metadata"]["name"] for c in ca["spec"]["volumeClaimTemplates"]]
    spec = ca["spec"]["template"]["spec"]
    ca_dir = spec["containers"][0]["args"][spec["containers"][0]["args"].index("--dir") + 1]
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts[ca_dir]["name"] in claims, "the CA directory must be a per-replica volume"
    keys = next(v for v in spec["volumes"] if v["name"] == "keys")
    assert keys["secret"]["secretName"] == "ztagent-ca-keys"
    init = spec["initContainers"][0]
    assert all(m.get("readOnly") for m in init["volumeMounts"] if m["name"] == "keys")


def test_every_container_runs_locked_down() -> None:
    for name in ("ztagent-ca", "ztagent-ca-db"):
        spec = resource("StatefulSet", name)["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for container in spec.get("initContainers", []) + spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert ctx["capabilities"]["drop"] == ["ALL"]


def test_only_the_ca_reaches_the_database() -> None:
    policy = resource("NetworkPolicy", "ztagent-ca-db")
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "ztagent-ca-db"
    }
    sources = policy["spec"]["ingress"][0]["from"]
    assert sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ztagent-ca"}}}]
