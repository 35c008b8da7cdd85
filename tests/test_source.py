"""Rules about the source itself (like dulwich's test_source.py), so the layering stays true."""

from __future__ import annotations

import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mstore"


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        yield path.relative_to(PKG).as_posix(), path.read_text(encoding="utf-8")


def test_only_the_cli_reads_the_environment():
    offenders = [
        rel for rel, src in _sources() if re.search(r"os\.environ|os\.getenv", src) and not rel.startswith("cli/")
    ]
    assert offenders == []


def test_only_the_output_module_prints():
    pattern = re.compile(r"^\s*(print\(|click\.echo\(|sys\.stdout\.write)", re.MULTILINE)
    offenders = [rel for rel, src in _sources() if pattern.search(src) and rel != "cli/_output.py"]
    assert offenders == []


def test_mstore_never_imports_ml_frameworks():
    pattern = re.compile(r"^\s*(import|from)\s+(torch|transformers|peft|trainer)\b", re.MULTILINE)
    offenders = [rel for rel, src in _sources() if pattern.search(src)]
    assert offenders == []


def test_layer_contracts_hold():
    """import-linter's contracts in pyproject.toml (layers, no framework imports) are kept."""
    import subprocess
    import sys

    root = PKG.parent
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
