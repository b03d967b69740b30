"""Dynamic batching with a model whose output is its input: any cross-talk would show."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures.ci import require_module

torch = require_module("torch")

from ztagent.workloads.inference.batching import Batcher  # noqa: E402
from ztagent.workloads.inference.errors import InferenceBusyError, InferenceError  # noqa: E402
from ztagent.workloads.inference.manifest import ModelManifest  # noqa: E402
from ztagent.workloads.inference.models import BatchOutput  # noqa: E402


class EchoModel:
    """Implements LoadedModel's interface: row i of the output is input i's first values.

    ``gate`` holds the worker thread inside run() until the test releases it.
    """

    def __init__(self) -> None:
        self.manifest = ModelManifest("echo", "1", "echo.pt", "ab" * 32, (2,), ("a", "b"), False)
        self.name = "echo"
        self.row_by_row = False
        self.batches: list[list[float]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def run(self, inputs: Sequence[torch.Tensor]) -> BatchOutput:
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("boom")
        self.batches.append([float(t[0]) for t in inputs])
        return BatchOutput([[float(t[0]), float(t[1])] for t in inputs], 0.001)


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Batcher, EchoModel]]:
    model = EchoModel()
    with ThreadPoolExecutor(1, thread_name_prefix="worker") as executor:
        batcher = Batcher(
            model,  # type: ignore[arg-type]
            executor,
            max_batch=8,
            max_wait_s=0.05,
            max_pending=64,
        )
        batcher.start()
        yield batcher, model
        await batcher.close()


async def test_each_caller_gets_its_own_row(echo: tuple[Batcher, EchoModel]) -> None:
    batcher, model = echo
    results = await asyncio.gather(
        *(batcher.predict(torch.tensor([float(i), -float(i)])) for i in range(50))
    )
    assert [r.probabilities for r in results] == [[float(i), -float(i)] for i in range(50)]
    assert all(len(b) <= 8 for b in model.batches)
    assert max(len(b) for b in model.batches) == 8  # 50 queued at once: full batches
    assert sorted(v for b in model.batches for v in b) == list(range(50))  # each ran once
    assert {r.batch_size for r in results} >= {8}
    assert model.threads == {"worker_0"}  # never on the event loop


async def test_a_lone_request_waits_at_most_max_wait(echo: tuple[Batcher, EchoModel]) -> None:
    batcher, model = echo
    result = await asyncio.wait_for(batcher.predict(torch.tensor([1.0, 2.0])), 5)
    assert result.batch_size == 1
    assert model.batches == [[1.0]]


async def test_cancelled_caller_is_skipped(echo: tuple[Batcher, EchoModel]) -> None:
    batcher, model = echo
    model.gate.clear()  # the worker blocks in the first batch
    first = asyncio.ensure_future(batcher.predict(torch.tensor([1.0, 0.0])))
    await asyncio.sleep(0.1)  # batch [1] has left and is blocked in the worker
    gone = asyncio.ensure_future(batcher.predict(torch.tensor([2.0, 0.0])))
    kept = asyncio.ensure_future(batcher.predict(torch.tensor([3.0, 0.0])))
    await asyncio.sleep(0)
    gone.cancel()
    model.gate.set()
    assert (await first).probabilities == [1.0, 0.0]
    assert (await kept).probabilities == [3.0, 0.0]
    assert model.batches == [[1.0], [3.0]]  # the cancelled input never ran


async def test_model_failure_fails_only_that_batch(echo: tuple[Batcher, EchoModel]) -> None:
    batcher, model = echo
    model.fail = True
    with pytest.raises(InferenceError, match="inference_failed: model 'echo' failed"):
        await batcher.predict(torch.tensor([1.0, 0.0]))
    model.fail = False
    assert (await batcher.predict(torch.tensor([2.0, 0.0]))).probabilities == [2.0, 0.0]


async def test_overload_and_close() -> None:
    model = EchoModel()
    model.gate.clear()
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(model, executor, max_batch=1, max_wait_s=0, max_pending=2)  # type: ignore[arg-type]
        batcher.start()
        running = asyncio.ensure_future(batcher.predict(torch.zeros(2)))
        await asyncio.sleep(0.05)  # in the worker; the queue is empty again
        queued = [asyncio.ensure_future(batcher.predict(torch.zeros(2))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(InferenceBusyError, match="has 2 inputs queued \\(maximum 2\\)"):
            await batcher.predict(torch.zeros(2))
        await batcher.close()
        for fut in queued:
            with pytest.raises(InferenceBusyError, match="shutting_down"):
                await fut
        with pytest.raises(InferenceBusyError, match="shutting_down"):
            await running  # its batch was in the worker: its caller is told, not left waiting
        with pytest.raises(InferenceBusyError, match="shutting_down"):
            await batcher.predict(torch.zeros(2))
        model.gate.set()
