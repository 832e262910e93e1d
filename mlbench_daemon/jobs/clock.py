"""Time as the job code sees it: wall time, monotonic time, waiting, timers.

``Clock()`` is the real thing.  Passing another object with the same four methods
(tests do) makes timeouts, backoffs and ``mpi.lost_after_s`` run on its time, so
they can be tested without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock:
    def time(self) -> float:
        """Wall time (epoch seconds): what records store."""
        return time.time()

    def monotonic(self) -> float:
        """For measuring how long something lasted."""
        return time.monotonic()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait up to `seconds` for `event` -> whether it is set."""
        return event.wait(seconds)

    def timer(self, seconds: float, action: Callable[[], object]) -> Timer:
        """Call `action` in a daemon thread after `seconds`, unless cancelled first."""
        t = threading.Timer(max(0.0, seconds), action)
        t.daemon = True
        t.start()
        return t
