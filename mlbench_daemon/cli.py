"""Command line: ``mlbench-daemon serve`` runs the daemon; the other commands are
HTTP clients of a running daemon (urllib only).

    mlbench-daemon serve --config FILE [--log-level L]
    mlbench-daemon nodes | jobs | logs [-f] [--rank N] ID | cancel ID | ranks ID
    mlbench-daemon run [--np N] [--node NAME ...] [--master NAME] [--env K=V ...]
                       [--timeout S] [--rank-output] [-- PROGRAM ARGS...]
    mlbench-daemon run --catalogue NAME -n N [--name NAME] [--backend B] [--wait]
    mlbench-daemon runs [delete ID]
    mlbench-daemon check [the same options as run]
    mlbench-daemon token add NAME --role R | list | revoke NAME   (--file F or --config F)

Global options (before or after the command): ``--url`` (env MLBENCH_DAEMON_URL),
``--token-file`` (env MLBENCH_DAEMON_TOKEN_FILE), ``--json``.

Exit codes: 0 ok; 1 the daemon answered with an error (its message is printed);
2 the daemon is unreachable or the command line/config is wrong; 3 ``cancel``: the
job was not final 60 s after the cancel (the daemon goes on with it); ``run`` exits with
the job's exit code (1 if it failed without one, 130 after Ctrl-C cancelled it) and
prints a root-cause block to stderr when the job did not succeed; ``run --catalogue``
(an MLBench run) exits 0 once the run is made, with ``--wait`` 0 when it finished, the
job's exit code (else 1) when it failed, 130 after Ctrl-C (the run goes on); ``check``
exits 0 when no check failed, 1 when one did, 2 on a usage or API error.
"""

import argparse
import io
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO, TextIO

import mlbench_daemon
from mlbench_daemon import logs, tokens
from mlbench_daemon.client import (
    TIMEOUT_S,
    Client,
    ClientError,
    ExitStatus,
    job_path,
    logs_path,
    run_path,
)
from mlbench_daemon.config import read_token
from mlbench_daemon.vocabulary import FINAL_STATES, JobState, Phase, Role

PROG = "mlbench-daemon"
DEFAULT_URL = "http://127.0.0.1:8080"
FOLLOW_READ_S = 60.0  # a silent job: reconnect the follow stream after this
CANCEL_WAIT_S = 60.0  # `cancel` polls a job whose cancel goes on (202) this long at most
CANCEL_POLL_S = 0.5
PREFLIGHT_TIMEOUT_S = 300.0  # the daemon bounds each preflight by mpi.preflight_timeout_s
COLOURS = {Phase.RUNNING: "32", Phase.PENDING: "33", Phase.UNKNOWN: "31", Phase.FAILED: "31"}


# --- HTTP ------------------------------------------------------------------------------


def connect(url: str, token_file: str | None = None) -> Client:
    """The client the commands use: JSON, our name, and the token if a file is given."""
    headers = {"Accept": "application/json", "User-Agent": f"{PROG}/{mlbench_daemon.__version__}"}
    token = None
    if token_file:
        try:
            token = read_token(token_file)
        except ValueError as e:
            raise ClientError(f"token file: {e}", ExitStatus.UNUSABLE) from None
    return Client(url, token, headers)


def copy_logs(
    client: Client,
    job_id: str,
    offset: int,
    out: BinaryIO,
    follow: bool,
    rank: int | None = None,
) -> int:
    """Write the job's output (one rank's with *rank*) from *offset* to *out*; returns
    the next offset.

    Without follow: read bounded chunks until there is no more. With follow: stream
    until the daemon ends the stream (the job ended); a stream silent for
    FOLLOW_READ_S is re-opened from the current offset, so no read blocks unbounded.
    """
    while True:
        got, timed_out = 0, False
        try:
            with client.open(
                "GET",
                logs_path(job_id, offset, follow, rank),
                timeout=FOLLOW_READ_S if follow else TIMEOUT_S,
            ) as resp:
                next_offset = resp.headers.get("X-Next-Offset")
                while chunk := resp.read1(65536):
                    out.write(chunk)
                    out.flush()
                    got += len(chunk)
        except TimeoutError:
            if not follow:
                raise ClientError(
                    f"daemon at {client.url} stopped answering", ExitStatus.UNUSABLE
                ) from None
            timed_out = True
        if follow:
            offset += got
            if not timed_out:
                return offset
        elif not got:
            return offset
        else:
            offset = int(next_offset) if next_offset else offset + got


# --- commands --------------------------------------------------------------------------


def cmd_nodes(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    nodes = client.json("GET", "/api/nodes/")
    if args.json:
        return _print_json(nodes, out)
    colour = out.isatty() and not os.environ.get("NO_COLOR")
    rows = [
        (
            n.get("name", ""),
            n.get("phase", ""),
            n.get("ip", ""),
            n.get("reason") or "",
            _labels_text(n),
        )
        for n in nodes
    ]
    _table(
        out,
        ("NAME", "PHASE", "IP", "REASON", "LABELS"),
        rows,
        paint={1: (lambda v: f"\033[{COLOURS[v]}m{v}\033[0m" if colour and v in COLOURS else v)},
    )


def _labels_text(node: dict[str, Any]) -> str:
    """k=v,... from the API's ``label_map``; a server without it: its ``labels`` text as is."""
    labels = node.get("label_map")
    if isinstance(labels, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return _text(node.get("labels"))


def cmd_jobs(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    query = [("state", s) for s in args.state or ()] + [("tag", t) for t in args.tag or ()]
    query += [(k, v) for k, v in (("submitted_by", args.by), ("name", args.name)) if v]
    path = "/api/mpi_jobs/" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    jobs = client.json("GET", path)
    if args.json:
        return _print_json(jobs, out)
    if isinstance(jobs, dict):
        jobs = jobs.get("jobs", [])
    rows = [
        (
            str(j.get("id", "")),
            j.get("state", ""),
            _text(j.get("exit_code")),
            j.get("master_name") or j.get("master") or "",
            _text(j.get("submitted_by")),
            _text(j.get("name")),
            _text(j.get("command")),
        )
        for j in jobs
    ]
    _table(out, ("ID", "STATE", "EXIT", "MASTER", "BY", "NAME", "COMMAND"), rows)


def cmd_logs(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    copy_logs(client, args.id, 0, out.buffer, follow=args.follow, rank=args.rank)


def cmd_cancel(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """DELETE the job; a 202 (the kill and sweep go on in the daemon) is followed by
    polling the job until it is final, at most CANCEL_WAIT_S."""
    with client.open("DELETE", job_path(args.id)) as resp:
        status, raw = resp.status, resp.read()
    try:
        job = json.loads(raw)
    except ValueError:
        raise ClientError(
            f"daemon at {client.url} sent something that is not JSON for DELETE", ExitStatus.FAILED
        ) from None
    deadline = time.monotonic() + CANCEL_WAIT_S
    while status == 202 and isinstance(job, dict) and job.get("state") not in FINAL_STATES:
        if time.monotonic() >= deadline:
            sys.stderr.write(
                f"{PROG}: job {args.id} is still {job.get('state')} {CANCEL_WAIT_S:.0f} s "
                "after the cancel; the daemon goes on with it (see: "
                f"{PROG} jobs)\n"
            )
            return ExitStatus.STILL_CANCELLING
        time.sleep(CANCEL_POLL_S)
        job = client.json("GET", job_path(args.id))
    if args.json:
        _print_json(job, out)
        return ExitStatus.OK
    state = job.get("state", "cancel requested") if isinstance(job, dict) else "cancel requested"
    out.write(f"job {args.id}: {state}\n")
    return ExitStatus.OK


RANKS_TIMEOUT_S = 120.0  # the daemon bounds a roll-call by mpi.roll_call_timeout_s


def cmd_ranks(client: Client, args: argparse.Namespace, out: TextIO) -> None:
    """The roll-call of a running job: suspects first, then by group, then the rest."""
    call = client.json("GET", job_path(args.id) + "/ranks", timeout=RANKS_TIMEOUT_S)
    if args.json:
        return _print_json(call, out)
    out.write(rank_table(call))


def rank_table(call: dict[str, Any]) -> str:
    """The roll-call as text: a table of ranks (suspects first, then each group, largest
    first), the groups, and any node that could not be read."""
    text = io.StringIO()
    suspects = [s["rank"] for s in call["suspects"]]
    order = suspects + [r for g in call["groups"] for r in g["ranks"] if r not in suspects]
    order += [r["rank"] for r in call["ranks"] if r["rank"] not in order]
    ranks = {r["rank"]: r for r in call["ranks"]}
    group_of = {r: i + 1 for i, g in enumerate(call["groups"]) for r in g["ranks"]}
    rows = []
    for n in order:
        r = ranks[n]
        where = r["stack"][0] if r["stack"] else ""
        if r["stack_error"]:
            where = f"{where} [{r['stack_error']}]".strip()
        rows.append(
            (
                ("*" if n in suspects else "") + str(n),
                _text(r["node"]),
                _text(r["pid"]),
                _text(r["state"]),
                "" if r["cpu_percent"] is None else f"{r['cpu_percent']:.0f}",
                "" if r["rss_bytes"] is None else f"{r['rss_bytes'] >> 20}",
                _text(group_of.get(n)),
                r["stack_source"],
                where,
            )
        )
    header = ("RANK", "NODE", "PID", "STATE", "CPU%", "RSS_MB", "GROUP", "SOURCE", "TOP FRAME")
    _table(text, header, rows)
    if suspects:
        text.write(f"suspects (*): {', '.join(map(str, suspects))}\n")
    else:
        text.write("suspects: none (all ranks with a stack agree, or no majority)\n")
    for f in call["nodes_failed"]:
        text.write(f"not read: {f['node']}: {f['error']}\n")
    return text.getvalue()


def cmd_run(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.catalogue is not None or args.workers is not None:
        return cmd_mlbench_run(client, args, out)
    if args.wait or args.backend:
        raise ClientError("run: --wait and --backend go with --catalogue", ExitStatus.UNUSABLE)
    body = dict(
        job_body(args),
        wait=False,
        **_given(env=dict(args.env or ()), timeout_s=args.timeout, name=args.name, tags=args.tag),
        **({"rank_output": True} if args.rank_output else {}),
    )
    job = client.json("POST", "/api/mpi_jobs/", body)
    job_id = job["id"]
    offset = 0
    try:
        while True:
            offset = copy_logs(client, job_id, offset, out.buffer, follow=True)
            job = client.json("GET", job_path(job_id))
            if job.get("state") in FINAL_STATES:
                break
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: cancelling job {job_id}\n")
        try:
            client.json("DELETE", job_path(job_id))
        except ClientError as e:
            sys.stderr.write(f"{PROG}: {e}\n")
        return ExitStatus.INTERRUPTED
    if args.json:
        _print_json(job, out)
    if job.get("failure"):
        sys.stderr.write(root_cause(job))
    if isinstance(code := job.get("exit_code"), int):
        return code
    if job.get("state") == JobState.SUCCEEDED:
        return ExitStatus.OK
    sys.stderr.write(
        f"{PROG}: job {job_id} {job.get('state')}: {job.get('error') or 'no exit code'}\n"
    )
    return ExitStatus.INTERRUPTED if job.get("state") == JobState.CANCELLED else ExitStatus.FAILED


# --- MLBench runs (PRODUCT.md "Runs and metrics") ----------------------------------------

RUN_FINAL = ("finished", "failed")  # MLBench's words for a run that ended
RUN_POLL_S = 2.0
# What `run --catalogue` leaves to the job API: given with it, they are a usage error.
JOB_ONLY = (("np", "--np"), ("node", "--node"), ("master", "--master"), ("env", "--env"),
            ("timeout", "--timeout"), ("tag", "--tag"), ("rank_output", "--rank-output"),
            ("program", "PROGRAM"))  # fmt: skip


def run_form(args: argparse.Namespace) -> dict[str, str]:
    """The form mlbench-core's ``ApiClient.create_run`` posts (its defaults for what this
    command does not ask), with the catalogue entry as ``image_name``."""
    base = args.catalogue.rpartition("/")[2].partition(":")[0]  # mlbench/NAME:latest -> NAME
    name = args.name or f"{base}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    form = {
        "name": name,
        "num_workers": str(args.workers),
        "num_cpus": "2.0",
        "max_bandwidth": "1000",
        "gpu_enabled": "false",
        "light_target": "false",
        "run_all_nodes": "false",
        "image_name": args.catalogue,
    }
    if args.backend:
        form["backend"] = args.backend
    return form


def cmd_mlbench_run(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """POST /api/runs/ as a form; with --wait, follow its job's output and then the run
    until it is final."""
    if args.catalogue is None or args.workers is None:
        raise ClientError("run: --catalogue NAME and -n N go together", ExitStatus.UNUSABLE)
    extra = [flag for key, flag in JOB_ONLY if getattr(args, key)]
    if extra:
        raise ClientError(
            f"run --catalogue: {', '.join(extra)} belong to plain jobs (the catalogue entry "
            "says what runs, the daemon where)",
            ExitStatus.UNUSABLE,
        )
    run = client.json("POST", "/api/runs/", form=run_form(args))
    sys.stderr.write(f"{PROG}: run {run.get('id')} ({run.get('name')}): {run.get('state')}\n")
    if args.wait:
        try:
            run = wait_run(client, run, out)
        except KeyboardInterrupt:
            sys.stderr.write(
                f"{PROG}: no longer waiting; run {run.get('id')} goes on "
                f"(stop it with: {PROG} runs delete {run.get('id')})\n"
            )
            return ExitStatus.INTERRUPTED
    if args.json:
        _print_json(run, out)
    if not args.wait or run.get("state") == "finished":
        return ExitStatus.OK
    job = client.json("GET", job_path(run["job_id"])) if run.get("job_id") else {}
    if job.get("failure"):
        sys.stderr.write(root_cause(job))
    code = job.get("exit_code")
    sys.stderr.write(f"{PROG}: run {run.get('id')} {run.get('state')}\n")
    return code if isinstance(code, int) and code > 0 else ExitStatus.FAILED


def wait_run(client: Client, run: dict[str, Any], out: TextIO) -> dict[str, Any]:
    """Copy the run's job output once it has a job (also when the run already ended),
    and poll the run until it is final; says on stderr when the state changes (a queued
    run waits for its nodes)."""
    followed = False
    state = run.get("state")
    while True:
        if run.get("job_id") and not followed:
            copy_logs(client, str(run["job_id"]), 0, out.buffer, follow=True)
            followed = True  # the job ended; the run follows within a round or two
        elif run.get("state") in RUN_FINAL:
            return run
        else:
            time.sleep(RUN_POLL_S)
        run = client.json("GET", run_path(run["id"]))
        if run.get("state") != state:
            state = run.get("state")
            sys.stderr.write(f"{PROG}: run {run.get('id')}: {state}\n")


def cmd_runs(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """The runs as a table (or JSON); ``runs delete ID`` deletes one (a live one's job is
    cancelled first: the daemon answers once that is done)."""
    if args.action == "delete":
        if args.id is None:
            raise ClientError("runs delete: give the run's ID", ExitStatus.UNUSABLE)
        with client.open("DELETE", run_path(args.id), timeout=CANCEL_WAIT_S + TIMEOUT_S):
            pass
        out.write(f"run {args.id}: deleted\n")
        return ExitStatus.OK
    if args.id is not None:
        raise ClientError(f"runs: unexpected {args.id!r} (runs delete ID?)", ExitStatus.UNUSABLE)
    runs = client.json("GET", "/api/runs/")
    if args.json:
        _print_json(runs, out)
        return ExitStatus.OK
    rows = [
        (
            _text(r.get("id")),
            _text(r.get("name")),
            _text(r.get("state")),
            _text(r.get("num_workers")),
            _text(r.get("created_at")),
            _text(r.get("finished_at")),
            _text(r.get("job_id")),
        )
        for r in sorted(runs, key=lambda r: -int(r.get("id") or 0))
    ]
    _table(out, ("ID", "NAME", "STATE", "WORKERS", "CREATED", "FINISHED", "JOB"), rows)
    return ExitStatus.OK


def root_cause(job: dict[str, Any]) -> str:
    """The short block `run` prints to stderr for a job that did not succeed."""
    f = job["failure"]
    where = f.get("node") or f.get("host") or "-"
    if f.get("node") and f.get("host") and f["host"] != f["node"]:
        where = f"{f['node']} (launcher: {f['host']})"
    rows = [
        ("time", job.get("finished") or "-"),
        ("kind", f.get("kind")),
        ("node", where),
        ("rank", _text(f.get("rank")) or "-"),
        ("exit code", _text(f.get("exit_code")) or "-"),
        ("signal", _text(f.get("signal")) or "-"),
        ("message", f.get("message") or "-"),
        ("hint", f.get("hint") or "-"),
    ]
    text = f"{PROG}: job {job.get('id')} {job.get('state')}\nRoot Cause (first observed failure):\n"
    text += "".join(f"  {k:<10}: {v}\n" for k, v in rows)
    bad = [c for c in f.get("checks") or () if c.get("status") == "fail"]
    if bad:
        text += "  failing checks (preflight run by the daemon):\n"
        text += "".join(
            f"    {c.get('node') or '-'} {c.get('check')}: {c.get('message')}\n" for c in bad
        )
    return text


def _given(**values: Any) -> dict[str, Any]:
    """The options the user gave (empty ones are left to the daemon's defaults)."""
    return {k: v for k, v in values.items() if v}


def job_body(args: argparse.Namespace) -> dict[str, Any]:
    """What `run` and `check` both send: the program and where to run it."""
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    return _given(program=program, np=args.np, nodes=args.node, master=args.master)


# --- tokens (no daemon: the tokens file itself) ---------------------------------------


def tokens_file(args: argparse.Namespace) -> str:
    """--file, else the --config's server.tokens_file."""
    if args.file:
        return str(args.file)
    from mlbench_daemon import config

    try:
        path = config.load(args.config).server.tokens_file if args.config else ""
    except config.ConfigError as e:
        raise ClientError(str(e), ExitStatus.UNUSABLE) from None
    if not path:
        raise ClientError(
            "token: give --file FILE, or --config FILE whose server.tokens_file is set",
            ExitStatus.UNUSABLE,
        )
    return path


def cmd_token(args: argparse.Namespace, out: TextIO) -> int:
    """add (prints the token once), list, revoke: the file is changed in place; a running
    daemon sees the change within a second."""
    path = tokens_file(args)
    try:
        if args.action == "add":
            token = tokens.add(path, args.name, Role(args.role))
            out.write(f"{token}\n")
            sys.stderr.write(
                f"{PROG}: token {args.name!r} ({args.role}) added to {path}; it is shown "
                "only this once\n"
            )
        elif args.action == "revoke":
            for e in tokens.revoke(path, args.name):
                out.write(f"revoked {e.name} ({e.id})\n")
        elif args.json:
            keys = ("name", "role", "id", "created", "revoked")
            _print_json([{k: getattr(e, k) for k in keys} for e in tokens.entries(path)], out)
        else:
            rows = [
                (e.name, e.role, e.id, e.created, e.revoked or "") for e in tokens.entries(path)
            ]
            _table(out, ("NAME", "ROLE", "ID", "CREATED", "REVOKED"), rows)
    except (ValueError, OSError) as e:
        raise ClientError(f"token: {e}", ExitStatus.FAILED) from None
    return ExitStatus.OK


def cmd_check(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Preflight: a table by node; exit 0 nothing failed, 1 a check failed, 2 API error."""
    try:
        result = client.json("POST", "/api/preflight/", job_body(args), PREFLIGHT_TIMEOUT_S)
    except ClientError as e:
        raise ClientError(str(e), ExitStatus.UNUSABLE) from None
    if args.json:
        _print_json(result, out)
    else:
        out.write(f"master {result.get('master_name')}, {result.get('flavour')}\n")
        out.write(f"command {result.get('command')}\n\n")
        rows = [
            (c.get("node") or "(all)", c.get("check", ""), c.get("status", ""),
             c.get("message") or "")
            for c in result.get("checks", [])
        ]  # fmt: skip
        _table(out, ("NODE", "CHECK", "STATUS", "MESSAGE"), rows)
        hints = [c for c in result.get("checks", []) if c.get("status") == "fail" and c.get("hint")]
        if hints:
            out.write("\n")
        for c in hints:
            out.write(f"{c.get('node') or '(all)'} {c['check']}: {c['hint']}\n")
    return ExitStatus.OK if result.get("ok") else ExitStatus.FAILED


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


def _table(
    out: TextIO,
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    paint: dict[int, Callable[[Any], str]] | None = None,
) -> None:
    paint = paint or {}
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [paint[i](c) if row is not header and i in paint else c for i, c in enumerate(row)]
        pads = [w - len(str(c)) for w, c in zip(widths, row, strict=True)]
        line = "  ".join(f"{c}{' ' * p}" for c, p in zip(cells, pads, strict=True))
        out.write(line.rstrip() + "\n")


# --- serve -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from mlbench_daemon import config

    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        raise ClientError(str(e), ExitStatus.UNUSABLE) from None
    logs.setup(args.log_level or cfg.log.level)
    from mlbench_daemon import server  # the heavy imports only for serve

    try:
        return server.Daemon(cfg).run()
    except (config.ConfigError, server.StartupError) as e:
        raise ClientError(str(e), ExitStatus.UNUSABLE) from None


# --- argument parsing ------------------------------------------------------------------


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
        return value

    return convert


def _rank(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a rank (0, 1, ...), got {text!r}")
    return int(text)


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    def add_globals(p: argparse.ArgumentParser, default: Callable[[Any], Any]) -> None:
        # on the main parser with real defaults; on each command with SUPPRESS so an
        # option given before the command is not overwritten by the command's default
        p.add_argument(
            "--url",
            default=default(environ.get("MLBENCH_DAEMON_URL", DEFAULT_URL)),
            help=f"daemon base URL (env MLBENCH_DAEMON_URL, default {DEFAULT_URL})",
        )
        p.add_argument(
            "--token-file",
            default=default(environ.get("MLBENCH_DAEMON_TOKEN_FILE")),
            help="file with the API bearer token (env MLBENCH_DAEMON_TOKEN_FILE)",
        )
        p.add_argument("--json", action="store_true", default=default(False), help="print JSON")

    parser = argparse.ArgumentParser(
        prog=PROG, description="SSH-native launcher daemon for MPI jobs."
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {mlbench_daemon.__version__}"
    )
    add_globals(parser, lambda v: v)
    common = argparse.ArgumentParser(add_help=False)
    add_globals(common, lambda v: argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="override log.level"
    )

    sub.add_parser("nodes", parents=[common], help="list nodes and their phase").set_defaults(
        func=cmd_nodes
    )
    p = sub.add_parser("jobs", parents=[common], help="list jobs")
    p.add_argument("--state", action="append", choices=tuple(JobState), help="(repeatable)")
    p.add_argument("--tag", action="append", metavar="K:V", help="with this tag (repeatable)")
    p.add_argument("--by", metavar="TOKEN", help="submitted by this token name")
    p.add_argument("--name", help="with this job name")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("token", help="named tokens with roles: add, list, revoke")
    p.add_argument("action", choices=("add", "list", "revoke"))
    p.add_argument("name", nargs="?", help="the token's name (add, revoke; revoke: or its id)")
    p.add_argument("--role", choices=tuple(Role), default=Role.VIEWER, help="(add)")
    p.add_argument("--file", metavar="FILE", help="the tokens file")
    p.add_argument("--config", metavar="FILE", help="or the config naming server.tokens_file")
    p.add_argument("--json", action="store_true", help="print JSON (list)")

    p = sub.add_parser("logs", parents=[common], help="print a job's output")
    p.add_argument("-f", "--follow", action="store_true", help="keep following until the job ends")
    p.add_argument(
        "--rank",
        type=_rank,
        metavar="N",
        help="only rank N's output (a job run with rank_output)",
    )
    p.add_argument("id")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser(
        "ranks", parents=[common], help="roll-call: every rank of a running job with its stack"
    )
    p.add_argument("id")
    p.set_defaults(func=cmd_ranks)

    p = sub.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "runs", parents=[common], help="MLBench runs: list them, or delete one (runs delete ID)"
    )
    p.add_argument("action", nargs="?", choices=("list", "delete"), default="list")
    p.add_argument("id", nargs="?", help="the run to delete")
    p.set_defaults(func=cmd_runs)

    for name, func, what in (
        ("run", cmd_run, "run a job, follow its output, exit with its code"),
        ("check", cmd_check, "preflight: check that a job with these options can launch"),
    ):
        p = sub.add_parser(
            name, parents=[common], help=what, usage=f"{PROG} {name} [options] [-- PROGRAM ARGS...]"
        )
        _job_options(p)
        if name == "run":
            p.add_argument("--name", help="a name for the job")
            p.add_argument("--tag", action="append", metavar="K:V", help="a tag (repeatable)")
            p.add_argument(
                "--rank-output",
                action="store_true",
                help="keep each rank's output apart too (read it with `logs --rank N`)",
            )
            p.add_argument(
                "--catalogue",
                metavar="NAME",
                help="an MLBench run of this benchmark catalogue entry (with -n)",
            )
            p.add_argument(
                "-n", "--workers", type=_positive(int), metavar="N", help="the run's nodes"
            )
            p.add_argument(
                "--backend", help="the run's backend, as mlbench-core names it (MPI, GLOO, NCCL)"
            )
            p.add_argument(
                "--wait", action="store_true", help="follow the run's output until it ends"
            )
        p.set_defaults(func=func)
    return parser


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--np", type=_positive(int), help="number of processes")
    p.add_argument("--node", action="append", metavar="NAME", help="run on this node (repeatable)")
    p.add_argument("--master", metavar="NAME", help="the node that runs mpirun")
    p.add_argument(
        "--env", action="append", type=_env_pair, metavar="K=V", help="environment for all ranks"
    )
    p.add_argument("--timeout", type=_positive(float), metavar="S", help="job timeout in seconds")
    p.add_argument(
        "program", nargs=argparse.REMAINDER, help="program and arguments (default: mpi.program)"
    )


def main(
    argv: list[str] | None = None,
    environ: Mapping[str, str] = os.environ,
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    args = build_parser(environ).parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "token":
            if args.action != "list" and not args.name:
                raise ClientError(f"token {args.action}: give the NAME", ExitStatus.UNUSABLE)
            return cmd_token(args, out)
        code: int | None = args.func(connect(args.url, args.token_file), args, out)
        return ExitStatus.OK if code is None else code
    except ClientError as e:
        # under systemd the journal records `serve`'s last words as an error (sd-daemon(3))
        prio = "<3>" if args.command == "serve" and logs.under_systemd(environ) else ""
        sys.stderr.write(f"{prio}{PROG}: {e}\n")
        return e.status
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        return ExitStatus.FAILED


if __name__ == "__main__":
    sys.exit(main())
