"""`make screenshots`: a screenshot of each view of the status page, from the test
cluster (needs root), into docs/.

Builds a 3-worker cluster, starts the daemon, runs a job that succeeds, one that
fails and one that is still writing, stops one worker's sshd (so the overview shows
a failing node), and photographs Overview, Jobs, Job detail and Launch (with a
preflight's check table) in Debian's headless Chromium.

    python3 -m demo.screenshots [--out docs]
"""

import argparse
import subprocess
import time
from pathlib import Path

from tests.cluster import Cluster
from tests.helpers import call_json as call
from tests.helpers import served

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = "/usr/lib/chromium/chromium"


def wait(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: timed out waiting for {what}")
        time.sleep(0.2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    with (
        Cluster(workers=3, extra=0) as cluster,
        served(
            cluster,
            stderr=subprocess.DEVNULL,
            mpi={"max_concurrent_jobs": 4, "cancel_grace_s": 1.0},
        ) as daemon,
    ):
        url = daemon.url

        def nodes():
            try:
                return call(f"{url}/api/nodes/")
            except OSError:
                return None

        prog = str(cluster.mpi_program)
        ok = call(f"{url}/api/mpi_jobs/", "POST", {"program": [prog, "--bytes", "3000"]})
        bad = call(
            f"{url}/api/mpi_jobs/",
            "POST",
            {"program": [prog, "--stderr", "loss is NaN at step 1200", "--exit", "3"]},
        )
        script = "for i in $(seq 1 400); do echo step $i loss 0.$((1000 - i)); sleep 0.5; done"
        two = sorted(n["name"] for n in nodes())[:2]  # the third worker goes down below
        live = call(
            f"{url}/api/mpi_jobs/",
            "POST",
            {
                "program": ["sh", "-c", script],
                "np": 1,
                "nodes": two,
                "wait": False,
                "env": {"SEED": "7"},
            },
        )
        wait(lambda: call(f"{url}/api/mpi_jobs/{live['id']}")["log_bytes"] > 400, "live output", 90)
        cluster.stop_sshd(cluster.workers[2])
        wait(
            lambda: any(n["phase"] == "Unknown" for n in nodes() or []),
            "a worker to show Unknown",
        )

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            shots = [
                ("overview", "#/", "#nodes tbody tr"),
                ("jobs", "#/jobs", "#jobs tbody tr"),
                ("job", f"#/jobs/{live['id']}", "#job-record dt"),
                ("job-failed", f"#/jobs/{bad['id']}", "#job-failure dt"),
                ("launch", "#/launch", "#launch-nodes label"),
            ]
            for name, hash, ready in shots:
                page.goto(f"{url}/{hash}")
                page.wait_for_selector(ready)
                if name == "launch":
                    page.fill("#launch-program", f"{prog}\n--bytes\n20000")
                    page.fill("#launch-np", "2")
                    page.check(f'#launch-nodes input[value="{two[0]}"]')
                    page.check(f'#launch-nodes input[value="{two[1]}"]')
                    page.click("#preflight-run")
                    page.wait_for_selector("#preflight-checks tbody tr")
                page.wait_for_timeout(2500)  # a refresh and a few log lines in
                path = out / f"screenshot-{name}.png"
                page.screenshot(path=str(path), full_page=name == "launch")
                print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
            browser.close()
        assert ok["state"] == "succeeded", ok
        call(f"{url}/api/mpi_jobs/{live['id']}", "DELETE", timeout=120)


if __name__ == "__main__":
    main()
