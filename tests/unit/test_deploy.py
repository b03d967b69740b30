"""deploy/k3s: the manifests parse, agree with each other and with the repository.

Pure file checks, no cluster: the in-cluster ztagent.toml must pass the real config loader,
every path it names must be provided by a mount of the sidecar container, the unix socket of
each route must sit on a volume the workload container shares, the policies ConfigMap must be
a byte-identical copy of policies/, and every container must run locked down. These tests do
not prove that the manifests apply to a live cluster or that the image builds.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ztagent.addresses import parse_host_port
from ztagent.config import Config, parse_config

ROOT = Path(__file__).resolve().parents[2]
K3S = ROOT / "deploy" / "k3s"
POLICIES = ROOT / "policies"
CONFIG_PATH = "/etc/ztagent/ztagent.toml"


# --- loading ----------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K3S.iterdir() if p.suffix in {".yaml", ".yml"})


@functools.cache
def documents() -> tuple[tuple[Path, dict[str, Any]], ...]:
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in manifest_files():
        with path.open(encoding="utf-8") as fh:
            docs.extend((path, doc) for doc in yaml.safe_load_all(fh) if doc is not None)
    return tuple(docs)


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in documents() if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} under deploy/k3s, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    daemonset = resource("DaemonSet", "ztagent")
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    found = [c for c in pod_spec()["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r} in DaemonSet ztagent"
    return found[0]


def volume(name: str) -> dict[str, Any]:
    found = [v for v in pod_spec()["volumes"] if v["name"] == name]
    assert len(found) == 1, f"expected one volume {name!r} in DaemonSet ztagent"
    return found[0]


def config_text() -> str:
    text: str = resource("ConfigMap", "ztagent-config")["data"]["ztagent.toml"]
    return text


def cluster_config() -> Config:
    return parse_config(tomllib.loads(config_text()), Path(CONFIG_PATH).parent)


def is_under(path: str, directory: str) -> bool:
    path, directory = posixpath.normpath(path), posixpath.normpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def mount_for(container_spec: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The mount that provides ``path`` in a container: the deepest mountPath above it."""
    mounts = [m for m in container_spec.get("volumeMounts", []) if is_under(path, m["mountPath"])]
    return max(mounts, key=lambda m: len(m["mountPath"]), default=None)


def projected_paths(volume_spec: dict[str, Any]) -> set[str] | None:
    """File paths a configMap/secret volume projects; None for other volume types."""
    source = volume_spec.get("configMap") or volume_spec.get("secret")
    if source is None:
        return None
    if "items" in source:
        return {item["path"] for item in source["items"]}
    if "configMap" in volume_spec:
        return set(resource("ConfigMap", source["name"])["data"])
    raise AssertionError(f"volume {volume_spec['name']!r}: list the Secret's items explicitly")


def provided_file(path: Path) -> tuple[dict[str, Any], str]:
    """Asserts the sidecar sees ``path`` as a file projected by one of its volumes."""
    mount = mount_for(container("sidecar"), str(path))
    assert mount is not None, f"{path} is not under any volumeMount of the sidecar container"
    assert "subPath" not in mount, f"{path}: subPath mounts do not receive updates"
    rel = posixpath.relpath(str(path), mount["mountPath"])
    paths = projected_paths(volume(mount["name"]))
    assert paths is not None, f"{path}: volume {mount['name']!r} is not a ConfigMap or Secret"
    assert rel in paths, f"{path}: volume {mount['name']!r} projects {sorted(paths)}, not {rel!r}"
    return mount, rel


def provided_writable_dir(path: Path) -> dict[str, Any]:
    mount = mount_for(container("sidecar"), str(path))
    assert mount is not None, f"{path} is not under any volumeMount of the sidecar container"
    assert not mount.get("readOnly", False), f"{path}: mount {mount['mountPath']} is read-only"
    kinds = {"hostPath", "emptyDir", "persistentVolumeClaim"} & set(volume(mount["name"]))
    assert kinds, f"{path}: volume {mount['name']!r} is not writable storage"
    return mount


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"expected {flag} in {args}"
    return args[args.index(flag) + 1]


# --- the files --------------------------------------------------------------------------------


def test_every_document_is_a_named_resource() -> None:
    assert manifest_files(), "deploy/k3s has no manifests"
    for path, doc in documents():
        assert isinstance(doc, dict), f"{path.name}: expected a mapping, got {doc!r}"
        if doc.get("kind") == "Kustomization":
            continue
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion/kind missing"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} without a name"
        assert "namespace" not in doc["metadata"], (
            f"{path.name}: {doc['kind']} sets its namespace; kustomization.yaml sets it"
        )


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = resource_kustomization()
    assert kustomization["namespace"] == "ztagent"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), f"duplicate resources in kustomization: {listed}"
    on_disk = {p.name for p in manifest_files()} - {"kustomization.yaml"}
    assert set(listed) == on_disk, (
        f"kustomization.yaml lists {sorted(listed)}; deploy/k3s holds {sorted(on_disk)}"
    )


def resource_kustomization() -> dict[str, Any]:
    found = [d for p, d in documents() if p.name == "kustomization.yaml"]
    assert len(found) == 1 and found[0]["kind"] == "Kustomization"
    return found[0]


def test_namespace_matches_kustomization() -> None:
    assert resource("Namespace", "ztagent")
    assert resource_kustomization()["namespace"] == "ztagent"


# --- config against the DaemonSet ---------------------------------------------------------------


def test_cluster_config_passes_the_config_loader() -> None:
    config = cluster_config()
    assert config.tokens is None, "a [tokens] section needs a mounted JWKS file"
    assert config.tls.crl_source is None, "crl_source writes tls.crl, which is on a read-only mount"
    assert config.identity.check_crl and config.tls.crl is not None


def test_sidecar_runs_serve_with_the_mounted_config() -> None:
    sidecar = container("sidecar")
    assert sidecar["args"] == ["serve", "--config", CONFIG_PATH]
    assert "command" not in sidecar, "the image's entrypoint is ztagent"
    mount, rel = provided_file(Path(CONFIG_PATH))
    source = volume(mount["name"])["configMap"]
    assert source["name"] == "ztagent-config"
    keys = {item["path"]: item["key"] for item in source["items"]}
    assert keys[rel] == "ztagent.toml"


def test_listen_and_metrics_ports_match_the_container() -> None:
    config = cluster_config()
    sidecar = container("sidecar")
    ports = {p["containerPort"]: p for p in sidecar["ports"]}
    host, port = parse_host_port(config.listen.address, "listen.address")
    assert host == "0.0.0.0", "the sidecar must listen on the pod network, not loopback"
    assert port == 8443 and port in ports, f"listen port {port} is not a containerPort"
    assert ports[port].get("hostPort") == 8443, "devices reach the sidecar at <node>:8443"
    assert sidecar["livenessProbe"]["tcpSocket"]["port"] == port
    assert config.metrics.enabled
    m_host, m_port = parse_host_port(config.metrics.address, "metrics.address")
    assert m_host == "0.0.0.0" and m_port in ports and "hostPort" not in ports[m_port]
    # readiness follows the overall health (NOT_SERVING when stale trust refuses everyone),
    # through the plain listener: the kubelet has no device certificate
    assert config.health.address is not None, "the readiness probe needs [health] address"
    h_host, h_port = parse_host_port(config.health.address, "health.address")
    assert h_host == "0.0.0.0" and h_port in ports and "hostPort" not in ports[h_port]
    probe = sidecar["readinessProbe"]["grpc"]
    assert (probe["port"], probe.get("service", "")) == (h_port, "")


def test_every_file_the_config_names_is_mounted_in_the_sidecar() -> None:
    config = cluster_config()
    tls_mount = None
    for path in (config.tls.server_cert, config.tls.server_key, config.tls.client_ca):
        tls_mount, _ = provided_file(path)
    assert config.tls.crl is not None
    provided_file(config.tls.crl)
    assert tls_mount is not None and tls_mount.get("readOnly") is True
    assert volume(tls_mount["name"])["secret"]["secretName"] == "ztagent-tls"
    assert config.posture.reference_values is not None
    provided_file(config.posture.reference_values)
    for key in config.posture.firmware_keys:
        provided_file(key)
    if config.tokens is not None and config.tokens.jwks_file is not None:
        provided_file(config.tokens.jwks_file)
    if config.posture.ek_ca_bundle is not None:
        provided_file(config.posture.ek_ca_bundle)


def test_policy_dir_is_the_policies_configmap() -> None:
    config = cluster_config()
    assert config.policy.engine == "embedded" and config.policy.path is not None
    mount = mount_for(container("sidecar"), str(config.policy.path))
    assert mount is not None, f"{config.policy.path} is not mounted in the sidecar container"
    assert mount["mountPath"] == str(config.policy.path) and mount.get("readOnly") is True
    assert volume(mount["name"])["configMap"]["name"] == "ztagent-policies"


def test_reference_values_come_from_the_policies_configmap() -> None:
    config = cluster_config()
    assert config.posture.reference_values is not None
    mount, rel = provided_file(config.posture.reference_values)
    assert rel == "data/reference-values.json"
    source = volume(mount["name"])["configMap"]
    assert source["name"] == "ztagent-policies"
    items = {item["path"]: item["key"] for item in source["items"]}
    assert items[rel] == "reference-values.json"


def test_state_and_decision_log_are_writable_on_the_node() -> None:
    config = cluster_config()
    state = provided_writable_dir(config.posture.state_dir)
    log = provided_writable_dir(config.decision_log.path.parent)
    for mount in (state, log):
        host = volume(mount["name"])["hostPath"]
        assert host["path"] == "/var/lib/ztagent" and host["type"] == "DirectoryOrCreate"


def test_init_container_prepares_every_hostpath_subpath() -> None:
    """kubelet creates hostPath directories root-owned; the init container hands each subPath
    the containers use to uid 10001, or the sidecar and storage cannot write."""
    (init,) = pod_spec()["initContainers"]
    script = " ".join(init["command"] + init["args"])
    subpaths = {
        m["subPath"]
        for c in pod_spec()["containers"]
        for m in c["volumeMounts"]
        if m["name"] == "state"
    }
    assert subpaths, "expected subPath mounts of the state volume"
    for sub in subpaths:
        assert sub in script.split("chown")[-1], f"init container does not chown {sub!r}"
    assert "10001:10001" in script


# --- routes and workloads -----------------------------------------------------------------------


def test_each_route_socket_is_on_a_volume_the_workload_shares() -> None:
    config = cluster_config()
    sidecar, storage = container("sidecar"), container("storage")
    assert config.routes, "expected at least one [[routes]]"
    listen = arg_after(storage["args"], "--listen")
    routed = {r.service: r.upstream for r in config.routes}
    assert routed == {"ztagent.workloads.v1.Storage": listen}, (
        f"routes {routed} do not match the storage container's --listen {listen!r}"
    )
    for route in config.routes:
        assert route.upstream.startswith("unix:/"), f"{route.service}: expected an absolute unix:"
        socket = route.upstream.removeprefix("unix:")
        ours, theirs = mount_for(sidecar, socket), mount_for(storage, socket)
        assert ours is not None and theirs is not None, f"{socket}: not mounted in both"
        assert ours["name"] == theirs["name"], (
            f"{socket}: sidecar mounts volume {ours['name']!r}, storage {theirs['name']!r}"
        )
        assert ours["mountPath"] == theirs["mountPath"] and "subPath" not in ours
        assert "emptyDir" in volume(ours["name"]), f"{socket}: expected a pod-local emptyDir"


def test_storage_container_runs_the_storage_workload_on_the_node() -> None:
    storage = container("storage")
    assert storage["args"][:2] == ["workload", "storage"]
    data = arg_after(storage["args"], "--data")
    mount = mount_for(storage, data)
    assert mount is not None and not mount.get("readOnly", False), f"{data} is not writable"
    assert "hostPath" in volume(mount["name"]), "storage data must outlive the pod"


def test_storage_trusts_the_sidecars_assertion_key_and_never_sees_the_private_one() -> None:
    """The workload verifies the sidecar's identity assertions with the public key the
    sidecar publishes on a volume both mount; the private key is on one only the sidecar
    mounts."""
    config = cluster_config()
    state = config.posture.state_dir
    public, private = config.assertion.public_path(state), config.assertion.key_path(state)
    storage, sidecar = container("storage"), container("sidecar")
    assert arg_after(storage["args"], "--trust-key") == str(public)
    theirs, ours = mount_for(storage, str(public)), mount_for(sidecar, str(public))
    assert theirs is not None and ours is not None and theirs["name"] == ours["name"]
    assert mount_for(sidecar, str(private)) is not None
    assert mount_for(storage, str(private)) is None, "the storage container sees the signing key"


# --- policies drift -----------------------------------------------------------------------------


def repo_policy_files() -> dict[str, bytes]:
    """What the sidecar loads from policies/: modules (not tests), data.json, reference values."""
    files = {}
    for path in sorted(POLICIES.rglob("*")):
        rel = path.relative_to(POLICIES).as_posix()
        wanted = (path.suffix == ".rego" and not path.name.endswith("_test.rego")) or (
            path.name == "data.json" or rel == "data/reference-values.json"
        )
        if path.is_file() and wanted:
            files[rel] = path.read_bytes()
    return files


def test_policies_configmap_is_a_copy_of_policies_dir() -> None:
    data = resource("ConfigMap", "ztagent-policies")["data"]
    items = {item["path"]: item["key"] for item in volume("policies")["configMap"]["items"]}
    assert set(items.values()) == set(data), "the policies volume must project every key"
    expected = repo_policy_files()
    assert set(items) == set(expected), (
        f"the policies volume projects {sorted(items)}; policies/ has {sorted(expected)}: "
        "update deploy/k3s/configmap.yaml (ztagent-policies) and daemonset.yaml (items)"
    )
    for rel, content in expected.items():
        assert data[items[rel]].encode("utf-8") == content, (
            f"policies/{rel} differs from key {items[rel]!r} of ConfigMap ztagent-policies: "
            "copy the file into deploy/k3s/configmap.yaml"
        )


# --- security -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sidecar", "storage"])
def test_containers_run_locked_down(name: str) -> None:
    ctx = container(name)["securityContext"]
    assert ctx.get("runAsNonRoot") is True
    assert ctx.get("runAsUser") == 10001
    assert ctx.get("readOnlyRootFilesystem") is True
    assert ctx.get("allowPrivilegeEscalation") is False
    assert ctx.get("privileged", False) is False
    assert ctx.get("capabilities", {}).get("drop") == ["ALL"]
    assert not ctx.get("capabilities", {}).get("add"), "no capabilities are needed"
    assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    limits = container(name)["resources"]["limits"]
    assert {"cpu", "memory"} <= set(limits), f"{name}: set cpu and memory limits"


def test_pod_and_init_container_are_locked_down() -> None:
    spec = pod_spec()
    ctx = spec["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
    assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key, False), f"{key} is not needed"
    assert spec["automountServiceAccountToken"] is False
    assert spec["nodeSelector"] == {"ztagent.dev/edge": "true"}
    assert container("sidecar")["resources"]["limits"]["memory"] == "256Mi"
    (init,) = spec["initContainers"]
    init_ctx = init["securityContext"]
    assert init_ctx["readOnlyRootFilesystem"] is True
    assert init_ctx["allowPrivilegeEscalation"] is False
    assert init_ctx["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    for mount in init["volumeMounts"]:
        assert volume(mount["name"]).get("hostPath", {}).get("path") == "/var/lib/ztagent"


def test_secret_is_read_only_and_not_world_readable() -> None:
    secret = volume("tls")["secret"]
    assert secret["defaultMode"] & 0o007 == 0, "server.key must not be world-readable"
    for c in pod_spec()["containers"]:
        for mount in c["volumeMounts"]:
            if mount["name"] in {"tls", "config", "policies"}:
                assert mount.get("readOnly") is True, f"{c['name']}: {mount['name']} writable"
    assert all(m["name"] != "tls" for m in container("storage")["volumeMounts"])


def test_network_policy_opens_only_the_sidecar_ports() -> None:
    config = cluster_config()
    policy = resource("NetworkPolicy", "ztagent")
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == (resource("DaemonSet", "ztagent")["spec"]["selector"]["matchLabels"])
    )
    rules = policy["spec"]["ingress"]
    ports = {p["port"]: rule for rule in rules for p in rule["ports"]}
    _, listen_port = parse_host_port(config.listen.address, "listen.address")
    _, metrics_port = parse_host_port(config.metrics.address, "metrics.address")
    assert set(ports) == {listen_port, metrics_port}
    assert ports[metrics_port].get("from"), "metrics have no authentication: restrict sources"


# --- the image's build context ------------------------------------------------------------------
#
# The image is built with the repository root as its context (`docker build -f
# deploy/Dockerfile .`), so Docker reads the repository's `.dockerignore`. These tests apply its
# patterns with Docker's own semantics (moby/patternmatcher: paths relative to the context
# root, `*` and `?` within one path component, `**` across any number of them, a pattern that
# matches a directory excludes everything below it, `!` re-includes, the last match wins) and
# expand every COPY / ADD of the Dockerfile against what is left.

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PRIVATE_KEY = re.compile(
    rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=\s]{16,}"
    rb"-----END [A-Z0-9 ]*PRIVATE KEY-----"
)
"""A PEM private key block (a base64 body between the markers, so a marker quoted in code or a
test assertion is not one)."""


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """One `.dockerignore` pattern as a regex over `/`-separated context-relative paths."""
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*" and pattern[i + 1 : i + 2] == "*":
            i += 2
            if pattern[i : i + 1] == "/":
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


@dataclass(frozen=True)
class DockerIgnore:
    rules: tuple[tuple[bool, re.Pattern[str]], ...]
    """(is an exception ``!``, pattern), in file order."""

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line[1:].strip() if negate else line
            cleaned = posixpath.normpath(line).lstrip("/")
            if cleaned in {"", "."}:
                continue
            rules.append((negate, _pattern_regex(cleaned)))
        return cls(tuple(rules))

    def excludes(self, rel: str) -> bool:
        """Whether the context-relative file ``rel`` is left out of the build context."""
        candidates = _self_and_parents(rel)
        excluded = False
        for negate, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                excluded = not negate
        return excluded


def dockerignore() -> DockerIgnore:
    assert DOCKERIGNORE.is_file(), (
        f"{DOCKERIGNORE.relative_to(ROOT)} is missing: the build context would carry "
        "certs-dev/ keys, .venv/ and var/ to the builder"
    )
    return DockerIgnore.parse(DOCKERIGNORE.read_text(encoding="utf-8"))


def dockerfile_copy_sources(text: str) -> list[str]:
    """The context paths of every COPY / ADD that reads the build context (not --from)."""
    logical = re.sub(r"\\\n", " ", text)
    sources: list[str] = []
    for line in logical.splitlines():
        words = line.strip().split(maxsplit=1)
        if len(words) < 2 or words[0].upper() not in {"COPY", "ADD"}:
            continue
        rest = words[1].strip()
        flags = []
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        if any(f.startswith("--from=") for f in flags):
            continue
        args = json.loads(rest) if rest.startswith("[") else rest.split()
        assert len(args) >= 2, f"COPY/ADD without source and destination: {line!r}"
        sources.extend(args[:-1])
    return sources


def context_files(root: Path, ignore: DockerIgnore) -> list[str]:
    """Every regular file of ``root`` that reaches the build context (symlinks not followed)."""
    found: list[str] = []
    for directory, dirs, files in os.walk(root):
        rel_dir = Path(directory).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = [d for d in dirs if not ignore.excludes(prefix + d) or _has_exception(ignore)]
        found.extend(prefix + f for f in files if not ignore.excludes(prefix + f))
    return sorted(found)


def _has_exception(ignore: DockerIgnore) -> bool:
    """With a ``!`` rule an excluded directory may hold re-included files: walk it."""
    return any(negate for negate, _ in ignore.rules)


def copied_files(root: Path, dockerfile_text: str, ignore: DockerIgnore) -> list[str]:
    """The context files the Dockerfile's COPY / ADD instructions put into the image."""
    in_context = context_files(root, ignore)
    copied: set[str] = set()
    for source in dockerfile_copy_sources(dockerfile_text):
        src = posixpath.normpath(source).lstrip("/")
        regex = _pattern_regex(src)  # COPY sources are globs too (filepath.Match)
        hits = [f for f in in_context if any(regex.match(p) for p in _self_and_parents(f))]
        assert hits, f"COPY {source}: nothing in the build context"
        copied.update(hits)
    return sorted(copied)


def _self_and_parents(rel: str) -> list[str]:
    """``a/b/c`` -> ``a``, ``a/b``, ``a/b/c``: a file is copied or ignored with its directory."""
    parts = rel.split("/")
    return ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]


def private_keys_in(root: Path, rels: list[str]) -> list[str]:
    return [rel for rel in rels if PRIVATE_KEY.search((root / rel).read_bytes())]


def test_the_readme_builds_with_the_repository_root_as_context() -> None:
    """The .dockerignore sits where the documented build command makes Docker read it."""
    command = "docker build -f deploy/Dockerfile -t ztagent:0.1.0 ."
    assert command in (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    assert command in DOCKERFILE.read_text(encoding="utf-8")
    assert not (ROOT / "deploy" / "Dockerfile.dockerignore").exists(), "one ignore file only"


@pytest.mark.parametrize(
    "path",
    [
        "certs-dev/issuing-ca.key",
        "certs-dev/README.md",  # certs-dev entirely, not only its keys
        "certs-dev/devices/demo-device.pem",
        ".venv/bin/python",
        "var/storage/storage.key",
        "var/state/ak-bindings.json",
        "ztagent/stray.key",  # a key anywhere, also inside a copied directory
        "tests/fixtures/some/deep/device.key",
        ".git/config",
        "ztagent/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".hypothesis/constants/x",
        ".mypy_cache/3.11/cache.db",
    ],
)
def test_dockerignore_leaves_keys_state_and_caches_out(path: str) -> None:
    assert dockerignore().excludes(path), f"{path} would be sent to the builder"


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "ztagent/cli.py"])
def test_dockerignore_keeps_what_the_image_needs(path: str) -> None:
    assert not dockerignore().excludes(path)


def test_no_file_the_dockerfile_copies_holds_a_private_key() -> None:
    copied = copied_files(ROOT, DOCKERFILE.read_text(encoding="utf-8"), dockerignore())
    assert "pyproject.toml" in copied and "ztagent/cli.py" in copied
    assert not any(f.endswith((".key", ".pyc")) for f in copied)
    assert private_keys_in(ROOT, copied) == []


def test_the_build_context_holds_no_private_key() -> None:
    """Not only what is copied: nothing the builder receives is a key (the dev PKI in
    certs-dev/ and the devices' keys in var/ exist after `make run` / `make certs`)."""
    assert private_keys_in(ROOT, context_files(ROOT, dockerignore())) == []


def test_the_check_finds_a_planted_key(tmp_path: Path) -> None:
    """The expansion and the key scan can fail: a key inside a copied directory is caught
    without the ignore file, and left out with it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "ztagent").mkdir()
    (tmp_path / "ztagent" / "cli.py").write_text("x = 1\n")
    (tmp_path / "ztagent" / "leaked.key").write_bytes(pem)
    (tmp_path / "certs-dev").mkdir()
    (tmp_path / "certs-dev" / "root-ca.key").write_bytes(pem)
    dockerfile = "FROM x\nCOPY ztagent ./ztagent\nCOPY --from=build /wheels /wheels\n"
    nothing = DockerIgnore.parse("")
    assert copied_files(tmp_path, dockerfile, nothing) == ["ztagent/cli.py", "ztagent/leaked.key"]
    assert private_keys_in(tmp_path, copied_files(tmp_path, dockerfile, nothing)) == [
        "ztagent/leaked.key"
    ]
    assert private_keys_in(tmp_path, context_files(tmp_path, nothing)) == [
        "certs-dev/root-ca.key",
        "ztagent/leaked.key",
    ]
    assert copied_files(tmp_path, dockerfile, dockerignore()) == ["ztagent/cli.py"]
    assert context_files(tmp_path, dockerignore()) == ["ztagent/cli.py"]


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        ("**/*.key", "a.key", True),
        ("**/*.key", "a/b/c.key", True),
        ("*.key", "a/b.key", False),  # `*` stays within one component
        ("certs-dev", "certs-dev/x/y", True),  # a directory excludes what is below it
        ("/var/", "var/log/x", True),  # leading and trailing slashes are cleaned
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
        ("certs-dev\n!certs-dev/README.md", "certs-dev/README.md", False),
        ("certs-dev\n!certs-dev/README.md", "certs-dev/x.key", True),
        ("!x\nx", "x", True),  # the last matching rule wins
        ("# certs-dev\n\n", "certs-dev/x", False),
    ],
)
def test_the_matcher_has_dockers_semantics(patterns: str, path: str, excluded: bool) -> None:
    assert DockerIgnore.parse(patterns).excludes(path) is excluded
