"""Helpers shared by the ``iiot`` command modules. They live here, not in cli.py, so that a
command module can import them while cli.py imports the command modules (also when cli.py runs
as ``python -m iiot_orchestration.cli``)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import click

from iiot_orchestration.errors import IiotError
from iiot_orchestration.settings import Settings, load_settings


class HelpGroup(click.Group):
    """A command group whose help lists each command with the whole first sentence of its
    docstring (or its short_help), wrapped, where click would cut it at one line with '...'."""

    group_class = type  # groups made with @group.group() list their commands the same way

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=sys.maxsize)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _settings() -> Settings:
    state = click.get_current_context().ensure_object(dict)
    if "settings" not in state:
        state["settings"] = load_settings()
    return state["settings"]


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print an IiotError as one line on stderr and exit 1, instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except IiotError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)

    return wrapper


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S%z")
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    return str(value)


def _json(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, default=str, ensure_ascii=False)
