"""TrustFiles: loading from disk and noticing changes."""

from __future__ import annotations

import pytest

from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.errors import ConfigError
from ztagent.pki.trust_files import TrustFiles

from ._support import NOW, Pki


def test_load_then_changed_after_crl_rewrite(pki: Pki) -> None:
    files = TrustFiles(pki.layout.bundle, pki.layout.crl)
    assert files.changed()  # never loaded
    trust = files.load()
    assert len(trust.roots) == 1 and len(trust.intermediates) == 1 and len(trust.crls) == 1
    assert not files.changed()
    ca_store.write_crl(pki.dir, now=NOW)
    assert files.changed()
    assert files.load().crls[0].next_update_utc == NOW + builders.CRL_LIFETIME
    assert not files.changed()


def test_reload_of_junk_raises_naming_the_file(pki: Pki) -> None:
    files = TrustFiles(pki.layout.bundle, pki.layout.crl)
    files.load()
    pki.layout.crl.write_bytes(b"garbage")
    assert files.changed()
    with pytest.raises(ConfigError, match=r"crl\.pem: not a PEM or DER CRL"):
        files.load()
    assert not files.changed()  # the bad file is not re-read until it changes again


def test_missing_file(pki: Pki) -> None:
    files = TrustFiles(pki.dir / "nope.pem", None)
    with pytest.raises(ConfigError, match=r"nope\.pem: cannot read"):
        files.load()


def test_without_crl_path(pki: Pki) -> None:
    files = TrustFiles(pki.layout.bundle, None)
    assert files.load().crls == ()
    assert not files.changed()
