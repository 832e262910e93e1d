"""The one declared table of settings.

Every key is declared once in ``SETTINGS`` as (section, key, converter,
default, doc), in the style of waitress's ``adjustments.py``.  ``load()`` reads
a TOML file, applies ``MLBENCH_DAEMON_<SECTION>_<KEY>`` environment overrides
(lists and tables as JSON, bools as true/false/1/0), converts and validates
each value, and returns a ``Config`` with one frozen object per section.

Any problem raises ``ConfigError`` with one line naming the key, e.g.
``ssh.port: must be an integer from 1 to 65535, got 'abc'``.

Values keep their TOML types (str, int, float, bool, list, dict); path keys
(``server.token_file``, ``ssh.key_file``, ``ssh.known_hosts``) have
``$VAR``/``${VAR}`` expanded from the environment, so
``${CREDENTIALS_DIRECTORY}/ssh_key`` works with systemd's LoadCredential.
"""

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mlbench_daemon import browser, template
from mlbench_daemon.vocabulary import HOOK_EVENTS

ENV_PREFIX = "MLBENCH_DAEMON_"
CLIENT_ENV = ("MLBENCH_DAEMON_URL", "MLBENCH_DAEMON_TOKEN_FILE")  # read by the CLI, not here
REQUIRED = object()

Converter = Callable[[Any], Any]
JSON_ENV: set[Converter] = set()  # converters whose environment value is JSON
EXPANDED: set[Converter] = set()  # converters whose value gets $VAR / ${VAR} expanded
UNECHOED: set[Converter] = set()  # converters whose bad value is never echoed (may hold secrets)


F = TypeVar("F", bound=Callable[..., Any])


def _json_env(fn: F) -> F:
    JSON_ENV.add(fn)
    return fn


def _expanded(fn: F) -> F:
    EXPANDED.add(fn)
    return fn


def _unechoed(fn: F) -> F:
    UNECHOED.add(fn)
    return fn


class ConfigError(Exception):
    """A bad config file or value; str() is one line naming the key."""


# --- converters: value (TOML-typed, or str from the environment) -> value,
# raising ValueError("must be ...") on bad input.


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def nonempty(value: Any) -> str:
    text = string(value)
    if not text.strip():
        raise ValueError("must be a non-empty string")
    return text


@_expanded
def path(value: Any) -> str:
    return string(value)


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError("must be true or false")


def integer(lo: int, hi: int | None = None) -> Converter:
    rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"

    def convert(value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < lo
            or (hi is not None and value > hi)
        ):
            raise ValueError(f"must be an integer {rng}")
        return value

    return convert


def number(lo: float, *, strict: bool = False) -> Converter:
    rng = f"> {lo}" if strict else f">= {lo}"

    def convert(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be a number {rng}") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value != value
            or value in (float("inf"), float("-inf"))
            or value < lo
            or (strict and value == lo)
        ):
            raise ValueError(f"must be a number {rng}")
        return float(value)

    return convert


def one_of(*choices: str) -> Converter:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value.strip().lower()

    return convert


@_json_env
def str_list(value: Any, *, what: str = "a list of strings") -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be {what}")
    return list(value)


# Launcher options that write each rank's output to files (on that rank's own node)
# instead of the launcher's output: the job's log (`response`) would stay empty, and
# every such job would look stalled.  A job's `rank_output` splits it on the head instead.
OUTPUT_FILE_OPTIONS = (
    "--output-filename",  # OpenMPI 4 and 5
    "-output-filename",
    "-outfile-pattern",  # Hydra
    "-errfile-pattern",
    "--outfile-pattern",
    "--errfile-pattern",
)
_OUTPUT_FILE_VALUE = re.compile(r"(?:^|,)(?:dir|file)[=:]")  # PRRTE's --output dir=... or file=...


@_json_env
def launcher_args(value: Any) -> list[str]:
    items = str_list(value)
    for i, item in enumerate(items):
        name, eq, rest = item.partition("=")
        after = rest if eq else (items[i + 1] if i + 1 < len(items) else "")
        if name in OUTPUT_FILE_OPTIONS or (name == "--output" and _OUTPUT_FILE_VALUE.search(after)):
            raise ValueError(
                f"must not hold {item!r} (it writes each rank's output to files on that "
                "rank's node: the job's log would stay empty and the job look stalled; "
                "a job's rank_output: true keeps each rank's output apart instead)"
            )
    return items


@_json_env
def argv(value: Any) -> list[str]:
    what = "a non-empty list of non-empty strings"
    if not str_list(value, what=what) or not all(value):
        raise ValueError(f"must be {what}")
    return list(value)


@_json_env
def nameservers(value: Any) -> list[str]:
    what = 'a list of "IP" or "IP:port" strings'
    for item in str_list(value, what=what):
        try:
            parse_nameserver(item)
        except ValueError:
            raise ValueError(f"must be {what}; bad entry {item!r}") from None
    return list(value)


STACK_TOOLS = ("py-spy", "eu-stack", "gdb")


@_json_env
def stack_tools(value: Any) -> list[str]:
    what = f"a list of distinct names from {', '.join(STACK_TOOLS)}"
    items = str_list(value, what=what)
    if len(set(items)) != len(items) or not set(items) <= set(STACK_TOOLS):
        raise ValueError(f"must be {what}")
    return list(items)


def _every(value: Any, what: str, parse: Callable[[str], object]) -> list[str]:
    """`value` as a list of strings that `parse` accepts (does not map to None)."""
    for item in str_list(value, what=what):
        if parse(item) is None:
            raise ValueError(f"must be {what}; bad entry {item!r}")
    return list(value)


@_json_env
def host_names(value: Any) -> list[str]:
    return _every(value, 'a list of "name" or "name:port" strings', browser.split_host)


@_json_env
def origins(value: Any) -> list[str]:
    what = 'a list of origins like "https://host" or "http://host:port"'
    return _every(value, what, browser.normalise_origin)


HOOK_NAME = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,39}")
HOOK_KEYS = {"name", "url", "secret_file", "events", "tags"}


@_unechoed  # a URL may carry a secret (a token in its path or query)
@_json_env
def hooks(value: Any) -> list[dict[str, Any]]:
    """Webhooks: a list of tables {name, url, secret_file, events = [...], tags = [...]};
    `events` defaults to every event, `tags` (every one must be on the job) to none."""
    what = "a list of tables {name, url, secret_file, events, tags}"
    if not isinstance(value, list):
        raise ValueError(f"must be {what}")
    out, names = [], set()
    for i, hook in enumerate(value):
        if not isinstance(hook, dict) or not {"name", "url", "secret_file"} <= set(hook):
            raise ValueError(f"must be {what}; [{i}] needs name, url and secret_file")
        if set(hook) - HOOK_KEYS:
            raise ValueError(f"[{i}]: unknown key {sorted(set(hook) - HOOK_KEYS)[0]!r}")
        name = hook["name"]
        if not isinstance(name, str) or not HOOK_NAME.fullmatch(name) or name in names:
            raise ValueError(f"[{i}].name must be unique and match {HOOK_NAME.pattern}")
        names.add(name)
        url = hook["url"]
        try:
            parts = urlsplit(url) if isinstance(url, str) else None
            port = parts.port if parts else None
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in browser.DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"[{i}].url must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"[{i}].url must carry no user or password (the secret signs)")
        events = str_list(hook.get("events", list(HOOK_EVENTS)), what=f"[{i}].events: a list")
        unknown = [e for e in events if e not in HOOK_EVENTS]
        if unknown or not events:
            raise ValueError(f"[{i}].events must name some of {', '.join(HOOK_EVENTS)}")
        out.append({
            "name": name,
            "url": url,
            "host": parts.hostname.lower().rstrip("."),
            "port": port or browser.DEFAULT_PORTS[parts.scheme],
            "secret_file": nonempty(hook["secret_file"]),
            "events": list(dict.fromkeys(events)),
            "tags": str_list(hook.get("tags", []), what=f"[{i}].tags: a list of key:value"),
        })  # fmt: skip
    return out


WILDCARDS = ("0.0.0.0", "::")


def own_addresses(
    fib_trie: str = "/proc/net/fib_trie", if_inet6: str = "/proc/net/if_inet6"
) -> set[str]:
    """The addresses of this machine's interfaces (in the daemon's network namespace),
    from the kernel's tables: IPv4's local routes and IPv6's interface list.  Empty where
    they cannot be read (not Linux): the other checks still apply."""
    found: set[str] = set()
    try:
        with open(fib_trie, encoding="ascii") as f:
            last = ""
            for line in f:  # "|-- 10.0.0.5" then "/32 host LOCAL" under it
                if "|--" in line:
                    last = line.split("|--", 1)[1].strip()
                elif line.split()[-1:] == ["LOCAL"] and last:
                    found.add(last)
    except OSError:
        pass
    try:
        with open(if_inet6, encoding="ascii") as f:
            for line in f:  # "fe80000000000000c4855bfffe1641bb 1ad2 40 20 80 eth0"
                hexed = line.split()[0]
                found.add(str(ipaddress.IPv6Address(int(hexed, 16))))
    except (OSError, ValueError, IndexError):
        pass
    return found


def _unmapped(host: str) -> str:
    """An IP literal in its canonical text (an IPv4-mapped IPv6 as the IPv4); a name as is."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _hook_at_daemon(
    hook: Mapping[str, Any], server: "Server", own: Callable[[], set[str]] = own_addresses
) -> str | None:
    """Why `hook` would POST to this daemon itself (None if it would not): its bind
    address, a loopback name or address, or one of server.allowed_hosts, on its port; on a
    wildcard bind also the machine's hostname, any address of its interfaces, or the
    wildcard address itself (a connect to 0.0.0.0 reaches this machine)."""
    host, port = _unmapped(hook["host"]), hook["port"]
    policy = browser.Policy.from_config(server)
    named = [(n, p if p is not None else server.port) for n, p in policy.allowed_hosts]
    mine = {policy.bind, *WILDCARDS}
    if policy.bind in WILDCARDS and port == server.port:
        mine |= {policy.hostname, *own()}
    if (host, port) in named or (
        port == server.port and (host in mine or browser.is_loopback(host))
    ):
        return f"points at the daemon itself ({host}:{port}); a hook must go elsewhere"
    return None


def read_token(path: str) -> str:
    """The bearer token in file `path`; ValueError (one line, naming the file) if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path} must hold one non-empty token")
    return token


def parse_nameserver(text: str, default_port: int = 53) -> tuple[str, int]:
    """'IP', 'IP:port', '[IPv6]:port' or a bare IPv6 -> (ip, port)."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]+):(\d+)|([^\[\]]+)", text.strip())
    if not m:
        raise ValueError(text)
    ip = m.group(1) or m.group(3) or m.group(5)
    port = int(m.group(2) or m.group(4) or default_port)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return str(ipaddress.ip_address(ip)), port


@_json_env
def label_rules(value: Any) -> list[dict[str, Any]]:
    what = 'a list of tables {match = "glob", labels = {key = "value"}}'
    if not isinstance(value, list):
        raise ValueError(f"must be {what}")
    rules = []
    for i, rule in enumerate(value):
        if (
            not isinstance(rule, dict)
            or set(rule) != {"match", "labels"}
            or not isinstance(rule["match"], str)
            or not rule["match"]
            or not isinstance(rule["labels"], dict)
            or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in rule["labels"].items()
            )
        ):
            raise ValueError(f"must be {what}; bad entry [{i}]")
        rules.append({"match": rule["match"], "labels": dict(rule["labels"])})
    return rules


@_json_env
def catalogue(value: Any) -> dict[str, str]:
    """MLBench runs' benchmark catalogue: name -> command template (template.py)."""
    what = 'a table of name = "command template"'
    if not isinstance(value, dict):
        raise ValueError(f"must be {what}")
    for name, text in value.items():
        if not isinstance(name, str) or not name or not isinstance(text, str):
            raise ValueError(f"must be {what}; bad entry {name!r}")
        try:
            template.words(text)
        except template.TemplateError as e:
            raise ValueError(f"entry {name!r} {e}") from None
    return dict(value)


SETTINGS: tuple[tuple[str, str, Converter, Any, str], ...] = (
    # section, key, converter, default, doc
    ("server", "host", nonempty, "127.0.0.1", "address to bind; non-loopback needs token_file"),
    ("server", "port", integer(0, 65535), 8080, "TCP port to bind (0 = any free port)"),
    ("server", "token_file", path, "", "file holding the bearer token for /api/; empty = no auth"),
    (
        "server",
        "tokens_file",
        path,
        "",
        "named tokens with roles (`mlbench-daemon token add`); empty = none; beside token_file",
    ),
    ("server", "threads", integer(1, 256), 8, "waitress worker threads"),
    ("server", "max_body_bytes", integer(1), 1048576, "largest accepted request body"),
    (
        "server",
        "max_streams",
        integer(1, 255),
        4,
        "log follows and waiting sync POSTs at once (each holds a thread; below threads)",
    ),
    (
        "server",
        "allowed_hosts",
        host_names,
        [],
        "more Host names (a reverse proxy's) besides the bind address and, on loopback, localhost",
    ),
    (
        "server",
        "allowed_origins",
        origins,
        [],
        "web origins besides the daemon's own that may call the API from a browser",
    ),
    ("server", "public_metrics", boolean, False, "serve /metrics without the token"),
    (
        "server",
        "cancel_answer_s",
        number(0),
        2.0,
        "longest a DELETE of a job waits for the cancel to end (then 202, the cancel goes on)",
    ),
    (
        "discovery",
        "service",
        nonempty,
        REQUIRED,
        "headless service name, e.g. rel-mlbench-worker.default.svc.cluster.local",
    ),
    ("discovery", "srv", nonempty, "_ssh._tcp", "SRV prefix queried under the service"),
    (
        "discovery",
        "nameservers",
        nameservers,
        ["127.0.0.1:5353"],
        '"IP" or "IP:port" list; empty = system resolver',
    ),
    (
        "discovery",
        "namespace",
        nonempty,
        "default",
        "namespace when the service name does not carry one",
    ),
    (
        "discovery",
        "transfer_zone",
        string,
        "",
        "zone copied by AXFR then IXFR from the first nameserver, for clusters past one SRV"
        ' answer (~700 members); "" = ask SRV queries',
    ),
    ("discovery", "selector", string, "", "label selector, e.g. app=mlbench,component=worker"),
    ("discovery", "refresh_s", number(0, strict=True), 10.0, "longest time between DNS refreshes"),
    ("discovery", "timeout_s", number(0, strict=True), 2.0, "deadline of one DNS lookup"),
    (
        "discovery",
        "recheck_s",
        number(0),
        300.0,
        "re-read each member's address and TXT labels this often (0 = every pass)",
    ),
    (
        "discovery",
        "negative_ttl_min_s",
        number(0),
        30.0,
        "floor of the time a member's NXDOMAIN/NODATA answer is kept (RFC 2308 SOA minimum)",
    ),
    (
        "discovery",
        "negative_ttl_max_s",
        number(0),
        600.0,
        "ceiling of the time a member's NXDOMAIN/NODATA answer is kept",
    ),
    (
        "discovery",
        "negative_ttl_fallback_s",
        number(0),
        60.0,
        "time a member's NXDOMAIN/NODATA answer without an SOA is kept",
    ),
    (
        "discovery",
        "max_txt_bytes",
        integer(0),
        4096,
        "a node's TXT labels kept up to this many bytes of key=value text",
    ),
    ("discovery", "max_txt_keys", integer(0), 64, "a node's TXT labels kept up to this many keys"),
    (
        "discovery",
        "max_label_value",
        integer(0),
        128,
        "a TXT label whose value is longer than this many characters is dropped",
    ),
    (
        "discovery",
        "label_rules",
        label_rules,
        [],
        "static labels: [{match = glob on node name, labels = {...}}]",
    ),
    ("ssh", "user", nonempty, "mlbench", "cluster user to log in as"),
    ("ssh", "port", integer(1, 65535), 22, "SSH port when DNS gives none"),
    (
        "ssh",
        "key_file",
        path,
        "",
        "private key file; empty = the first of ~/.ssh/id_ed25519, id_ecdsa, id_rsa (no agent)",
    ),
    ("ssh", "known_hosts", path, "", "known_hosts file checked (and written by accept-new)"),
    (
        "ssh",
        "host_key_policy",
        one_of("reject", "accept-new"),
        "reject",
        "unknown host keys: reject or pin on first sight",
    ),
    (
        "ssh",
        "connect_timeout_s",
        number(0, strict=True),
        5.0,
        "deadline for TCP connect + SSH handshake + auth",
    ),
    (
        "ssh",
        "probe_interval_s",
        number(0, strict=True),
        5.0,
        "time between reachability probes of one node",
    ),
    (
        "ssh",
        "verify_interval_s",
        number(0, strict=True),
        300.0,
        "a full fresh login to each node this often (spread over the nodes)",
    ),
    (
        "ssh",
        "listener_interval_s",
        number(0, strict=True),
        120.0,
        "each node connects to its own sshd this often (2 lines in its auth log); between, "
        "it checks the listening socket each probe round, which sshd does not log",
    ),
    ("ssh", "keepalive_s", number(0), 10.0, "SSH keepalive interval (0 = off)"),
    ("ssh", "max_connects", integer(1, 1024), 16, "SSH connects in flight at once"),
    (
        "ssh",
        "max_channels",
        integer(1, 1024),
        8,
        "channels open at once per connection (sshd MaxSessions is 10)",
    ),
    (
        "ssh",
        "use_system_known_hosts",
        boolean,
        True,
        "also trust the system/user known_hosts files",
    ),
    ("mpi", "mpirun", nonempty, "/usr/bin/mpirun", "mpirun path on the master"),
    (
        "mpi",
        "flavour",
        one_of("auto", "openmpi4", "openmpi5", "mpich"),
        "auto",
        "which launcher mpi.mpirun is (auto: from its --version on the master)",
    ),
    ("mpi", "program", argv, ["/usr/local/bin/python", "/app/main.py"], "default program argv"),
    (
        "mpi",
        "args",
        launcher_args,
        [],
        "extra launcher arguments (for that launcher), placed before the program",
    ),
    ("mpi", "max_concurrent_jobs", integer(1, 1024), 1, "jobs running at once"),
    ("mpi", "queue_size", integer(0, 100000), 16, "jobs waiting beyond that; more get 429"),
    (
        "mpi",
        "default_timeout_s",
        number(0),
        0.0,
        "job timeout when the request gives none (0 = none)",
    ),
    ("mpi", "cancel_grace_s", number(0), 5.0, "seconds between TERM and KILL on cancel"),
    (
        "mpi",
        "roll_call_timeout_s",
        number(1),
        10.0,
        "bound of a roll-call's remote script on each node (GET /api/mpi_jobs/<id>/ranks)",
    ),
    (
        "mpi",
        "roll_call_tools",
        stack_tools,
        list(STACK_TOOLS),
        "stack tools a roll-call may use, first found first (py-spy only for python ranks)",
    ),
    (
        "mpi",
        "stall_after_s",
        number(0),
        0.0,
        "a running job whose output has not grown this long is marked stalled and one "
        "roll-call taken (0 = never; the job field stall_after_s overrides)",
    ),
    (
        "mpi",
        "lost_after_s",
        number(0),
        900.0,
        "a running job whose master cannot be reached for this long is recorded lost (0 = never)",
    ),
    (
        "mpi",
        "preflight_timeout_s",
        number(1),
        20.0,
        "deadline of one preflight (POST /api/preflight/, and the one run to explain a "
        "failed daemon launch)",
    ),
    (
        "mpi",
        "remote_dir",
        nonempty,
        ".mlbench-daemon/jobs",
        "job directory on the master, relative to the user's home",
    ),
    (
        "mpi",
        "catalogue",
        catalogue,
        {},
        "MLBench runs' benchmarks: name -> command template (fields {run_id}, {rank}, "
        "{hosts}, {backend}); a run's image_name picks one by MLBench's image string "
        "(mlbench/NAME:TAG) or by NAME",
    ),
    ("state", "dir", nonempty, "/var/lib/mlbench-daemon", "job database and logs"),
    (
        "state",
        "keep_days",
        number(0),
        30.0,
        "finished jobs (record and log) are removed this many days after they end (0 = never)",
    ),
    (
        "state",
        "max_bytes",
        integer(0),
        10 * 2**30,
        "job logs together stay below this; the oldest finished jobs go first (0 = no limit)",
    ),
    (
        "state",
        "audit_file",
        path,
        "",
        "the audit log (JSON lines, mode 0640); empty = audit.log in state.dir",
    ),
    ("log", "level", one_of("debug", "info", "warning", "error"), "info", "log level"),
    (
        "metrics",
        "max_points_per_series",
        integer(1),
        100_000,
        "points kept per metric of one run or one node; more are refused (413)",
    ),
    (
        "metrics",
        "max_points_per_run",
        integer(1),
        1_000_000,
        "points clients may post for one run, its nodes' included; more are refused (413)",
    ),
    (
        "metrics",
        "queue_size",
        integer(1),
        10_000,
        "points accepted but not yet written; more are refused (429 with Retry-After)",
    ),
    (
        "metrics",
        "sample_interval_s",
        number(0),
        5.0,
        "seconds between the daemon's samples of a live run's nodes (cpu, memory, network), "
        "read from the node's probe loop (0 = no samples)",
    ),
    (
        "metrics",
        "forward_port",
        integer(1, 65535),
        18080,
        "the port on each node's 127.0.0.1 forwarded to the daemon, where a run's ranks post "
        "metrics (the same on every node)",
    ),
    (
        "webhooks",
        "hooks",
        hooks,
        [],
        "POST signed job and run events to these (name, url, secret_file, events, tags); [] = none",
    ),
    ("webhooks", "timeout_s", number(0, strict=True), 5.0, "connect and read timeout of a POST"),
    ("webhooks", "concurrency", integer(1, 64), 4, "deliveries in flight at once (all hooks)"),
    ("webhooks", "backoff_s", number(0, strict=True), 1.0, "first retry's longest backoff"),
    (
        "webhooks",
        "backoff_max_s",
        number(0, strict=True),
        300.0,
        "longest backoff between two attempts (exponential, full jitter, up to this)",
    ),
    (
        "webhooks",
        "max_age_s",
        number(0, strict=True),
        86400.0,
        "an event not delivered this long after it happened is given up (logged, counted)",
    ),
)

SECTIONS = tuple(dict.fromkeys(s for s, *_ in SETTINGS))


# One frozen dataclass per section, a field per key of SETTINGS in the same
# order (tests/test_config.py checks that the table and these agree); the
# defaults, converters and docs stay in SETTINGS.


@dataclasses.dataclass(frozen=True)
class Server:
    host: str
    port: int
    token_file: str
    tokens_file: str
    threads: int
    max_body_bytes: int
    max_streams: int
    allowed_hosts: list[str]
    allowed_origins: list[str]
    public_metrics: bool
    cancel_answer_s: float


@dataclasses.dataclass(frozen=True)
class Discovery:
    service: str
    srv: str
    nameservers: list[str]
    namespace: str
    transfer_zone: str
    selector: str
    refresh_s: float
    timeout_s: float
    recheck_s: float
    negative_ttl_min_s: float
    negative_ttl_max_s: float
    negative_ttl_fallback_s: float
    max_txt_bytes: int
    max_txt_keys: int
    max_label_value: int
    label_rules: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Ssh:
    user: str
    port: int
    key_file: str
    known_hosts: str
    host_key_policy: str
    connect_timeout_s: float
    probe_interval_s: float
    verify_interval_s: float
    listener_interval_s: float
    keepalive_s: float
    max_connects: int
    max_channels: int
    use_system_known_hosts: bool


@dataclasses.dataclass(frozen=True)
class Mpi:
    mpirun: str
    flavour: str
    program: list[str]
    args: list[str]
    max_concurrent_jobs: int
    queue_size: int
    default_timeout_s: float
    cancel_grace_s: float
    roll_call_timeout_s: float
    roll_call_tools: list[str]
    stall_after_s: float
    lost_after_s: float
    preflight_timeout_s: float
    remote_dir: str
    catalogue: dict[str, str]


@dataclasses.dataclass(frozen=True)
class State:
    dir: str
    keep_days: float
    max_bytes: int
    audit_file: str


@dataclasses.dataclass(frozen=True)
class Log:
    level: str


@dataclasses.dataclass(frozen=True)
class Metrics:
    max_points_per_series: int
    max_points_per_run: int
    queue_size: int
    sample_interval_s: float
    forward_port: int


@dataclasses.dataclass(frozen=True)
class Webhooks:
    hooks: list[dict[str, Any]]
    timeout_s: float
    concurrency: int
    backoff_s: float
    backoff_max_s: float
    max_age_s: float


@dataclasses.dataclass(frozen=True)
class Config:
    """One frozen object per section: cfg.server.port, cfg.ssh.user, ..."""

    server: Server
    discovery: Discovery
    ssh: Ssh
    mpi: Mpi
    state: State
    log: Log
    metrics: Metrics
    webhooks: Webhooks


SECTION_TYPES: dict[str, type] = {
    "server": Server,
    "discovery": Discovery,
    "ssh": Ssh,
    "mpi": Mpi,
    "state": State,
    "log": Log,
    "metrics": Metrics,
    "webhooks": Webhooks,
}


def _expand(text: str, environ: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in environ:
            raise ValueError(f"${name} is not set")
        return environ[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, text)


def _convert(convert: Converter, value: Any, environ: Mapping[str, str]) -> Any:
    value = convert(value)
    if convert in EXPANDED:
        value = _expand(value, environ)
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _got(convert: Converter, value: Any) -> str:
    """The end of a bad value's message: the value shown, unless it may hold a secret
    (then the message names the key and the problem only)."""
    return "" if convert in UNECHOED else f", got {_show(value)}"


def load(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] = os.environ
) -> Config:
    """Read the TOML file at *path* (None = defaults only) plus env overrides."""
    data = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None

    known = {(s, k) for s, k, *_ in SETTINGS}
    for section, table in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: must be a table [{section}]")
        for key in table:
            if (section, key) not in known:
                raise ConfigError(f"{section}.{key}: unknown key")

    for name in environ:
        if name.startswith(ENV_PREFIX) and name not in CLIENT_ENV and not _env_key(name, known):
            raise ConfigError(f"{name}: unknown setting (no matching section.key)")

    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, key, convert, default, _doc in SETTINGS:
        where = f"{section}.{key}"
        env_name = f"{ENV_PREFIX}{section}_{key}".upper()
        if env_name in environ:
            where = f"{where} (from {env_name})"
            value = environ[env_name]
            if convert in JSON_ENV:
                try:
                    value = json.loads(value)
                except ValueError:
                    raise ConfigError(f"{where}: must be JSON{_got(convert, value)}") from None
        elif key in data.get(section, {}):
            value = data[section][key]
        elif default is REQUIRED:
            raise ConfigError(f"{section}.{key}: required; set it in the config file or {env_name}")
        else:
            value = json.loads(json.dumps(default))  # a fresh copy of lists/dicts
        try:
            values[section][key] = _convert(convert, value, environ)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}{_got(convert, value)}") from None

    cfg = Config(**{s: SECTION_TYPES[s](**values[s]) for s in SECTIONS})
    for i, hook in enumerate(cfg.webhooks.hooks):
        why = _hook_at_daemon(hook, cfg.server)
        if why is not None:
            raise ConfigError(f"webhooks.hooks[{i}].url: {why}")
    return cfg


def _env_key(name: str, known: set[tuple[str, str]]) -> bool:
    rest = name[len(ENV_PREFIX) :].lower()
    return any(rest == f"{s}_{k}" for s, k in known)
