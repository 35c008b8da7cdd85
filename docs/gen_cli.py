"""Regenerate docs/cli.md from the commands' own --help (run: make docs).

The reference is generated so it can never drift from the code; tests/cli/test_cli_docs.py
fails when it is stale.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HEADER = """# mstore command reference

Generated from each command's `--help` by `docs/gen_cli.py` (`make docs`); do not edit by hand.

Every command finds the repository through `--store DIR`, else `$MSTORE_DIR`, else the first
`.mstore/` at or above the current directory. Reading commands take `--json` and print one JSON
document for scripts (`mstore show exp1 --json | jq .provenance`). Long operations show a
progress bar on a terminal and stay quiet otherwise. Exit codes are listed in
[errors.md](errors.md): 0 ok, 2 bad input, 3 not found, 4 conflict, 5 damaged data,
6 unsupported format, 7 storage failure, 8 refused by a safety rule (guards, protected refs).

Revisions (`REV`) are a branch (`exp1`), tag (`v1`), commit id or unique prefix of ≥ 7 hex
characters, followed by any of `~N` (N-th first parent), `^` / `^N` (first / N-th parent) and
`@{N}` / `@{2.days.ago}` / `@{2026-11-20T10:00}` (the ref's value N changes ago / at a time, from
the reflog, also for deleted branches). `REV:PATH` names a file or directory inside a commit.
"""


def render() -> str:
    """The whole reference as Markdown."""
    from mstore.cli import COMMANDS

    env = {**os.environ, "COLUMNS": "100", "TERM": "dumb"}
    parts = [HEADER]
    top = subprocess.run([sys.executable, "-m", "mstore", "--help"], capture_output=True, text=True, env=env).stdout
    parts.append(f"## mstore\n\n```\n{top.rstrip()}\n```\n")
    for name in sorted(COMMANDS):
        out = subprocess.run(
            [sys.executable, "-m", "mstore", name, "--help"], capture_output=True, text=True, env=env
        ).stdout
        parts.append(f"## mstore {name}\n\n```\n{out.rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    Path(__file__).with_name("cli.md").write_text(render(), encoding="utf-8")
