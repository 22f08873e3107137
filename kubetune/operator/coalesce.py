"""One reconcile at a time per FineTuneJob, and bursts of triggers folded into one more.

A job is reconciled on its own events, on each of its Jobs' events and on every resync
round; at scale many arrive while a reconcile of that job is running. Rather than each
waiting on the job's lock (a worker thread each) and then repeating the same reads, a
trigger that finds a reconcile running only asks for one more run after it: however many
arrive meanwhile, the job is reconciled once more, after the last of them, and sees the
state they announced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class Coalescer:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        #: The keys being run, each with whether another run was asked for meanwhile.
        self._running: dict[Hashable, bool] = {}
        self.folded = 0

    def run(self, key: Hashable, fn: Callable[[], T]) -> list[T]:
        """Run `fn` for `key` now, again while triggers came in during a run, and return
        its results; or, when a run for `key` is under way in another thread, ask it for
        one more run and return [] at once. An exception ends the runs (the triggers it
        absorbed are left to the caller's retry and the resync round) and propagates."""
        with self._guard:
            if key in self._running:
                self._running[key] = True
                self.folded += 1
                return []
            self._running[key] = False
        results: list[T] = []
        try:
            while True:
                results.append(fn())
                with self._guard:
                    if not self._running[key]:
                        del self._running[key]
                        return results
                    self._running[key] = False
        except BaseException:
            with self._guard:
                self._running.pop(key, None)
            raise

    def busy(self, key: Hashable) -> bool:
        with self._guard:
            return key in self._running
