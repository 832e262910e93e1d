"""Logging setup: one line per event to stderr.

Under systemd (``$JOURNAL_STREAM`` or ``$INVOCATION_ID`` set) each line starts
with its syslog priority as ``<N>`` (sd-daemon(3)) and carries no timestamp,
since the journal adds its own.  Module loggers are ``mlbench_daemon.<module>``;
a line about one node or job names it (``log.info("node %s: ...", name)``).
"""

import logging
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

# sd-daemon.h: SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _OneLine(logging.Formatter):
    """Newlines (multi-line messages, tracebacks) are escaped: one event, one line.

    A record's traceback is kept only when *tracebacks* (``--log-level debug``); otherwise
    the line is the message alone, which names the exception itself.
    """

    def __init__(self, fmt: str, tracebacks: bool = False) -> None:
        super().__init__(fmt)
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if not self.tracebacks and (record.exc_info or record.exc_text or record.stack_info):
            record = logging.makeLogRecord(record.__dict__)
            record.exc_info = record.exc_text = record.stack_info = None
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
    debug = level.upper() == "DEBUG"
    if journald:
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s", debug))
    else:
        handler.setFormatter(_OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s", debug))
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
    threading.excepthook = _thread_died
    sys.excepthook = _uncaught
    return handler


_log = logging.getLogger("mlbench_daemon")


def _thread_died(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception: one log line, not Python's multi-line print."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    exc = (args.exc_type, args.exc_value, args.exc_traceback)
    _log.error("thread %s died: %r", name, args.exc_value, exc_info=exc)  # type: ignore[arg-type]


def _uncaught(
    exc_type: type[BaseException], value: BaseException, tb: types.TracebackType | None
) -> None:
    _log.critical("uncaught: %r", value, exc_info=(exc_type, value, tb))


class _ErrorStream:
    """``wsgi.errors`` as log lines: bottle writes a route's traceback there (one line at
    debug, since api/plugin.py logs the 500 itself) and its own critical errors (one line at error).
    """

    def write(self, text: str) -> int:
        text = text.strip()
        if text:
            level = logging.DEBUG if text.startswith("Traceback") else logging.ERROR
            logging.getLogger("mlbench_daemon.wsgi").log(level, "%s", text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        self.write("".join(lines))

    def flush(self) -> None:
        pass


def errors_to_log(app: Callable[..., Any]) -> Callable[..., Any]:
    """The WSGI *app* with its ``wsgi.errors`` going to the daemon's log."""
    stream = _ErrorStream()

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ["wsgi.errors"] = stream
        return app(environ, start_response)

    return wrapped
