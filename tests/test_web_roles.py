"""The status page with named tokens (issue 24): it shows who you are and hides what your
role cannot do; the API refuses those actions anyway, also when sent from the page."""

import json
import re

import pytest

from mlbench_daemon import tokens
from mlbench_daemon.vocabulary import Role
from tests.test_web import HANG, Tab, browser, submit, wait_text  # noqa: F401 (a fixture)

TOKEN_KEY = "mlbench-daemon-token"  # web/api.js: where the page keeps the token


def tab_as(browser, daemon, token, hash):  # noqa: F811
    tab = Tab(browser, daemon.url)
    tab.context.add_init_script(
        f"sessionStorage.setItem({json.dumps(TOKEN_KEY)}, {json.dumps(token)})"
    )
    tab.open(hash)
    return tab


def fetch_status(page, method, path, token, body=None):
    """The status of a request the page's own origin sends with `token`."""
    return page.evaluate(
        """async ([method, path, token, body]) => {
             const headers = {Authorization: `Bearer ${token}`};
             if (body !== null) headers["Content-Type"] = "application/json";
             const r = await fetch(path, {method, headers,
                                          body: body === null ? undefined : JSON.stringify(body)});
             return r.status;
           }""",
        [method, path, token, body],
    )


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_viewers_page_has_no_launch_or_cancel_and_the_api_refuses(
    browser,  # noqa: F811
    start_daemon,
    cluster,
    tmp_path,
):
    path = str(tmp_path / "tokens.json")
    admin = tokens.add(path, "root", Role.ADMIN)
    viewer = tokens.add(path, "vera", Role.VIEWER)
    submitter = tokens.add(path, "alice", Role.SUBMITTER)
    daemon = start_daemon(
        server={"tokens_file": path}, mpi={"cancel_grace_s": 1.0}, wait_running=False
    )
    daemon.token = admin
    daemon.wait_nodes(lambda ns: len(ns) == 3 and all(n["phase"] == "Running" for n in ns))
    job = submit(daemon, cluster, "--sleep", "120")
    # who, token, sees Launch, sees Cancel on root's job
    for who, token, launch, cancel in (
        ("vera (viewer)", viewer, False, False),
        ("alice (submitter)", submitter, True, False),  # not her job
        ("root (admin)", admin, True, True),
    ):
        tab = tab_as(browser, daemon, token, "#/jobs")
        try:
            page = tab.page
            row = page.locator(f'#jobs tr[data-key="{job["id"]}"]')
            wait_text(row.locator("td.state"), r"^running$")
            wait_text(page.locator("#whoami"), rf"^{re.escape(who)}$")
            assert page.locator("#nav-launch").is_visible() == launch, who
            assert row.get_by_role("button", name=re.compile("Cancel")).is_visible() == cancel, who
            page.goto(f"{daemon.url}/#/jobs/{job['id']}")
            wait_text(page.locator("#job-record"), r"Submitted by\s*root")
            assert page.locator("#job-cancel").is_visible() == cancel, who
            page.goto(f"{daemon.url}/#/launch")
            page.wait_for_selector("#view-overview:not([hidden])" if not launch else
                                   "#view-launch:not([hidden])")  # fmt: skip
            assert not tab.console_errors() and not tab.errors and not tab.csp()
            if token == viewer:  # the API refuses anyway, from the page's own origin too
                gone = fetch_status(page, "DELETE", f"/api/mpi_jobs/{job['id']}", token)
                made = fetch_status(page, "POST", "/api/mpi_jobs/", token, {"wait": False})
                assert (gone, made) == (403, 403)
                status, now = daemon.json("GET", f"/api/mpi_jobs/{job['id']}")
                assert now["state"] == "running" and now["cancelled_by"] is None
                assert len(daemon.json("GET", "/api/mpi_jobs/")[1]) == 1  # nothing launched
        finally:
            tab.close()
    status, done = daemon.json("DELETE", f"/api/mpi_jobs/{job['id']}")
    assert status in (200, 202) and done["cancelled_by"] == "root"
    daemon.wait_job(job["id"], timeout=HANG)


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_submitter_starts_a_run_from_the_page_and_a_viewer_sees_no_form(
    browser,  # noqa: F811
    start_daemon,
    cluster,
    tmp_path,
):
    """The run form on #/runs offers the daemon's catalogue, says in one message why a run
    was not started, posts mlbench-core's create_run fields, and the run shows in the list,
    started, created by the submitter; a viewer's page has no form and asks for no
    catalogue."""
    path = str(tmp_path / "tokens.json")
    admin = tokens.add(path, "root", Role.ADMIN)
    viewer = tokens.add(path, "vera", Role.VIEWER)
    submitter = tokens.add(path, "alice", Role.SUBMITTER)
    command = f"{cluster.mpi_program} --sleep 120"
    daemon = start_daemon(
        server={"tokens_file": path}, mpi={"catalogue": {"sleeper": command}}, wait_running=False
    )
    daemon.token = admin
    daemon.wait_nodes(lambda ns: len(ns) == 3 and all(n["phase"] == "Running" for n in ns))
    assert daemon.json("GET", "/api/runs/catalogue/") == (
        200,
        [{"name": "sleeper", "command": command}],
    )
    tab = tab_as(browser, daemon, submitter, "#/runs")
    posted = []
    tab.page.on(
        "request",
        lambda r: posted.append(r.post_data) if r.method == "POST" and "/api/runs" in r.url else 0,
    )
    run = None
    try:
        page = tab.page
        page.wait_for_selector("#run-form:not([hidden])")
        wait_text(page.locator("#run-image-command"), re.escape(command))
        assert page.locator("#run-image").input_value() == "sleeper"
        page.fill("#run-name", "from-the-page")
        page.fill("#run-workers", "")
        page.click("#run-submit")  # refused by the page: nothing is sent
        wait_text(page.locator("#run-launch-error"), r"^Not started: workers: a whole number")
        assert posted == []
        page.fill("#run-workers", "4")  # the cluster has 3 nodes: it could never start
        page.click("#run-submit")
        error = wait_text(page.locator("#run-launch-error"), r"^Not started: .*num_workers")
        assert "\n" not in error.strip()
        assert daemon.json("GET", "/api/runs/")[1] == []
        page.fill("#run-workers", "2")
        page.click("#run-submit")
        link = page.locator("#run-launch-state a")
        run_id = wait_text(link, r"^Run \d+$").split()[1]
        assert page.locator("#run-launch-error").is_hidden()
        assert json.loads(posted[-1]) == {
            "name": "from-the-page",
            "num_workers": "2",
            "num_cpus": "2.0",
            "max_bandwidth": "1000",
            "gpu_enabled": "false",
            "light_target": "false",
            "run_all_nodes": "false",
            "image_name": "sleeper",
            "backend": "MPI",
        }
        row = page.locator(f'#runs tr[data-key="{run_id}"]')
        wait_text(row, r"from-the-page\s+started\s+2\b")
        run = daemon.json("GET", f"/api/runs/{run_id}")[1]
        assert (run["state"], run["submitted_by"], len(run["job_metadata"]["pods"])) == (
            "started",
            "alice",
            2,
        )
        job = daemon.json("GET", f"/api/mpi_jobs/{run['job_id']}")[1]
        assert job["state"] in ("pending", "running"), job
        # the one 400 the daemon answered is the only console error (Chromium logs it)
        assert all("400" in e for e in tab.console_errors()), tab.console_errors()
        assert not tab.errors and not tab.csp()
    finally:
        tab.close()
    tab = tab_as(browser, daemon, viewer, "#/runs")
    try:
        page = tab.page
        wait_text(page.locator(f'#runs tr[data-key="{run["id"]}"]'), r"from-the-page")
        wait_text(page.locator("#whoami"), r"^vera \(viewer\)$")
        assert page.locator("#run-form").is_hidden()
        assert not any("/api/runs/catalogue" in u for _, u, _ in tab.requests)
        assert not tab.console_errors() and not tab.errors and not tab.csp()
    finally:
        tab.close()
    assert daemon.request("DELETE", f"/api/runs/{run['id']}")[0] == 204
    assert daemon.wait_job(run["job_id"], timeout=HANG)["state"] == "cancelled"
