"""numpy is imported only when a version holds tensor files (its import is a third of a small commit)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from mstore import Repo
repo = Repo.init(sys.argv[1])
repo.commit(sys.argv[2], "data", "v1")
repo.checkout("data", sys.argv[3])
print("numpy" in sys.modules)
"""


def test_committing_and_checking_out_text_files_never_imports_numpy(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"shard-{i}.jsonl").write_text("".join(f'{{"id": {j}, "text": "record {j}"}}\n' for j in range(2000)))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "store"), str(data), str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"
    assert (tmp_path / "out" / "shard-1.jsonl").read_text() == (data / "shard-1.jsonl").read_text()
