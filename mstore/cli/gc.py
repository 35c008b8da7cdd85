"""gc plan / show / verify / apply / undo / purge / log, and pin: deleting only with a proof."""

from __future__ import annotations

import click

from . import _output as out
from ._common import json_option, state


@click.group()
def gc() -> None:
    """Delete unreachable data, only through a reviewable reachability proof.

    \b
    mstore gc plan            write a proof of what would be deleted (deletes nothing)
    mstore gc show PROOF      review it: every candidate, its size, age and last reference
    mstore gc verify PROOF    re-check it against the store as it is now
    mstore gc apply PROOF     re-check, confirm, and move the candidates to trash
    mstore gc undo PROOF      bring them back (until purge)
    mstore gc purge           empty old trash: the point of no return
    mstore gc log             the audit log of applied, undone and purged proofs
    """


def _summary(pid: str, doc: dict, total_stored: int | None = None) -> None:
    c = doc["candidates"]
    commits = sum(len(g["commits"]) for g in doc["groups"])
    files = sum(1 for g in doc["groups"] for o in g["objects"] if o[0] == "f")
    of = f" (of {out.human_bytes(total_stored)} stored)" if total_stored else ""
    out.echo(
        f"gc proof {pid[:7]}: {out.plural(commits, 'commit')}, {out.plural(files, 'file')}, "
        f"{out.plural(c['objects'], 'object')}, "
        f"{out.human_bytes(c['stored_bytes'])} reclaimable{of}"
    )
    for g in doc["groups"]:
        name = g["ref"] or "(unreferenced)"
        ncommits = len(g["commits"])
        what = f"{ncommits} commit{'s' if ncommits != 1 else ''}" if ncommits else f"{len(g['objects'])} objects"
        out.echo(f"  {name:<24} {g['reason']:<70} {what:>12}  {out.human_bytes(g['stored_bytes'])}")
    if doc["dead_packs"]:
        dead = sum(p["bytes"] for p in doc["dead_packs"])
        out.echo(
            f"  {'(dead packs)':<24} {len(doc['dead_packs'])} pack files holding no indexed object: "
            f"{out.human_bytes(dead)}"
        )
    if c.get("younger_than_grace"):
        out.echo(
            f"  kept: {c['younger_than_grace']} unreachable objects younger than the "
            f"{doc['policy']['grace_days']}-day grace period"
        )
    r = doc["roots"]
    heads = sum(1 for n in r["refs"] if n.startswith("refs/heads/"))
    tags = sum(1 for n in r["refs"] if n.startswith("refs/tags/"))
    entries = len({e[0] for e in r["reflog"]})
    out.echo(
        f"  roots: {heads} branches, {tags} tags, {entries} reflog entries within "
        f"{doc['policy']['retention_days']} days, {len(r['pins'])} pins, {len(r['leases'])} leases"
    )
    check = doc.get("remote_check")
    if check:
        out.echo(f"  every candidate is also on remote {check['remote']} ({check['objects_checked']} objects checked)")


@gc.command("plan")
@click.option("--retention-days", type=float, help="Reflog entries younger than this are roots (default 30).")
@click.option("--grace-days", type=float, help="Nothing stored more recently is a candidate (default 14).")
@click.option("--verify-data", is_flag=True, help="Read and verify every live byte first (slow: like fsck).")
@click.option(
    "--require-remote", metavar="REMOTE",
    help="Every candidate must already be on this remote (checked now and again at apply).",
)
@json_option
@click.pass_context
def gc_plan(ctx, retention_days, grace_days, verify_data, require_remote, as_json) -> None:
    """Write a proof of what gc would delete and why nothing live needs it. Deletes nothing.

    If any live object cannot be read, no proof is written: an incomplete view of what is
    live is never a reason to delete. By default the bytes of live objects are read where gc
    would rewrite their pack; --verify-data reads all of them.

    With --require-remote backup, the plan is refused unless the remote holds every candidate
    (push the branches there before deleting them), so gc never deletes the last copy.
    """
    with state(ctx).repo() as repo:
        pid, doc = repo.gc_plan(
            retention_days=retention_days, grace_days=grace_days, verify_data=verify_data,
            require_remote=require_remote,
        )
        if as_json:
            out.emit_json({"proof": pid, **doc})
            return
        _summary(pid, doc, repo.stored_bytes())
        out.echo(f"review with: mstore gc show {pid[:7]};  apply with: mstore gc apply {pid[:7]}")


@gc.command("show")
@click.argument("proof")
@json_option
@click.pass_context
def gc_show(ctx, proof, as_json) -> None:
    """Show a proof: every candidate commit with its message, and the roots it was checked against."""
    with state(ctx).repo() as repo:
        pid, doc = repo.gc_show(proof)
        if as_json:
            out.emit_json({"proof": pid, **doc})
            return
        out.echo(f"proof {pid}")
        out.echo(f"created {out.fmt_time(doc['created'])} by {doc['created_by']}; policy {doc['policy']}")
        _summary(pid, doc)
        for g in doc["groups"]:
            out.echo(f"\n{g['ref'] or '(unreferenced)'}: {g['reason']}")
            for c in g["commits"]:
                out.echo(f"  commit {c['id'][:7]}  {c.get('kind') or '':<10} {c.get('message') or '(unreadable)'}")
            kinds = {}
            for o in g["objects"]:
                kinds[o[0]] = kinds.get(o[0], 0) + 1
            names = {"m": "commits", "t": "trees", "f": "files", "c": "chunks"}
            out.echo(
                "  "
                + ", ".join(out.plural(n, names[k][:-1]) for k, n in sorted(kinds.items()))
                + f"; {out.human_bytes(g['bytes'])} raw, {out.human_bytes(g['stored_bytes'])} stored"
            )


@gc.command("verify")
@click.argument("proof")
@json_option
@click.pass_context
def gc_verify(ctx, proof, as_json) -> None:
    """Re-check a proof against the store as it is now; exit 8 and list why if it no longer holds."""
    with state(ctx).repo() as repo:
        v = repo.gc_verify(proof)
        if as_json:
            out.emit_json(v.to_dict())
        elif v.valid:
            out.echo(f"proof {v.proof[:7]} is valid: every candidate is unreachable and older than the grace period")
        else:
            out.echo(f"proof {v.proof[:7]} is not valid now:")
            for r in v.reasons:
                out.echo(f"  - {r}")
        if not v.valid:
            ctx.exit(8)


@gc.command("apply")
@click.argument("proof")
@click.option("--yes", is_flag=True, help="Do not ask to type the proof id (for scripts that pass PROOF explicitly).")
@json_option
@click.pass_context
def gc_apply(ctx, proof, yes, as_json) -> None:
    """Re-check a proof, then move its candidates to trash and compact their packs.

    Refused unless the refs/reflog state is unchanged since the plan, no candidate is
    reachable, every candidate is older than the grace period and the proof is younger than
    its time limit. Until `mstore gc purge`, `mstore gc undo PROOF` brings everything back.
    """
    with state(ctx).repo() as repo:
        pid, doc = repo.gc_show(proof)
        v = repo.gc_verify(proof)
        if not v.valid:
            from ..gc import GcRefused

            raise GcRefused(f"gc proof {pid[:7]} cannot be applied", v.reasons)
        if not yes:
            _summary(pid, doc)
            typed = out.confirm(f"type the proof id ({pid[:7]}) to move these to trash")
            if len(typed) < 7 or not pid.startswith(typed.strip()):
                raise click.Abort()
        res = repo.gc_apply(pid)
        if as_json:
            out.emit_json(res.to_dict())
            return
        out.echo(
            f"applied {pid[:7]}: {out.plural(res.objects, 'object')} ({out.human_bytes(res.trashed_bytes)}) "
            f"moved to trash; {out.plural(res.packs_rewritten, 'pack')} rewritten; "
            f"packs/ {out.human_bytes(res.bytes_before)} -> {out.human_bytes(res.bytes_after)}"
        )
        out.echo(f"undo with: mstore gc undo {pid[:7]}  (until mstore gc purge)")


@gc.command("undo")
@click.argument("proof")
@json_option
@click.pass_context
def gc_undo(ctx, proof, as_json) -> None:
    """Bring back everything an applied proof moved to trash (possible until it is purged)."""
    with state(ctx).repo() as repo:
        n = repo.gc_undo(proof)
        if as_json:
            out.emit_json({"proof": proof, "objects": n})
        else:
            out.echo(f"restored {n} objects from trash; deleted branches can be restored again (mstore reflog)")


@gc.command("purge")
@click.option("--quarantine-days", type=float, help="Only trash older than this (default 7).")
@click.option("--dry-run", is_flag=True, help="Say what would be purged; delete nothing.")
@json_option
@click.pass_context
def gc_purge(ctx, quarantine_days, dry_run, as_json) -> None:
    """Permanently delete trash older than the quarantine period.

    THIS IS THE POINT OF NO RETURN: after purge, `mstore gc undo` cannot bring those versions
    back, and the reflog entries that named them lead nowhere.
    """
    with state(ctx).repo() as repo:
        items = repo.gc_purge(quarantine_days=quarantine_days, dry_run=dry_run)
        if as_json:
            out.emit_json(items)
            return
        if not items:
            out.echo("nothing to purge")
        for i in items:
            verb = "would purge" if dry_run else "purged"
            out.echo(f"{verb} trash of proof {i['proof'][:7]}: {i['objects']} objects, {out.human_bytes(i['bytes'])}")


@gc.command("log")
@json_option
@click.pass_context
def gc_log(ctx, as_json) -> None:
    """The audit log: every proof applied, undone or purged, by whom and when."""
    with state(ctx).repo() as repo:
        entries = repo.gc_log()
        if as_json:
            out.emit_json(entries)
            return
        for e in entries:
            extra = f"{e.get('objects', '')} objects" if "objects" in e else out.human_bytes(e.get("bytes"))
            out.echo(f"{out.fmt_time(e['time'])}  {e['action']:<8} {e['proof'][:7]}  {e['user']}  {extra}")


@click.command()
@click.argument("rev", required=False)
@click.option("--remove", is_flag=True, help="Remove the pin instead.")
@click.option("--note", default="", help="Why it is pinned.")
@json_option
@click.pass_context
def pin(ctx, rev, remove, note, as_json) -> None:
    """Pin REV so gc keeps it whatever happens to refs; without REV, list pins."""
    with state(ctx).repo() as repo:
        if rev is None:
            pins = repo.pins()
            if as_json:
                out.emit_json(pins)
            else:
                out.table([(p["id"][:7], out.fmt_time(p["time"]), p["user"], p["note"]) for p in pins])
            return
        if remove:
            ok = repo.unpin(rev)
            out.echo(f"unpinned {rev}" if ok else f"{rev} was not pinned")
            return
        oid = repo.pin(rev, note)
        if as_json:
            out.emit_json({"pinned": oid})
        else:
            out.echo(f"pinned {oid.short}; undo with: mstore pin --remove {oid.short}")
