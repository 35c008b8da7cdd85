"""remote, push, fetch, pull, clone: sharing versions through S3 or a second directory."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import click

from . import _output as out
from ._common import json_option, state


@contextmanager
def _transfer_bar(label: str, quiet: bool):
    """A progress bar in bytes with the transfer rate; silent when stderr is not a terminal."""
    holder: dict = {}
    start = time.monotonic()

    def on_total(total: int) -> None:
        if quiet or not sys.stderr.isatty() or total <= 0:
            return
        done = {"n": 0}

        def show(_item):
            secs = max(time.monotonic() - start, 1e-6)
            return f"{out.human_bytes(done['n'])} at {out.human_bytes(done['n'] / secs)}/s"

        bar = click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True, width=30,
                                item_show_func=show)
        bar.__enter__()
        holder["bar"], holder["done"] = bar, done

    def update(n: int) -> None:
        bar = holder.get("bar")
        if bar is not None:
            holder["done"]["n"] += n
            bar.update(n, current_item=n)

    try:
        yield on_total, update
    finally:
        if "bar" in holder:
            holder["bar"].__exit__(None, None, None)


def _summary(verb: str, remote: str, result) -> None:
    for r in result.refs:
        arrow = f"{r.old.short if r.old else '(new)'} -> {r.new.short if r.new else '(none)'}"
        out.echo(f"{r.status:<10} {r.local} -> {r.remote}  {arrow}{'  ' + r.reason if r.reason else ''}")
    rate = result.bytes / result.seconds if result.seconds > 0 else 0
    out.echo(
        f"{verb} {out.plural(result.objects, 'object')} in {out.plural(result.packs, 'pack') if result.packs else ''}"
        f"{' ' if result.packs else ''}({out.human_bytes(result.bytes)} on the wire, "
        f"{out.human_bytes(result.raw_bytes)} of data) in {result.seconds:.1f} s"
        + (f", {out.human_bytes(rate)}/s" if result.bytes else "")
    )


@click.group()
def remote() -> None:
    """Configure remotes: S3 buckets (s3://BUCKET/PREFIX) or directories (file:///PATH).

    \b
    mstore remote add origin s3://ml-artifacts/team-a --endpoint-url http://127.0.0.1:8333
    mstore remote add backup file:///mnt/other-disk/mstore
    mstore remote list
    mstore remote show origin          # the remote's branches and tags
    mstore remote log origin exp1      # the remote's own reflog of a branch

    Credentials for S3 come from the standard AWS chain (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY, AWS_PROFILE or --profile, instance roles); they are never stored in
    config.toml and never printed.
    """


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--endpoint-url", help="S3 endpoint (MinIO, Ceph, SeaweedFS); path-style addressing.")
@click.option("--region", help="S3 region.")
@click.option("--profile", help="AWS profile whose credentials to use.")
@click.pass_context
def remote_add(ctx, name, url, endpoint_url, region, profile) -> None:
    """Add remote NAME at URL (s3://BUCKET/PREFIX, file:///PATH)."""
    with state(ctx).repo() as repo:
        repo.remote_add(name, url, endpoint_url=endpoint_url, region=region, profile=profile)
        out.echo(f"added remote {name} -> {url}")


@remote.command("remove")
@click.argument("name")
@click.pass_context
def remote_remove(ctx, name) -> None:
    """Forget remote NAME and its tracking refs (NAME/*); the remote itself is untouched."""
    with state(ctx).repo() as repo:
        n = repo.remote_remove(name)
        out.echo(f"removed remote {name} ({out.plural(n, 'tracking ref')})")


@remote.command("list")
@json_option
@click.pass_context
def remote_list(ctx, as_json) -> None:
    """List configured remotes."""
    with state(ctx).repo() as repo:
        remotes = repo.remotes()
        if as_json:
            out.emit_json(remotes)
            return
        out.table([[n, s["url"], s.get("endpoint_url", "")] for n, s in remotes.items()])


@remote.command("show")
@click.argument("name")
@json_option
@click.pass_context
def remote_show(ctx, name, as_json) -> None:
    """The branches and tags on remote NAME as they are now."""
    with state(ctx).repo() as repo:
        refs = repo.remote_refs(name)
        if as_json:
            out.emit_json(refs)
            return
        out.table([[r["ref"], r["id"][:12], r["seq"], r["user"], out.fmt_time(r["time"])] for r in refs],
                  ["ref", "id", "changes", "by", "last moved"])


@remote.command("log")
@click.argument("name")
@click.argument("ref")
@json_option
@click.pass_context
def remote_log(ctx, name, ref, as_json) -> None:
    """Every change of REF on remote NAME (the remote's reflog), oldest first."""
    with state(ctx).repo() as repo:
        entries = repo.remote_reflog(name, ref)
        if as_json:
            out.emit_json(entries)
            return
        for e in entries:
            old = (e["old"] or "(new)")[:12]
            out.echo(f"#{e['seq']:<4} {out.fmt_time(e['time'])}  {old} -> {(e['id'] or '(deleted)')[:12]}  "
                     f"{e['user']}: {e['message']}")


@click.command()
@click.argument("name")
@click.argument("refs", nargs=-1)
@click.option("--all", "all_branches", is_flag=True, help="Push every branch.")
@click.option("--tags", is_flag=True, help="Push every tag.")
@click.option("-f", "--force", is_flag=True,
              help="Move remote branches even if not a fast-forward; with --delete, also delete tags, branches "
                   "moved since you last fetched them and branches you never fetched (logged remotely).")
@click.option("-d", "--delete", is_flag=True, help="Delete the remote branches REFS (logged in the remote reflog).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@json_option
@click.pass_context
def push(ctx, name, refs, all_branches, tags, force, delete, quiet, as_json) -> None:
    """Send branches or tags (REF or LOCAL:REMOTE) to remote NAME; or delete remote branches.

    Only objects the remote lacks are sent, in packs (multipart uploads for big ones); an
    interrupted push resumes where it stopped. Remote refs then move by compare-and-swap: if
    someone else pushed first, or the remote branch is not an ancestor of yours, the push is
    rejected (exit 4) and nothing is lost: fetch, build on the new head, push again.

    \b
    mstore push origin --delete exp1     # delete the remote branch exp1 (and origin/exp1)

    A deletion is a compare-and-swap too, logged in the remote's reflog (`mstore remote log
    origin exp1` shows it; a later push re-creates the branch). It is rejected (exit 4) if
    someone pushed to the branch since you last fetched it, or if you never fetched it, unless
    --force; remote tags are deleted only with --force. Every ref named is checked before any
    is deleted. A ref the remote does not have is an error (exit 3).
    """
    from ..errors import PushRejected

    with state(ctx).repo() as repo, _transfer_bar("pushing", quiet or as_json) as (on_total, update):
        try:
            result = repo.push(name, list(refs), all_branches=all_branches, tags=tags, force=force,
                               progress=update, on_total=on_total, delete=delete)
        except PushRejected as exc:
            if as_json and hasattr(exc, "result"):
                out.emit_json(exc.result.to_dict())
            raise
    if as_json:
        out.emit_json(result.to_dict())
    elif delete:
        for r in result.refs:
            out.echo(f"deleted    {name}/{r.remote}  (was {r.old.short})")
    else:
        _summary("sent", name, result)


@click.command()
@click.argument("name")
@click.argument("refs", nargs=-1)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@json_option
@click.pass_context
def fetch(ctx, name, refs, quiet, as_json) -> None:
    """Receive branches (all, or REFS) and tags from remote NAME into NAME/BRANCH refs.

    Every object is verified against its id before it is indexed; a remote serving wrong,
    truncated or hostile data gets an error (exit 5) and no ref moves. Local branches do not
    move: use pull, or `mstore log NAME/BRANCH` to look first.
    """
    with state(ctx).repo() as repo, _transfer_bar("fetching", quiet or as_json) as (on_total, update):
        result = repo.fetch(name, list(refs), progress=update, on_total=on_total)
    if as_json:
        out.emit_json(result.to_dict())
    else:
        _summary("received", name, result)


@click.command()
@click.argument("name")
@click.argument("branch")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@json_option
@click.pass_context
def pull(ctx, name, branch, quiet, as_json) -> None:
    """Fetch BRANCH from remote NAME and fast-forward the local BRANCH to it.

    A local branch with commits the remote lacks is never moved (exit 4): push them elsewhere
    or compare with `mstore diff BRANCH NAME/BRANCH`.
    """
    with state(ctx).repo() as repo, _transfer_bar("fetching", quiet or as_json) as (on_total, update):
        result, change = repo.pull(name, branch, progress=update, on_total=on_total)
    if as_json:
        out.emit_json({"fetch": result.to_dict(), "branch": change.to_dict()})
        return
    _summary("received", name, result)
    if change.old == change.new:
        out.echo(f"{branch} is up to date with {name}/{branch}")
    else:
        out.echo(f"{branch}: {change.old.short if change.old else '(new)'} -> {change.new.short}")


@click.command()
@click.argument("url")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--origin", "name", default="origin", show_default=True, help="Name for the remote.")
@click.option("--endpoint-url", help="S3 endpoint (MinIO, Ceph, SeaweedFS).")
@click.option("--region", help="S3 region.")
@click.option("--profile", help="AWS profile.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@json_option
def clone(url, directory, name, endpoint_url, region, profile, quiet, as_json) -> None:
    """Create a repository in DIRECTORY (the store directory itself) from the remote at URL.

    Every branch and tag is fetched and verified; each remote branch becomes a local branch
    too. The new store cuts files as the store that made the remote did (its chunking
    settings, recorded on the remote), so later versions share pieces with the history. If
    anything fails the new directory is removed.
    """
    from .. import Repo

    with _transfer_bar("cloning", quiet or as_json) as (on_total, update):
        repo = Repo.clone(url, directory, name=name, endpoint_url=endpoint_url, region=region, profile=profile,
                          progress=update, on_total=on_total)
    with repo:
        branches = [b.name for b in repo.branches()]
        if as_json:
            out.emit_json({"store": str(repo.root), "remote": name, "url": url, "branches": branches})
        else:
            word = "branch" if len(branches) == 1 else "branches"
            out.echo(f"cloned {url} into {repo.root}: {len(branches)} {word}"
                     f"{' (' + ', '.join(branches[:10]) + ')' if branches else ''}")
