"""NSD, an authoritative DNS server, serving zone files on one address: for clusters and
benches past what dnsmasq answers (its TCP answer is malformed past about 300 SRV members).
`Knot` runs Knot DNS the same way, for IXFR (bench.discovery); `Bind` runs BIND 9, which
also answers IXFR with the changes only (Debian 12 ships both).

NSD runs unprivileged in the foreground (`nsd -d -c FILE`), with every file under one
directory: no system configuration is read or written. It answers zone transfers (AXFR;
NSD 4.6 answers an IXFR for an older serial with the whole zone) to anyone, and sends
NOTIFY to the addresses given when a zone changes. `write()` replaces the zones and bumps
their serial; `reload()` (SIGHUP) makes NSD read the changed files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

NSD_BIN = shutil.which("nsd") or "/usr/sbin/nsd"
KNOTD_BIN = shutil.which("knotd") or "/usr/sbin/knotd"
NAMED_BIN = shutil.which("named") or "/usr/sbin/named"


def free_port(ip="127.0.0.1"):
    """A port free on ip for both UDP and TCP (NSD listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((ip, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((ip, port))
                except OSError:
                    continue
                return port


def _conf(directory, ip, port, zones, notify, provide_xfr):
    lines = [
        "server:",
        f"  ip-address: {ip}@{port}",
        '  username: ""',
        '  chroot: ""',
        f'  zonesdir: "{directory}"',
        f'  pidfile: "{directory}/nsd.pid"',
        '  database: ""',
        f'  zonelistfile: "{directory}/zone.list"',
        f'  xfrdfile: "{directory}/xfrd.state"',
        f'  xfrdir: "{directory}"',
        f'  logfile: "{directory}/nsd.log"',
        "  server-count: 1",
        "  do-ip6: no",
        "  verbosity: 1",
        "  tcp-count: 64",
        "remote-control:",
        "  control-enable: no",
    ]
    for origin in zones:
        lines += ["zone:", f"  name: {origin}", f'  zonefile: "{origin}.zone"']
        if provide_xfr:
            lines.append("  provide-xfr: 0.0.0.0/0 NOKEY")
        lines += [f"  notify: {target} NOKEY" for target in notify]
    return "\n".join(lines) + "\n"


class NSD:
    """One NSD process; `zones` maps an origin (no trailing dot) to its record lines
    (`name TTL IN TYPE data`, names absolute)."""

    def __init__(self, directory, ip, port=53, notify=(), netns=None, ttl=2, provide_xfr=True):
        self.dir = Path(directory)
        self.provide_xfr = provide_xfr
        self.ip, self.port, self.netns, self.ttl = ip, port, netns, ttl
        self.notify = list(notify)  # "ip@port" of servers to NOTIFY on a change
        self.serial = int(time.time()) % 2**31  # each write() bumps it
        self.zones: dict[str, list[str]] = {}
        self.proc: subprocess.Popen | None = None

    def write(self, zones):
        """Write the zone files (serial bumped) and the configuration."""
        self.serial += 1
        self.zones = dict(zones)
        self.dir.mkdir(parents=True, exist_ok=True)
        for origin, records in self.zones.items():
            soa = (
                f"{origin}. {self.ttl} IN SOA ns.{origin}. hostmaster.{origin}. "
                f"{self.serial} 3600 600 86400 {self.ttl}"
            )
            ns = f"{origin}. {self.ttl} IN NS ns.{origin}.\nns.{origin}. {self.ttl} IN A {self.ip}"
            text = "\n".join([soa, ns, *records]) + "\n"
            tmp = self.dir / f"{origin}.zone.tmp"
            tmp.write_text(text)
            tmp.replace(self.dir / f"{origin}.zone")
        (self.dir / "nsd.conf").write_text(self.conf())

    def conf(self):
        return _conf(self.dir, self.ip, self.port, self.zones, self.notify, self.provide_xfr)

    def argv(self):
        return [NSD_BIN, "-d", "-c", str(self.dir / "nsd.conf")]

    def start(self, timeout=20.0):
        argv = self.argv()
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with open(self.dir / "nsd.out", "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        self.wait_serial(timeout)

    def reload(self, timeout=20.0):
        """Read the changed zone files (SIGHUP); returns once NSD serves the new serial."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)
        self.wait_serial(timeout)

    def wait_serial(self, timeout):
        """Until every zone answers its SOA with the current serial over UDP."""
        deadline = time.monotonic() + timeout
        for origin in self.zones:
            q = dns.message.make_query(f"{origin}.", dns.rdatatype.SOA)
            # A query sent while the server is still starting is lost: ask again soon, and
            # give each retry longer (a loaded machine answers slowly, not never).
            wait = 0.05
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.argv()[0]} exited: " + self.log())
                try:
                    wait = min(wait * 2, 0.5)
                    r = dns.query.udp(q, self.ip, timeout=wait, port=self.port)
                    if r.answer and r.answer[0][0].serial == self.serial:
                        break
                except (dns.exception.DNSException, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.argv()[0]} does not serve serial {self.serial}: " + self.log()
                    )
                time.sleep(0.05)

    def log(self):
        return "".join(
            p.read_text(errors="replace")[-2000:]
            for p in (self.dir / n for n in ("nsd.log", "nsd.out", "knot.log", "named.log"))
            if p.exists()
        )

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Knot(NSD):
    """Knot DNS in NSD's place (same interface), for the IXFR figures: it keeps the
    difference of each reloaded zone file in a journal (`zonefile-load: difference`), so
    an IXFR gets only the changes, where NSD 4.6 sends the whole zone again."""

    def conf(self):
        d = self.dir
        lines = [
            "server:",
            f'    rundir: "{d}"',
            f"    listen: {self.ip}@{self.port}",
            "log:",
            f'  - target: "{d}/knot.log"',
            "    any: notice",
            "database:",
            f'    storage: "{d}"',
            "acl:",
            "  - id: xfr",
            "    address: 0.0.0.0/0",
            "    action: transfer",
            "template:",
            "  - id: default",
            f'    storage: "{d}"',
            "    zonefile-sync: -1",
            "    zonefile-load: difference",
            "    journal-content: changes",
            *(["    acl: xfr"] if self.provide_xfr else []),
            "zone:",
        ]
        for origin in self.zones:
            lines += [f"  - domain: {origin}", f'    file: "{origin}.zone"']
        return "\n".join(lines) + "\n"

    def argv(self):
        return [KNOTD_BIN, "-c", str(self.dir / "nsd.conf")]


class Bind(NSD):
    """BIND 9 in NSD's place (same interface): `ixfr-from-differences` keeps the difference
    of each reloaded zone file in a journal, so an IXFR gets only the changes.  It holds at
    most 64 KB of one RRset: a zone whose SRV set is bigger is not loaded ("ran out of
    space"; about 1,300 of bench.discovery's members).  Run in the foreground with every
    file under one directory."""

    def conf(self):
        d = self.dir
        xfr = "any" if self.provide_xfr else "none"
        lines = [
            "options {",
            f'  directory "{d}";',
            f'  pid-file "{d}/named.pid";',
            f'  session-keyfile "{d}/session.key";',
            f'  managed-keys-directory "{d}";',
            f"  listen-on port {self.port} {{ {self.ip}; }};",
            "  listen-on-v6 { none; };",
            "  recursion no;",
            "  dnssec-validation no;",
            "  notify no;",
            f"  allow-transfer {{ {xfr}; }};",
            "  ixfr-from-differences yes;",
            # 9.18.28 on cap an RRset at 100 records (CVE-2024-1737); a headless
            # service's SRV set is one RRset of every member
            "  max-records-per-type 0;",
            "};",
            "controls { };",
            "logging {",
            f'  channel file {{ file "{d}/named.log"; severity notice; }};',
            "  category default { file; };",
            "};",
        ]
        for origin in self.zones:
            lines.append(f'zone "{origin}" {{ type primary; file "{origin}.zone"; }};')
        return "\n".join(lines) + "\n"

    def argv(self):
        # -g: foreground, no daemon user switch; -n 1: one worker thread (a bench's server)
        return [NAMED_BIN, "-g", "-n", "1", "-c", str(self.dir / "nsd.conf")]
