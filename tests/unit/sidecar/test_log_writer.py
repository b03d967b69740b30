"""The decision log written by a child process (``sidecar.log_writer``): the same bytes as the
writer thread, start-up failures named, nothing acknowledged lost when the sidecar dies, a
dead writer counted and replaced, and a stalled writer never blocking a drop-mode submit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.unit.policy.test_decision_log import record
from ztagent.errors import ConfigError
from ztagent.policy.decision_log import DecisionLog, DecisionLogError
from ztagent.policy.log_verify import log_files, verify_files
from ztagent.sidecar.log_writer import ProcessDecisionLog

REPO = Path(__file__).resolve().parents[3]


def _lines(path: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in log_files(path))


def _wait(predicate: object, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def logs() -> Iterator[list[ProcessDecisionLog]]:
    """Every log a test starts is closed (its writer process ended) afterwards."""
    started: list[ProcessDecisionLog] = []
    yield started
    for log in started:
        log.close(timeout_s=5.0)
        proc = log._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def _start(logs: list[ProcessDecisionLog], path: Path, **kw: object) -> ProcessDecisionLog:
    log = ProcessDecisionLog(path, **kw)  # type: ignore[arg-type]
    logs.append(log)
    log.start()
    return log


def test_the_file_is_byte_for_byte_what_the_writer_thread_writes(
    tmp_path: Path, logs: list[ProcessDecisionLog]
) -> None:
    records = [record(i, allow=i % 3 == 0) for i in range(300)]
    thread = DecisionLog(tmp_path / "thread" / "d.jsonl", max_bytes=8192, backups=50)
    thread.start()
    for r in records:
        assert thread.submit(r)
    assert thread.close()

    async def through_the_loop() -> ProcessDecisionLog:
        log = _start(logs, tmp_path / "process" / "d.jsonl", max_bytes=8192, backups=50)
        for i, r in enumerate(records):
            assert log.submit(r)
            if i % 50 == 0:
                await asyncio.sleep(0.01)  # several batches, each handed over by the loop
        return log

    log = asyncio.run(through_the_loop())
    assert log.close()
    a = [p.read_bytes() for p in log_files(tmp_path / "thread" / "d.jsonl")]
    b = [p.read_bytes() for p in log_files(tmp_path / "process" / "d.jsonl")]
    assert len(a) > 3 and a == b
    stats = log.stats
    assert (stats.written, stats.dropped, stats.lost, stats.errors) == (300, 0, 0, 0)
    assert stats.rotated == len(a) - 1


def test_checkpoints_are_signed_by_the_writer_process_and_the_chain_verifies(
    tmp_path: Path, logs: list[ProcessDecisionLog]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "d.jsonl"
    log = _start(logs, path, signer_pem=pem, checkpoint_every=10, max_bytes=16384, backups=20)
    for i in range(55):
        log.submit(record(i))
    assert log.close()
    report = verify_files(log_files(path))
    assert report.ok, report.reason
    assert log.stats.written == 55
    assert log.stats.checkpoints >= 6  # every 10 lines, at rotations, at close


def test_a_log_that_cannot_be_opened_stops_start_with_its_path(
    tmp_path: Path, logs: list[ProcessDecisionLog]
) -> None:
    path = tmp_path / "d.jsonl"
    path.symlink_to(tmp_path / "elsewhere")
    log = ProcessDecisionLog(path)
    logs.append(log)
    with pytest.raises(DecisionLogError) as caught:
        log.start()
    assert caught.value.code == "decision_log_unavailable"
    assert "is a symbolic link" in caught.value.message and "d.jsonl" in caught.value.message
    assert log._proc is None  # the writer process that could not open it is gone


def test_bad_settings_name_their_key_before_any_process_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"decision_log\.queue_size"):
        ProcessDecisionLog(tmp_path / "d.jsonl", queue_size=0)
    with pytest.raises(ConfigError, match=r"decision_log\.on_full"):
        ProcessDecisionLog(tmp_path / "d.jsonl", on_full="wait")  # type: ignore[arg-type]


_KILLED_SIDECAR = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from tests.unit.policy.test_decision_log import record
    from ztagent.sidecar.log_writer import ProcessDecisionLog
    log = ProcessDecisionLog(Path(sys.argv[1]))
    log.start()
    writer = log._proc.pid
    print(writer, flush=True)
    for i in range(1000):
        assert log.submit(record(i))  # no event loop: each is in the pipe when it returns
    os.kill(writer, signal.SIGSTOP)  # the writer falls behind: what follows waits in the pipe
    for i in range(1000, 1300):
        assert log.submit(record(i))
    os.kill(os.getpid(), signal.SIGKILL)  # the sidecar dies without closing anything
    """
)


def test_records_handed_over_survive_a_killed_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    with (tmp_path / "stderr").open("wb") as stderr:  # the writer inherits it: not a pipe
        sidecar = subprocess.run(
            [sys.executable, "-c", _KILLED_SIDECAR, str(path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            timeout=60,
        )
    assert sidecar.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()
    writer = int(sidecar.stdout.split()[0])
    try:
        assert _lines(path) < 1300  # the writer was stopped before the last records
        os.kill(writer, signal.SIGCONT)  # resumes with the sidecar gone (its stats pipe too)
        assert _wait(lambda: not Path(f"/proc/{writer}").exists(), 60.0), "it did not exit"
    finally:
        if Path(f"/proc/{writer}").exists():
            os.kill(writer, signal.SIGKILL)
    assert _lines(path) == 1300, (tmp_path / "stderr").read_text()[-2000:]
    assert verify_files(log_files(path)).ok


def test_a_dead_writer_is_counted_and_replaced_and_the_chain_continues(
    tmp_path: Path, logs: list[ProcessDecisionLog], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "d.jsonl"
    log = _start(logs, path)
    for i in range(20):
        log.submit(record(i))
    assert _wait(lambda: log.stats.written == 20)
    first = log._proc
    assert first is not None
    first.kill()
    first.wait()
    assert log.stats.errors == 1  # noticed at the next look
    second = log._proc
    assert second is not None and second.pid != first.pid
    assert "writer process ended" in caplog.text
    for i in range(20, 50):
        log.submit(record(i))
    assert log.close()
    assert log.stats.written == 50
    report = verify_files(log_files(path))
    assert report.ok and report.lines == _lines(path)


def test_a_writer_that_dies_again_at_once_is_restarted_at_the_next_hand_over(
    tmp_path: Path, logs: list[ProcessDecisionLog]
) -> None:
    path = tmp_path / "d.jsonl"
    log = _start(logs, path)
    for _ in range(2):  # two deaths within RESTART_INTERVAL_S: the second restart must wait
        proc = log._proc
        assert proc is not None
        proc.kill()
        proc.wait()
        log.stats  # noqa: B018 (noticed here)
    assert log._proc is None and log.stats.errors == 2
    log.submit(record(0))  # waits: too soon to start another writer
    time.sleep(1.1)
    log.submit(record(1))  # hands over: a new writer, and both records reach it
    assert log.close()
    assert log.stats.written == 2 and log.stats.lost == 0
    assert verify_files(log_files(path)).ok


def test_a_record_pickle_cannot_take_is_counted_and_the_rest_of_its_batch_written(
    tmp_path: Path, logs: list[ProcessDecisionLog]
) -> None:
    log = _start(logs, tmp_path / "d.jsonl")
    bad = record(1, input_doc={"x": lambda: None})

    async def one_batch() -> None:
        for r in (record(0), bad, record(2)):
            assert log.submit(r)
        await asyncio.sleep(0.05)  # the loop hands the three over as one batch

    asyncio.run(one_batch())
    assert log.close()
    stats = log.stats
    assert (stats.written, stats.errors, stats.lost, stats.queue_depth) == (2, 1, 1, 0)


def test_a_stalled_writer_never_blocks_a_drop_mode_submit(
    tmp_path: Path, logs: list[ProcessDecisionLog]
) -> None:
    log = _start(logs, tmp_path / "d.jsonl", queue_size=50)
    assert log._proc is not None
    os.kill(log._proc.pid, signal.SIGSTOP)  # a writer stuck on a hung disk
    total = 30_000  # far more than the pipe holds

    async def flood() -> tuple[int, float]:
        started = time.monotonic()
        accepted = 0
        for i in range(total):
            accepted += log.submit(record(i))
            if i % 500 == 0:
                await asyncio.sleep(0.006)  # let the loop hand batches over
        return accepted, time.monotonic() - started

    accepted, took = asyncio.run(flood())
    assert log.stats.dropped == total - accepted > 0
    assert took < 30
    os.kill(log._proc.pid, signal.SIGCONT)
    assert log.close(timeout_s=30)
    stats = log.stats
    assert stats.written == accepted and stats.lost == 0


def test_block_mode_waits_for_a_stalled_writer_and_loses_nothing(
    tmp_path: Path, logs: list[ProcessDecisionLog]
) -> None:
    log = _start(logs, tmp_path / "d.jsonl", queue_size=20, on_full="block")
    proc = log._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)

    async def run() -> int:
        async def submit_all() -> None:
            for i in range(30_000):  # far more than the pipe holds
                assert await log.asubmit(record(i))

        task = asyncio.create_task(submit_all())
        await asyncio.sleep(0.5)
        waiting = not task.done()  # the pipe is full: asubmit waits on the loop
        os.kill(proc.pid, signal.SIGCONT)
        await asyncio.wait_for(task, 60)
        return waiting

    assert asyncio.run(run())
    assert log.close(timeout_s=30)
    assert log.stats.written == 30_000 and log.stats.dropped == 0
