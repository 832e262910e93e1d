"""POST /api/preflight: check from the master that a job with these fields can launch."""

from __future__ import annotations

import bottle

from mlbench_daemon.api.common import Deps, as_json, body
from mlbench_daemon.api.plugin import register
from mlbench_daemon.errors import NotFound
from mlbench_daemon.openapi import Alias, Route, answer, error, ref
from mlbench_daemon.vocabulary import Role


def run_preflight(deps: Deps) -> str:
    if deps.preflight is None:
        raise NotFound("preflight is not available")
    return as_json(deps.preflight.run(body(deps.max_body_bytes)))


ROUTES = [
    Route(
        "POST",
        "/api/preflight/",
        run_preflight,
        "runPreflight",
        "Check that a job with these fields can launch, from the master",
        "jobs",
        {
            200: answer("The checks (`ok` false when one failed).", ref("PreflightResult")),
            400: error("Bad request body; `field` names the field."),
            409: error("A requested node or master is unknown or not `Running`."),
            413: error("The body is over `server.max_body_bytes`."),
            429: error("Another preflight is running."),
            503: error("No `Running` node matches the selector."),
        },
        description=(
            "Runs from the master, as the launcher will: ssh to each worker in batch mode with "
            "strict host keys, the launcher's remote daemon found the way the launcher looks "
            "for it, the same MPI version, the program, writable directories, TCP between "
            "nodes where python3 is there to test it, np against the slots.  One at a time; "
            "the whole run is bounded by `mpi.preflight_timeout_s`.  Leaves nothing behind."
        ),
        body=ref("PreflightRequest"),
        aliases=(Alias("/api/preflight", "runPreflightNoSlash"),),
        role=Role.SUBMITTER,
    ),
]


def install(app: bottle.Bottle, deps: Deps) -> None:
    register(app, ROUTES, deps)
