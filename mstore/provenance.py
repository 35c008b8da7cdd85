"""What produced a commit, captured automatically on every commit.

Code revision, command line, user, host and runtime (incidents 4 and 5: "nobody could say
which code, data and settings produced an artifact").

This module never reads configuration from environment variables; callers pass the working
directory and command line explicitly. Package versions come from installed metadata
(``importlib.metadata``), so recording the torch version never imports torch.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

# Recorded when installed; looked up by distribution name, never imported.
TRACKED_PACKAGES = ("torch", "transformers", "peft", "safetensors", "numpy", "accelerate", "datasets")


def mstore_version() -> str:
    """The installed mstore version."""
    return installed_versions(("mstore",)).get("mstore", "0+unknown")


def _normalize(name: str) -> str:
    return name.replace("-", "_").replace(".", "_").lower()


def _egg_version(path: str) -> str | None:
    """The ``Version:`` header of an ``.egg-info`` (a directory with PKG-INFO, or the file itself).

    An editable install of mstore is one: importing importlib.metadata and its e-mail parser
    just to read this header cost 30 ms of every commit.
    """
    info = os.path.join(path, "PKG-INFO") if os.path.isdir(path) else path
    try:
        with open(info, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the headers
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() == "version" and value.strip():
                    return value.strip()
    except OSError:
        return None
    return None


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Versions of the installed distributions among ``names``, as importlib would find them.

    A wheel-installed distribution's directory is named ``{name}-{version}.dist-info``, so its
    version is read from the directory name: ``importlib.metadata.version`` parses the whole
    METADATA file with the e-mail parser, which cost ~5 ms per package (40 ms of a 90 ms
    commit). The first ``sys.path`` entry that has the package wins, as for an import; a
    package found only as an ``.egg-info`` has the ``Version:`` header of its PKG-INFO read,
    and only if that fails is importlib.metadata asked.
    """
    wanted = {_normalize(n): n for n in names}
    out: dict[str, str] = {}
    eggs: dict[str, str] = {}  # name -> path of its .egg-info
    for entry in sys.path:
        try:
            it = os.scandir(entry or ".")
        except OSError:
            continue
        with it:
            for d in it:
                stem, dot, suffix = d.name.rpartition(".")
                if suffix not in ("dist-info", "egg-info") or not dot:
                    continue
                dist, _, version = stem.partition("-")
                name = wanted.get(_normalize(dist))
                if name is None or name in out or name in eggs:
                    continue  # an earlier path entry decided it, as for an import
                if suffix == "dist-info" and version:
                    out[name] = version
                else:
                    eggs[name] = d.path
    for name, path in list(eggs.items()):
        version = _egg_version(path)
        if version is not None:
            out[name] = version
            del eggs[name]
    if eggs:
        from importlib import metadata  # ~15 ms to import: only for egg-info that did not parse

        for name in eggs:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
    return {n: out[n] for n in names if n in out}


def current_user() -> str:
    """The user name, from the password database (no environment lookup)."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):  # pragma: no cover - exotic systems
        import getpass

        return getpass.getuser()


def git_revision(cwd: Path) -> dict[str, Any] | None:
    """The git commit and dirty flag of the repository containing ``cwd``, if any."""
    import subprocess  # here, on the capture thread (see Capture), not before a commit's work

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    if rev is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    info: dict[str, Any] = {"commit": rev, "dirty": bool(status)}
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        info["branch"] = branch
    return info


def package_versions() -> dict[str, str]:
    """Versions of the ML packages that are installed (none are imported)."""
    return installed_versions(TRACKED_PACKAGES)


def platform_name() -> str:
    """The OS, its release and the machine, e.g. ``Linux-6.1.0-x86_64-with-glibc2.36``.

    On Linux with glibc it is built from ``os.uname()`` and glibc's own version string:
    ``platform.platform(terse=True)`` says the same where ``uname -p`` prints nothing useful,
    but it runs ``uname -p`` in a subprocess and scans the interpreter's binary for the glibc
    version, 8 ms of every commit. Elsewhere (macOS, musl, Windows) it is that function's answer.
    """
    if not sys.platform.startswith("linux"):
        return platform.platform(terse=True)
    u = os.uname()
    name = f"{u.sysname}-{u.release}-{u.machine}"
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (ValueError, OSError):
        libc = None
    if not libc:
        return platform.platform(terse=True)  # not glibc (musl): let platform find out
    return f"{name}-with-{libc.replace(' ', '')}"


def host_name() -> str:
    """This machine's host name: ``uname``'s node name (what ``gethostname`` returns), else socket's."""
    try:
        return os.uname().nodename
    except AttributeError:  # pragma: no cover - Windows
        import socket

        return socket.gethostname()


def capture(cwd: Path, argv: list[str] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance record of a commit made now, from ``cwd`` with command line ``argv``.

    ``extra`` (for example the trainer's CUDA and GPU facts) is merged in last.
    """
    prov: dict[str, Any] = {
        "command": list(argv) if argv is not None else list(sys.argv),
        "cwd": str(cwd),
        "user": current_user(),
        "host": host_name(),
        "python": platform.python_version(),
        "platform": platform_name(),
        "mstore": mstore_version(),
        "packages": package_versions(),
    }
    code = git_revision(cwd)
    if code is not None:
        prov["code"] = code
    if extra:
        prov.update(extra)
    return prov


class Capture:
    """:func:`capture` run on a thread, so a commit ingests its files meanwhile.

    The git calls are subprocesses (~15 ms from a process that has loaded numpy); waiting for
    them need not hold up hashing and encoding. :meth:`result` joins the thread and re-raises
    anything it raised.
    """

    def __init__(self, cwd: Path, argv: list[str] | None, extra: dict[str, Any] | None = None):
        import threading

        self._out: dict[str, Any] | None = None
        self._exc: BaseException | None = None
        argv = list(argv) if argv is not None else list(sys.argv)  # now, not when the thread runs
        self._thread = threading.Thread(
            target=self._run, args=(cwd, argv, extra), name="mstore-provenance", daemon=True
        )
        self._thread.start()

    def _run(self, cwd: Path, argv: list[str], extra: dict[str, Any] | None) -> None:
        try:
            self._out = capture(cwd, argv, extra)
        except BaseException as exc:  # handed to the caller by result()
            self._exc = exc

    def result(self) -> dict[str, Any]:
        """The provenance record (waits for the thread)."""
        self._thread.join()
        if self._exc is not None:
            raise self._exc
        assert self._out is not None
        return self._out

