"""Named tokens with roles: the tokens file, its reload, and the check of a presented token.

The file (``server.tokens_file``) is JSON, written only by ``mlbench-daemon token
add/revoke`` (atomically: a new file renamed over the old), mode 0600::

    {"tokens": [
      {"id": "5c0f2a9e81d4", "name": "alice", "role": "submitter",
       "salt": "<32 hex>", "hash": "<64 hex: sha256(salt bytes + secret)>",
       "created": "2026-12-05T06:30:00.000Z", "revoked": null}
    ]}

A token is ``<id>.<secret>``: the id (12 hex digits) finds its entry, and only that
entry's hash is computed (a table of 1,000 costs what a table of one does); the secret
is 32 random bytes, so one SHA-256 is as strong as a slow hash would be.  Digests are
compared in constant time.  ``revoked`` is the time of ``token revoke``: the entry stays
so that the refusal can say "revoked" and ``token list`` can show it.

The daemon stats the file at most every ``RECHECK_S`` and reads it again when it changed
(inode, size or mtime), so a revocation takes effect within a second without a restart.
A file that cannot be read, or whose mode lets others in, refuses every named token until
it is fixed (one log line per change): a broken revocation must not leave a token working.

The single ``server.token_file`` keeps working beside it, as the admin token ``admin``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from mlbench_daemon.timefmt import iso
from mlbench_daemon.vocabulary import Refusal, Role

log = logging.getLogger(__name__)

RECHECK_S = 0.25  # the file is stat()ed at most this often (revocation within 1 s)
LEGACY_NAME = "admin"  # the name of server.token_file's token
NAME = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.@]{0,63}")
ID = re.compile(r"[0-9a-f]{12}")
_HEX = re.compile(r"[0-9a-f]+")


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who made a request: the token's name (None when the daemon has no tokens) and role."""

    name: str | None
    role: Role


NOBODY = Caller(None, Role.ADMIN)  # a daemon without tokens: everything, as before


@dataclasses.dataclass(frozen=True)
class Entry:
    id: str
    name: str
    role: Role
    salt: bytes
    digest: bytes
    created: str
    revoked: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "salt": self.salt.hex(),
            "hash": self.digest.hex(),
            "created": self.created,
            "revoked": self.revoked,
        }


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8", "surrogatepass")).digest()


def _entry(raw: Any, n: int) -> Entry:
    if not isinstance(raw, dict):
        raise ValueError(f"tokens[{n}] must be an object")
    try:
        entry = Entry(
            id=str(raw["id"]),
            name=str(raw["name"]),
            role=Role(raw["role"]),
            salt=bytes.fromhex(raw["salt"]),
            digest=bytes.fromhex(raw["hash"]),
            created=str(raw.get("created") or ""),
            revoked=None if raw.get("revoked") is None else str(raw["revoked"]),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"tokens[{n}]: bad or missing {e}") from None
    if not ID.fullmatch(entry.id) or len(entry.digest) != 32:
        raise ValueError(f"tokens[{n}]: bad id or hash")
    return entry


def check_mode(path: str, st: os.stat_result) -> None:
    """ValueError unless only the owner can read and write the file."""
    if st.st_mode & 0o077:
        raise ValueError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: others may read or change it; "
            f"chmod 600 it"
        )


def read(path: str) -> dict[str, Entry]:
    """The entries of the tokens file by id; ValueError (one line, naming the file)."""
    try:
        with open(path, "rb") as f:
            check_mode(path, os.fstat(f.fileno()))
            data = json.loads(f.read() or b'{"tokens": []}')
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list):
        raise ValueError(f'{path}: must be a JSON object {{"tokens": [...]}}')
    entries = [_entry(raw, n) for n, raw in enumerate(tokens)]
    return {e.id: e for e in entries}


def basic_password(credentials: str) -> str:
    """The password of HTTP Basic credentials (base64 of ``user:password``, RFC 7617);
    "" when they are malformed."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    _user, colon, password = decoded.partition(":")
    return password if colon else ""


class Tokens:
    """The daemon's tokens: ``check(authorization header)`` -> Caller or a Refusal."""

    def __init__(
        self,
        path: str = "",
        legacy: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path, self.legacy, self._clock = path, legacy, clock
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) last read
        self._next_check = 0.0
        if path:
            self._entries = read(path)  # a start-up problem is the caller's one line
            self._seen = self._key()
            self._next_check = clock() + RECHECK_S

    @property
    def enabled(self) -> bool:
        """Whether requests need a token at all."""
        return bool(self.path or self.legacy)

    def check(self, header: str) -> Caller | Refusal:
        """The caller an ``Authorization`` header names, or why it is refused: ``Bearer
        <token>``, or HTTP Basic with the token as the password (any user name), which is
        what ``requests`` sends from ``~/.netrc`` for a client that sets no header itself
        (mlbench-core's ``ApiClient``)."""
        scheme, _, value = header.partition(" ")
        token = value.strip()
        if scheme.lower() == "basic" and token:
            token = basic_password(token)
        elif scheme.lower() != "bearer":
            return Refusal.NO_TOKEN
        if not token:
            return Refusal.NO_TOKEN
        token_id, dot, secret = token.partition(".")
        entry = self._table().get(token_id) if dot else None
        if entry is not None:
            if not hmac.compare_digest(_digest(entry.salt, secret), entry.digest):
                return Refusal.BAD_TOKEN
            return Refusal.REVOKED if entry.revoked else Caller(entry.name, entry.role)
        _digest(b"\0" * 16, secret)  # the same work for an unknown id as for a known one
        if self.legacy is not None and hmac.compare_digest(token.encode(), self.legacy.encode()):
            return Caller(LEGACY_NAME, Role.ADMIN)
        return Refusal.BAD_TOKEN

    def _key(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _table(self) -> dict[str, Entry]:
        """The entries, read again if the file changed (stat at most every RECHECK_S)."""
        if not self.path:
            return self._entries
        now = self._clock()
        if now < self._next_check:
            return self._entries
        with self._lock:
            if now < self._next_check:
                return self._entries
            self._next_check = now + RECHECK_S
            key = self._key()
            if key != self._seen:
                self._seen = key
                try:
                    self._entries = read(self.path)
                    log.info("tokens: read %d token(s) from %s", len(self._entries), self.path)
                except ValueError as e:
                    self._entries = {}
                    log.error("tokens: %s; every named token is refused until it is fixed", e)
            return self._entries


# --- the CLI's side: add, list, revoke (the daemon only reads) ------------------------


def _write(path: str, entries: list[Entry]) -> None:
    """Replace the file at once (a new file renamed over it), mode 0600, synced."""
    body = json.dumps({"tokens": [e.to_json() for e in entries]}, indent=1).encode() + b"\n"
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=folder)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _existing(path: str) -> list[Entry]:
    return list(read(path).values()) if os.path.exists(path) else []


def add(path: str, name: str, role: Role) -> str:
    """Add a token named *name*; returns the token (shown once: only its hash is kept)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"name {name!r} must match {NAME.pattern}")
    if name == LEGACY_NAME:
        raise ValueError(f"the name {LEGACY_NAME!r} is server.token_file's token")
    entries = _existing(path)
    if any(e.name == name and not e.revoked for e in entries):
        raise ValueError(f"a token named {name!r} exists; revoke it first")
    taken = {e.id for e in entries}
    token_id = secrets.token_hex(6)
    while token_id in taken:
        token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    created = iso(time.time()) or ""
    entries.append(Entry(token_id, name, role, salt, _digest(salt, secret), created, None))
    _write(path, entries)
    return f"{token_id}.{secret}"


def entries(path: str) -> list[Entry]:
    return _existing(path)


def revoke(path: str, name_or_id: str) -> list[Entry]:
    """Revoke every live token with this name (or this id); returns those revoked."""
    now = iso(time.time())
    entries = _existing(path)
    hit = [e for e in entries if name_or_id in (e.name, e.id) and not e.revoked]
    if not hit:
        raise ValueError(f"no live token named {name_or_id!r} in {path}")
    done = {e.id for e in hit}
    _write(path, [dataclasses.replace(e, revoked=now) if e.id in done else e for e in entries])
    return hit
