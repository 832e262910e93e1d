"""Logging setup: one line per event to stderr.

Under systemd (``$JOURNAL_STREAM`` or ``$INVOCATION_ID`` set) each line starts
with its syslog priority as ``<N>`` (sd-daemon(3)) and carries no timestamp,
since the journal adds its own.  Module loggers are ``mlbench_daemon.<module>``;
a line about one node or job names it (``log.info("node %s: ...", name)``).
"""

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

# sd-daemon.h: SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _OneLine(logging.Formatter):
    """Newlines (multi-line messages, tracebacks) are escaped: one event, one line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


class _JournalFormatter(_OneLine):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{prio}>{super().format(record)}"


def under_systemd(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


def setup(
    level: str = "info", journald: bool | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Configure the root logger; *journald* None = detect from the environment."""
    if journald is None:
        journald = under_systemd()
    handler = logging.StreamHandler(stream or sys.stderr)
    if journald:
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(_OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("paramiko").setLevel(logging.WARNING)
    # paramiko.transport's records repeat failures the daemon reports itself (ssh.py)
    quiet = logging.WARNING if level.upper() == "DEBUG" else logging.CRITICAL
    logging.getLogger("paramiko.transport").setLevel(quiet)
    # "Task queue depth is N" on every burst of requests: load, not an event to log
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return handler
