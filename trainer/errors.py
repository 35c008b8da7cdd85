"""The trainer's errors: mstore error categories, so the CLI maps them to the same exit codes."""

from __future__ import annotations

import mstore


class ConfigError(mstore.UserError):
    """A training option is invalid or inconsistent (exit code 2)."""


class DataError(mstore.UserError):
    """A dataset commit cannot be trained on: no JSONL records, bad records, wrong counts."""


class PreflightFailed(mstore.Refused):
    """A pre-flight check failed; nothing was trained and nothing was committed (exit code 8).

    Attributes:
        check: which check failed (``base``, ``data``, ``seen``, ``disk``, ``device``, ``branch``).
    """

    def __init__(self, check: str, message: str):
        super().__init__(f"preflight failed ({check}): {message}")
        self.check = check


class ResumeError(mstore.UserError):
    """``--resume`` cannot continue the branch (not a trainer checkpoint, missing state, changed options)."""
