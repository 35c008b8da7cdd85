"""Repository layout, format version and ``config.toml``.

A repository is a directory (normally ``.mstore/``)::

    .mstore/
      config.toml        format version and settings (this module)
      packs/             append-only pack files (storage/packs.py)
      index.lmdb/        LMDB environment: objects, packs, refs, reflog, meta (storage/index.py)
      tmp/               scratch space of running commands

Example ``config.toml``::

    [format]
    version = 2

    [chunking]
    cdc_avg_size = 65536
    tensor_max_chunk = 4194304
    matrix_rows = 512

    [packs]
    max_size = 67108864

    [codec]
    zstd_level = 3

    [delta]
    enabled = true
    max_depth = 8

A version newer than :data:`MAX_VERSION`, or one older than :data:`MIN_VERSION`, is refused:
mstore never guesses at a layout it does not know.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from .errors import FormatError, UnsupportedFormat
from .fsutil import atomic_write

# Version 2 added delta chunks (codec 3), float planes (codec 4) and the ``deltas`` index table. Version 3 added
# low-rank deltas (inner codec 5 of a delta). Older stores are read and written as before,
# without what their version lacks (an older mstore would take it for damage).
FORMAT_VERSION = 3
MIN_VERSION = 1
MAX_VERSION = 3
DELTA_MIN_VERSION = 2
FLOATPLANE_MIN_VERSION = 2
LOWRANK_MIN_VERSION = 3


def required_version(codec: int, payload: bytes | memoryview = b"") -> tuple[int, str]:
    """``(oldest format version whose readers decode it, its name)`` of a record's encoding.

    A store must not hold a record its own version predates: an mstore of that version would
    read it as damage. A low-rank delta is told by its payload (the inner codec byte).
    """
    from . import codecs

    if codec == codecs.DELTA:
        if len(payload) >= codecs.DELTA_HEAD.size and codecs.delta_inner(payload) == codecs.LOWRANK:
            return LOWRANK_MIN_VERSION, "low-rank delta"
        return DELTA_MIN_VERSION, codecs.NAMES[codec]
    if codec == codecs.FLOATPLANE:
        return FLOATPLANE_MIN_VERSION, codecs.NAMES[codec]
    return MIN_VERSION, codecs.NAMES.get(codec, str(codec))

CONFIG_NAME = "config.toml"
PACKS_DIR = "packs"
INDEX_DIR = "index.lmdb"
TMP_DIR = "tmp"

# How a store cuts files, when its config.toml does not say: what every store made before
# ``matrix_rows`` existed was written with (16 MiB tensor pieces cut at elements). A store must
# keep cutting as it did, or its next versions share no pieces with the history it holds.
LEGACY_CHUNKING: dict[str, int] = {"cdc_avg_size": 64 * 1024, "tensor_max_chunk": 16 << 20, "matrix_rows": 0}
# What a new store is made with (written into its config.toml): 4 MiB pieces, float32 matrices
# in whole rows, about 512 of them per piece (docs/format.md, "Chunking"). A clone takes its
# remote's settings instead (remote.marker_chunking).
NEW_CHUNKING: dict[str, int] = {"cdc_avg_size": 64 * 1024, "tensor_max_chunk": 4 << 20, "matrix_rows": 512}
# Bounds every chunking setting a remote's marker carries must lie within: what FastCDC accepts
# as its average, and pieces (up to 2 x tensor_max_chunk) well below what a fetch takes as one
# object (remote.MAX_OBJECT, 256 MiB).
_CHUNKING_BOUNDS = {
    "cdc_avg_size": (256, 4 << 20),
    "tensor_max_chunk": (64 << 10, 64 << 20),
    "matrix_rows": (0, 1 << 20),
}
# What a store's own config.toml may say: only what the chunkers can work with (FastCDC's
# average, a piece of at least a byte). Tests and users may cut finer than a remote accepts.
_NO_UPPER = 1 << 62
_LOCAL_CHUNKING_BOUNDS = {
    "cdc_avg_size": (256, 4 << 20),
    "tensor_max_chunk": (1, _NO_UPPER),
    "matrix_rows": (0, _NO_UPPER),
}

DEFAULTS: dict[str, Any] = {
    "format": {"version": FORMAT_VERSION},
    "chunking": dict(LEGACY_CHUNKING),
    "packs": {"max_size": 64 * 1024 * 1024},
    "codec": {"zstd_level": 3},
    # A float tensor piece whose file had the same tensor (name, dtype, shape) in the parent
    # commit is stored as XOR with the parent's piece when that is smaller; chains of deltas
    # are at most max_depth long (then the piece is stored whole), bounding what a read decodes.
    "delta": {"enabled": True, "max_depth": 8, "lowrank": True},
    # Deleting or force-moving a ref matching one of these (fnmatch on the short or full name)
    # needs --force-protected and --confirm NAME.
    "protect": {"patterns": ["main", "refs/tags/*"]},
    # Commit guards (guards.py): refuse a version that shrinks or regresses against its parent.
    "guards": {"max_shrink": 0.5, "max_vocab_shrink": 0.0, "max_metric_regression": 0.10},
}

# Known sections; an unknown section could be a feature of a newer mstore whose meaning we
# would silently ignore, so it is refused like a newer version.
KNOWN_SECTIONS = frozenset(DEFAULTS) | {"gc", "remotes"}


@dataclass(frozen=True)
class Config:
    """Parsed, validated ``config.toml`` with defaults filled in."""

    data: dict[str, Any]

    @property
    def version(self) -> int:
        """The repository format version."""
        return int(self.data["format"]["version"])

    def get(self, section: str, key: str, default: Any = None) -> Any:
        """One setting, or ``default``."""
        return self.data.get(section, {}).get(key, default)


def default_config() -> Config:
    """The settings of a freshly initialised repository (NEW_CHUNKING, not the legacy ones)."""
    data = copy.deepcopy(DEFAULTS)
    data["chunking"] = dict(NEW_CHUNKING)
    return Config(data)


def chunking_settings(config: Config, source: str = CONFIG_NAME) -> dict[str, int]:
    """The settings that decide where a store cuts files (what a remote's marker records).

    Raises:
        FormatError: a setting that is not an integer within its bounds (naming ``source``).
    """
    return check_chunking({k: config.get("chunking", k, v) for k, v in LEGACY_CHUNKING.items()}, f"{source} [chunking]")


def check_chunking(doc: Any, source: str) -> dict[str, int]:
    """Chunking settings read from ``source``, validated; missing keys are the legacy ones.

    Raises:
        UnsupportedFormat: a setting this mstore does not know (a newer mstore's): upgrade.
        FormatError: not a table of integer settings within their bounds.
    """
    if not isinstance(doc, dict):
        raise FormatError(f"{source}: chunking settings must be an object")
    unknown = sorted(set(doc) - set(LEGACY_CHUNKING))
    if unknown:
        raise UnsupportedFormat(
            f"{source}: chunking settings this mstore does not know: {', '.join(map(str, unknown))}; upgrade mstore"
        )
    out = dict(LEGACY_CHUNKING)
    for key, value in doc.items():
        out[key] = _chunking_value(key, value, _CHUNKING_BOUNDS[key], f"{source}: chunking setting")
    return out


def _chunking_value(key: str, value: Any, bounds: tuple[int, int], where: str) -> int:
    """``value`` if it is an integer (not a bool) within ``bounds``.

    Raises:
        FormatError: naming ``where``, the key, the value and the bounds.
    """
    lo, hi = bounds
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        upper = f" and at most {hi}" if hi < _NO_UPPER else ""
        raise FormatError(f"{where} {key} = {value!r} must be an integer of at least {lo}{upper}")
    return value


def _merge(defaults: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for section, values in loaded.items():
        if isinstance(values, dict):
            out.setdefault(section, {}).update(values)
        else:
            out[section] = values
    return out


def parse_config(text: str, source: str = CONFIG_NAME) -> Config:
    """Parse and validate a config document.

    Raises:
        FormatError: not TOML, or a section of the wrong shape.
        UnsupportedFormat: a format version this mstore cannot read, or an unknown section.
    """
    try:
        loaded = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FormatError(f"{source} is not valid TOML: {exc}") from None
    fmt = loaded.get("format")
    if not isinstance(fmt, dict) or not isinstance(fmt.get("version"), int):
        raise FormatError(f"{source} has no [format] version")
    version = fmt["version"]
    if version > MAX_VERSION:
        raise UnsupportedFormat(
            f"repository format version {version} is newer than this mstore understands "
            f"(max {MAX_VERSION}); upgrade mstore"
        )
    if version < MIN_VERSION:
        raise UnsupportedFormat(f"repository format version {version} is too old (min {MIN_VERSION})")
    unknown = sorted(set(loaded) - KNOWN_SECTIONS)
    if unknown:
        raise UnsupportedFormat(f"{source} has sections this mstore does not know: {', '.join(unknown)}")
    for section, values in loaded.items():
        if not isinstance(values, dict):
            raise FormatError(f"{source}: [{section}] must be a table")
    _check_remotes(loaded.get("remotes", {}), source)
    _check_local_chunking(loaded.get("chunking", {}), source)
    return Config(_merge(DEFAULTS, loaded))


def _check_local_chunking(chunking: dict[str, Any], source: str) -> None:
    """``[chunking]`` settings this mstore knows must be integers the chunkers accept."""
    for key, bounds in _LOCAL_CHUNKING_BOUNDS.items():
        if key in chunking:
            _chunking_value(key, chunking[key], bounds, f"{source}: [chunking]")


_REMOTE_KEYS = {"url": str, "endpoint_url": str, "region": str, "profile": str, "pack_size": int}


def _check_remotes(remotes: dict[str, Any], source: str) -> None:
    """``[remotes.NAME]`` tables: a ``url`` string and only known keys (never credentials)."""
    for name, settings in remotes.items():
        if not isinstance(settings, dict) or not isinstance(settings.get("url"), str):
            raise FormatError(f"{source}: [remotes.{name}] must be a table with a url")
        for key, value in settings.items():
            kind = _REMOTE_KEYS.get(key)
            if kind is None:
                raise FormatError(
                    f"{source}: [remotes.{name}] has unknown key {key!r} (known: {', '.join(sorted(_REMOTE_KEYS))}; "
                    "credentials come from the AWS environment or profile, never from config.toml)"
                )
            if not isinstance(value, kind) or isinstance(value, bool):
                raise FormatError(f"{source}: [remotes.{name}] {key} must be a {kind.__name__}")


def read_config(root: Path) -> Config:
    """Read ``root/config.toml``.

    Raises:
        FormatError, UnsupportedFormat: see :func:`parse_config`.
    """
    path = root / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{path} is missing: not a complete mstore repository") from None
    except UnicodeDecodeError:
        raise FormatError(f"{path} is not UTF-8 text") from None
    return parse_config(text, str(path))


def write_config(root: Path, config: Config) -> None:
    """Write ``root/config.toml`` atomically."""
    atomic_write(root / CONFIG_NAME, tomli_w.dumps(config.data).encode("utf-8"))
