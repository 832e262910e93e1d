"""An MLBench run's request: the form mlbench-core sends -> a checked ``RunSpec``; and
how its ranks are launched (``plan``).  Pure: no I/O.

mlbench-core 3's ``ApiClient.create_run`` posts a form whose every value is a string
(``num_workers`` "2", ``run_all_nodes`` "true", ``backend`` "MPI" or missing).  The
fields and their limits are declared once, in ``shapes.RunRequest``; this module reads
them from there (``msgspec``), then applies what MLBench's dashboard did with them:

- ``image_name`` ``custom_image`` runs ``custom_image_command``; any other picks an entry
  of ``mpi.catalogue``, by MLBench's image string (``mlbench/NAME:TAG``) or by ``NAME``;
- ``backend`` is lower-cased; ``custom_backend`` names a backend of its own;
- ``gpu_enabled`` and ``light_target`` append ``--gpu`` and ``--light``.

Ranks (``plan``), as MLBench started them: backend ``mpi`` (or none) is one mpirun over
the run's nodes with ``{rank}`` 0 (each rank asks MPI for its own); another backend with
``run_all_nodes`` is one process per node with its own ``{rank}``, launched as one MPMD
mpirun (one app context per node) so cancel and re-attach work as for any job; without
``run_all_nodes``, the first node only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from mlbench_daemon import shapes, template
from mlbench_daemon.errors import BadRequest, echo

CUSTOM_IMAGE = "custom_image"
CUSTOM_BACKEND = "custom_backend"
MPI = "mpi"
_FLAGS = {"true": True, "1": True, "false": False, "0": False, "": False}
_IMAGE = re.compile(r"(?:mlbench/)?(?P<name>[^:/]+)(?::[^:/]*)?")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A checked run request."""

    name: str
    num_workers: int
    image: str  # the image_name as given (a catalogue key, or custom_image)
    template: str  # the command template
    backend: str  # lower-case; "mpi" when missing
    run_all_nodes: bool
    gpu: bool
    light: bool

    def to_json(self) -> dict[str, Any]:
        """What the runs table keeps of it (a restart starts a waiting run from this)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSpec:
        return cls(**data)


def flag(value: str, field: str) -> bool:
    """A form's boolean: ``true``/``false`` in any case (``True``/``False`` as Python
    prints them), ``1``/``0``; empty is false."""
    try:
        return _FLAGS[value.strip().lower()]
    except KeyError:
        raise BadRequest(
            f"{field}: must be true or false, got {echo(value)}", field=field
        ) from None


def form_values(body: Mapping[str, Any]) -> dict[str, str]:
    """A form, or a JSON object with the form's keys -> {field: string}: JSON numbers and
    booleans are taken as the form would send them; anything else is a 400."""
    out = {}
    for key, value in body.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = str(value)
        if not isinstance(value, str):
            raise BadRequest(f"{key}: must be a string, as a form sends it", field=str(key))
        out[str(key)] = value
    return out


def _declared(values: Mapping[str, str]) -> shapes.RunRequest:
    """The form checked against ``shapes.RunRequest`` (fields, patterns, lengths); a
    BadRequest names the first bad field."""
    try:
        return msgspec.convert(dict(values), shapes.RunRequest)
    except msgspec.ValidationError as e:
        text = str(e)
        m = re.search(r"at `\$\.([A-Za-z0-9_]+)`", text) or re.search(r"`([A-Za-z0-9_]+)`", text)
        field = m.group(1) if m else "body"
        raise BadRequest(f"{field}: {cut_path(text)}", field=field) from None


def cut_path(text: str) -> str:
    """msgspec's message without its ``- at `$.x``` suffix (the field is named first)."""
    return re.sub(r" - at `\$[^`]*`$", "", text)


def catalogue_entry(catalogue: Mapping[str, str], image: str) -> str | None:
    """The template `image` names: an exact key, else the entry whose short name (MLBench's
    image string without ``mlbench/`` and ``:TAG``) is the same as `image`'s."""
    if image in catalogue:
        return catalogue[image]
    want = _IMAGE.fullmatch(image)
    if want is None:
        return None
    for key, text in catalogue.items():
        m = _IMAGE.fullmatch(key)
        if m is not None and m["name"] == want["name"]:
            return text
    return None


def parse(values: Mapping[str, str], catalogue: Mapping[str, str]) -> RunSpec:
    """The form -> a RunSpec; BadRequest naming the field (an unknown template field, a
    catalogue entry that does not exist, a count out of range, ...)."""
    req = _declared(values)
    workers = int(req.num_workers)  # a whole number >= 1 (its declared pattern)
    if req.image_name == CUSTOM_IMAGE:
        if not isinstance(req.custom_image_command, str) or not req.custom_image_command:
            raise BadRequest(
                "custom_image_command: image_name custom_image needs the command to run",
                field="custom_image_command",
            )
        text, field = req.custom_image_command, "custom_image_command"
    else:
        found = catalogue_entry(catalogue, req.image_name)
        if found is None:
            names = ", ".join(sorted(catalogue)) or "none: set mpi.catalogue"
            raise BadRequest(
                f"image_name: {echo(req.image_name)} is not in the daemon's catalogue "
                f"(entries: {names}); or use custom_image",
                field="image_name",
            )
        text, field = found, "image_name"
    try:
        template.words(text)
    except template.TemplateError as e:
        raise BadRequest(f"{field}: the command {e}", field=field) from None
    backend = req.backend.lower() if isinstance(req.backend, str) and req.backend else MPI
    if backend == CUSTOM_BACKEND:
        if not isinstance(req.custom_backend, str) or not req.custom_backend:
            raise BadRequest(
                "custom_backend: backend custom_backend needs its name", field="custom_backend"
            )
        backend = req.custom_backend.lower()

    def opt(v: str | msgspec.UnsetType, field: str) -> bool:
        return flag(v, field) if isinstance(v, str) else False

    return RunSpec(
        name=req.name,
        num_workers=workers,
        image=req.image_name,
        template=text,
        backend=backend,
        run_all_nodes=opt(req.run_all_nodes, "run_all_nodes"),
        gpu=opt(req.gpu_enabled, "gpu_enabled"),
        light=opt(req.light_target, "light_target"),
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a run's job is launched: one argv on `hosts` (``apps`` empty), or one process
    per (host, argv) of ``apps`` (an MPMD launch)."""

    program: tuple[str, ...]
    hosts: tuple[str, ...]  # the addresses the argv runs on (its first for an MPMD launch)
    apps: tuple[tuple[str, tuple[str, ...]], ...] = ()


def argv(spec: RunSpec, run_id: int, rank: int, hosts: Sequence[str]) -> tuple[str, ...]:
    """One rank's argv: the template filled in, then ``--gpu``/``--light``."""
    values = {"run_id": str(run_id), "rank": str(rank), "hosts": ",".join(hosts)}
    words = template.render(spec.template, {**values, "backend": spec.backend})
    return (*words, *(("--gpu",) if spec.gpu else ()), *(("--light",) if spec.light else ()))


def plan(spec: RunSpec, run_id: int, hosts: Sequence[str]) -> Plan:
    """How the run starts on `hosts` (its nodes' addresses, in order)."""
    if spec.backend == MPI:
        return Plan(argv(spec, run_id, 0, hosts), tuple(hosts))
    if spec.run_all_nodes:
        apps = tuple((h, argv(spec, run_id, i, hosts)) for i, h in enumerate(hosts))
        return Plan(apps[0][1], tuple(hosts), apps)
    return Plan(argv(spec, run_id, 0, hosts), tuple(hosts[:1]))
