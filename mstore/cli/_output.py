"""Everything the CLI shows: text, tables, JSON, progress bars, errors. The only module that prints."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click


def echo(text: str = "", err: bool = False) -> None:
    """Print a line."""
    click.echo(text, err=err)


def emit_json(value: Any) -> None:
    """Print one JSON document on stdout (for scripts and ``jq``)."""
    click.echo(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str))


def write_bytes(data: bytes) -> None:
    """Write raw bytes to stdout."""
    sys.stdout.buffer.write(data)


def flush() -> None:
    """Flush stdout."""
    sys.stdout.buffer.flush()


def error(message: str) -> None:
    """An error line on stderr."""
    click.echo(f"error: {message}", err=True)


def warn(message: str) -> None:
    """A warning line on stderr."""
    click.echo(f"warning: {message}", err=True)


def plural(n: int, word: str) -> str:
    """``plural(1, "file")`` → ``1 file``; ``plural(3, "file")`` → ``3 files``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def human_bytes(n: int | float | None) -> str:
    """``13107200`` → ``13.1 MB`` (decimal units, like the incident reports)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def ago(ts: float | str, now: float | None = None) -> str:
    """A unix time or ISO string as ``3 days ago``."""
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    delta = (time.time() if now is None else now) - ts
    for unit, secs in (("year", 365 * 86400), ("month", 30 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if delta >= secs:
            k = int(delta // secs)
            return f"{k} {unit}{'s' if k != 1 else ''} ago"
    return "just now"


def fmt_time(ts: float | str) -> str:
    """A unix time or ISO string as ``2026-11-22 05:30:57 UTC``."""
    if isinstance(ts, str):
        dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    else:
        dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None) -> None:
    """Left-aligned columns; numbers right-aligned."""
    data = [[("" if c is None else str(c)) for c in r] for r in rows]
    if headers:
        data.insert(0, list(headers))
    if not data:
        return
    widths = [max(len(r[i]) for r in data) for i in range(len(data[0]))]
    for r in data:
        cells = []
        for i, c in enumerate(r):
            cells.append(c.rjust(widths[i]) if _numeric(c) else c.ljust(widths[i]))
        click.echo("  ".join(cells).rstrip())


def _numeric(s: str) -> bool:
    return bool(s) and s.replace(".", "", 1).replace(",", "").lstrip("-+").isdigit()


@contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr; silent when stderr is not a terminal."""
    if not sys.stderr.isatty() or total <= 0:
        yield lambda n: None
        return
    with click.progressbar(
        length=total, label=label, file=sys.stderr, show_eta=True, show_percent=True, width=30
    ) as bar:
        yield bar.update


def confirm(prompt: str) -> str:
    """Ask for a typed answer."""
    return click.prompt(prompt, default="", show_default=False, err=True)
