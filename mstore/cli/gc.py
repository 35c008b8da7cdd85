"""gc plan / show / verify / apply / undo / purge / log, and pin: deleting only with a proof."""

from __future__ import annotations

import click

from . import _output as out
from ._common import json_option, state

remote_option = click.option(
    "--remote", "remote", metavar="NAME",
    help="Collect on remote NAME (its refs, reflog and packs) instead of this store: docs/remote-gc.md.",
)


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

    With --remote NAME the same verbs collect on a remote (an S3 bucket or a second disk):
    the roots are the remote's refs and remote reflog entries inside the retention window,
    whole dead packs are the candidates, apply moves them to trash/PROOF/ on the remote under
    a lock that no push can race, and undo brings them back (docs/remote-gc.md).

    \b
    mstore gc plan --remote origin      a proof for the remote's packs (deletes nothing)
    mstore gc show|verify|apply|undo PROOF    dispatch on the proof: it names its remote
    mstore gc purge --remote origin     empty the remote's trash after quarantine
    mstore gc log --remote origin       the remote's audit log
    mstore gc unlock --remote origin    remove locks left by killed pushes or gcs
    """


def _proof_remote(repo, proof: str, remote: str | None) -> tuple[str, str | None]:
    """The proof's full id and the remote it is for (None: a local proof); checks ``--remote``."""
    from .. import remote_gc
    from ..errors import UserError

    pid, for_remote = remote_gc.proof_type(repo.root, proof)
    if remote is not None and for_remote != remote:
        what = f"for remote {for_remote!r}" if for_remote else "a proof for this store"
        raise UserError(f"gc proof {pid[:7]} is {what}, not for remote {remote!r}")
    return pid, for_remote


def _confirms(typed: str, pid: str) -> bool:
    """Whether what the user typed is the proof's id, or a prefix of it of at least 7 characters."""
    typed = typed.strip()
    return len(typed) >= 7 and pid.startswith(typed)


def _remote_summary(pid: str, doc: dict) -> None:
    c = doc["candidates"]
    out.echo(
        f"remote gc proof {pid[:7]} for {doc['remote']['name']} ({doc['remote']['url']}): "
        f"{out.plural(c['packs'], 'pack')}, {out.plural(c['records'], 'record')}, "
        f"{out.human_bytes(c['bytes'])} reclaimable"
    )
    for p in doc["packs"]:
        n = "?" if p["records"] is None else p["records"]
        out.echo(f"  {p['pack']}  {out.human_bytes(p['bytes']):>10}  {n} records  {p['reason']}")
    kept = doc["partial_packs"]
    if kept:
        dead = sum(p["dead_bytes"] for p in kept)
        out.echo(
            f"  partly dead, kept (a pack with any live record is never rewritten or moved; not reclaimable): "
            f"{out.plural(len(kept), 'pack')} with {out.human_bytes(dead)} of dead records"
        )
    if doc["damaged_packs"]:
        out.echo(f"  damaged (kept): {', '.join(p['pack'] + ' ' + p['problem'] for p in doc['damaged_packs'])}")
    if c.get("younger_than_grace"):
        out.echo(
            f"  kept: {out.plural(c['younger_than_grace'], 'dead pack')} younger than the "
            f"{doc['policy']['grace_days']:g}-day grace period"
        )
    r = doc["roots"]
    heads = sum(1 for n in r["refs"] if n.startswith("refs/heads/"))
    tags = sum(1 for n in r["refs"] if n.startswith("refs/tags/"))
    entries = len({(e[0], e[1]) for e in r["reflog"]})
    out.echo(
        f"  roots: {heads} branches, {tags} tags, {entries} remote reflog entries within "
        f"{doc['policy']['retention_days']:g} days"
    )


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
@remote_option
@json_option
@click.pass_context
def gc_plan(ctx, retention_days, grace_days, verify_data, require_remote, remote, as_json) -> None:
    """Write a proof of what gc would delete and why nothing live needs it. Deletes nothing.

    If any live object cannot be read, no proof is written: an incomplete view of what is
    live is never a reason to delete. By default the bytes of live objects are read where gc
    would rewrite their pack; --verify-data reads all of them.

    With --require-remote backup, the plan is refused unless the remote holds every candidate
    (push the branches there before deleting them), so gc never deletes the last copy.

    With --remote origin, the proof is about the remote's packs: roots are its refs and its
    reflog entries inside the retention window; a pack is a candidate if none of its records
    is reachable and it is older than the grace period. Partly dead packs are reported.
    """
    if remote is not None and (verify_data or require_remote):
        raise click.UsageError("--remote cannot be combined with --verify-data or --require-remote")
    with state(ctx).repo() as repo:
        if remote is not None:
            pid, doc = repo.remote_gc(remote).plan(retention_days, grace_days)
            if as_json:
                out.emit_json({"proof": pid, **doc})
                return
            _remote_summary(pid, doc)
            from .. import remote_gc

            for why in remote_gc.below_floor(doc["policy"], repo.gc_policy()):
                out.echo(f"  note: {why}; apply will refuse this proof")
            out.echo(f"review with: mstore gc show {pid[:7]};  apply with: mstore gc apply {pid[:7]}")
            return
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
@remote_option
@json_option
@click.pass_context
def gc_show(ctx, proof, remote, as_json) -> None:
    """Show a proof: every candidate commit with its message, and the roots it was checked against.

    A remote proof shows every candidate pack, why it is dead and the commits it held.
    """
    with state(ctx).repo() as repo:
        pid, for_remote = _proof_remote(repo, proof, remote)
        if for_remote is not None:
            from .. import remote_gc

            pid, doc = remote_gc.load_proof(repo.root, pid)
            if as_json:
                out.emit_json({"proof": pid, **doc})
                return
            out.echo(f"proof {pid}")
            out.echo(f"created {out.fmt_time(doc['created'])} by {doc['created_by']}; policy {doc['policy']}")
            _remote_summary(pid, doc)
            for c in doc["dead_commits"]:
                ref, msg = c.get("ref") or "(no ref)", c.get("message") or "(unreadable)"
                out.echo(f"  commit {c['id'][:7]}  {ref:<16} {msg}")
            return
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
@remote_option
@json_option
@click.pass_context
def gc_verify(ctx, proof, remote, as_json) -> None:
    """Re-check a proof against the store as it is now; exit 8 and list why if it no longer holds.

    A remote proof is re-checked against the remote's refs, reflog and packs as they are now.
    """
    with state(ctx).repo() as repo:
        pid, for_remote = _proof_remote(repo, proof, remote)
        if for_remote is not None:
            from .. import remote_gc

            pid, doc = remote_gc.load_proof(repo.root, pid)
            v = repo.remote_gc(for_remote).verify(pid, doc)
        else:
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
@remote_option
@json_option
@click.pass_context
def gc_apply(ctx, proof, yes, remote, as_json) -> None:
    """Re-check a proof, then move its candidates to trash and compact their packs.

    Refused unless the refs/reflog state is unchanged since the plan, no candidate is
    reachable, every candidate is older than the grace period and the proof is younger than
    its time limit. Until `mstore gc purge`, `mstore gc undo PROOF` brings everything back.

    A remote proof is applied under the remote's gc lock (refused while a push holds one):
    refs and reflogs are re-read under it, and each candidate pack and its index move to
    trash/PROOF/ on the remote, the index first, so no reader or pusher relies on it any more.
    """
    with state(ctx).repo() as repo:
        pid, for_remote = _proof_remote(repo, proof, remote)
        if for_remote is not None:
            _apply_remote(repo, pid, for_remote, yes, as_json)
            return
        pid, doc = repo.gc_show(proof)
        v = repo.gc_verify(proof)
        if not v.valid:
            from ..gc import GcRefused

            raise GcRefused(f"gc proof {pid[:7]} cannot be applied", v.reasons)
        if not yes:
            _summary(pid, doc)
            typed = out.confirm(f"type the proof id ({pid[:7]}) to move these to trash")
            if not _confirms(typed, pid):
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


def _apply_remote(repo, pid: str, remote: str, yes: bool, as_json: bool) -> None:
    from .. import remote_gc
    from ..gc import GcRefused

    pid, doc = remote_gc.load_proof(repo.root, pid)
    rgc = repo.remote_gc(remote)
    if not yes:
        v = rgc.verify(pid, doc)  # before asking; apply checks everything again under the lock
        if not v.valid:
            raise GcRefused(f"remote gc proof {pid[:7]} cannot be applied", v.reasons)
        _remote_summary(pid, doc)
        typed = out.confirm(f"type the proof id ({pid[:7]}) to move these packs to the remote's trash")
        if not _confirms(typed, pid):
            raise click.Abort()
    res = rgc.apply(pid, doc)
    if as_json:
        out.emit_json(res.to_dict())
        return
    kept = f"; kept {out.plural(len(res.kept), 'pack')} a push has indexed since the plan" if res.kept else ""
    out.echo(
        f"applied {pid[:7]} on {remote}: {out.plural(res.packs, 'pack')} ({out.human_bytes(res.bytes)}) "
        f"moved to trash/{pid[:7]}…/ on the remote{kept}"
    )
    out.echo(f"undo with: mstore gc undo {pid[:7]}  (until mstore gc purge --remote {remote})")


@gc.command("undo")
@click.argument("proof")
@remote_option
@json_option
@click.pass_context
def gc_undo(ctx, proof, remote, as_json) -> None:
    """Bring back everything an applied proof moved to trash (possible until it is purged).

    For a remote proof, the packs in the remote's trash/PROOF/ go back (each pack before its
    index). With --remote NAME, PROOF may be a full id planned elsewhere.
    """
    with state(ctx).repo() as repo:
        from ..errors import NotFound
        from ..hashing import is_full_id

        try:
            pid, for_remote = _proof_remote(repo, proof, remote)
        except NotFound:
            if remote is None or not is_full_id(proof):
                raise
            pid, for_remote = proof, remote
        if for_remote is not None:
            n = repo.remote_gc(for_remote).undo(pid)
            if as_json:
                out.emit_json({"proof": pid, "remote": for_remote, "packs": n})
            else:
                out.echo(f"restored {out.plural(n, 'pack')} on {for_remote} from trash/{pid[:7]}…/")
            return
        n = repo.gc_undo(proof)
        if as_json:
            out.emit_json({"proof": proof, "objects": n})
        else:
            out.echo(f"restored {n} objects from trash; deleted branches can be restored again (mstore reflog)")


@gc.command("purge")
@click.option("--quarantine-days", type=float, help="Only trash older than this (default 7).")
@click.option("--dry-run", is_flag=True, help="Say what would be purged; delete nothing.")
@remote_option
@json_option
@click.pass_context
def gc_purge(ctx, quarantine_days, dry_run, remote, as_json) -> None:
    """Permanently delete trash older than the quarantine period.

    THIS IS THE POINT OF NO RETURN: after purge, `mstore gc undo` cannot bring those versions
    back, and the reflog entries that named them lead nowhere.

    With --remote NAME, the remote's trash (trash/PROOF/ on it) is purged, not this store's:
    under the remote's gc lock its refs and reflog are read and marked again, and a proof whose
    trash holds anything live now is skipped. Each proof waits for the longer of its own
    quarantine and this one.
    """
    with state(ctx).repo() as repo:
        if remote is not None:
            _purge_remote(repo, remote, quarantine_days, dry_run, as_json)
            return
        items = repo.gc_purge(quarantine_days=quarantine_days, dry_run=dry_run)
        if as_json:
            out.emit_json(items)
            return
        if not items:
            out.echo("nothing to purge")
        for i in items:
            verb = "would purge" if dry_run else "purged"
            out.echo(f"{verb} trash of proof {i['proof'][:7]}: {i['objects']} objects, {out.human_bytes(i['bytes'])}")


def _purge_remote(repo, remote: str, quarantine_days, dry_run: bool, as_json: bool) -> None:
    items = repo.remote_gc(remote).purge(quarantine_days, dry_run)
    if as_json:
        out.emit_json(items)
        return
    if not items:
        out.echo(f"nothing to purge on {remote}")
    for i in items:
        what = (f"trash of proof {i['proof'][:7]} on {remote}: {out.plural(i['packs'], 'pack')}, "
                f"{out.human_bytes(i['bytes'])}")
        if i.get("skipped"):
            out.echo(f"kept {what}: {i['skipped']}")
        else:
            out.echo(f"{'would purge' if dry_run else 'purged'} {what}")


@gc.command("log")
@remote_option
@json_option
@click.pass_context
def gc_log(ctx, remote, as_json) -> None:
    """The audit log: every proof applied, undone or purged, by whom and when (--remote: on that remote)."""
    with state(ctx).repo() as repo:
        if remote is not None:
            entries = repo.remote_gc(remote).log()
            if as_json:
                out.emit_json(entries)
                return
            for e in entries:
                note = "  (unfinished: apply again to finish, or undo)" if e.get("unfinished") else ""
                out.echo(f"{out.fmt_time(e['time'])}  {e['action']:<8} {e['proof'][:7]}  {e['user']}@{e.get('host')}  "
                         f"{e.get('packs', '')} packs{note}")
            return
        entries = repo.gc_log()
        if as_json:
            out.emit_json(entries)
            return
        for e in entries:
            extra = f"{e.get('objects', '')} objects" if "objects" in e else out.human_bytes(e.get("bytes"))
            out.echo(f"{out.fmt_time(e['time'])}  {e['action']:<8} {e['proof'][:7]}  {e['user']}  {extra}")


@gc.command("unlock")
@click.option("--remote", "remote", metavar="NAME", required=True, help="The remote whose locks to list or remove.")
@click.argument("keys", nargs=-1, metavar="[LOCK_KEY]...")
@click.option("--older-than", type=float, default=24.0, show_default=True,
              help="Remove locks older than this many hours (a lock this old is stale: its holder died).")
@click.option("--force", is_flag=True, help="Also remove fresh locks: only if you know their holder is dead.")
@click.option("--list", "list_only", is_flag=True, help="Only list the remote's locks; remove nothing.")
@json_option
@click.pass_context
def gc_unlock(ctx, remote, keys, older_than, force, list_only, as_json) -> None:
    """Remove locks a killed push or remote gc left on remote NAME (locks/push/*, locks/gc/*).

    A push holds a lock from before it reads what the remote has until its refs moved; a remote
    gc apply, undo or purge holds one while it deletes. Each removes its own when it ends; a
    killed process leaves it behind, and it blocks the other kind for 24 h, after which it is
    stale and ignored. Without --force only locks older than --older-than and older than the
    24 h stale age are removed (--older-than can only raise the bar), and a named fresher lock
    is refused.
    """
    from ..remote_lock import STALE_AFTER

    with state(ctx).repo() as repo:
        g = repo.remote_gc(remote)
        locks = g.locks() if list_only else g.unlock(list(keys) or None, older_than=older_than * 3600, force=force)
        if as_json:
            out.emit_json([lk.to_dict() for lk in locks])
            return
        verb = "" if list_only else "removed "
        if not locks:
            bar = older_than if force else max(older_than, STALE_AFTER / 3600)
            out.echo("no locks" if list_only else f"no lock older than {bar:g} h (use --force for fresh ones)")
        for lk in locks:
            out.echo(f"{verb}{lk.key}  {lk.describe()}")


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
