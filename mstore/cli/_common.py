"""Options and parsing shared by the command modules."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from ..errors import UserError

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")


def state(ctx: click.Context) -> Any:
    """The CLI state (where the repository is)."""
    return ctx.find_root().obj


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def parse_meta(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("lr=3e-4", "note=first try")`` → ``{"lr": 0.0003, "note": "first try"}``.

    Values that parse as JSON numbers, booleans or null keep that type; anything else is a
    string. NaN and infinities stay strings (a commit never stores a non-finite number).

    Raises:
        UserError: an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--meta wants KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value, parse_constant=_no_constant)
            if isinstance(parsed, (dict, list)):
                parsed = value
        except ValueError:
            parsed = value
        out[key] = parsed
    return out


def path_size(path: str) -> int:
    """Total bytes of regular files under ``path`` (for progress bars)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
