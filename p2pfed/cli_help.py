"""Plain ``--help`` for the whole CLI: flags without a type, values named as click names them.

Typer (0.29, with rich) shows every option's Python type in angle brackets — a flag reads
``--json <bool>``, a repeatable option ``<list[str]>``, an argument ``{topology} <path>`` — and
leaves out the default of an option whose default is None.  :class:`PlainHelpGroup`, given as
``cls`` to the root ``typer.Typer``, fixes that once for every command and sub-group, whoever
registers them:

* a flag shows no value (``--json``), an option the kind of value it takes, as click names it
  (``PATH``, ``INTEGER``, ``FLOAT``, ``TEXT``; ``TEXT (repeatable)`` for a repeatable one;
  a range still shows its bounds, an explicit ``metavar`` such as ``NODE@ROUND`` wins);
* an argument shows its name in capitals (``TOPOLOGY``), in the usage line too;
* an option whose default is None says ``[default: none]`` unless its help text already says
  what the default is (``Node home (default: $P2PFED_HOME or …)``).
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperGroup, TyperOption

try:  # typer ≥ 0.2x vendors click (and renders the types this module replaces)
    from typer import _click
except ImportError:  # pragma: no cover - an older typer, on click itself
    import click as _click  # type: ignore[no-redef]

#: typer's type labels (``<int range>``) as click names the values (ranges show their bounds
#: separately)
_VALUE_NAMES = {"int": "INTEGER", "int range": "INTEGER", "float": "FLOAT",
                "float range": "FLOAT", "str": "TEXT", "bool": "BOOLEAN"}


def value_name(label: str) -> str:
    """The plain name of a typer type label: ``<path>`` → ``PATH``, ``<list[str]>`` →
    ``TEXT (repeatable)``, ``<a|b>`` → ``[a|b]``."""
    label = label.strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        return f"{value_name(label[5:-1])} (repeatable)"
    if "|" in label:
        return f"[{label}]"
    return _VALUE_NAMES.get(label, label.upper())


class PlainOption(TyperOption):
    """A TyperOption whose help names its value plainly (see the module's docstring)."""

    def display_type_rich(self, ctx: _click.Context) -> str | None:
        if self.metavar is not None:
            return self.metavar
        if self.is_flag or self.count:
            return None
        return value_name(self.display_type(ctx))

    def _extract_default_help_str(self, *, ctx: _click.Context) -> Any:
        default = super()._extract_default_help_str(ctx=ctx)
        if (default is None and not self.required and not self.is_flag
                and "default" not in (self.help or "").lower()):
            return "none"
        return default


class PlainArgument(TyperArgument):
    """A TyperArgument named in capitals, in its help row and in the usage line."""

    def display_type_rich(self, ctx: _click.Context) -> str | None:
        return None  # (the name column already says what it is)

    def get_usage_pieces(self, ctx: _click.Context) -> list[str]:
        name = self.display_name_raw
        if self.nargs != 1:
            name += "..."
        return [name if self.required else f"[{name}]"]


def plain_help(command: _click.Command) -> None:
    """Give ``command``, and every command below it, plain help (in place)."""
    # (click makes the --help option on first use and keeps it: made here, it is plain too)
    help_option = command.get_help_option(_click.Context(command))
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if type(param) is TyperOption:
            param.__class__ = PlainOption
        elif type(param) is TyperArgument:
            param.__class__ = PlainArgument
            if param.metavar is None and param.name is not None:
                param.metavar = param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)


class PlainHelpGroup(TyperGroup):
    """The root group: the same as typer's, with :func:`plain_help` applied to the whole tree
    once typer has built it (``typer.Typer(cls=PlainHelpGroup)``)."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        plain_help(self)
