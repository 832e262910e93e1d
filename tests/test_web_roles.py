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
