"""The proxy's unary fast path through the real mTLS sidecar: a unary method takes exactly one
request message (read only after admission), and the admitted call's decision-log line,
whose writer is woken only once the call has gone upstream, is written on every path."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import Pki, channel
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration

UNARY = f"/{SERVICE}/Unary"


def _log_path(pki: Pki) -> Path:
    return pki.layout.dir.parent / "decisions.jsonl"  # write_config's [decision_log] path


async def _lines(pki: Pki, count: int) -> list[dict[str, object]]:
    """The decision log's first ``count`` lines, once the writer has written them (5 s)."""
    path = _log_path(pki)
    for _ in range(500):
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path}: {len(lines)} lines after 5 s, expected {count}")


@pytest.mark.parametrize("messages", [[], [b"one", b"two"]], ids=["none", "two"])
async def test_a_unary_method_takes_exactly_one_request_message(
    pki: Pki, sidecar: Sidecar, upstream: EchoUpstream, messages: list[bytes]
) -> None:
    async with channel(pki, sidecar.port, pki.mint("dev-1")) as ch:
        call = ch.stream_stream(UNARY)(timeout=10)  # a client that ignores the method's kind
        for message in messages:
            await call.write(message)
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await call.details() == f"unary method {UNARY} expects exactly one request message"
        assert await ch.unary_unary(UNARY)(b"fine", timeout=10) == b"fine"
    assert [seen.method for seen in upstream.seen] == ["Unary"]  # the refused one never left
    first, second = await _lines(pki, 2)
    # admitted (the policy saw only the headers), then stopped by the proxy: still logged
    assert (first["method"], first["allow"], first["enforced"]) == ("Unary", True, True)
    assert second["method"] == "Unary"


async def test_an_admitted_call_is_logged_without_further_traffic(
    pki: Pki, sidecar: Sidecar
) -> None:
    """The writer is woken by the call itself (not by a later submit or by close)."""
    async with channel(pki, sidecar.port, pki.mint("dev-1")) as ch:
        assert await ch.unary_unary(UNARY)(b"x", timeout=10) == b"x"
        (line,) = await _lines(pki, 1)
        assert (line["method"], line["allow"], line["device_id"]) == ("Unary", True, "dev-1")
        stream = ch.stream_stream(f"/{SERVICE}/Bidi")(timeout=10)
        await stream.write(b"ab")
        assert await stream.read() == b"ba"
        # the stream is still open: its line was written when the call went upstream
        assert [line["method"] for line in await _lines(pki, 2)] == ["Unary", "Bidi"]
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
