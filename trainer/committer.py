"""Committing checkpoints while training continues, in order, each one atomic.

For every checkpoint the training loop writes a staging directory and goes on training; one
background thread then

1. commits the directory to ``<branch>.pending`` (the bytes are now in the store);
2. the training thread, between two steps, checks that commit out, reloads it into a fresh
   model and recomputes the validation metric (:func:`trainer.evaluate.verify`): verification
   runs on the training thread with the RNG state preserved, so it cannot change the run's
   numbers;
3. commits the same directory to the run's branch with the receipt (same tree, so the receipt's
   tree id is the branch commit's tree; the second commit stores no new bytes), by
   compare-and-swap from the head it expects, and moves ``<branch>.best`` if the checkpoint
   is verified and better.

Only step 3 moves the run's branch, in one store transaction: a run killed at any moment
leaves the last complete checkpoint as the head, never a half one. Hashing, compression and
fsyncs (which release the GIL) overlap training; at most ``max_inflight`` checkpoints wait at
once, which bounds the disk that staging uses.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mstore

from .evaluate import METRIC
from .preflight import best_branch, pending_branch

Report = Callable[..., None]


@dataclass
class Job:
    """One checkpoint on its way into the store."""

    step: int
    dir: Path
    message: str
    meta: dict[str, Any]
    params: dict[str, Any]
    inputs: dict[str, Any]
    provenance: dict[str, Any]
    in_loop: float | None
    stage: Future | None = None
    staged: str | None = None
    verified: bool = False
    receipt: dict[str, Any] | None = None
    final: Future | None = None


@dataclass
class Committed:
    """A checkpoint that reached the branch."""

    step: int
    id: str
    receipt: dict[str, Any] | None
    best: bool
    overridden: list[dict[str, Any]] = field(default_factory=list)
    new_bytes: int = 0


def commit_checkpoint(repo: Any, path: Path, branch: str, message: str, report: Report, **kw: Any) -> Any:
    """``repo.commit`` for a checkpoint: a guard that trips only on metrics is recorded, not fatal.

    A checkpoint is the run's state; refusing it would lose the work since the last one and
    make the run impossible to resume. So when the only findings are metrics (the verified
    eval loss is worse than the previous checkpoint's by more than the guard allows), the
    checkpoint is committed with ``allow_regression`` (mstore records the override in its
    provenance) and the regression is reported loudly. Any other finding (fewer tensors, a
    shrunken vocabulary, far fewer bytes) is not something training does by itself, and stops
    the run.

    Raises:
        mstore.RegressionRefused: a guard other than a metric guard tripped.
        mstore.RefConflict: the branch moved under the run.
    """
    try:
        return repo.commit(path, branch, message, kind="checkpoint", **kw)
    except mstore.RegressionRefused as exc:
        if not exc.findings or any(f.guard != "metric" for f in exc.findings):
            raise
        report("guard", findings=[f.to_dict() for f in exc.findings], step=kw.get("meta", {}).get("step"))
        return repo.commit(path, branch, message, kind="checkpoint", allow_regression=True, **kw)


class Committer:
    """The background checkpoint pipeline of one run (see the module docstring)."""

    def __init__(
        self,
        repo: Any,
        branch: str,
        head: str | None,
        *,
        verify: Callable[[Job], dict[str, Any] | None],
        report: Report,
        argv: list[str] | None,
        cwd: str | None,
        hold: Callable[[str, int], None],
        max_inflight: int = 2,
    ):
        self.root = repo.root
        self.branch = branch
        self.head = head
        self.verify = verify
        self.report = report
        self.argv = argv
        self.cwd = cwd
        self.hold = hold
        self.max_inflight = max_inflight
        self.jobs: deque[Job] = deque()
        self.done: list[Committed] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mstore-checkpoint")
        # The worker thread has its own Repo (own pack readers and transactions).
        self._repo: Any = None

    # -- worker thread -------------------------------------------------------------------------
    def _worker_repo(self) -> Any:
        if self._repo is None:
            self._repo = mstore.Repo.open(self.root)
        return self._repo

    def _stage(self, job: Job) -> str:
        repo = self._worker_repo()
        res = repo.commit(
            job.dir,
            pending_branch(self.branch),
            f"staged for verification: {job.message}",
            kind="checkpoint",
            meta={"staged_for": self.branch, "step": job.step},
            provenance=job.provenance,
            argv=self.argv,
            cwd=self.cwd,
            allow_regression=True,  # a staging ref, not a version anyone uses: its guard is the branch's
        )
        return str(res.id)

    def _final(self, job: Job) -> Committed:
        repo = self._worker_repo()
        metrics: dict[str, Any] = {}
        if job.receipt is not None:
            metrics["receipts"] = {METRIC: job.receipt}
            if job.receipt.get("verified"):
                metrics[METRIC] = job.receipt["value"]
        res = commit_checkpoint(
            repo,
            job.dir,
            self.branch,
            job.message,
            self.report,
            meta=job.meta,
            metrics=metrics,
            params=job.params,
            inputs=job.inputs,
            provenance=job.provenance,
            argv=self.argv,
            cwd=self.cwd,
            expected_head=mstore.ObjectId(self.head) if self.head else None,
        )
        self.head = str(res.id)
        best = self._maybe_best(repo, self.head, job.receipt)
        overridden = [f.to_dict() for f in res.overridden]
        return Committed(job.step, self.head, job.receipt, best, overridden, res.new_bytes)

    def _maybe_best(self, repo: Any, oid: str, receipt: dict[str, Any] | None) -> bool:
        """Point ``<branch>.best`` here if this checkpoint is verified and better. Unverified never is."""
        if not receipt or not receipt.get("verified"):
            return False
        name = best_branch(self.branch)
        cur = repo.head(name)
        if cur is not None:
            prev = repo.get_commit(cur).metrics.get("receipts", {}).get(METRIC) or {}
            same_split = (prev.get("eval_data") or {}).get("split") == receipt["eval_data"]["split"]
            if prev.get("verified") and same_split and prev["value"] <= receipt["value"]:
                return False
            # No atomic "move branch" in the public API yet: delete + create, both reflogged.
            repo.delete_branch(name)
        repo.create_branch(name, oid)
        return True

    # -- training thread -----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a staged checkpoint (waits if ``max_inflight`` are already on their way)."""
        while len(self.jobs) >= self.max_inflight:
            self.poll(block=True, limit=1)
        job.stage = self.pool.submit(self._stage, job)
        self.jobs.append(job)

    def poll(self, block: bool = False, limit: int | None = None) -> None:
        """Advance finished work, oldest first; with ``block``, wait for it.

        Raises:
            Exception: whatever a background commit raised (the run stops; the branch keeps its
                last complete checkpoint).
        """
        handled = 0
        while self.jobs and (limit is None or handled < limit):
            job = self.jobs[0]
            if not job.verified:
                if not block and not job.stage.done():  # type: ignore[union-attr]
                    return
                job.staged = job.stage.result()  # type: ignore[union-attr]
                job.receipt = self.verify(job)
                job.verified = True
                self.hold("before-final", job.step)
                job.final = self.pool.submit(self._final, job)
            if not block and not job.final.done():  # type: ignore[union-attr]
                return
            done = job.final.result()  # type: ignore[union-attr]
            self.jobs.popleft()
            shutil.rmtree(job.dir, ignore_errors=True)
            self.done.append(done)
            self.report("checkpoint", committed=done)
            self.hold("after-commit", job.step)
            handled += 1

    def drain(self) -> None:
        """Wait until every queued checkpoint is committed."""
        self.poll(block=True)

    def close(self) -> None:
        """Stop the worker (after :meth:`drain`, or abandoning queued work on an error)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self._repo is not None:
            self._repo.close()
            self._repo = None


def make_hold(spec: str | None, report: Report) -> Callable[[str, int], None]:
    """Fault injection for the crash tests: ``POINT:STEP`` stops the process there (SIGSTOP).

    Points: ``step`` (after an optimizer step), ``before-final`` (checkpoint staged and verified,
    branch not yet moved), ``after-commit`` (the branch just moved). The test then kills the
    stopped process with SIGKILL, which no code can intercept.
    """
    if not spec:
        return lambda point, step: None
    point, _, at = spec.partition(":")

    def hold(where: str, step: int) -> None:
        if where == point and step == int(at):
            report("fault", text=f"holding at {where}:{step} (pid {os.getpid()})")
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP)

    return hold
