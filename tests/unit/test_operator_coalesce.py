"""One reconcile at a time per job; triggers during a run fold into one more run."""

from __future__ import annotations

import threading
import time

import pytest

from kubetune.operator.coalesce import Coalescer

pytestmark = pytest.mark.unit


def test_triggers_during_a_run_fold_into_exactly_one_more_run() -> None:
    c = Coalescer()
    entered, release = threading.Event(), threading.Event()
    runs: list[int] = []

    def slow() -> int:
        runs.append(len(runs))
        if len(runs) == 1:
            entered.set()
            release.wait(5)
        return len(runs)

    results: list[list[int]] = []
    first = threading.Thread(target=lambda: results.append(c.run("job", slow)))
    first.start()
    assert entered.wait(5)
    # Five more triggers while it runs: each returns at once, having asked for one rerun.
    assert [c.run("job", slow) for _ in range(5)] == [[]] * 5
    assert c.busy("job")
    release.set()
    first.join(5)
    assert results == [[1, 2]]  # the first run, then one more for all five triggers
    assert c.folded == 5
    assert not c.busy("job")
    assert c.run("job", lambda: 7) == [7]  # idle again: runs at once


def test_other_keys_run_concurrently_and_an_error_frees_the_key() -> None:
    c = Coalescer()
    gate = threading.Event()
    seen: list[str] = []

    def blocked() -> str:
        gate.wait(5)
        return "a"

    t = threading.Thread(target=lambda: c.run("a", blocked))
    t.start()
    time.sleep(0.05)

    def other() -> str:
        seen.append("b")
        return "b"

    assert c.run("b", other) == ["b"]  # not held up by "a"
    assert seen == ["b"]
    gate.set()
    t.join(5)

    def boom() -> str:
        raise RuntimeError("API down")

    with pytest.raises(RuntimeError):
        c.run("a", boom)
    assert not c.busy("a")
    assert c.run("a", lambda: "again") == ["again"]
