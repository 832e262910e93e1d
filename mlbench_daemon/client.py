"""The one HTTP client of a running daemon (urllib only), used by the CLI, the tests,
the benches and the demo; and the CLI's exit statuses.

``Client.call`` gives any answer as it came (status, headers, body); ``Client.open``
and ``Client.json`` raise ``ClientError`` (one line, with the exit status the CLI
gives it) for an error status, an unreachable daemon, or an answer that is not JSON.
"""

import dataclasses
import email.message
import enum
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from http.client import HTTPResponse
from typing import Any

TIMEOUT_S = 30.0  # one request/response


class ExitStatus(enum.IntEnum):
    """The CLI's exit codes; ``run`` passes a job's own exit code through as it is."""

    OK = 0
    FAILED = 1  # the daemon answered with an error, a check failed, a job failed without a code
    UNUSABLE = 2  # the daemon is unreachable, or the command line, config or token is wrong
    STILL_CANCELLING = (
        3  # `cancel`: the job was not final within CANCEL_WAIT_S (the cancel goes on)
    )
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), or the job ended cancelled


class ClientError(Exception):
    """One line for the user, the exit status it means, and the HTTP status if any."""

    def __init__(self, message: str, status: ExitStatus, http_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.http_status = http_status


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    headers: email.message.Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def job_path(job_id: str) -> str:
    return f"/api/mpi_jobs/{urllib.parse.quote(str(job_id), safe='')}"


def run_path(run_id: str | int) -> str:
    return f"/api/runs/{urllib.parse.quote(str(run_id), safe='')}"


def logs_path(job_id: str, offset: int, follow: bool = False, rank: int | None = None) -> str:
    query = {"offset": offset, **({"follow": 1} if follow else {})}
    if rank is not None:
        query["rank"] = rank
    return f"{job_path(job_id)}/logs?{urllib.parse.urlencode(query)}"


class Client:
    def __init__(
        self, url: str, token: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        """`url` is the daemon's base URL; `headers` go with every request."""
        self.url = url.rstrip("/")
        self.headers = dict(headers or {})
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def _request(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str] | None,
        form: Mapping[str, str] | None = None,
    ) -> urllib.request.Request:
        """A JSON body, or with `form` an urlencoded one (MLBench's POST /api/runs/)."""
        if form is not None:
            data: bytes | None = urllib.parse.urlencode(form).encode()
            kind = "application/x-www-form-urlencoded"
        else:
            data = None if body is None else json.dumps(body).encode()
            kind = "application/json"
        sent = dict(self.headers, **({"Content-Type": kind} if data else {}))
        sent.update(headers or {})
        return urllib.request.Request(self.url + path, data=data, method=method, headers=sent)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = TIMEOUT_S,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Any answer, whatever its status; raises OSError only if none came."""
        req = self._request(method, path, body, headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Answer(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            with e:
                return Answer(e.code, e.headers, e.read())

    def open(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = TIMEOUT_S,
        headers: dict[str, str] | None = None,
        form: Mapping[str, str] | None = None,
    ) -> HTTPResponse:
        """The open response of a successful call; ClientError otherwise."""
        req = self._request(method, path, body, headers, form)
        try:
            response: HTTPResponse = urllib.request.urlopen(req, timeout=timeout)
            return response
        except urllib.error.HTTPError as e:
            with e:
                raise ClientError(_error_message(e), ExitStatus.FAILED, e.code) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ClientError(
                f"cannot reach daemon at {self.url}: {reason}", ExitStatus.UNUSABLE
            ) from None

    def json(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = TIMEOUT_S,
        form: Mapping[str, str] | None = None,
    ) -> Any:
        """The decoded answer of a successful call; ClientError otherwise."""
        with self.open(method, path, body, timeout, form=form) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(
                f"daemon at {self.url} sent something that is not JSON for {method} {path}",
                ExitStatus.FAILED,
            ) from None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(65536))
        return f"HTTP {e.code}: {body['message']}"
    except Exception:
        return f"HTTP {e.code}: {e.reason}"
