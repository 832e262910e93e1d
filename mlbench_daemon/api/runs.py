"""MLBench runs: POST/GET /api/runs/, GET/DELETE /api/runs/<id> (jobs/runs.py), and
GET /api/runs/catalogue/ (the benchmarks a run may name, for the page's run form).

The answers and the form are mlbench-dashboard's, as mlbench-core 3's ``ApiClient``
sends and reads them: a form body of strings (JSON with the same keys is taken too),
201 with the run, 204 with no body for a delete.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import bottle

from mlbench_daemon.api.common import Deps, as_json, body, caller, location, note, own_only
from mlbench_daemon.api.plugin import register
from mlbench_daemon.browser import is_json
from mlbench_daemon.errors import PayloadTooLarge, Unavailable
from mlbench_daemon.jobs.runspec import form_values
from mlbench_daemon.openapi import Alias, Answer, Route, answer, error, ref
from mlbench_daemon.vocabulary import Role

if TYPE_CHECKING:  # the API is given the runs; it imports none of them
    from mlbench_daemon.jobs.runs import Runs


def _runs(deps: Deps) -> Runs:
    if deps.runs is None:
        raise Unavailable("this daemon serves no MLBench runs")
    return deps.runs


def _form(max_bytes: int) -> dict[str, str]:
    """The request's form (urlencoded or multipart, as UTF-8), or its JSON object."""
    if is_json(bottle.request.environ.get("CONTENT_TYPE", "")):
        return form_values(body(max_bytes) or {})
    length = bottle.request.content_length
    if length > max_bytes:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_bytes}")
    forms = bottle.request.forms.decode()  # bottle reads them as latin-1
    return {key: forms.get(key) for key in forms}


def create_run(deps: Deps) -> str:
    values = _form(deps.max_body_bytes)
    run = _runs(deps).create(values, by=caller().name)
    note(job=run["job_id"])
    bottle.response.set_header("Location", f"/api/runs/{run['id']}")
    return as_json(run, 201)


def list_runs(deps: Deps) -> str:
    return as_json(_runs(deps).list_json())


def get_run(deps: Deps, run_id: str) -> str:
    return as_json(_runs(deps).get_json(run_id))


def delete_run(deps: Deps, run_id: str) -> Any:
    runs, who = _runs(deps), caller()
    run = runs.get_json(run_id)  # a 404 first
    owner = run["submitted_by"]
    note(job=run["job_id"])
    own_only(who, owner, f"run {run_id}", "created", "delete")
    runs.delete(run_id, by=who.name)
    bottle.response.status = 204
    return ""


def list_catalogue(deps: Deps) -> str:
    """The catalogue's entries by name: what the page's run form offers as `image_name`."""
    catalogue = _runs(deps).cfg.mpi.catalogue
    return as_json([{"name": k, "command": v} for k, v in sorted(catalogue.items())])


_NO_SUCH_RUN = error("No such run.")

ROUTES = [
    Route(
        "POST",
        "/api/runs/",
        create_run,
        "createRun",
        "Create an MLBench run (mlbench-core's `ApiClient.create_run`)",
        "runs",
        {
            201: answer(
                "The run: `started` if its nodes were free, else `initialized` (waiting, with "
                "its place in `job_metadata.waiting`).",
                ref("Run"),
                headers=location("/api/runs/<id>"),
            ),
            400: error(
                "A bad field (`field` names it): an unknown field, a value that is not a "
                "string, a command template that names a field other than `{run_id}`, "
                "`{rank}`, `{hosts}`, `{backend}`, an `image_name` not in `mpi.catalogue`, "
                "or more `num_workers` than the daemon knows nodes (it could never start)."
            ),
            413: error("The body is over `server.max_body_bytes`."),
        },
        description="The form mlbench-core posts (every value a string).  The run waits "
        "(`initialized`) until `num_workers` Running nodes are free of other runs and of "
        "every job, in order of arrival; it then holds them until it ends (no other run or "
        "job is placed there) and runs as one job (`job_id`).  Backend `mpi` (or none): one "
        "mpirun over its nodes with `{rank}` 0; another backend with `run_all_nodes`: one "
        "process per node with its own `{rank}` (one MPMD launch); without it, the first "
        "node only.  A form body is refused from a foreign `Origin` (403).",
        body=ref("RunRequest"),
        form=True,
        role=Role.SUBMITTER,
        aliases=(Alias("/api/runs", "createRunNoSlash"),),
    ),
    Route(
        "GET",
        "/api/runs/",
        list_runs,
        "listRuns",
        "Every run, oldest first (mlbench-core's `get_runs`)",
        "runs",
        {200: answer("The runs.", {"type": "array", "items": ref("Run")})},
        aliases=(Alias("/api/runs", "listRunsNoSlash"),),
    ),
    Route(
        "GET",
        "/api/runs/{run_id}",
        get_run,
        "getRun",
        "One run (mlbench-core's `get_run`)",
        "runs",
        {200: answer("The run.", ref("Run")), 404: _NO_SUCH_RUN},
    ),
    Route(
        "DELETE",
        "/api/runs/{run_id}",
        delete_run,
        "deleteRun",
        "Delete a run, cancelling it first if it is live (mlbench-core's `delete_run`)",
        "runs",
        {
            204: Answer(
                "Deleted, no body (its job, if live, cancelled: the kill and sweep go on in "
                "the job's thread past `server.cancel_answer_s`).",
                {},
            ),
            403: error(
                "A submitter's token and another's run (`error` is `not-owner`): nothing is "
                "deleted.  Or as for every route (below)."
            ),
            404: _NO_SUCH_RUN,
        },
        role=Role.SUBMITTER,
    ),
    Route(
        "GET",
        "/api/runs/catalogue/",
        list_catalogue,
        "listRunCatalogue",
        "The benchmarks a run may name as `image_name` (`mpi.catalogue`), by name",
        "runs",
        {
            200: answer(
                "The entries; empty when none is configured.",
                {"type": "array", "items": ref("CatalogueEntry")},
            )
        },
        description="Not MLBench's: its images were a list built into the client.  The "
        "status page's run form reads it.",
    ),
]


def install(app: bottle.Bottle, deps: Deps) -> None:
    register(app, ROUTES, deps)
