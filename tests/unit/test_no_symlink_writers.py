"""Issue 14: no state file ztagent writes follows a symlink, and every one has its mode.

One test per writer: a symlink is planted at the file's path pointing at a victim file, the
writer runs, it is refused with a clear error naming the path (a ``ZtagentError`` for the CLI
and servers, a log line where the writer only keeps a copy), and the victim is unchanged.
Then umask(0) tests: created files and directories have exactly their documented modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ztagent.ca import store as ca_store
from ztagent.ca.bootstrap import ReplayStore
from ztagent.dev import tpm_manufacturer
from ztagent.dev.issuer import init_dev_issuer
from ztagent.device import device_dir
from ztagent.device.attest import AK_BOUND_FILE, record_binding
from ztagent.device.crl_fetch import CrlFetcher
from ztagent.device.errors import EnrollClientError
from ztagent.device.jwks_fetch import JwksSource
from ztagent.device.keystores import FileKeyStore, KeyStoreError
from ztagent.errors import ConfigError
from ztagent.files import make_private_dir
from ztagent.pki.errors import CaError
from ztagent.policy.sources import last_good_path, save_last_good
from ztagent.posture.verifier import AttestedPosture
from ztagent.sidecar.attestation import STATE_UNWRITABLE, state_unwritable
from ztagent.sidecar.shared_cache import SharedPostureCache
from ztagent.sidecar.shared_nonces import SharedNonceStore, nonce_dir
from ztagent.workloads.storage.errors import BackendError, KeyFileError
from ztagent.workloads.storage.keys import load_or_create_keys
from ztagent.workloads.storage.store import Store

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
VICTIM = b"the victim's own content\n"
REFUSED = "is a symbolic link"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


def plant(path: Path, victim: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.symlink_to(victim)
    return path


def untouched(victim: Path, link: Path) -> None:
    assert victim.read_bytes() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert link.is_symlink() and link.resolve() == victim.resolve()


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- CA state -----------------------------------------------------------------------------


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    ca_store.init_ca(directory, now=NOW)
    return directory


@pytest.mark.parametrize("name", ["crl.pem", "root-ca.key", "server.pem"])
def test_ca_init_refuses_a_symlinked_file(tmp_path: Path, victim: Path, name: str) -> None:
    link = plant(tmp_path / "ca" / name, victim)
    with pytest.raises(CaError, match=rf"^ca_state_invalid: cannot write {link}: {REFUSED}"):
        ca_store.init_ca(tmp_path / "ca", now=NOW, force=True)
    untouched(victim, link)


def test_the_ca_database_is_never_opened_through_a_symlink(ca_dir: Path, victim: Path) -> None:
    """A planted ca.db link would let an attacker swap the CA's whole state (which serials
    are revoked, which tokens were used): every entry point refuses it."""
    layout = ca_store.CaLayout(ca_dir)
    real = layout.state.with_name("real.db")
    layout.state.rename(real)
    link = plant(layout.state, victim)
    calls = [
        lambda: ca_store.revoke(ca_dir, serial=1, now=NOW),
        lambda: ca_store.write_crl(ca_dir, NOW),
        lambda: ReplayStore.for_ca(ca_dir),
        lambda: ca_store.init_ca(ca_dir, now=NOW, force=True),
    ]
    for call in calls:
        with pytest.raises(CaError, match=rf"^ca_state_invalid: {link} is a symbolic link"):
            call()
    untouched(victim, link)


def test_ca_crl_refuses_a_symlinked_crl(ca_dir: Path, victim: Path) -> None:
    link = plant(ca_store.CaLayout(ca_dir).crl, victim)
    with pytest.raises(CaError, match=rf"^ca_state_invalid: cannot write {link}: {REFUSED}"):
        ca_store.write_crl(ca_dir, NOW)
    untouched(victim, link)


def test_ca_issue_refuses_a_symlinked_cert_or_key(ca_dir: Path, victim: Path) -> None:
    out = ca_dir.parent / "out" / "cam.pem"
    link = plant(out.with_suffix(".key"), victim)
    with pytest.raises(CaError, match=rf"cannot write {link}: {REFUSED}"):
        ca_store.issue_device_cert(ca_dir, "cam", out, now=NOW)
    untouched(victim, link)


def test_ca_lock_is_never_followed(ca_dir: Path, victim: Path) -> None:
    layout = ca_store.CaLayout(ca_dir)
    link = plant(layout.lock, victim)
    with pytest.raises(CaError, match=rf"^ca_state_invalid: cannot lock {link}"):
        ca_store.init_ca(ca_dir, now=NOW, force=True)
    untouched(victim, link)


def test_ca_files_and_dirs_have_their_modes_under_umask_0(tmp_path: Path) -> None:
    with umask(0):
        layout = ca_store.init_ca(tmp_path / "new" / "ca", now=NOW)
        ReplayStore.for_ca(layout.dir).consume("jti-1", int(NOW.timestamp()) + 600, NOW)
    assert mode(tmp_path / "new") == 0o700  # a parent it created too
    assert mode(layout.dir) == mode(layout.devices_dir) == 0o700
    for key in (layout.root_key, layout.issuing_key, layout.server_key, layout.lock):
        assert mode(key) == 0o600, key
    assert mode(layout.state) == 0o600  # the database (its -wal and -shm get its mode)
    for public in (layout.root_cert, layout.bundle, layout.crl):
        assert mode(public) == 0o644, public


# --- the device directory -----------------------------------------------------------------


def test_file_key_store_refuses_a_symlink(tmp_path: Path, victim: Path) -> None:
    link = plant(tmp_path / "dev" / device_dir.NEW_KEY_FILE, victim)
    with pytest.raises(KeyStoreError, match=rf"^keystore_failed: .*{link}: {REFUSED}"):
        FileKeyStore.create(link)
    untouched(victim, link)


@pytest.mark.parametrize(
    "name",
    [
        device_dir.DEVICE_CERT,
        device_dir.CA_BUNDLE,
        device_dir.KEYSTORE_FILE,
        device_dir.ENROLLMENT_FILE,
        device_dir.DEVICE_KEY,
        AK_BOUND_FILE,
    ],
)
def test_device_dir_write_state_refuses_a_symlink(
    ca_dir: Path, tmp_path: Path, victim: Path, name: str
) -> None:
    from cryptography import x509

    layout = ca_store.CaLayout(ca_dir)
    chain = layout.device_cert("demo-device").read_bytes()
    leaf = x509.load_pem_x509_certificate(chain)
    out = tmp_path / "device"
    store = device_dir.new_key_store(
        device_dir.KeyStoreSpec.parse("file"), out, None, None, previous=None
    )
    link = plant(out / name, victim)
    with pytest.raises(EnrollClientError, match=rf"^device_dir_invalid: cannot write {link}"):
        device_dir.write_state(
            out,
            leaf=leaf,
            chain_pem=chain,
            bundle_pem=layout.bundle.read_bytes(),
            store=store,
            server="ca.example:8444",
            renew_server="ca.example:8445",
            device_id="demo-device",
            spiffe_id="spiffe://ztagent.dev/device/demo-device",
            ak_binding=("000b" + "cd" * 32, "enr-1"),
        )
    untouched(victim, link)


def test_device_ak_record_refuses_a_symlink(tmp_path: Path, victim: Path) -> None:
    link = plant(tmp_path / "dev" / AK_BOUND_FILE, victim)
    with pytest.raises(EnrollClientError, match=rf"cannot write {link}: {REFUSED}"):
        record_binding(tmp_path / "dev", "000b" + "cd" * 32, "b-1")
    untouched(victim, link)


def test_device_dir_modes_under_umask_0(tmp_path: Path) -> None:
    out = tmp_path / "var" / "device"
    with umask(0):
        store = device_dir.new_key_store(
            device_dir.KeyStoreSpec.parse("file"), out, None, None, previous=None
        )
        record_binding(out, "000b" + "cd" * 32, "b-1")
    assert mode(tmp_path / "var") == mode(out) == 0o700
    assert isinstance(store, FileKeyStore) and mode(store.path) == 0o600
    assert mode(out / AK_BOUND_FILE) == 0o644


# --- last good copies: JWKS, CRL, policy --------------------------------------------------


def test_jwks_cache_file_is_refused_and_logged_not_unlinked(
    tmp_path: Path, victim: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = plant(tmp_path / "jwks-cache.json", victim)
    source = JwksSource(
        "https://issuer.example/jwks",
        cache_file=link,
        wall_clock=lambda: NOW,
    )
    source._fetched_at = NOW  # as after a successful fetch (the fetch itself needs HTTPS)
    with caplog.at_level(logging.ERROR, logger="ztagent"):
        source._store_cache_file(b'{"keys": []}')
    untouched(victim, link)  # neither written through nor replaced (it used to be unlinked)
    assert f"refusing to write the JWKS cache file {link}: it is a symbolic link" in caplog.text


def test_jwks_cache_file_mode_under_umask_0(tmp_path: Path) -> None:
    cache = tmp_path / "new" / "jwks-cache.json"
    source = JwksSource("https://issuer.example/jwks", cache_file=cache, wall_clock=lambda: NOW)
    source._fetched_at = NOW
    with umask(0):
        source._store_cache_file(b'{"keys": []}')
    assert mode(cache) == 0o600 and mode(cache.parent) == 0o700


def test_crl_last_good_copy_refuses_a_symlink(ca_dir: Path, tmp_path: Path) -> None:
    layout = ca_store.CaLayout(ca_dir)
    older = layout.crl.read_bytes()
    victim = tmp_path / "old-crl.pem"
    victim.write_bytes(older)  # the link resolves to a valid, older CRL: still not written
    ca_store.write_crl(ca_dir, NOW)  # the CA has a newer one to fetch
    link = plant(tmp_path / "sidecar" / "crl.pem", victim)
    fetcher = CrlFetcher(f"file:{layout.crl}", layout.bundle, link)
    assert asyncio.run(fetcher.fetch_once(NOW + timedelta(seconds=1))) is False
    health = fetcher.health()
    assert not health.ok
    assert health.last_error == f"crl_unwritable: {link}: {REFUSED} (refusing to write through it)"
    assert victim.read_bytes() == older and link.is_symlink()


def test_policy_last_good_copy_refuses_a_symlink(tmp_path: Path, victim: Path) -> None:
    policy = tmp_path / "policies"
    policy.mkdir()
    (policy / "authz.rego").write_text("package ztagent.authz\n")
    keep = tmp_path / "last-good"
    keep.mkdir()
    link = plant(keep / "current", victim)
    with pytest.raises(OSError, match=REFUSED) as info:
        save_last_good(policy, keep)
    assert info.value.filename == str(link)
    untouched(victim, link)
    assert last_good_path(keep) is None  # a planted copy is never served either


def test_policy_last_good_copy_modes_under_umask_0(tmp_path: Path) -> None:
    policy = tmp_path / "policies"
    (policy / "data").mkdir(parents=True)
    (policy / "authz.rego").write_text("package ztagent.authz\n")
    (policy / "data" / "data.json").write_text("{}")
    keep = tmp_path / "state" / "last-good"
    with umask(0):
        saved = save_last_good(policy, keep)
    assert saved == keep / "current" / "policy"
    assert mode(keep.parent) == mode(keep) == mode(saved) == mode(saved / "data") == 0o700
    assert mode(saved / "authz.rego") == mode(saved / "data" / "data.json") == 0o600


# --- posture state of the sidecar -----------------------------------------------------------


def _posture(fingerprint: str) -> AttestedPosture:
    return AttestedPosture(
        attestation_id="att-1",
        device_id="cam-1",
        cert_fingerprint=fingerprint,
        ak_name="000b" + "cd" * 32,
        verified_at=NOW,
        expires_at=NOW + timedelta(seconds=600),
        firmware={"name": "edge-fw"},
        boot={"verified": True},
        host={},
        firmware_svn=3,
        quote_clock=1,
        quote_reset_count=1,
    )


def test_shared_posture_cache_refuses_a_symlink(tmp_path: Path, victim: Path) -> None:
    cache = SharedPostureCache(tmp_path / "state")
    fingerprint = "ab" * 32
    link = plant(tmp_path / "state" / "posture-cache" / f"{fingerprint}.json", victim)
    with pytest.raises(OSError, match=REFUSED) as info:
        cache.put(_posture(fingerprint))
    untouched(victim, link)
    err = state_unwritable(info.value)  # what the Attest handler answers the device
    assert err.code == STATE_UNWRITABLE and err.rpc_status() == "UNAVAILABLE"
    assert str(link) not in err.message  # the path is the sidecar's log's, not the client's


def test_state_unwritable_logs_the_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    exc = OSError(40, "is a symbolic link (refusing to write through it)", str(tmp_path / "x"))
    with caplog.at_level(logging.ERROR, logger="ztagent.attestation"):
        state_unwritable(exc)
    assert f"cannot write posture state {tmp_path / 'x'}: is a symbolic link" in caplog.text


def test_posture_state_dirs_and_files_under_umask_0(tmp_path: Path) -> None:
    state = tmp_path / "var" / "state"
    with umask(0):
        cache = SharedPostureCache(state)
        nonces = SharedNonceStore(state)
        cache.put(_posture("ab" * 32))
        nonce, _ = nonces.issue("cd" * 32, NOW)
    assert mode(tmp_path / "var") == mode(state) == mode(nonce_dir(state)) == 0o700
    assert mode(state / "posture-cache") == 0o700
    assert mode(state / "posture-cache" / f"{'ab' * 32}.json") == 0o600
    assert mode(nonce_dir(state) / nonce.hex()) == 0o600


def test_shared_nonce_files_are_never_followed(tmp_path: Path, victim: Path) -> None:
    nonce = b"\x07" * 32
    store = SharedNonceStore(tmp_path / "state", rng=lambda n: nonce)
    link = plant(nonce_dir(tmp_path / "state") / nonce.hex(), victim)
    with pytest.raises(OSError):
        store.issue("cd" * 32, NOW)
    untouched(victim, link)


# --- workloads ----------------------------------------------------------------------------


def test_storage_key_file_symlink_is_refused(tmp_path: Path, victim: Path) -> None:
    link = plant(tmp_path / "data" / "storage.key", victim)
    with pytest.raises(KeyFileError, match=rf"^key_file_invalid: {link}: cannot open .*symbolic"):
        load_or_create_keys(link)
    untouched(victim, link)


def test_storage_database_symlink_is_refused(tmp_path: Path, victim: Path) -> None:
    data = tmp_path / "data"
    load_or_create_keys_path = data / "storage.key"
    data.mkdir()
    load_or_create_keys(load_or_create_keys_path)
    link = plant(data / "storage.db", victim)
    with pytest.raises(BackendError, match=rf"^storage_backend: {link}: cannot open .*symbolic"):
        Store.open(data)
    untouched(victim, link)


def test_storage_modes_under_umask_0(tmp_path: Path) -> None:
    data = tmp_path / "var" / "storage"
    with umask(0):
        Store.open(data).close()
    assert mode(tmp_path / "var") == mode(data) == 0o700
    assert mode(data / "storage.key") == mode(data / "storage.db") == 0o600


# --- dev tools ----------------------------------------------------------------------------


def test_dev_issuer_lock_is_never_followed(ca_dir: Path, victim: Path) -> None:
    from ztagent.tokens.errors import DevIssuerError

    link = plant(ca_dir / ".token-issuer.lock", victim)
    with pytest.raises(DevIssuerError, match=rf"^dev_issuer_invalid: cannot lock {link}"):
        init_dev_issuer(ca_dir, "ztagent.dev")
    untouched(victim, link)


def test_dev_tpm_manufacturer_refuses_a_symlinked_key(tmp_path: Path, victim: Path) -> None:
    directory = tmp_path / "tpm-manufacturer"
    link = plant(directory / "ek-ca.key", victim)
    with pytest.raises(OSError, match=REFUSED):
        tpm_manufacturer.init(directory)
    untouched(victim, link)


# --- the helper ---------------------------------------------------------------------------


def test_make_private_dir_creates_every_missing_level_0700(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    with umask(0):
        make_private_dir(existing / "a" / "b" / "c")
        make_private_dir(existing / "a" / "b" / "c")  # again: nothing to do
    assert mode(existing) == 0o755  # not ours: left alone
    for path in (existing / "a", existing / "a" / "b", existing / "a" / "b" / "c"):
        assert mode(path) == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        make_private_dir(tmp_path / "file")


def test_posture_state_lock_and_file_are_never_followed(tmp_path: Path, victim: Path) -> None:
    from ztagent.posture.state import RollbackStore

    state = tmp_path / "state" / "firmware-svn.json"
    lock = plant(state.with_name(state.name + ".lock"), victim)
    store = RollbackStore(state)
    with pytest.raises(OSError) as info:  # the lock: O_NOFOLLOW
        store.check_and_record("cam-1", 3)
    assert info.value.errno == errno.ELOOP
    untouched(victim, lock)
    lock.unlink()
    plant(state, victim)
    with pytest.raises(ConfigError, match=REFUSED):  # neither read nor written through
        RollbackStore(state).check_and_record("cam-1", 3)
    untouched(victim, state)


def test_cli_file_errors_are_one_line_not_a_traceback(
    tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ztagent.cli import main

    keys = tmp_path / "vendor"
    assert main(["firmware", "keygen", "--out", str(keys), "--name", "acme"]) == 0
    out = tmp_path / "refs.json"
    link = plant(out, victim)
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"firmware")
    code = main(
        ["firmware", "sign", str(firmware), "--key", str(keys / "acme.key"), "--name", "fw",
         "--version", "1.0", "--svn", "1", "--out", str(link)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("ztagent: error: ") and REFUSED in err, err
    assert "Traceback" not in err
    untouched(victim, link)
