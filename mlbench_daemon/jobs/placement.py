"""Where a job runs: choosing its nodes and master, and the mpirun argv for them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from mlbench_daemon.discovery import Node, Selector, natural_key
from mlbench_daemon.errors import BadRequest, Conflict, Unavailable
from mlbench_daemon.jobs import flavour
from mlbench_daemon.jobs.request import Request
from mlbench_daemon.nodes import NodeStatus
from mlbench_daemon.shapes import NodeRow
from mlbench_daemon.vocabulary import Phase


class Registry(Protocol):
    """What the job code needs of ``nodes.Registry``."""

    def nodes(self, selector: Selector | str | None = None) -> list[NodeStatus]: ...
    def wait_first_pass(self, timeout: float) -> bool: ...


def choose(registry: Registry, req: Request) -> tuple[list[NodeStatus], str | None]:
    """The nodes a new job asks for -> (their statuses, the requested master or None).

    Conflict for unknown or not Running named nodes and an impossible master;
    Unavailable when nothing Running matches."""
    statuses = registry.nodes(req.selector)
    by_name = {s.node.name: s for s in statuses}
    if req.nodes:
        chosen = _named(req.nodes, by_name)
    else:
        chosen = [s for s in statuses if s.phase == Phase.RUNNING]
    master = req.master
    if master is not None and master not in [s.node.name for s in chosen]:
        if req.nodes:
            raise BadRequest("master must be one of nodes", field="master")
        s = by_name.get(master)
        raise Conflict(
            f"master {master}: "
            + (f"not Running ({s.phase}: {s.reason})" if s else "unknown node"),
            field="master",
        )
    if not chosen:
        raise Unavailable(
            "no Running node matches the selector"
            + (f" ({len(statuses)} node(s) known, none Running)" if statuses else "")
        )
    return chosen, master


def _named(names: Sequence[str], by_name: dict[str, NodeStatus]) -> list[NodeStatus]:
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise Conflict(
            f"unknown node(s) (or not matching the selector): {', '.join(unknown)}",
            field="nodes",
        )
    down = [by_name[n] for n in names if by_name[n].phase != Phase.RUNNING]
    if down:
        raise Conflict(
            "node(s) not Running: "
            + ", ".join(f"{s.node.name} ({s.phase}: {s.reason})" for s in down),
            field="nodes",
        )
    return sorted((by_name[n] for n in names), key=lambda s: natural_key(s.node.name))


def still_running(registry: Registry, names: Sequence[str]) -> tuple[list[Node], list[str]]:
    """A job queued before a restart: its nodes that are Running now -> (nodes, why not others)."""
    now = {s.node.name: s for s in registry.nodes()}
    running = [n for n in names if n in now and now[n].phase == Phase.RUNNING]
    return [now[n].node for n in running], [
        f"{n}: not Running after the restart" for n in names if n not in running
    ]


def master_order(nodes: Iterable[Node], master: str | None) -> list[Node]:
    """The order master candidates are tried in: the requested master first."""
    return sorted(nodes, key=lambda n: n.name != master)


def host_spec(node: Node) -> str:
    """``ip`` or ``ip:slots`` (from a positive ``slots`` label) for ``--host``."""
    slots = node.labels.get("slots", "")
    return f"{node.ip}:{int(slots)}" if slots.isdigit() and int(slots) > 0 else node.ip


def node_row(node: Node) -> NodeRow:
    return NodeRow(node.ip, node.namespace, node.name, node.labels_str)


def mpirun_argv(
    mpirun: str,
    args: Sequence[str],
    nodes: Sequence[Node],
    np: int | None,
    env_names: Sequence[str],
    program: Sequence[str],
    flavour_name: str = "openmpi4",
    rank_output: bool = False,
) -> list[str]:
    """The launcher's argv for that flavour (flavour.py): hosts with slots, process
    count, env passed by name only (OpenMPI's ``-x NAME``) or not at all (Hydra sends
    the whole environment), the program; with `rank_output`, the rank tag option."""
    hosts = [host_spec(n) for n in nodes]
    f = flavour.get(flavour_name)
    return f.argv(mpirun, args, hosts, np, env_names, program, rank_output)
