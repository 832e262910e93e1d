"""Metrics on the real cluster: the daemon samples the nodes of a live run while a real
job runs there, and mlbench-core 3.0.0's own ApiClient posts and reads the run's
metrics.  The run is a dict-backed RunLookup (tests/test_metrics_logic.py) pointing at
the cluster's real nodes: the runs themselves are another module's."""

import datetime
import io
import json
import time
import urllib.parse
import zipfile

from tests.helpers import wait_for
from tests.mlbench_core import api_client
from tests.test_metrics_logic import DictRuns, Run

SAMPLED = ("cpu", "memory", "network_in", "network_out")


def test_node_samples_and_mlbench_core_client(start_daemon, cluster):
    nodes = tuple(h.name for h in cluster.workers[:2])
    run = Run(7, "bench run", nodes, created_at=time.time() - 1)
    d = start_daemon(
        runs=DictRuns(run), metrics={"sample_interval_s": 1}, ssh={"probe_interval_s": 1}
    )
    status, job = d.json(
        "POST", "/api/mpi_jobs/", {"program": ["sleep", "30"], "np": 2, "wait": False}
    )
    assert status == 202, job
    client = api_client(urllib.parse.urlsplit(d.url).netloc)
    try:
        # the daemon's samples of both nodes, with values that move
        pod = {}

        def sampled():
            pod.update(client.get_pod_metrics(nodes[1]).result().json())
            return all(len(pod.get(n, [])) >= 3 for n in SAMPLED)

        wait_for(sampled, timeout=60, what="3 samples of each node metric", interval=0.5)
        assert {float(p["value"]) for p in pod["cpu"]} != {0.0}
        grown = [float(p["value"]) for p in pod["network_in"]]
        assert (
            grown == sorted(grown) and grown[-1] > grown[0] and pod["network_in"][0]["cumulative"]
        )
        assert all(float(p["value"]) > 0 for p in pod["memory"])
        assert set(client.get_pod_metrics(nodes[0]).result().json()) >= set(SAMPLED)
        assert (
            cluster.workers[2].name not in client.get_all_metrics().result().json()["pod_metrics"]
        )

        # mlbench-core posts a form (str(datetime) dates, "False"), then reads it back
        start = datetime.datetime.utcnow()
        for i in range(6):
            r = client.post_metric(7, "val_global_loss @ 0", 1.0 / (i + 1)).result()
            assert r.status_code == 201, r.text
        r = client.post_metric(7, "TaskResult @ 0", "top-1 accuracy 0.91", cumulative=True).result()
        assert r.status_code == 201 and r.json()["cumulative"] is True
        assert client.post_metric(8, "x", 1).result().status_code == 404
        last = client.get_run_metrics(7, metric_filter="val_global_loss @ 0", last_n=1).result()
        assert [p["value"] for p in last.json()["val_global_loss @ 0"]] == [str(1.0 / 6)]
        summary = client.get_run_metrics(7, summarize=3, metric_filter="val_global_loss @ 0")
        means = [float(p["value"]) for p in summary.result().json()["val_global_loss @ 0"]]
        assert means == [(1 + 1 / 2) / 2, (1 / 3 + 1 / 4) / 2, (1 / 5 + 1 / 6) / 2]
        since = client.get_run_metrics(7, since=start).result().json()
        assert len(since["val_global_loss @ 0"]) == 6
        later = datetime.datetime.utcnow() + datetime.timedelta(hours=1)
        assert client.get_run_metrics(7, since=later).result().json() == {}
        everything = client.get_all_metrics().result().json()
        assert "bench run" in everything["run_metrics"]

        z = client.download_run_metrics(7).result()
        assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
        files = zipfile.ZipFile(io.BytesIO(z.content))
        names = set(files.namelist())
        assert {"result_val_global_loss @ 0.json", "official_result.txt"} <= names
        assert {f"{n}_{m}.json" for n in nodes for m in SAMPLED} <= names
        assert files.read("official_result.txt") == b"top-1 accuracy 0.91"
        assert len(json.loads(files.read("result_val_global_loss @ 0.json"))) == 6
    finally:
        d.json("DELETE", f"/api/mpi_jobs/{job['id']}")
        d.wait_job(job["id"])
