"""A real webhook receiver on loopback (http.server in a thread) for the tests and the
bench: it verifies each POST's signature as README says a receiver should, checks each
body against the `WebhookEvent` schema of the document the daemon serves (its `webhooks`
section; `invalid()`), and records what came.  `mode` says how it answers: "ok" (204),
"fail" (503), "hang" (reads the request and answers nothing until stopped).  `stop()`
closes its socket (connections refused); `start()` again binds the same port."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time

import jsonschema_rs

from mlbench_daemon.api import DOCUMENT


def _event_validator():
    """A validator of a POST's body against the document's `webhooks` declaration."""
    [schema] = {
        json.dumps(item["post"]["requestBody"]["content"]["application/json"]["schema"])
        for item in DOCUMENT["webhooks"].values()
    }  # every subject declares the one body
    return jsonschema_rs.validator_for({**json.loads(schema), "components": DOCUMENT["components"]})


EVENT = _event_validator()


def body_errors(data: bytes) -> list[str]:
    """Why `data` is not a body the document declares (empty: it is one)."""
    try:
        value = json.loads(data)
    except ValueError:
        return ["not JSON"]
    return [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in EVENT.iter_errors(value)]


class Receiver:
    def __init__(self, secret: bytes, port: int = 0) -> None:
        self.secret, self.port = secret, port
        self.mode = "ok"
        self.lock = threading.Lock()
        self.got: list[dict] = []  # every POST: id, event, attempt, verified, status, body
        self.hung: list[dict] = []  # the POSTs answered nothing in mode "hang" (status None)
        self.release = threading.Event()
        self.server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self, mode: str = "ok") -> Receiver:
        self.mode = mode
        self.release.clear()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stamp = self.headers["X-Mlbench-Timestamp"]
                mac = hmac.new(owner.secret, stamp.encode() + b"." + body, hashlib.sha256)
                verified = (
                    hmac.compare_digest(
                        "sha256=" + mac.hexdigest(), self.headers["X-Mlbench-Signature"]
                    )
                    and abs(time.time() - int(stamp)) < 300
                )
                status = {"ok": 204, "fail": 503}.get(owner.mode)
                with owner.lock:
                    (owner.got if status else owner.hung).append({
                        "id": self.headers["X-Mlbench-Event-Id"],
                        "event": self.headers["X-Mlbench-Event"],
                        "attempt": int(self.headers["X-Mlbench-Attempt"]),
                        "verified": verified,
                        "status": status,
                        "body": body,
                        "errors": body_errors(body),
                    })  # fmt: skip
                if status is None:  # "hang"
                    owner.release.wait(60)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def delivered(self) -> list[dict]:
        with self.lock:
            return [g for g in self.got if g["status"] == 204]

    def invalid(self) -> list[tuple[str, list[str]]]:
        """(event id, schema errors) of every POST whose body the document does not declare."""
        with self.lock:
            return [(g["id"], g["errors"]) for g in self.got + self.hung if g["errors"]]

    def failed(self) -> list[dict]:
        with self.lock:
            return [g for g in self.got if g["status"] != 204]


def body(got: dict) -> dict:
    return json.loads(got["body"])
