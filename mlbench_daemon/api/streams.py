"""Long answers (log follows, sync POSTs still waiting): at most ``server.max_streams``
at once, each holding its slot until its body is done or closed."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from mlbench_daemon.errors import TooManyStreams


class Streams:
    """Long answers in flight (log follows and sync POSTs still waiting), at most
    ``limit`` at once: each holds a server thread for as long as it lasts."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.held >= self.limit:
                raise TooManyStreams(
                    f"{self.held} long request(s) (log follows, waiting POSTs) are open, the "
                    f"most server.max_streams allows; try again later"
                )
            self.held += 1

    def give(self) -> None:
        with self._lock:
            self.held -= 1


class Held:
    """An answer's chunks holding one stream slot until the body is done or closed
    (the WSGI server calls close(); Bottle drops an iterator that yields nothing)."""

    def __init__(self, chunks: Iterable[bytes], streams: Streams) -> None:
        self.chunks: Iterator[bytes] = iter(chunks)
        self.streams: Streams | None = streams

    def __iter__(self) -> Held:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        streams, self.streams = self.streams, None
        if streams is not None:
            try:
                getattr(self.chunks, "close", lambda: None)()
            finally:
                streams.give()
