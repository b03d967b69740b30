"""BundleFetcher against a real nginx on loopback (tests.fixtures.nginx): ETag and 304, a new
revision installed only after it validated, a refused bundle never replacing the copy, size
cap, bearer token, errors counted and the copy kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.nginx import NginxServer, nginx_server
from ztagent.addresses import check_bundle_url
from ztagent.device.bundle_fetch import BundleFetcher
from ztagent.errors import ConfigError
from ztagent.policy.errors import PolicyLoadError

pytestmark = pytest.mark.integration

TOKEN = "bundle-reader-token"


@pytest.fixture
def nginx() -> Iterator[NginxServer]:
    with nginx_server(bearer_token=TOKEN) as server:
        yield server


def _validate(path: Path) -> str:
    """Stand-in for the sidecar's signature + compile check: the revision is the content;
    content starting with b'bad' is refused as a forged bundle would be."""
    data = path.read_bytes()
    if data.startswith(b"bad"):
        raise PolicyLoadError("bundle_signature_invalid", f"{path}: forged")
    return data.decode()


def _fetcher(
    nginx: NginxServer, tmp_path: Path, rel: str = "bundles/edge.tar.gz", **kw: object
) -> BundleFetcher:
    return BundleFetcher(
        nginx.url(rel),
        tmp_path / "node" / "bundle.tar.gz",
        _validate,
        **kw,  # type: ignore[arg-type]
    )


async def test_download_304_new_revision_and_a_refused_bundle(
    nginx: NginxServer, tmp_path: Path
) -> None:
    nginx.publish("bundles/edge.tar.gz", b"rev-1")
    fetcher = _fetcher(nginx, tmp_path)
    assert await fetcher.fetch_once() is True
    assert fetcher.dest.read_bytes() == b"rev-1" and fetcher.health().revision == "rev-1"
    assert await fetcher.fetch_once() is False  # unchanged: a 304, nothing downloaded
    nginx.publish("bundles/edge.tar.gz", b"rev-2")
    assert await fetcher.fetch_once() is True and fetcher.dest.read_bytes() == b"rev-2"
    nginx.publish("bundles/edge.tar.gz", b"bad-forged")
    assert await fetcher.fetch_once() is False
    assert fetcher.dest.read_bytes() == b"rev-2"  # the copy that serves is untouched
    health = fetcher.health()
    assert not health.ok and "bundle_signature_invalid" in (health.last_error or "")
    assert health.revision == "rev-2" and health.fetch_failures == 1
    assert not list(fetcher.dest.parent.glob("*.candidate*"))  # no leftovers
    assert nginx.statuses("/bundles/edge.tar.gz") == [200, 304, 200, 200]
    # a restart keeps the ETag of the copy it holds: the first poll is a 304 again
    nginx.publish("bundles/edge.tar.gz", b"rev-2")
    restarted = _fetcher(nginx, tmp_path)
    assert await restarted.fetch_once() is True  # rev-2 re-published: new ETag, same bytes
    again = _fetcher(nginx, tmp_path)
    assert await again.fetch_once() is False
    assert nginx.statuses("/bundles/edge.tar.gz")[-1] == 304


async def test_size_cap_missing_bundle_and_an_unreachable_server(
    nginx: NginxServer, tmp_path: Path
) -> None:
    nginx.publish("bundles/big.tar.gz", b"x" * 2048)
    big = _fetcher(nginx, tmp_path, "bundles/big.tar.gz", max_bytes=1024)
    assert await big.fetch_once() is False
    assert "bundle_too_large" in (big.health().last_error or "") and not big.dest.exists()
    missing = _fetcher(nginx, tmp_path, "bundles/none.tar.gz")
    assert await missing.fetch_once() is False
    assert "HTTP 404" in (missing.health().last_error or "")
    gone = BundleFetcher("http://127.0.0.1:9/b.tar.gz", tmp_path / "g.tar.gz", _validate)
    assert await gone.fetch_once() is False
    assert "bundle_unavailable" in (gone.health().last_error or "")


async def test_a_bearer_token_from_a_file(nginx: NginxServer, tmp_path: Path) -> None:
    nginx.publish("bundles/edge.tar.gz", b"rev-private")
    anonymous = _fetcher(nginx, tmp_path, "private/bundles/edge.tar.gz")
    assert await anonymous.fetch_once() is False
    assert "HTTP 401" in (anonymous.health().last_error or "")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    authorised = _fetcher(nginx, tmp_path, "private/bundles/edge.tar.gz", token_file=token_file)
    assert await authorised.fetch_once() is True
    assert authorised.dest.read_bytes() == b"rev-private"


def test_plain_http_only_to_loopback_and_delays_checked(tmp_path: Path) -> None:
    check_bundle_url("https://bundles.example/edge.tar.gz")
    check_bundle_url("http://127.0.0.1:8080/edge.tar.gz")
    check_bundle_url("http://[::1]:8080/edge.tar.gz")
    for bad in ("http://bundles.example/edge.tar.gz", "ftp://x/y", "file:///etc/passwd"):
        with pytest.raises(ConfigError) as info:
            check_bundle_url(bad)
        assert info.value.key == "policy.bundle_url"
    with pytest.raises(ConfigError) as info:
        BundleFetcher(
            "https://b.example/x.tar.gz", tmp_path / "b", _validate, min_delay_s=9, max_delay_s=3
        )
    assert info.value.key == "policy.bundle_min_delay_s"
    fetcher = BundleFetcher(
        "https://b.example/x.tar.gz", tmp_path / "b", _validate, min_delay_s=10, max_delay_s=20,
        rng=iter([0.0, 1.0, 0.5]).__next__,
    )  # fmt: skip
    assert [fetcher.next_delay() for _ in range(3)] == [10.0, 20.0, 15.0]
