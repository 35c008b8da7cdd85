"""mount, umount, mounts, run: versions as read-only file systems, and jobs with lineage."""

from __future__ import annotations

import logging
import os
import re
import sys

import click

from ..errors import UserError
from . import _output as out
from ._common import json_option, parse_meta, state

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``256M`` / ``1G`` / ``64MiB`` / ``1048576`` → bytes (K, M, G, T are powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"not a size: {text!r} (use e.g. 256M, 1G)")
    scale = 1024 ** "bkmgt".index((m.group(2) or "b").lower())
    return int(float(m.group(1)) * scale)


def _log_to_stderr() -> None:
    """Log damaged reads and unmounts of a foreground mount on stderr.

    A background mount's stderr is its log file under <store>/mounts/.
    """
    logger = logging.getLogger("mstore.mount")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s mstore mount[%(process)d] %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


_cache_option = click.option(
    "--cache-size",
    default="256M",
    show_default=True,
    metavar="SIZE",
    help="Memory for decoded chunks; a mount process stays within its idle size plus this plus about 80 MiB.",
)
_readahead_option = click.option(
    "--readahead",
    default="32M",
    show_default=True,
    metavar="SIZE",
    help="How far ahead of a sequential reader chunks are decoded (at most half the cache).",
)


@click.command()
@click.argument("rev", metavar="REV")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("-f", "--foreground", is_flag=True, help="Serve from this process until unmounted (Ctrl-C unmounts).")
@_cache_option
@_readahead_option
@click.option(
    "--allow-other", is_flag=True, help="Let other users read the mount (needs user_allow_other in /etc/fuse.conf)."
)
@click.option(
    "--remote",
    metavar="NAME",
    help="Read REV (a branch, tag or commit id) from remote NAME, lazily; REMOTE/BRANCH does the same.",
)
@click.option(
    "--keep-chunks",
    is_flag=True,
    help="Remote mounts: also keep the chunks read in the local store (no ref moves).",
)
@click.option("--ready-fd", type=int, hidden=True)
@click.option("--exit-with", type=int, hidden=True)
@click.option("--label", hidden=True)
@json_option
@click.pass_context
def mount(
    ctx,
    rev,
    directory,
    foreground,
    cache_size,
    readahead,
    allow_other,
    remote,
    keep_chunks,
    ready_fd,
    exit_with,
    label,
    as_json,
):
    """Mount version REV read-only at DIRECTORY (created if missing; must be empty).

    Files are read lazily from the store, chunk by chunk, and every chunk is verified against
    its id before a byte of it is returned; a damaged chunk makes that read fail with EIO (and
    is logged with the file and offset) while the rest stays readable. Directories, sizes and
    modes are the commit's; every mtime is the commit time. The mount holds a gc lease on the
    commit while it is mounted.

    REMOTE/BRANCH (or a tag), or --remote NAME REV, mounts from a configured remote without
    fetching: the remote ref is read once (the mount keeps serving that commit), the commit's
    trees and manifests are read and verified up front, and each chunk is downloaded, verified,
    the first time it is read; chunks the store already has are read locally. A local branch
    or tag named like REMOTE/BRANCH wins; refs/remotes/REMOTE/BRANCH mounts the fetched copy.

    Returns once the mount answers; `mstore umount DIRECTORY` unmounts, `mstore mounts` lists
    mounts. With --foreground it serves until unmounted, SIGTERM or Ctrl-C.
    """
    from ..remote_mount import mount_remote, remote_target

    options = dict(
        cache_bytes=parse_size(cache_size),
        readahead_bytes=parse_size(readahead),
        allow_other=allow_other,
    )
    with state(ctx).repo() as repo:
        target = remote_target(repo, rev, remote)
        if target is None:
            if keep_chunks:
                raise UserError("--keep-chunks is for mounts from a remote (REMOTE/BRANCH or --remote NAME)")

            def do_mount(**kw):
                return repo.mount(rev, directory, **kw)

            where = ""
        else:

            def do_mount(**kw):
                return mount_remote(repo, target[0], target[1], directory, keep=keep_chunks, **kw)

            where = f", from remote {target[0]}"
        if not foreground:
            m = do_mount(detach=True, **options)
            if as_json:
                out.emit_json(m.info.to_dict())
            else:
                out.echo(
                    f"mounted {m.info.rev} ({m.commit[:7]}{where}) at {m.mountpoint} (pid {m.pid}); "
                    f"unmount with: mstore umount {m.mountpoint}"
                )
            return
        _log_to_stderr()

        def ready(info) -> None:
            if ready_fd is None:
                out.echo(f"mounted {info.rev} ({info.commit[:7]}{where}) at {info.mountpoint}; Ctrl-C to unmount")

        m = do_mount(
            foreground=True,
            ready_fd=ready_fd,
            owner_pid=exit_with,
            label=label,
            on_ready=ready,
            **options,
        )
        if ready_fd is None:
            out.echo(f"unmounted {m.mountpoint}")


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("-z", "--lazy", is_flag=True, help="Detach now even if busy; the mount ends when the last file closes.")
@click.pass_context
def umount(ctx, directory, lazy) -> None:
    """Unmount an mstore mount (also a dead one whose process was killed)."""
    with state(ctx).repo() as repo:
        info = repo.umount(directory, lazy=lazy)
        what = f"{info.rev} ({info.commit[:7]})" if info else "a mount"
        out.echo(f"unmounted {what} from {os.path.abspath(directory)}")


@click.command()
@json_option
@click.pass_context
def mounts(ctx, as_json) -> None:
    """What is mounted where, from which commit, by which process.

    A mount whose process was killed is shown as DEAD until `mstore umount DIR` clears it; an
    entry whose process and mount are both gone is removed (and shown this once).
    """
    with state(ctx).repo() as repo:
        infos = repo.mounts()
        if as_json:
            out.emit_json([i.to_dict() for i in infos])
            return
        rows = []
        for i in infos:
            if i.alive:
                status = "mounted" if i.mounted else "detached: ends when its last open file is closed"
            elif i.mounted:
                status = f"DEAD: run mstore umount {i.mountpoint}"
            else:
                status = "gone (entry removed)"
            source = f"remote {i.remote}" if i.remote else "store"
            rows.append((i.mountpoint, i.rev, i.commit[:7], source, i.pid, out.ago(i.started), status))
        if rows:
            out.table(rows, ("mount point", "rev", "commit", "reads from", "pid", "since", "status"))
        else:
            out.echo("nothing mounted")


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "-i",
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=REV",
    help="Mount REV for the job (repeatable); {NAME} in the command and $MSTORE_INPUT_<NAME> give its path.",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="What the job writes; committed if it succeeds.")
@click.option("-b", "--branch", required=True, help="Branch to commit the output to.")
@click.option("-m", "--message", required=True, help="What this run is.")
@click.option(
    "--kind",
    default="other",
    show_default=True,
    type=click.Choice(["model", "dataset", "checkpoint", "adapter", "eval", "other"]),
    help="What kind of artifact the output is.",
)
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Metadata to record (repeatable).")
@click.option("--commit-on-failure", is_flag=True, help="Commit the output even if the job exits non-zero.")
@click.option("--allow-regression", is_flag=True, help="Commit even if a guard finds a regression (recorded).")
@_cache_option
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(
    ctx, inputs, output, branch, message, kind, meta, commit_on_failure, allow_regression, cache_size, as_json, command
) -> None:
    """Run COMMAND with its inputs mounted, and commit its output with lineage.

    \b
    mstore run --input base=models/base --input data=data/syllo --output out/
        -b runs/job7 -m "sweep lr=3e-4" -- python train.py --model '{base}' --data '{data}'

    Each --input is mounted read-only (lazy and verified, like `mstore mount`) for the job's
    lifetime. If COMMAND exits 0, --output is committed to BRANCH with provenance: the inputs
    by commit id, the command line, exit code, wall time, code revision and environment. A
    failed job commits nothing (unless --commit-on-failure) and exits with the job's status;
    the mounts are always released.
    """  # noqa: D301 - \b keeps click from rewrapping the example
    parsed = []
    for item in inputs:
        name, sep, rev = item.partition("=")
        if not sep or not name or not rev:
            raise click.UsageError(f"--input wants NAME=REV, got {item!r}")
        parsed.append((name, rev))
    meta_d = parse_meta(meta)
    with state(ctx).repo() as repo:

        def mounted(inp) -> None:
            if not as_json:
                out.echo(f"mounted {inp.name} ({inp.id[:7]}) at {inp.mountpoint}", err=True)

        res = repo.run(
            list(command),
            inputs=parsed,
            output=output,
            branch=branch,
            message=message,
            kind=kind,
            meta=meta_d,
            env=dict(os.environ),
            cwd=os.getcwd(),
            commit_on_failure=commit_on_failure,
            allow_regression=allow_regression,
            mount_options={"cache_bytes": parse_size(cache_size)},
            mstore_argv=["mstore", *sys.argv[1:]],
            on_mounted=mounted,
        )
        if as_json:
            out.emit_json(res.to_dict())
        else:
            ins = ", ".join(f"{i.name} {i.id[:7]}" for i in res.inputs.values()) or "none"
            tail = f"(inputs: {ins}; exit {res.exit_code}; {_duration(res.wall_seconds)})"
            if res.commit is not None:
                out.echo(f"committed {output} as {res.commit.id.short} on {branch} {tail}", err=True)
            else:
                out.echo(f"job exited {res.exit_code}: nothing committed {tail}", err=True)
        if res.exit_code != 0:
            code = res.exit_code if res.exit_code > 0 else 128 - res.exit_code
            sys.exit(min(code, 255))
