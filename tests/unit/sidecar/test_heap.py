"""The collector settings a serving process takes once it serves."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from ztagent.sidecar.heap import GC_THRESHOLD, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_young_collections_are_rarer() -> None:
    start_up = [object()]  # a container built before the process serves
    settle_heap()
    assert gc.get_threshold() == GC_THRESHOLD
    assert gc.get_freeze_count() > 0
    assert not any(o is start_up for o in gc.get_objects())  # frozen, no longer scanned


@pytest.mark.usefixtures("restored_gc")
def test_cyclic_garbage_is_still_collected_without_an_explicit_collect() -> None:
    settle_heap()
    assert gc.isenabled()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle only the collector frees
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None
    # net new containers past the young threshold: the collector runs on its own
    held = [[] for _ in range(GC_THRESHOLD[0] * 2)]
    assert gone() is None
    del held
