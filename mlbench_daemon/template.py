"""Command templates of MLBench runs: a string -> an argv, with no shell.

MLBench's benchmark images start with a command such as ``python main.py --run_id
{run_id} --rank {rank} --hosts {hosts} --backend {backend}``.  A template is split into
words as a POSIX shell would split it (``shlex.split``: quotes group, nothing is
expanded), then each word has its fields filled in, so a value (a host list, a
backend name) is always one word of the argv, whatever it holds.  The fields are
``FIELDS``; any other ``{name}``, a conversion (``{rank!r}``) or a format spec
(``{rank:>3}``) is refused with its name, before anything runs.  ``{{`` and ``}}``
are literal braces.

Pure: used by ``config`` (the ``mpi.catalogue`` setting is checked at load) and by
``jobs/runspec.py`` (a run's command).
"""

from __future__ import annotations

import shlex
import string
from collections.abc import Mapping

FIELDS = ("run_id", "rank", "hosts", "backend")
_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template that cannot be used; str() says why, naming the field."""


def words(template: str) -> list[str]:
    """The template's words, each checked to name only ``FIELDS``; TemplateError if the
    template is empty, unbalanced (quotes, braces) or names anything else."""
    try:
        split = shlex.split(template)
    except ValueError as e:
        raise TemplateError(f"cannot be split into words: {e}") from None
    if not split:
        raise TemplateError("is empty: a command needs a program")
    for word in split:
        fields(word)
    return split


def fields(word: str) -> list[str]:
    """The fields one word names (TemplateError for an unknown one)."""
    try:
        parsed = list(_FORMATTER.parse(word))
    except ValueError as e:
        raise TemplateError(f"word {word!r}: {e} (write {{{{ and }}}} for braces)") from None
    named = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS:
            raise TemplateError(
                f"names {{{name}}}, which is not a template field; the fields are "
                + ", ".join(f"{{{f}}}" for f in FIELDS)
            )
        if spec or conversion:
            raise TemplateError(f"word {word!r}: {{{name}}} takes no conversion or format")
        named.append(name)
    return named


def render(template: str, values: Mapping[str, str]) -> list[str]:
    """The argv of `template` with every field filled from `values` (one word stays one
    argument, whatever its value)."""
    return [word.format_map(values) for word in words(template)]
