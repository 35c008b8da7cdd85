"""``mstore run``: mount a job's inputs, run it, and commit its output with lineage.

:func:`execute` is the whole job with its collaborators passed in (a mount function, a commit
function, the environment): it mounts every input read-only under a temporary directory,
substitutes ``{NAME}`` in the command with the input's mount point, adds
``MSTORE_INPUT_<NAME>`` to the job's environment, runs the command, releases the mounts
whatever happened, and commits the output only if the job exited 0 (or the caller asked to
commit failures too). The commit records the inputs by commit id and, under
``provenance.run``, the command, exit code and wall time; :mod:`mstore.provenance` adds the
code revision and runtime facts as on every commit.

:func:`run_job` is the facade's glue (``Repo.run``): it binds those collaborators to a repo.

This module never reads the process environment: the caller passes the job's environment in.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import PathNotFound, UserError
from .mount import mount_commit

INPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
ENV_PREFIX = "MSTORE_INPUT_"

# What a mount function returns (a context manager whose value has these attributes).
MountFn = Callable[[str, Path], AbstractContextManager[Any]]
CommitFn = Callable[..., Any]


@dataclass(frozen=True)
class RunInput:
    """One mounted input of a job."""

    name: str
    rev: str
    id: str
    mountpoint: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "rev": self.rev, "id": self.id, "mountpoint": self.mountpoint}


@dataclass
class RunResult:
    """What :func:`execute` did."""

    command: list[str]
    exit_code: int
    wall_seconds: float
    inputs: dict[str, RunInput] = field(default_factory=dict)
    output: str = ""
    commit: Any = None  # the commit's result (``CommitResult``), or None if nothing was committed

    @property
    def committed(self) -> bool:
        return self.commit is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        c = self.commit
        return {
            "command": self.command,
            "exit_code": self.exit_code,
            "wall_seconds": self.wall_seconds,
            "inputs": {n: i.to_dict() for n, i in self.inputs.items()},
            "output": self.output,
            "commit": None if c is None else str(c.id),
            "branch": None if c is None else c.branch,
        }


def check_inputs(inputs: Sequence[tuple[str, str]] | Mapping[str, str]) -> list[tuple[str, str]]:
    """Validate ``(NAME, REV)`` pairs: names are identifiers, unique ignoring case.

    Raises:
        UserError: a bad or repeated name, or an empty revision.
    """
    pairs = list(inputs.items()) if isinstance(inputs, Mapping) else list(inputs)
    seen: set[str] = set()
    for name, rev in pairs:
        if not INPUT_NAME.match(name):
            raise UserError(f"input name {name!r}: use letters, digits and _ (it becomes {{{name}}} and an env var)")
        if name.upper() in seen:
            raise UserError(f"input {name!r} is given twice")
        if not rev:
            raise UserError(f"input {name!r} names no revision")
        seen.add(name.upper())
    return pairs


def substitute(argv: Sequence[str], paths: Mapping[str, str]) -> list[str]:
    """Replace ``{NAME}`` of every input in each argument; other braces are left alone."""

    def one(m: re.Match) -> str:
        return paths.get(m.group(1), m.group(0))

    return [PLACEHOLDER.sub(one, a) for a in argv]


def input_env(paths: Mapping[str, str]) -> dict[str, str]:
    """``MSTORE_INPUT_<NAME>`` → mount point, for every input."""
    return {f"{ENV_PREFIX}{name.upper()}": p for name, p in paths.items()}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _wait(proc: subprocess.Popen) -> int:
    """Wait for the job; SIGTERM and SIGHUP sent to us are passed on to it.

    SIGINT is ignored here while the job runs: from a terminal, Ctrl-C reaches the job directly
    (it is in our process group), and the job decides how to stop. Mounts are released after it
    exits either way.
    """
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()

    def forward(signum: int, _frame: Any) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def execute(
    argv: Sequence[str],
    *,
    inputs: Sequence[tuple[str, str]] | Mapping[str, str],
    output: str | os.PathLike,
    mount: MountFn,
    commit: CommitFn,
    env: Mapping[str, str],
    cwd: str | os.PathLike,
    mount_root: str | os.PathLike | None = None,
    commit_on_failure: bool = False,
    on_mounted: Callable[[RunInput], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> RunResult:
    """Mount the inputs, run ``argv``, release the mounts, and commit ``output`` if it succeeded.

    Args:
        argv: the command; ``{NAME}`` in any argument becomes input NAME's mount point.
        inputs: ``(NAME, REV)`` pairs (or a mapping), mounted in order.
        output: the path the job writes (relative to ``cwd``).
        mount: ``mount(rev, mountpoint)`` returning a context manager whose value has ``commit``
            (the commit id) and ``mountpoint``; it unmounts on exit.
        commit: ``commit(path, inputs=..., provenance=..., cwd=...)`` returning the commit's
            result.
        env: the job's environment (``MSTORE_INPUT_<NAME>`` are added).
        cwd: the job's working directory; also where the code revision is read.
        mount_root: where the mount points are created (default: a new temporary directory).
        commit_on_failure: commit the output even if the job exits non-zero.
        on_mounted: called after each input is mounted.
        clock: wall-clock time source (for the provenance timestamps).

    Raises:
        UserError: bad input names or an empty command; the command cannot be started.
        PathNotFound: the job succeeded but left no ``output``.
        (and whatever ``mount`` or ``commit`` raise; the mounts are released first.)
    """
    if not argv:
        raise UserError("no command to run")
    pairs = check_inputs(inputs)
    cwd = Path(cwd)
    out_path = Path(output) if Path(output).is_absolute() else cwd / output
    made_root = mount_root is None
    root = Path(tempfile.mkdtemp(prefix="mstore-run-")) if made_root else Path(mount_root)
    root.mkdir(parents=True, exist_ok=True)
    mounted: dict[str, RunInput] = {}
    try:
        with ExitStack() as stack:
            for name, rev in pairs:
                mp = root / name
                m = stack.enter_context(mount(rev, mp))
                mounted[name] = RunInput(name, rev, str(m.commit), str(m.mountpoint))
                if on_mounted is not None:
                    on_mounted(mounted[name])
            paths = {n: i.mountpoint for n, i in mounted.items()}
            command = substitute(argv, paths)
            job_env = {**env, **input_env(paths)}
            started, t0 = clock(), time.monotonic()
            try:
                proc = subprocess.Popen(command, env=job_env, cwd=cwd)
            except OSError as exc:
                raise UserError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
            code = _wait(proc)
            wall = time.monotonic() - t0
    finally:
        for name in mounted:
            try:
                os.rmdir(root / name)  # empty once unmounted; never removes anything else
            except OSError:
                pass
        if made_root:
            try:
                os.rmdir(root)
            except OSError:
                pass
    result = RunResult(command, code, round(wall, 3), mounted, str(output))
    if code != 0 and not commit_on_failure:
        return result
    if not out_path.exists():
        raise PathNotFound(f"the job exited {code} but left no {output}; nothing was committed")
    provenance = {
        "run": {
            "command": list(argv),
            "resolved_command": command,
            "exit_code": code,
            "wall_seconds": round(wall, 3),
            "started": _iso(started),
            "finished": _iso(started + wall),
            "inputs": {n: {"rev": i.rev, "id": i.id} for n, i in mounted.items()},
            "output": str(output),
            "env": sorted(input_env(paths)),
        }
    }
    result.commit = commit(
        out_path,
        inputs={n: i.id for n, i in mounted.items()},
        provenance=provenance,
        cwd=cwd,
    )
    return result


def run_job(
    repo: Any,
    argv: Sequence[str],
    *,
    inputs: Sequence[tuple[str, str]] | Mapping[str, str],
    output: str | os.PathLike,
    branch: str,
    message: str,
    env: Mapping[str, str],
    cwd: str | os.PathLike | None = None,
    kind: str = "other",
    meta: dict[str, Any] | None = None,
    commit_on_failure: bool = False,
    allow_regression: bool = False,
    mount_options: dict[str, Any] | None = None,
    mstore_argv: list[str] | None = None,
    on_mounted: Callable[[RunInput], None] | None = None,
) -> RunResult:
    """``Repo.run``: :func:`execute` with mounts and commits of ``repo``.

    Each input is mounted by a child process tied to this one (it unmounts itself should this
    process die). ``env`` is the job's environment (the CLI passes its own); ``mstore_argv`` is
    the command line recorded as the commit's ``provenance.command`` (default: the job's).
    """
    opts = dict(mount_options or {})
    opts.setdefault("owner_pid", os.getpid())
    cwd = Path(cwd) if cwd is not None else Path.cwd()

    def mount(rev: str, mp: Path) -> AbstractContextManager[Any]:
        return mount_commit(repo, rev, mp, **opts)

    def commit(path: Path, **kw: Any) -> Any:
        return repo.commit(
            path,
            branch,
            message,
            kind=kind,
            meta=meta,
            allow_regression=allow_regression,
            argv=mstore_argv or list(argv),
            **kw,
        )

    # Resolve every input before anything is mounted or run: a typo fails fast.
    pairs = check_inputs(inputs)
    for _name, rev in pairs:
        repo.resolve(rev)
    return execute(
        argv,
        inputs=pairs,
        output=output,
        mount=mount,
        commit=commit,
        env=env,
        cwd=cwd,
        commit_on_failure=commit_on_failure,
        on_mounted=on_mounted,
        clock=repo.clock,
    )


__all__ = ["RunInput", "RunResult", "execute", "input_env", "run_job", "substitute"]
