"""The ``mstore`` command line: parse, call one Repo method, render.

This package is the only place that reads the environment (``MSTORE_DIR``), prints, prompts
and exits. Subcommands live in their own modules and are imported only when used, so
``mstore --help`` and ``mstore log`` start fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

# name -> (module, attribute, one-line help shown by `mstore --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "init": ("mstore.cli.store", "init", "Create an empty repository."),
    "commit": ("mstore.cli.store", "commit", "Snapshot a file or directory as a new commit on a branch."),
    "log": ("mstore.cli.inspect", "log", "List the commits of a branch, newest first."),
    "show": ("mstore.cli.inspect", "show", "Show a commit: what it is, where it came from, its provenance."),
    "ls": ("mstore.cli.inspect", "ls", "List the files of a commit, with tensor summaries."),
    "cat": ("mstore.cli.inspect", "cat", "Write one file of a commit to stdout, verified."),
    "checkout": ("mstore.cli.store", "checkout", "Write a version's files into a directory, verifying every byte."),
    "status": ("mstore.cli.inspect", "status", "What committing a path would change, by file and tensor."),
    "diff": ("mstore.cli.inspect", "diff", "Compare two versions by file and tensor."),
    "branch": ("mstore.cli.refs", "branch", "List, create or delete branches."),
    "tag": ("mstore.cli.refs", "tag", "List or create immutable tags."),
    "reflog": ("mstore.cli.refs", "reflog", "Every ref change, deleted refs included."),
    "restore": ("mstore.cli.refs", "restore", "Bring back a deleted or moved branch from the reflog."),
    "branches": ("mstore.cli.refs", "branches", "What is each branch: kind, age, size, base, step, metrics."),
    "fsck": ("mstore.cli.store", "fsck", "Verify every object, ref and reflog entry."),
    "gc": ("mstore.cli.gc", "gc", "Delete unreachable data, only through a reviewable proof."),
    "pin": ("mstore.cli.gc", "pin", "Keep a commit whatever happens to refs; list pins."),
    "mount": ("mstore.cli.mount", "mount", "Mount a version read-only (FUSE, lazy, every chunk verified)."),
    "umount": ("mstore.cli.mount", "umount", "Unmount an mstore mount (also a dead one)."),
    "mounts": ("mstore.cli.mount", "mounts", "What is mounted where, from which commit."),
    "run": ("mstore.cli.mount", "run", "Run a job with its inputs mounted; commit its output with lineage."),
    "import-model": ("mstore.cli.lineage", "import_model", "Commit a local Hugging Face model folder as a model."),
    "import-data": ("mstore.cli.lineage", "import_data", "Commit JSONL files as a dataset, with record counts."),
    "lineage": ("mstore.cli.lineage", "lineage", "What a version was made from: its inputs, back to the roots."),
    "seen": ("mstore.cli.lineage", "seen", "Which records of a dataset were trained on, and by what."),
    "remote": ("mstore.cli.remote", "remote", "Configure remotes: S3 buckets or other directories."),
    "push": ("mstore.cli.remote", "push", "Send branches and tags to a remote (only what it lacks)."),
    "fetch": ("mstore.cli.remote", "fetch", "Receive a remote's branches and tags, verified, into NAME/BRANCH."),
    "pull": ("mstore.cli.remote", "pull", "Fetch a branch and fast-forward the local one to it."),
    "clone": ("mstore.cli.remote", "clone", "Create a repository from a remote."),
}


PLUGIN_GROUP = "mstore.commands"


def _plugins() -> dict[str, object]:
    """Commands other packages contribute (``mstore train`` from the bundled trainer).

    Entry points are read only when a name is not built in, or for the command list, so the
    common commands never pay for scanning installed packages.
    """
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in COMMANDS}


# Plugins shipped with mstore itself, listed by `mstore --help` when their package is installed,
# without scanning every installed distribution's entry points (that costs ~50 ms).
BUNDLED_PLUGINS = {"train": ("trainer", "Fine-tune a model from the store; every checkpoint is a commit.")}


def _bundled() -> dict[str, str]:
    from importlib.util import find_spec

    return {name: help_ for name, (pkg, help_) in BUNDLED_PLUGINS.items() if find_spec(pkg) is not None}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        if _listing_help():
            return sorted([*COMMANDS, *_bundled()])
        return sorted([*COMMANDS, *_plugins()])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        spec = COMMANDS.get(name)
        if spec is None and _listing_help() and name in BUNDLED_PLUGINS:
            help_ = BUNDLED_PLUGINS[name][1]
            return click.Command(name, help=help_, short_help=help_)
        if spec is None:
            ep = _plugins().get(name)
            if ep is None:
                return None
            if ctx.resilient_parsing or _listing_help():
                return click.Command(
                    name,
                    help=f"(plugin from {ep.value.split(':')[0]})",
                    short_help=f"Provided by {ep.value.split('.')[0]}.",
                )
            return ep.load()
        if ctx.resilient_parsing or _listing_help():
            return click.Command(name, help=spec[2], short_help=spec[2])
        if name not in RUNS_USER_PROGRAMS:
            _one_blas_thread()
        module = importlib.import_module(spec[0])
        return getattr(module, spec[1])


# Commands that start the user's own programs: their environment is left as the user set it.
RUNS_USER_PROGRAMS = frozenset({"run"})


def _one_blas_thread() -> None:
    """Have numpy's OpenBLAS, if something imports it, start with one thread.

    On import OpenBLAS starts a thread per core that spins for ~0.1 s of CPU waiting for work
    mstore never gives it (its one BLAS use, the low-rank range finder, runs on one thread
    anyway). On two cores that is a tenth of a second taken from hashing and decoding in every
    commit, checkout or clone that imports numpy. Nothing changes if numpy is already loaded or
    the user chose a thread count.
    """
    if "numpy" in sys.modules:
        return
    if any(v in os.environ for v in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")):
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"


def _listing_help() -> bool:
    args = sys.argv[1:]
    return bool(args) and args[0] in ("--help", "-h")


class State:
    """What every command needs: where the repository is."""

    def __init__(self, store: str | None):
        self.store = store

    def repo(self) -> Any:
        from .. import Repo

        env = dict(os.environ)
        if self.store:
            env["MSTORE_DIR"] = self.store
        return Repo.discover(os.getcwd(), env=env)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "store",
    metavar="DIR",
    default=None,
    help="The repository (store directory). Default: $MSTORE_DIR, else .mstore at or above the cwd.",
)
@click.version_option(package_name="mstore", prog_name="mstore")
@click.pass_context
def cli(ctx: click.Context, store: str | None) -> None:
    """mstore: git for model weights and datasets.

    Every version is immutable and named by its BLAKE3 hash; branches, tags and a reflog keep
    every version reachable; nothing is deleted without a reviewable proof.
    """
    ctx.obj = State(store)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map errors to exit codes.

    As the installed command (``argv`` None) it then leaves through ``os._exit`` once its
    output is flushed: every command has closed its repository and made what it wrote durable
    by then, and tearing the interpreter down (dropping every module and freeing the workers'
    and buffers' memory object by object) cost 30-35 ms of each command, a twentieth of a
    commit's. The kernel frees the memory at exit either way.
    """
    code = _run(argv)
    if argv is not None:
        if code:
            sys.exit(code)
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # `mstore log | head`: the reader went away; not an error
            pass
        except (OSError, ValueError):  # output lost (disk full, a closed stream): say so by the code
            code = code or 120  # what Python exits with when it cannot flush stdout at exit
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    """Run one command; its exit code."""
    from ..errors import MstoreError
    from ._output import echo

    try:
        rc = cli.main(args=argv, prog_name="mstore", standalone_mode=False)
        return rc if isinstance(rc, int) else 0  # ctx.exit(N) returns N in non-standalone mode
    except MstoreError as exc:
        echo(f"error: {exc}", err=True)
        if exc.show_traceback:
            raise
        return exc.exit_code
    except click.exceptions.Abort:
        echo("aborted", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except BrokenPipeError:
        # `mstore log | head`: the reader went away; not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        echo("interrupted", err=True)
        return 130
