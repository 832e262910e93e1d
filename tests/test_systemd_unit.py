"""The shipped unit passes systemd-analyze verify and scores <= 2.0 on security."""

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

UNIT = pathlib.Path(__file__).parent.parent / "systemd" / "mlbench-daemon.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.system  # systemd-analyze and systemd-run: not the fast stage
needs_analyze = pytest.mark.skipif(not ANALYZE, reason="systemd-analyze is not installed")


def settings():
    pairs = [
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    ]
    return [(k.strip(), v.strip()) for k, v in pairs]


@needs_analyze
def test_security_exposure_at_most_2():
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    m = re.search(r"Overall exposure level for mlbench-daemon\.service: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout


@needs_analyze
def test_verify_is_clean(tmp_path):
    # verify checks that ExecStart exists: point it at this interpreter
    text = UNIT.read_text()
    assert "ExecStart=/opt/mlbench-daemon/current/bin/mlbench-daemon serve " in text
    copy = tmp_path / "mlbench-daemon.service"
    copy.write_text(
        text.replace(
            "/opt/mlbench-daemon/current/bin/mlbench-daemon serve",
            f"{sys.executable} -m mlbench_daemon serve",
        )
    )
    proc = subprocess.run(
        [ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "mlbench-daemon.service" not in proc.stderr + proc.stdout


def test_unit_essentials():
    s = dict(settings())
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main" and s["WatchdogSec"] == "30"
    assert s["User"] == "mlbench-daemon" and s["KillMode"] == "mixed"
    assert s["LoadCredential"] == "ssh_key:/etc/mlbench-daemon/ssh_key"
    assert s["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    keys = [k for k, _ in settings()]
    # the daemon must reach the cluster: no network isolation
    assert "PrivateNetwork" not in keys and "IPAddressDeny" not in keys
    assert s["MemoryDenyWriteExecute"] == "yes"
    # no key: `systemctl start` fails at once, naming no credential error; a bad config
    # (exit 2) is not retried
    assert s["AssertPathExists"] == "/etc/mlbench-daemon/ssh_key"
    assert s["RestartPreventExitStatus"] == "2"


def _mdwe_supported():
    code = "import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel lacks PR_SET_MDWE (Linux >= 6.3)")
def test_daemon_code_runs_with_memory_deny_write_execute():
    """MemoryDenyWriteExecute=yes: the kernel's PR_SET_MDWE gives the same W^X rule."""
    code = r"""
import ctypes, mmap
assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("W^X not enforced")
except PermissionError:
    pass
import paramiko, bottle, waitress, dns.resolver, prometheus_client, sqlite3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
ed25519.Ed25519PrivateKey.generate().sign(b"x")
ec.generate_private_key(ec.SECP256R1()).sign(b"x", ec.ECDSA(hashes.SHA256()))
paramiko.RSAKey(key=rsa.generate_private_key(65537, 2048)).sign_ssh_data(b"x", "rsa-sha2-256")
from mlbench_daemon import cli, config, metrics, sdnotify
metrics.render()
sqlite3.connect(":memory:").execute("select 1")
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=UNIT.parent.parent,
    )
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
