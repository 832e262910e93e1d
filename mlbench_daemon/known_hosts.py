"""Host keys: OpenSSH known_hosts parsing, checking and ``accept-new`` pinning.

Kept apart from the pool (as paramiko keeps hostkeys.py apart from its client):
``KnownHosts.verify`` is called with the key a server offered during the key
exchange and raises ``Untrusted`` unless it is the known key of one of the
host's names.  Supported: plain and hashed (``|1|``) names, ``[name]:port``,
patterns with ``*``/``?`` and ``!`` negation, ``@revoked``; ``@cert-authority``
lines are skipped (no host certificates).
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import functools
import hashlib
import hmac
import logging
import os
import re
import threading

import paramiko

from mlbench_daemon.ssh_errors import Untrusted
from mlbench_daemon.vocabulary import SSHReason

log = logging.getLogger(__name__)

SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, e.g. ``SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_names(ip: str, port: int, host: str | None = None) -> list[str]:
    """The known_hosts names of a host: ``name`` and ``ip``, or ``[name]:port`` off port 22."""
    names = [n for n in dict.fromkeys([host, ip]) if n]
    return names if port == 22 else [f"[{n}]:{port}" for n in names]


@dataclasses.dataclass(frozen=True)
class KnownKey:
    patterns: tuple[str, ...]
    key: paramiko.PKey
    revoked: bool = False

    def matches(self, name: str) -> bool:
        hit = False
        for p in self.patterns:
            negated, p = p.startswith("!"), p.lstrip("!")
            if p.startswith("|1|"):
                m = hmac.compare_digest(paramiko.HostKeys.hash_host(name, p), p)
            else:
                m = _glob(p).fullmatch(name.lower()) is not None
            if m and negated:
                return False
            hit = hit or m
        return hit

    @property
    def plain(self) -> bool:
        """Only literal names (no pattern, negation or hash): found by name, not by scan."""
        return not any(p[:1] == "!" or p.startswith("|1|") or "*" in p or "?" in p
                       for p in self.patterns)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """OpenSSH's host pattern: `*` and `?` are the only wildcards, case ignored (so
    ``[name]:2222`` is literal text, where fnmatch would read a character class)."""
    wild = {"*": ".*", "?": "."}
    return re.compile("".join(wild.get(c) or re.escape(c) for c in pattern.lower()), re.S)


class _Table:
    """The keys of the known_hosts files as read at `stamp`, literal names indexed: a login
    looks its names up instead of matching every line (at 512 nodes parsing and scanning the
    file was 13 ms of CPU per login, the largest part of a fresh login)."""

    def __init__(self, stamp: tuple[object, ...], keys: list[KnownKey]) -> None:
        self.stamp = stamp
        self.keys = keys
        self.by_name: dict[str, list[int]] = {}
        self.scanned: list[int] = []  # lines with a pattern, a negation or a hashed name
        for i, k in enumerate(keys):
            if not k.plain:
                self.scanned.append(i)
                continue
            for n in dict.fromkeys(p.lower() for p in k.patterns):
                self.by_name.setdefault(n, []).append(i)

    def matching(self, names: list[str]) -> list[KnownKey]:
        """The keys of any of `names`, in file order."""
        found = {i for n in names for i in self.by_name.get(n.lower(), ())}
        found.update(i for i in self.scanned if any(self.keys[i].matches(n) for n in names))
        return [self.keys[i] for i in sorted(found)]


def parse_known_hosts(text: str, source: str = "known_hosts") -> list[KnownKey]:
    """known_hosts lines -> [KnownKey].

    ``@revoked`` lines are kept; ``@cert-authority`` and bad lines are skipped."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        revoked = line.startswith("@revoked")
        if line.startswith("@"):
            if not revoked:
                continue  # @cert-authority: we do not do host certificates
            line = line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
        if not line or line.startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
        except Exception as e:  # a bad line must not hide the good ones
            log.warning("%s:%d: skipped: %s", source, lineno, e)
            continue
        if entry is not None:
            out.append(KnownKey(tuple(entry.hostnames), entry.key, revoked))
    return out


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class KnownHosts:
    """Host key checks against known_hosts files; ``accept-new`` pins into the first one."""

    def __init__(self, path: str, system: bool, policy: str) -> None:
        self.path = path
        self.paths = [p for p in (path, SYSTEM_KNOWN_HOSTS if system else None) if p]
        self.policy = policy
        self._lock = threading.Lock()
        self._table = _Table((), [])

    def _load(self) -> _Table:
        """The files' keys, parsed again only when a file changed (its identity, size or
        mtime), so an edit is seen by the next login."""
        stamp = tuple(_stamp(p) for p in self.paths)
        table = self._table
        if table.stamp == stamp:
            return table
        keys = []
        for p in self.paths:
            try:
                with open(p, encoding="utf-8", errors="replace") as f:
                    keys += parse_known_hosts(f.read(), p)
            except FileNotFoundError:
                pass
        self._table = table = _Table(stamp, keys)
        return table

    def preferred_types(self, names: list[str]) -> set[str]:
        """Key types already known for these names (negotiate those first, like OpenSSH)."""
        return {k.key.get_name() for k in self._load().matching(names)}

    def verify(self, key: paramiko.PKey, names: list[str], where: str) -> None:
        """Raise Untrusted unless `key` is the known key of `names` (or pinned under accept-new)."""
        try:
            self._check(self._load().matching(names), key, names, where)
        except Untrusted as e:
            if (
                e.reason != SSHReason.HOST_KEY_UNKNOWN
                or self.policy != "accept-new"
                or not self.path
            ):
                raise
            self._pin(key, names, where)

    @staticmethod
    def _check(mine: list[KnownKey], key: paramiko.PKey, names: list[str], where: str) -> None:
        """`mine`: the keys known for `names`."""
        blob = key.asbytes()
        if any(k.revoked and k.key.asbytes() == blob for k in mine):
            raise Untrusted(
                SSHReason.HOST_KEY_CHANGED, f"{where}: host key {fingerprint(key)} is revoked"
            )
        known = [k for k in mine if not k.revoked]
        if any(k.key.asbytes() == blob for k in known):
            return
        if known:
            was = ", ".join(f"{k.key.get_name()} {fingerprint(k.key)}" for k in known)
            raise Untrusted(
                SSHReason.HOST_KEY_CHANGED,
                f"{where}: HOST KEY CHANGED: known {was}, "
                f"offered {key.get_name()} {fingerprint(key)}",
            )
        raise Untrusted(
            SSHReason.HOST_KEY_UNKNOWN,
            f"{where}: host key {key.get_name()} {fingerprint(key)} is not in known_hosts "
            f"(names {', '.join(names)})",
        )

    def _pin(self, key: paramiko.PKey, names: list[str], where: str) -> None:
        """Append the key under an exclusive lock, unless someone pinned one meanwhile."""
        with self._lock, open(self.path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            text = f.read()
            try:
                self._check(_Table((), parse_known_hosts(text, self.path)).matching(names),
                            key, names, where)  # fmt: skip
                return  # pinned by another writer, and it is this key
            except Untrusted as e:
                if e.reason != SSHReason.HOST_KEY_UNKNOWN:
                    raise
            sep = "" if not text or text.endswith("\n") else "\n"
            f.write(f"{sep}{','.join(names)} {key.get_name()} {key.get_base64()}\n")
            f.flush()
            os.fsync(f.fileno())
        log.warning("%s: pinned new host key %s %s", where, key.get_name(), fingerprint(key))
