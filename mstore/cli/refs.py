"""branch, branches, tag, reflog, restore: naming versions, and undoing name changes."""

from __future__ import annotations

import click

from . import _output as out
from ._common import json_option, state

_force_options = [
    click.option("--force-protected", is_flag=True, help="Allow changing a protected ref (needs --confirm NAME)."),
    click.option("--confirm", metavar="NAME", help="Repeat the protected ref's name to confirm."),
]
_dry_run = click.option("--dry-run", is_flag=True, help="Say exactly what would happen; change nothing.")


def _with(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


@click.command()
@click.argument("name", required=False)
@click.argument("rev", required=False)
@click.option("-d", "--delete", "delete", metavar="NAME", help="Delete branch NAME (undo with: mstore restore NAME).")
@_dry_run
@_with(_force_options)
@json_option
@click.pass_context
def branch(ctx, name, rev, delete, dry_run, force_protected, confirm, as_json) -> None:
    """List branches; `branch NAME REV` creates one; `branch -d NAME` deletes one.

    Deleting a branch removes the name only: its reflog keeps every version it pointed to,
    and `mstore restore NAME` brings it back (until a gc proof is applied after the reflog
    retention period; see docs/undo.md).
    """
    with state(ctx).repo() as repo:
        if delete:
            res = repo.delete_branch(delete, dry_run=dry_run, force_protected=force_protected, confirm=confirm)
            if as_json:
                out.emit_json(res.to_dict())
                return
            if res.dependents:
                out.warn(
                    f"{', '.join(res.dependents)} recorded commits of {delete} as inputs; they keep its "
                    "objects alive (the delete is still allowed and undoable)"
                )
            verb = "would delete" if dry_run else "deleted"
            out.echo(f"{verb} {delete} (was {res.old.short}); undo with: mstore restore {delete}")
            return
        if name:
            if not rev:
                raise click.UsageError("give the revision the new branch starts at: mstore branch NAME REV")
            oid = repo.create_branch(name, rev, dry_run=dry_run)
            if as_json:
                out.emit_json({"created": name, "id": oid, "dry_run": dry_run})
            else:
                verb = "would create" if dry_run else "created"
                out.echo(f"{verb} {name} at {oid.short}; undo with: mstore branch -d {name}")
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
@json_option
@click.pass_context
def branches(ctx, as_json) -> None:
    """What is each branch? Kind, age, last move, size, base model, step and key metrics.

    The question the teams in the incident reports could not answer before a clean-up.
    """
    with state(ctx).repo() as repo:
        info = repo.branches_info()
        if as_json:
            out.emit_json(info)
            return
        rows = []
        for b in info:
            metrics = ", ".join(f"{k}={_num(v)}" for k, v in sorted(b["metrics"].items())[:3])
            base = b["base"][:7] if isinstance(b["base"], str) else ""
            rows.append(
                (
                    b["name"],
                    b["kind"],
                    b["id"][:7],
                    out.ago(b["created"]) if b["created"] else "",
                    out.ago(b["moved"]) if b["moved"] else "",
                    out.human_bytes(b["bytes"]),
                    base,
                    "" if b["step"] is None else b["step"],
                    metrics,
                )
            )
        out.table(rows, ("branch", "kind", "head", "created", "last moved", "size", "base", "step", "metrics"))


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@click.command()
@click.argument("name", required=False)
@click.argument("rev", required=False)
@click.option("-m", "--message", default="", help="Why this version is tagged.")
@click.option("-d", "--delete", "delete", metavar="NAME", help="Delete tag NAME (protected: needs --force-protected).")
@_dry_run
@_with(_force_options)
@json_option
@click.pass_context
def tag(ctx, name, rev, message, delete, dry_run, force_protected, confirm, as_json) -> None:
    """List tags, or create tag NAME at REV. Tags never move; deleting one needs confirmation."""
    with state(ctx).repo() as repo:
        if delete:
            res = repo.delete_tag(delete, dry_run=dry_run, force_protected=force_protected, confirm=confirm)
            if as_json:
                out.emit_json(res.to_dict())
            else:
                verb = "would delete" if dry_run else "deleted"
                out.echo(f"{verb} tag {delete} (was {res.old.short}); undo with: mstore restore {delete}")
            return
        if name:
            if not rev:
                raise click.UsageError("give the revision to tag: mstore tag NAME REV")
            oid = repo.create_tag(name, rev, message, dry_run=dry_run)
            if as_json:
                out.emit_json({"tag": name, "id": oid, "dry_run": dry_run})
            else:
                out.echo(f"{'would tag' if dry_run else 'tagged'} {oid.short} as {name}")
            return
        tags = repo.tags()
        if as_json:
            out.emit_json([{"name": t.name, "id": t.id} for t in tags])
        else:
            out.table([(t.name, t.id[:7]) for t in tags])


@click.command()
@click.argument("ref", required=False)
@click.option("--all", "all_refs", is_flag=True, help="Every ref, deleted ones included (the default without REF).")
@click.option(
    "-n",
    "--max-count",
    "limit",
    type=click.IntRange(min=0),
    default=None,
    help="Show at most N entries (text default 100; 0 for all).",
)
@json_option
@click.pass_context
def reflog(ctx, ref, all_refs, limit, as_json) -> None:
    """Every change of every ref (or of REF), newest first, deleted refs included.

    Each entry shows the old and new commit, when, who, and the command and message that caused
    it. `mstore restore REF@{N}` brings back the state N changes ago.
    """
    if ref and all_refs:
        raise click.UsageError("give either REF or --all")
    with state(ctx).repo() as repo:
        if limit is None and not as_json:
            limit = 100
        entries = repo.reflog(ref, limit=(limit or None) and limit + 1)
        more = limit and len(entries) > limit
        entries = entries[:limit] if limit else entries
        if as_json:
            out.emit_json(entries)
            return
        positions: dict[str, int] = {}
        for e in entries:
            name = e["ref"].removeprefix("refs/heads/").removeprefix("refs/")
            n = positions.get(name, 0)
            positions[name] = n + 1
            old = (e["old"] or "-------")[:7]
            new = (e["new"] or "deleted")[:7]
            out.echo(
                f"{new:<7} {name}@{{{n}}}  {out.fmt_time(e['time'])}  {e['user']}  "
                f"{e['command']}: {e['message']}  (was {old})"
            )
        if more:
            out.echo(f"(first {limit} entries; -n 0 shows all)")


@click.command()
@click.argument("spec", metavar="REF[@{N}|@{TIME}]")
@click.option("--as", "as_name", metavar="NAME", help="Create a new branch NAME instead of moving REF.")
@_dry_run
@_with(_force_options)
@json_option
@click.pass_context
def restore(ctx, spec, as_name, dry_run, force_protected, confirm, as_json) -> None:
    """Bring back a deleted or moved branch from the reflog.

    `restore exp1` recreates a deleted branch as it was before deletion; `restore exp1@{3}`
    moves it back to its state 3 changes ago; `exp1@{2.days.ago}` to its state at a time;
    `--as NAME` puts the old state on a new branch. A restore is itself logged, so it can be
    undone the same way.
    """
    with state(ctx).repo() as repo:
        res = repo.restore(spec, as_name=as_name, dry_run=dry_run, force_protected=force_protected, confirm=confirm)
        if as_json:
            out.emit_json(res.to_dict())
            return
        verb = "would restore" if dry_run else "restored"
        was = f"was {res.old.short}" if res.old else "was deleted"
        undo = f"mstore restore {res.name}@{{1}}" if res.old else f"mstore branch -d {res.name}"
        out.echo(f"{verb} {res.name} at {res.new.short} ({was}); undo with: {undo}")
