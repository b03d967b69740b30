"""The PostgreSQL fixture starts a real server the tests can share, and cleans up after itself."""

from __future__ import annotations

import os
import socket
import threading

import psycopg
import pytest

from tests.fixtures.postgres import (  # noqa: F401 (the fixtures)
    PostgresServer,
    fresh_database,
    postgres_dsn_fixture,
    postgres_server,
    postgres_server_fixture,
)

pytestmark = pytest.mark.integration


def test_insert_on_conflict_from_two_connections_keeps_one_row(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE used_tokens (jti text PRIMARY KEY, device text NOT NULL)")
    barrier = threading.Barrier(2)
    inserted: list[int] = []
    errors: list[BaseException] = []

    def insert(device: str) -> None:
        try:
            with psycopg.connect(postgres_dsn) as conn:
                barrier.wait(timeout=10)
                cur = conn.execute(
                    "INSERT INTO used_tokens (jti, device) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    ("jti-1", device),
                )
                inserted.append(cur.rowcount)
                conn.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(d,)) for d in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert sorted(inserted) == [0, 1]  # exactly one of the two inserted
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT jti, device FROM used_tokens").fetchall()
    assert len(rows) == 1
    assert rows[0][0] == "jti-1"


def test_each_test_gets_a_fresh_empty_database(postgres_server: PostgresServer) -> None:
    with fresh_database(postgres_server) as first, fresh_database(postgres_server) as second:
        assert first != second
        with psycopg.connect(first) as conn:
            conn.execute("CREATE TABLE t (x int)")
        with psycopg.connect(second) as conn:
            tables = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        assert tables == []
        left_open = psycopg.connect(first)  # the drop must not wait for it
    with psycopg.connect(postgres_server.dsn()) as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
    assert first.rsplit("/", 1)[1] not in names
    assert second.rsplit("/", 1)[1] not in names
    left_open.close()


def test_listens_on_loopback_only_and_is_gone_after_the_context() -> None:
    with postgres_server() as server:
        assert server.dsn().startswith(f"postgresql://ztagent@127.0.0.1:{server.port}/")
        with psycopg.connect(server.dsn()) as conn:
            settings: dict[str, str] = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings "
                    "WHERE name IN ('listen_addresses', 'unix_socket_directories')"
                ).fetchall()
            )
            is_super = conn.execute(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
        assert settings["listen_addresses"] == "127.0.0.1"
        assert settings["unix_socket_directories"] == str(server.base_dir)
        assert is_super == (True,)
        if os.geteuid() == 0:
            assert os.stat(server.base_dir / "data").st_uid != 0  # not run as root
        os.kill(server.pid, 0)  # alive while in use
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert not server.base_dir.exists()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect((server.host, server.port))
