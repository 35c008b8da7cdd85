"""branch, tag, reflog."""

from __future__ import annotations

import click

from . import _output as out
from ._common import json_option, state


@click.command()
@click.argument("name", required=False)
@click.argument("rev", required=False)
@click.option("-d", "--delete", "delete", metavar="NAME", help="Delete branch NAME (undo with: mstore restore NAME).")
@json_option
@click.pass_context
def branch(ctx: click.Context, name: str | None, rev: str | None, delete: str | None, as_json: bool) -> None:
    """List branches; `branch NAME REV` creates one; `branch -d NAME` deletes one.

    Deleting a branch removes the name only: its reflog keeps every version it pointed to,
    and `mstore restore NAME` brings it back.
    """
    with state(ctx).repo() as repo:
        if delete:
            was = repo.delete_branch(delete)
            if as_json:
                out.emit_json({"deleted": delete, "was": was})
            else:
                out.echo(f"deleted {delete} (was {was.short}); undo with: mstore restore {delete}")
            return
        if name:
            if not rev:
                raise click.UsageError("give the revision the new branch starts at: mstore branch NAME REV")
            oid = repo.create_branch(name, rev)
            if as_json:
                out.emit_json({"created": name, "id": oid})
            else:
                out.echo(f"created {name} at {oid.short}; undo with: mstore branch -d {name}")
            return
        rows = []
        for b in repo.branches():
            c = repo.get_commit(b.id)
            rows.append({"name": b.name, "id": b.id, "kind": c.kind, "message": c.message, "time": c.time})
        if as_json:
            out.emit_json(rows)
            return
        out.table([(r["name"], r["id"][:7], r["kind"], out.ago(r["time"]), r["message"][:60]) for r in rows])


@click.command()
@click.argument("name", required=False)
@click.argument("rev", required=False)
@click.option("-m", "--message", default="", help="Why this version is tagged.")
@json_option
@click.pass_context
def tag(ctx: click.Context, name: str | None, rev: str | None, message: str, as_json: bool) -> None:
    """List tags, or create tag NAME at REV. Tags never move and cannot be deleted by accident."""
    with state(ctx).repo() as repo:
        if name:
            if not rev:
                raise click.UsageError("give the revision to tag: mstore tag NAME REV")
            oid = repo.create_tag(name, rev, message)
            if as_json:
                out.emit_json({"tag": name, "id": oid})
            else:
                out.echo(f"tagged {oid.short} as {name}")
            return
        tags = repo.tags()
        if as_json:
            out.emit_json([{"name": t.name, "id": t.id} for t in tags])
        else:
            out.table([(t.name, t.id[:7]) for t in tags])


@click.command()
@click.argument("ref", required=False)
@click.option("-n", "--max-count", "limit", type=click.IntRange(min=1), default=None, help="Show at most N entries.")
@json_option
@click.pass_context
def reflog(ctx: click.Context, ref: str | None, limit: int | None, as_json: bool) -> None:
    """Every change of every ref (or of REF), newest first, deleted refs included."""
    with state(ctx).repo() as repo:
        entries = repo.reflog(ref, limit=limit)
        if as_json:
            out.emit_json(entries)
            return
        for e in entries:
            old = (e["old"] or "0000000")[:7]
            new = (e["new"] or "deleted")[:7]
            out.echo(
                f"{e['seq']:>6}  {out.fmt_time(e['time'])}  {e['ref'].removeprefix('refs/heads/'):<24} "
                f"{old} -> {new:<7}  {e['command']}: {e['message']}"
            )
