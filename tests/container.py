"""A real systemd in a container, for testing the installed service.

``rootfs()`` gives a Debian root filesystem made by debootstrap (minbase plus
systemd, dbus, python3 and python3-venv) for the distribution release this
machine runs (plus make), from the mirror apt uses here (read from the apt sources at run
time).  It is built once and cached outside the repository, in
``$MLBENCH_TEST_CACHE`` (default ``/var/cache/mlbench-daemon-tests``), under a
name made of a hash of the release, architecture and package list plus the build
date; an entry older than ``MAX_AGE_DAYS`` is built again, so security updates
arrive.  Builds take a lock and appear by one rename, so concurrent runs never
see half a tree; entries no mount uses any more are removed.

``Container(rootfs, workdir)`` mounts an overlay over that tree (the cache is
never written), boots it with ``systemd-nspawn --register=no --keep-unit -b`` in
a cgroup of its own (PID 1 here is not systemd), and runs commands in it with
``nsenter`` into its systemd.  It shares this machine's network namespace, so a
daemon inside reaches the test cluster and loopback.  ``stop()`` powers it off
and removes everything; a state file lets a later run remove what a killed run
left behind.  Needs root.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.cluster.cluster import _pid_alive, dead_runs

CACHE = Path(os.environ.get("MLBENCH_TEST_CACHE", "/var/cache/mlbench-daemon-tests"))
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "make")
MAX_AGE_DAYS = 30
WORK_PREFIX = "mlbn-"
STATE_ROOT = Path("/tmp")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(RuntimeError):
    pass


def _run(argv, *, timeout=60, check=True, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise ContainerError(f"{' '.join(map(str, argv))}: exit {r.returncode}: {r.stderr[-2000:]}")
    return r


# --- the root filesystem ------------------------------------------------------------------


def release() -> str:
    """This machine's distribution release (VERSION_CODENAME), e.g. bookworm."""
    text = Path("/etc/os-release").read_text()
    m = re.search(r"^VERSION_CODENAME=\"?([\w-]+)\"?$", text, re.M)
    if not m:
        raise ContainerError("no VERSION_CODENAME in /etc/os-release")
    return m.group(1)


def apt_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled deb source apt uses here, both file formats."""
    parts = _run(["apt-config", "shell", "D", "Dir::Etc::sourceparts/d"]).stdout
    m = re.search(r"D='([^']*)'", parts)
    parts_dir = Path(m.group(1) if m else "/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(parts_dir.glob("*"))]
    out = []
    for f in files:
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.split()
                if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
                    out += [(uri, fields.get("suites", [])) for uri in fields.get("uris", [])]
        elif f.name == "sources.list" or f.suffix == ".list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    out.append((words[1], [words[2]]))
    return out


def apt_mirror(suite: str) -> str:
    """The mirror apt uses here for `suite`."""
    for uri, suites in apt_sources():
        if suite in suites and uri.startswith(("http://", "https://", "file:/")):
            return uri
    raise ContainerError(f"no apt source for {suite!r} in the apt sources of this machine")


def _apt_proxy_env() -> dict[str, str]:
    env = {}
    for scheme in ("http", "https"):
        r = _run(["apt-config", "shell", "P", f"Acquire::{scheme}::Proxy"], check=False)
        m = re.search(r"P='([^']*)'", r.stdout)
        if m and m.group(1) not in ("", "DIRECT", "false"):
            env[f"{scheme}_proxy"] = m.group(1)
    return env


def _cache_key(suite: str, arch: str) -> str:
    spec = json.dumps({"suite": suite, "arch": arch, "variant": "minbase", "pkgs": PACKAGES})
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _in_use(path: Path) -> bool:
    needle = str(path)
    return needle in Path("/proc/self/mountinfo").read_text()


def rootfs(log=print) -> tuple[Path, float | None]:
    """The cached root filesystem -> (path, seconds debootstrap took, None when cached)."""
    suite = release()
    arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    key = _cache_key(suite, arch)
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; readers wait for it
        today = datetime.date.today()
        fresh = []
        for d in CACHE.glob(f"{key}-*"):
            try:
                built = datetime.datetime.strptime(d.name.split("-", 1)[1], "%Y%m%d").date()
            except ValueError:
                continue
            if (d / ".complete").exists() and (today - built).days <= MAX_AGE_DAYS:
                fresh.append((built, d))
        took = None
        if fresh:
            root = max(fresh)[1]
        else:
            root = CACHE / f"{key}-{today:%Y%m%d}"
            tmp = CACHE / f"tmp-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            mirror = apt_mirror(suite)
            log(f"debootstrap {suite} from {mirror} into {root} (cached for later runs)")
            t0 = time.monotonic()
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    f"--arch={arch}",
                    suite,
                    str(tmp),
                    mirror,
                ],
                timeout=1200,
                env={**os.environ, **_apt_proxy_env()},
            )
            took = time.monotonic() - t0
            (tmp / ".complete").write_text(json.dumps({"suite": suite, "mirror": mirror}))
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        # entries of other dates or package lists, and failed builds, once nothing mounts them
        for d in CACHE.iterdir():
            if not d.is_dir() or d == root or _in_use(d):
                continue
            if d.name.startswith("tmp-"):
                if not _pid_alive(int(d.name.rsplit("-", 1)[1])):
                    shutil.rmtree(d, ignore_errors=True)
            elif time.time() - d.stat().st_mtime > 3600:  # not one another run just chose
                shutil.rmtree(d, ignore_errors=True)
        return root, took


# --- one container ------------------------------------------------------------------------


def _cgroup_roots() -> list[Path]:
    """Where nspawn's cgroups go: the named systemd v1 hierarchy and the v2 one."""
    base = Path("/sys/fs/cgroup")
    hybrid = [base / "systemd", base / "unified"]
    if all((p / "cgroup.procs").exists() for p in hybrid):
        return hybrid
    return [base]


def _remove_cgroup(path: Path) -> None:
    if not path.exists():
        return
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


class Container:
    """Container(rootfs, ...).start(); always stop()."""

    def __init__(self, rootfs: Path):
        cleanup_leftovers()
        self.id = secrets.token_hex(3)
        self.dir = STATE_ROOT / f"{WORK_PREFIX}{self.id}"
        self.lower = rootfs
        self.root = self.dir / "root"
        self.cgroups = [r / f"{WORK_PREFIX}{self.id}" for r in _cgroup_roots()]
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # the container's systemd, in our PID namespace

    def start(self, timeout: float = 60.0) -> Container:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout):
        for sub in ("upper", "work", "root"):
            (self.dir / sub).mkdir(parents=True)
        self._save()
        _run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={self.lower},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}",
                str(self.root),
            ]
        )
        for cg in self.cgroups:
            cg.mkdir()
        log = open(self.dir / "console.log", "wb")

        def own_cgroup():  # nspawn puts the container below the cgroup it starts in
            for cg in self.cgroups:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-q", "-D", str(self.root), "--register=no", "--keep-unit", "-b"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=own_cgroup,
        )
        log.close()
        self._save()
        deadline = time.monotonic() + timeout
        while self.pid is None:
            kids = [
                p
                for p in _children(self.proc.pid)
                if Path(f"/proc/{p}/comm").read_text().strip() == "systemd"
            ]
            if kids:
                self.pid = kids[0]
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise ContainerError(f"systemd did not boot: {self.console()[-2000:]}")
            else:
                time.sleep(0.05)
        while True:
            left = max(1.0, deadline - time.monotonic())
            r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return
            # "" (no bus yet) and "offline" (no /run/systemd/system yet): it is still
            # coming up; a first try can come that early on a busy machine
            if state not in ("", "offline") or time.monotonic() > deadline:
                raise ContainerError(f"container systemd is {state!r}: {r.stderr.strip()}")
            time.sleep(0.1)

    def _save(self):
        state = {"owner": os.getpid(), "nspawn": self.proc.pid if self.proc else None}
        state["root"], state["cgroups"] = str(self.root), [str(c) for c in self.cgroups]
        (self.dir / "state.json").write_text(json.dumps(state))

    def console(self) -> str:
        try:
            return (self.dir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def run(self, argv, *, check=True, timeout=120, input=None, env=None):
        """Run argv inside (as root, clean environment); -> CompletedProcess (text)."""
        environ = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0", **(env or {})}
        cmd = ["nsenter", "-t", str(self.pid), "-a", "env", "-i"]
        cmd += [f"{k}={v}" for k, v in environ.items()] + list(argv)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise ContainerError(
                f"in container: {' '.join(argv)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
            )
        return r

    def path(self, inside: str) -> Path:
        """This machine's path of a path inside the container."""
        return self.root / inside.lstrip("/")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc and self.proc.poll() is None:
            if self.pid:
                try:
                    self.run(["systemctl", "poweroff"], check=False, timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)  # nspawn: power off the container
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        _teardown(self.dir)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _teardown(d: Path) -> None:
    try:
        state = json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        state = {}
    nspawn = state.get("nspawn")
    if nspawn and _pid_alive(nspawn):
        try:
            cmdline = Path(f"/proc/{nspawn}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if str(d).encode() in cmdline:  # still the nspawn we started, not a reused pid
            os.kill(nspawn, signal.SIGKILL)  # its container dies with it (PDEATHSIG)
            deadline = time.monotonic() + 10
            while _pid_alive(nspawn) and time.monotonic() < deadline:
                time.sleep(0.05)
    root = d / "root"
    if root.exists() and str(root) in Path("/proc/self/mountinfo").read_text():
        _run(["umount", "-l", str(root)], check=False)
    for cg in state.get("cgroups", []):
        _remove_cgroup(Path(cg))
    shutil.rmtree(d, ignore_errors=True)


def cleanup_leftovers() -> None:
    """Remove what earlier runs, killed before their teardown, left behind."""
    for d in dead_runs(STATE_ROOT, f"{WORK_PREFIX}*"):
        _teardown(d)
