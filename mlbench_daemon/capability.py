"""Run capabilities: a secret per live run that lets its ranks post that run's metrics,
and nothing else, without the operator's token.

A rank is given ``MLBENCH_DASHBOARD_URL = "HOST:PORT/run-cap/<secret>"`` (the ``url``
form mlbench-core's ``ApiClient`` takes; it posts to ``http://{url}/api/metrics/``).
The API plugin (api/plugin.py) strips ``/run-cap/<secret>`` from the path before
anything else reads it, so no route, error message, log or audit line sees the secret,
then sets ``environ[SCOPE]`` to the run's id; the metrics route posts only for that run.

The secret is 32 random bytes (urlsafe base64), minted when the run starts and revoked
when it ends.  Only its SHA-256 is kept, keyed by the digest: a lookup is one hash and
one dict access, and ``hmac.compare_digest`` then compares the entry it found with what
was presented, so the time does not depend on how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading

PREFIX = "/run-cap/"  # a capability URL's path: PREFIX + secret + "/api/metrics/"
SCOPE = "mlbench.run_scope"  # WSGI environ key: the run id a capability request may post for
SECRET = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class Capabilities:
    """The live runs' capabilities: ``mint``, ``check``, ``revoke``; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_digest: dict[bytes, int] = {}
        self._by_run: dict[int, bytes] = {}

    def mint(self, run_id: int) -> str:
        """A new secret for `run_id` (replacing any it had): 256 bits, urlsafe."""
        secret = secrets.token_urlsafe(32)
        digest = _digest(secret)
        with self._lock:
            old = self._by_run.pop(run_id, None)
            if old is not None:
                self._by_digest.pop(old, None)
            self._by_digest[digest] = run_id
            self._by_run[run_id] = digest
        return secret

    def revoke(self, run_id: int) -> bool:
        """End `run_id`'s capability; False if it had none."""
        with self._lock:
            digest = self._by_run.pop(run_id, None)
            if digest is None:
                return False
            self._by_digest.pop(digest, None)
            return True

    def check(self, secret: str) -> int | None:
        """The run whose capability `secret` is, or None (unknown, malformed or revoked)."""
        if not SECRET.fullmatch(secret):
            return None
        digest = _digest(secret)
        with self._lock:
            run_id = self._by_digest.get(digest)
            known = self._by_run.get(run_id) if run_id is not None else None
        if known is None or not hmac.compare_digest(known, digest):
            return None
        return run_id

    def live(self) -> int:
        """How many runs hold a capability now."""
        with self._lock:
            return len(self._by_run)
