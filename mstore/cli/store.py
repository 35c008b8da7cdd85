"""init, commit, checkout, fsck."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import _output as out
from ._common import json_option, parse_meta, path_size, state


@click.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@json_option
@click.pass_context
def init(ctx: click.Context, directory: str | None, as_json: bool) -> None:
    """Create an empty repository in DIRECTORY/.mstore (default: the current directory).

    With --store (or $MSTORE_DIR) the repository is created exactly there instead.
    """
    from .. import Repo
    from ..repo import STORE_DIRNAME

    st = state(ctx)
    target = st.store or os.environ.get("MSTORE_DIR") or str(Path(directory or ".") / STORE_DIRNAME)
    repo = Repo.init(target)
    if as_json:
        out.emit_json({"store": str(repo.root), "format_version": repo.format_version})
    else:
        out.echo(f"initialized empty mstore repository in {repo.root}")
    repo.close()


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("-b", "--branch", required=True, help="Branch to commit to (created if it does not exist).")
@click.option("-m", "--message", required=True, help="What this version is.")
@click.option(
    "--kind",
    default="other",
    show_default=True,
    type=click.Choice(["model", "dataset", "checkpoint", "adapter", "eval", "other"]),
    help="What kind of artifact this is.",
)
@click.option(
    "--meta",
    multiple=True,
    metavar="KEY=VALUE",
    help="Metadata to record (repeatable); numbers stay numbers, e.g. --meta lr=3e-4.",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=REV",
    help="A version this one was made from (repeatable), recorded by id, e.g. --input base=models/base.",
)
@click.option(
    "--allow-regression", is_flag=True, help="Commit even if a guard finds a regression (the override is recorded)."
)
@click.option("--dry-run", is_flag=True, help="Run the guards and say what would be stored; store nothing.")
@json_option
@click.pass_context
def commit(ctx, path, branch, message, kind, meta, inputs, allow_regression, dry_run, as_json) -> None:
    """Snapshot PATH (a file or directory) as a new commit on BRANCH.

    Unchanged tensors and chunks are stored once; provenance (code revision, command line,
    user, host, Python and package versions) is recorded automatically.

    Guards compare the new version with the branch head before anything is stored, and refuse
    (exit status 8) a version that shrinks by more than half, loses tensors or parameters,
    changes a tensor's dtype or shape, loses vocabulary, or worsens a tracked metric in --meta
    (loss: lower is better; acc/score: higher) by more than 10 %. Thresholds live in
    config.toml [guards].
    """
    meta_d = parse_meta(meta)
    with state(ctx).repo() as repo:
        input_ids = {}
        for item in inputs:
            name, sep, rev = item.partition("=")
            if not sep or not name or not rev:
                raise click.UsageError(f"--input wants NAME=REV, got {item!r}")
            input_ids[name] = str(repo.resolve(rev))
        with out.progress(path_size(path), "checking" if dry_run else "committing") as bar:
            res = repo.commit(
                path,
                branch,
                message,
                kind=kind,
                meta=meta_d,
                inputs=input_ids,
                argv=["mstore", *sys.argv[1:]],
                allow_regression=allow_regression,
                dry_run=dry_run,
                progress=bar,
            )
        stats = res.stats
        overridden = [f.to_dict() for f in res.overridden]
        if as_json:
            out.emit_json(
                {
                    "id": res.id,
                    "branch": branch,
                    "parent": res.parent,
                    "stats": stats,
                    "dry_run": dry_run,
                    "new_bytes": res.new_bytes,
                    "stored_bytes": res.stored_bytes,
                    "guards_overridden": overridden,
                }
            )
            return
        for f in res.overridden:
            out.warn(f"regression recorded anyway: {f.what}: {f.detail}")
        extra = f", {stats['tensors']} tensors" if stats.get("tensors") else ""
        if dry_run:
            parent = res.parent.short if res.parent else "a new branch"
            verdict = "guards overridden" if res.overridden else "guards passed"
            out.echo(f"would commit {path} to {branch} (on {parent}); {verdict}")
            out.echo(
                f"  {stats['files']} files, {out.human_bytes(stats['bytes'])}{extra}; "
                f"{out.human_bytes(res.new_bytes)} not yet in the store"
            )
        else:
            out.echo(f"[{branch} {res.id.short}] {message}")
            out.echo(
                f"  {stats['files']} files, {out.human_bytes(stats['bytes'])}{extra}; "
                f"new data {out.human_bytes(res.new_bytes)} stored as {out.human_bytes(res.stored_bytes)}"
            )
        for bad in stats.get("invalid_safetensors", []):
            out.warn(f"stored as plain bytes, not as tensors: {bad}")


@click.command()
@click.argument("rev", metavar="REV[:PATH]")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Write into DEST even if it is not empty (files there may be replaced).")
@json_option
@click.pass_context
def checkout(ctx: click.Context, rev: str, dest: str, force: bool, as_json: bool) -> None:
    """Write the files of REV (or of one path inside it) into DEST.

    Every chunk and every file is verified against its id before it appears under its final
    name; nothing is written outside DEST, and symlinks in DEST are never followed.
    """
    with state(ctx).repo() as repo:
        total = repo.size_of(rev)
        with out.progress(total, "checking out") as bar:
            co = repo.checkout(rev, dest, force=force, progress=bar)
        if as_json:
            out.emit_json(
                {
                    "rev": rev,
                    "id": repo.resolve(rev.partition(":")[0]),
                    "dest": dest,
                    "files": co.files,
                    "bytes": co.bytes,
                }
            )
        else:
            out.echo(
                f"checked out {rev} into {dest}: {out.plural(co.files, 'file')}, "
                f"{out.human_bytes(co.bytes)}, all verified"
            )


@click.command()
@click.option(
    "--repair-from",
    "repair_from",
    metavar="REMOTE",
    help="Replace damaged or missing objects with copies from REMOTE, each verified against its id.",
)
@json_option
@click.pass_context
def fsck(ctx: click.Context, repair_from: str | None, as_json: bool) -> None:
    """Verify every object, index entry, ref and reflog entry.

    Damage is reported with the object, the files it belongs to and the commits (and refs)
    it affects. Exits with status 5 if anything is damaged or missing. With --repair-from,
    damaged objects are replaced by verified copies from a remote and the store is checked again.
    """
    with state(ctx).repo() as repo:
        total = repo.object_bytes() if not as_json else 0
        if repair_from:
            with out.progress(total, "checking") as bar:
                fixed = repo.fsck_repair(repair_from, progress=bar)
            if as_json:
                out.emit_json(fixed)
            else:
                for r in fixed["repaired"]:
                    out.echo(f"REPAIRED {r['kind']} {r['id']} from {repair_from}")
                for r in fixed["failed"]:
                    out.echo(f"NOT REPAIRED {r['kind']} {r['id']}: {r['error']}")
                out.echo("ok" if fixed["ok"] else "store still has damage (run mstore fsck for details)")
            if not fixed["ok"]:
                sys.exit(5)
            return
        with out.progress(total, "checking") as bar:
            report = repo.fsck(progress=bar)
        if as_json:
            out.emit_json(report.to_dict())
        else:
            out.echo(f"checked {report.objects} objects, {out.human_bytes(report.bytes)}")
            for d in report.damaged:
                out.echo(f"DAMAGED {d['kind']} {d['id']}: {d['error']}")
                for f in d["files"]:
                    out.echo(f"  file   {f}")
                for c in d["commits"]:
                    refs = f" ({', '.join(c['refs'])})" if c["refs"] else ""
                    out.echo(f"  commit {c['id'][:7]}{refs}")
            for r in report.refs:
                out.echo(f"BAD REF {r['ref']} -> {r['id']}: {r['problem']}")
            for r in report.reflog:
                out.echo(f"BAD REFLOG #{r['seq']} {r['ref']} {r['field']} {r['id']}: {r['problem']}")
            for p in report.orphan_packs:
                out.echo(
                    f"note: pack {p['pack']} ({out.human_bytes(p['bytes'])}) is not indexed "
                    "(left by a killed writer; harmless, reclaimed by gc)"
                )
            out.echo("ok" if report.ok else "store has damage (see above)")
        if not report.ok:
            sys.exit(5)
