"""Capture real OpenMPI 4 failure output on the test cluster, as test data.

    sudo python3 -m tests.data.capture_openmpi4     (from the repository root)

Builds a 3-host cluster, gives each host 2 slots and runs np=5 from the middle host
(so rank i is not on host i), once per fault, and writes tests/data/openmpi4/<case>.json:
the argv run, the master's IP, every host's IP, name and `uname -n`, the exit status
and the output exactly as mpirun wrote it (stdout and stderr together).
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from tests.cluster import MPI_ARGS, MPIRUN, Cluster

OUT = Path(__file__).resolve().parent / "openmpi4"


def main():
    c = Cluster(workers=3, extra=0).build()
    try:
        hosts, master = c.hosts, c.hosts[1]
        unames = {h.ip: c.ssh(h, ["uname", "-n"], check=True).stdout.strip() for h in hosts}

        def run(case, program, np=5, before=None, during=None, after=None):
            argv = [MPIRUN, *MPI_ARGS, "--host", ",".join(f"{h.ip}:2" for h in hosts)]
            argv += ["-np", str(np), *program]
            if before:
                before()
            t = threading.Thread(target=during) if during else None
            if t:
                t.start()
            r = c.ssh(master, ["sh", "-c", '"$@" </dev/null 2>&1', "sh", *argv], timeout=120)
            if t:
                t.join()
            if after:
                after()
            doc = {
                "command": argv,
                "master_ip": master.ip,
                "nodes": [{"name": h.name, "ip": h.ip, "hostname": unames[h.ip]} for h in hosts],
                "exit_code": r.returncode,
                "output": r.stdout,
            }
            (OUT / f"{case}.json").write_text(json.dumps(doc, indent=1) + "\n")
            print(case, r.returncode, file=sys.stderr)

        prog = str(c.mpi_program)
        run("succeeded", [prog])
        run("rank-exit", [prog, "--exit-rank", "3", "3"])
        run("rank-exit-all", [prog, "--exit", "7"])

        def kill_rank(rank=4):
            time.sleep(1.5)
            for p in os.listdir("/proc"):
                try:
                    if not p.isdigit() or os.stat(f"/proc/{p}").st_uid != c.uid:
                        continue
                    env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
                    comm = Path(f"/proc/{p}/comm").read_text().strip()
                    if comm == "mpiprog" and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
                        os.kill(int(p), signal.SIGKILL)
                except OSError:
                    pass

        run("rank-signal", [prog, "--sleep", "4"], during=kill_rank)
        run("exe-not-found", ["/nonexistent/program"])
        run("not-enough-slots", [prog], np=7)

        kh = c.home / ".ssh" / "known_hosts"
        saved = kh.read_text()
        drop = hosts[2].ip
        run(
            "daemon-launch",
            [prog],
            before=lambda: kh.write_text(
                "".join(line for line in saved.splitlines(True) if drop not in line)
            ),
            after=lambda: kh.write_text(saved),
        )

        def kill_orted():
            time.sleep(1.5)
            for p in c.netns_exec(hosts[2], ["ip", "netns", "pids", hosts[2].ns]).stdout.split():
                try:
                    if Path(f"/proc/{p}/comm").read_text().strip() == "orted":
                        os.kill(int(p), signal.SIGKILL)
                except OSError:
                    pass

        run("lost-contact", [prog, "--sleep", "4"], during=kill_orted)
    finally:
        c.teardown()


if __name__ == "__main__":
    main()
