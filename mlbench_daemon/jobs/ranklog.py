"""Per-rank output of a job with ``rank_output``: the combined log split on the head by
the launcher's rank tags (flavour.py) into one log per rank.

The combined log stays the launcher's output byte for byte, every line and tag kept;
the rank logs are derived from it, never the other way (store.py has the paths)::

    <state.dir>/logs/<id>.ranks/<rank>.log   what that rank printed, its tags removed
    <state.dir>/logs/<id>.ranks/split        the checkpoint (JSON): combined-log offset
                                             split so far, the rank of the piece in
                                             progress there, each rank log's size then

A tag starts a piece of that rank's output, which runs to its first newline or to the
next tag, whichever comes first (no launcher keeps a rank's partial line whole: the
next rank's tag can follow it on the same line).  What follows a newline untagged is the
launcher's own text: it stays in the combined log only.

``Splitter`` is pure.  It holds back the last bytes of what it is given while a tag may
begin there, so the same stream cut into any chunks gives the same rank logs (the
property tests/test_ranklog.py checks): rank logs are a function of the combined log.

``RankLogs`` reads the combined log from where it stopped, appends each rank's pieces,
and writes the checkpoint (a new file renamed over the old) every CHECKPOINT_BYTES and
when the job ends.  After a kill -9 of the daemon, or a write that failed (a full disk),
it starts again from the checkpoint: every rank log cut back to the size recorded there
and the combined log split again from its offset, so no piece is lost or written twice.
A checkpoint that does not fit the files (a host crash lost a tail the page cache held)
starts the split over from byte 0.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from typing import Any, BinaryIO

from mlbench_daemon.jobs import flavour
from mlbench_daemon.store import LOG_CHUNK_MAX, Store, StoreError

log = logging.getLogger(__name__)

CHECKPOINT_BYTES = 4 << 20  # a restart splits at most about this much of the log again
OPEN_FILES_MAX = 256  # rank logs kept open at once (a job may have thousands of ranks)

Pieces = dict[int, list[bytes]]  # rank -> its bytes, in order


class Splitter:
    """Splits a tagged stream into per-rank pieces, fed in chunks of any size."""

    def __init__(self, tag: re.Pattern[bytes], rank: int | None = None) -> None:
        self.tag = tag
        self.rank = rank  # whose piece the next byte continues; None: the launcher's text
        self.held = b""  # the stream's last bytes, while a tag may begin there
        self.fed = 0  # bytes given so far; `fed - len(held)` are split

    @property
    def consumed(self) -> int:
        return self.fed - len(self.held)

    def feed(self, data: bytes, final: bool = False) -> Pieces:
        """Split `data` (what follows the bytes fed before) -> each rank's new bytes.
        `final`: the stream ends here, nothing is held back."""
        buf = self.held + data
        self.fed += len(data)
        cut = len(buf) if final else self._undecided(buf)
        self.held = buf[cut:]
        parts = self.tag.split(buf[:cut])  # text, rank, text, rank, text, ...
        out: dict[bytes, list[bytes]] = collections.defaultdict(list)
        rank = None if self.rank is None else str(self.rank).encode()
        pairs = iter(parts)
        for text in pairs:  # one loop step per tag: keep it lean (a GB has ~10 million)
            if rank is not None and text:
                end = text.find(b"\n")
                if end < 0:
                    out[rank].append(text)
                else:
                    out[rank].append(text if end == len(text) - 1 else text[: end + 1])
                    rank = None  # the next line is the launcher's unless a tag starts it
            tag = next(pairs, None)
            if tag is None:
                break
            rank = tag
        self.rank = None if rank is None else int(rank)
        pieces: Pieces = {}
        for key, chunks in out.items():  # b"05" and b"5" are one rank
            pieces.setdefault(int(key), []).extend(chunks)
        return pieces

    def _undecided(self, buf: bytes) -> int:
        """Where a tag may begin that the bytes so far cannot tell (len(buf) if none): a
        '[' in the last TAG_MAX bytes, with no newline after it, that starts no whole
        tag (a tag holds neither a newline nor a second '[')."""
        start = max(len(buf) - flavour.TAG_MAX + 1, buf.rfind(b"\n") + 1, 0)
        while (q := buf.find(b"[", start)) >= 0:
            if not self.tag.match(buf, q):
                return q
            start = q + 1
        return len(buf)


class RankLogs:
    """The rank logs of one job, kept up with its combined log (``advance``)."""

    def __init__(
        self, store: Store, job_id: str, flavour_name: str, checkpoint_bytes: int = CHECKPOINT_BYTES
    ) -> None:
        self.store, self.id, self.every = store, job_id, checkpoint_bytes
        self.tag = flavour.get(flavour_name).tag
        self.splitter = Splitter(self.tag)
        self.read_to = 0  # the combined log's next byte to read
        self.sizes: dict[int, int] = {}
        self.checkpointed = 0  # the splitter's `consumed` at the last checkpoint
        self.files: dict[int, BinaryIO] = {}
        self.clean = False  # False: start again from the checkpoint before going on

    def advance(self, final: bool = False) -> None:
        """Split what the combined log has beyond what was split; `final`: the job is
        over (the held-back bytes go too, and the checkpoint is written).  StoreError
        if a rank log or the checkpoint cannot be written (the next call starts again
        from the checkpoint)."""
        path = self.store.rank_dir(self.id)
        try:
            if not self.clean:
                self._restart()
            self.clean = False
            while True:
                data, self.read_to = self.store.read_log(self.id, self.read_to, LOG_CHUNK_MAX)
                if not data:
                    break
                self._write(self.splitter.feed(data))
            if final:
                self._write(self.splitter.feed(b"", final=True))
            if final or self.splitter.consumed - self.checkpointed >= self.every:
                self._checkpoint()
            self.clean = True
        except OSError as e:
            self.close()
            raise StoreError(path, e) from None
        finally:
            if final:
                self.close()

    def close(self) -> None:
        files, self.files = self.files, {}
        for f in files.values():
            f.close()

    def _write(self, pieces: Pieces) -> None:
        for rank, chunks in pieces.items():
            f = self.files.get(rank)
            if f is None:
                if len(self.files) >= OPEN_FILES_MAX:
                    self.close()
                f = self.files[rank] = open(self.store.rank_log_path(self.id, rank), "ab", 0)
            data = b"".join(chunks)
            view = memoryview(data)
            while view:
                view = view[f.write(view) or 0 :]
            self.sizes[rank] = self.sizes.get(rank, 0) + len(data)

    def _checkpoint(self) -> None:
        state = {
            "offset": self.splitter.consumed,
            "rank": self.splitter.rank,
            "sizes": {str(r): n for r, n in sorted(self.sizes.items())},
        }
        path = self.store.rank_checkpoint_path(self.id)
        with open(path + ".new", "w") as f:
            json.dump(state, f)
        os.replace(path + ".new", path)
        self.checkpointed = self.splitter.consumed

    def _restart(self) -> None:
        """Back to the checkpoint: every rank log cut to its size there, the split
        resumed from its offset (from byte 0 if there is none, or it does not fit)."""
        self.close()
        os.makedirs(self.store.rank_dir(self.id), mode=0o700, exist_ok=True)
        state = self._read_checkpoint()
        on_disk = self.store.rank_log_sizes(self.id)
        fits = state is not None and state["offset"] <= self.store.log_size(self.id)
        if state is not None and fits:
            fits = all(on_disk.get(r, 0) >= n for r, n in state["sizes"].items())
        if state is None or not fits:
            if state is not None:
                log.warning("job %s: rank logs do not fit their checkpoint: split again", self.id)
            state = {"offset": 0, "rank": None, "sizes": {}}
        for rank, size in on_disk.items():
            keep = state["sizes"].get(rank, 0)
            if size != keep:
                os.truncate(self.store.rank_log_path(self.id, rank), keep)
        self.splitter = Splitter(self.tag, state["rank"])
        self.splitter.fed = self.read_to = self.checkpointed = state["offset"]
        self.sizes = dict(state["sizes"])

    def _read_checkpoint(self) -> dict[str, Any] | None:
        try:
            with open(self.store.rank_checkpoint_path(self.id)) as f:
                raw = json.load(f)
            return {
                "offset": int(raw["offset"]),
                "rank": None if raw["rank"] is None else int(raw["rank"]),
                "sizes": {int(r): int(n) for r, n in raw["sizes"].items()},
            }
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("job %s: unreadable rank-log checkpoint (%s): split again", self.id, e)
            return None
