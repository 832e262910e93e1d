import dataclasses
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlbench_daemon import config
from mlbench_daemon.config import ConfigError, load

ENV = {"MLBENCH_DAEMON_DISCOVERY_SERVICE": "w.default.svc.cluster.local"}


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def error(tmp_path, text, environ=ENV):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), environ)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_match_the_table():
    cfg = load(None, ENV)
    for section, key, _conv, default, doc in config.SETTINGS:
        assert doc
        got = getattr(getattr(cfg, section), key)
        if default is not config.REQUIRED:
            assert got == default, (section, key)
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8080
    assert cfg.discovery.nameservers == ["127.0.0.1:5353"]
    assert cfg.mpi.program == ["/usr/local/bin/python", "/app/main.py"]


def test_the_table_and_the_dataclasses_agree():
    """Each key of SETTINGS is a field of its section's dataclass, in order, and no more;
    a loaded value has the field's declared type."""
    assert [f.name for f in dataclasses.fields(config.Config)] == list(config.SECTIONS)
    assert list(config.SECTION_TYPES) == list(config.SECTIONS)
    cfg = load(None, ENV)
    for f in dataclasses.fields(config.Config):
        assert config.SECTION_TYPES[f.name] is f.type
        declared = [k for s, k, *_ in config.SETTINGS if s == f.name]
        fields = dataclasses.fields(config.SECTION_TYPES[f.name])
        assert [g.name for g in fields] == declared, f.name
        for g in fields:
            value = getattr(getattr(cfg, f.name), g.name)
            origin = getattr(g.type, "__origin__", g.type)
            assert isinstance(value, origin), (f.name, g.name, g.type, value)


def test_sections_are_frozen():
    cfg = load(None, ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ssh.port = 2222
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ssh = None


def test_default_lists_are_not_shared():
    a, b = load(None, ENV), load(None, ENV)
    a.mpi.program.append("x")
    assert b.mpi.program == ["/usr/local/bin/python", "/app/main.py"]


def test_file_values(tmp_path):
    cfg = load(
        write(
            tmp_path,
            """
[server]
port = 9000
[discovery]
service = "svc.ns.svc.cluster.local"
nameservers = ["10.0.0.1", "10.0.0.2:5353", "[::1]:53", "::1"]
refresh_s = 3
label_rules = [{match = "*-worker-*", labels = {slots = "2"}}]
[ssh]
use_system_known_hosts = false
host_key_policy = "accept-new"
[mpi]
args = ["--bind-to", "none"]
""",
        ),
        {},
    )
    assert cfg.server.port == 9000
    assert cfg.discovery.service == "svc.ns.svc.cluster.local"
    assert cfg.discovery.refresh_s == 3.0 and isinstance(cfg.discovery.refresh_s, float)
    assert cfg.discovery.label_rules == [{"match": "*-worker-*", "labels": {"slots": "2"}}]
    assert cfg.ssh.use_system_known_hosts is False
    assert cfg.ssh.host_key_policy == "accept-new"
    assert cfg.mpi.args == ["--bind-to", "none"]


def test_env_overrides_file(tmp_path):
    p = write(tmp_path, '[ssh]\nport = 22\n[discovery]\nservice = "a"\n')
    cfg = load(
        p,
        {
            "MLBENCH_DAEMON_SSH_PORT": "2222",
            "MLBENCH_DAEMON_SSH_USE_SYSTEM_KNOWN_HOSTS": "0",
            "MLBENCH_DAEMON_DISCOVERY_NAMESERVERS": "[]",
            "MLBENCH_DAEMON_DISCOVERY_REFRESH_S": "0.5",
            "MLBENCH_DAEMON_MPI_PROGRAM": '["/bin/echo", "hi"]',
            "MLBENCH_DAEMON_DISCOVERY_LABEL_RULES": '[{"match": "n*", "labels": {"a": "b"}}]',
            "MLBENCH_DAEMON_URL": "http://127.0.0.1:1",  # the CLI's, ignored here
        },
    )
    assert cfg.ssh.port == 2222
    assert cfg.ssh.use_system_known_hosts is False
    assert cfg.discovery.nameservers == []
    assert cfg.discovery.refresh_s == 0.5
    assert cfg.mpi.program == ["/bin/echo", "hi"]
    assert cfg.discovery.label_rules == [{"match": "n*", "labels": {"a": "b"}}]


def test_path_keys_expand_environment(tmp_path):
    p = write(
        tmp_path,
        '[ssh]\nkey_file = "${CREDENTIALS_DIRECTORY}/ssh_key"\nknown_hosts = "$STATE/kh"\n',
    )
    cfg = load(p, dict(ENV, CREDENTIALS_DIRECTORY="/run/credentials/x", STATE="/s"))
    assert cfg.ssh.key_file == "/run/credentials/x/ssh_key"
    assert cfg.ssh.known_hosts == "/s/kh"
    msg = error(tmp_path, '[ssh]\nkey_file = "${CREDENTIALS_DIRECTORY}/ssh_key"\n')
    assert msg.startswith("ssh.key_file: $CREDENTIALS_DIRECTORY is not set")


def test_non_path_keys_are_not_expanded(tmp_path):
    cfg = load(
        write(tmp_path, '[mpi]\nprogram = ["/bin/sh", "-c", "echo $HOME"]\n'),
        dict(ENV, HOME="/root"),
    )
    assert cfg.mpi.program[2] == "echo $HOME"


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[ssh]\nport = "abc"', "ssh.port: must be an integer from 1 to 65535, got 'abc'"),
        ("[ssh]\nport = 70000", "ssh.port: must be an integer from 1 to 65535, got 70000"),
        ("[ssh]\nport = true", "ssh.port: must be an integer from 1 to 65535, got True"),
        (
            '[ssh]\nhost_key_policy = "yes"',
            "ssh.host_key_policy: must be one of reject, accept-new, got 'yes'",
        ),
        (
            '[ssh]\nuse_system_known_hosts = "maybe"',
            "ssh.use_system_known_hosts: must be true or false",
        ),
        ("[discovery]\nrefresh_s = 0", "discovery.refresh_s: must be a number > 0, got 0"),
        (
            '[discovery]\nnameservers = ["dns.example"]',
            'discovery.nameservers: must be a list of "IP" or "IP:port" strings; '
            "bad entry 'dns.example'",
        ),
        ('[discovery]\nnameservers = ["1.2.3.4:0"]', "discovery.nameservers: "),
        ('[discovery]\nnameservers = "1.2.3.4"', "discovery.nameservers: "),
        (
            '[discovery]\nlabel_rules = [{match = "x"}]',
            "discovery.label_rules: must be a list of tables",
        ),
        ('[discovery]\nlabel_rules = [{match = "x", labels = {a = 1}}]', "discovery.label_rules: "),
        (
            "[mpi]\nprogram = []",
            "mpi.program: must be a non-empty list of non-empty strings, got []",
        ),
        ('[mpi]\nprogram = ["a", 1]', "mpi.program: "),
        (
            "[mpi]\nmax_concurrent_jobs = 0",
            "mpi.max_concurrent_jobs: must be an integer from 1 to 1024, got 0",
        ),
        (
            '[log]\nlevel = "loud"',
            "log.level: must be one of debug, info, warning, error, got 'loud'",
        ),
        ('[server]\nhost = ""', "server.host: must be a non-empty string"),
        ("[sever]\nport = 1", "sever: unknown section"),
        ("[ssh]\nprot = 22", "ssh.prot: unknown key"),
        ("ssh = 1", "ssh: must be a table"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, expected):
    assert error(tmp_path, text).startswith(expected)


def test_service_is_required(tmp_path):
    msg = error(tmp_path, "", environ={})
    assert msg.startswith("discovery.service: required")
    assert "MLBENCH_DAEMON_DISCOVERY_SERVICE" in msg


@pytest.mark.parametrize(
    "name, value, expected",
    [
        (
            "MLBENCH_DAEMON_SSH_PORT",
            "x",
            "ssh.port (from MLBENCH_DAEMON_SSH_PORT): must be an integer",
        ),
        (
            "MLBENCH_DAEMON_MPI_PROGRAM",
            "/bin/true",
            "mpi.program (from MLBENCH_DAEMON_MPI_PROGRAM): must be JSON",
        ),
        ("MLBENCH_DAEMON_SSH_USE_SYSTEM_KNOWN_HOSTS", "yes", "ssh.use_system_known_hosts (from"),
        ("MLBENCH_DAEMON_SSH_PROT", "22", "MLBENCH_DAEMON_SSH_PROT: unknown setting"),
    ],
)
def test_bad_env_names_the_key_and_variable(tmp_path, name, value, expected):
    assert error(tmp_path, "", dict(ENV, **{name: value})).startswith(expected)


def test_toml_syntax_error_is_one_line(tmp_path):
    msg = error(tmp_path, "[ssh\nport = 1\n")
    assert "invalid TOML" in msg


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "nope.toml", ENV)
    assert "cannot read config" in str(e.value) and "\n" not in str(e.value)


@given(st.integers(min_value=-(10**6), max_value=10**6))
def test_port_accepts_exactly_the_valid_range(n):
    env = dict(ENV, MLBENCH_DAEMON_SSH_PORT=str(n))
    if 1 <= n <= 65535:
        assert load(None, env).ssh.port == n
    else:
        with pytest.raises(ConfigError):
            load(None, env)


def test_example_config_loads():
    example = pathlib.Path(__file__).parent.parent / "config" / "mlbench-daemon.toml"
    cfg = load(example, {"CREDENTIALS_DIRECTORY": "/run/credentials/mlbench-daemon.service"})
    assert cfg.ssh.key_file == "/run/credentials/mlbench-daemon.service/ssh_key"
    assert cfg.server.host == "127.0.0.1"
