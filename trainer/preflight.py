"""Checks before any training step: right base, right data, data not already trained, disk, device.

Incident 4 lists what a team lost weeks to: the wrong base model, the wrong data, data trained
twice, a full disk, a missing GPU, a previous run that had silently died. Each check below
prints one line when it passes and stops the run with a :class:`PreflightFailed` naming the
check and the fix when it does not. Only one is overridable, because only one can be
intended: training again on data the lineage has seen (``--allow-seen-data``, recorded in
every checkpoint's provenance). A wrong base, missing data, a missing device or too little
disk are never right to train through.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mstore

from . import ledger as ledger_mod
from .config import TrainConfig
from .data import DataOrder, Dataset, load_dataset
from .errors import DataError, PreflightFailed

Report = Callable[..., None]

MODEL_KINDS = ("model", "checkpoint")
DATA_KINDS = ("dataset",)
# Checkpoints staged but not yet committed, plus one checked out for verification.
STAGING_COPIES = 3


@dataclass
class BranchState:
    """What the run's branch holds before training."""

    head: str | None = None
    head_meta: dict[str, Any] = field(default_factory=dict)
    stale_pending: str | None = None


def _short(oid: str) -> str:
    return str(oid)[:7]


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def pending_branch(branch: str) -> str:
    """The ref a checkpoint is staged on while its metric is verified (see docs/trainer.md)."""
    return f"{branch}.pending"


def best_branch(branch: str) -> str:
    """The ref that follows the run's best verified checkpoint."""
    return f"{branch}.best"


def check_branch(repo: Any, cfg: TrainConfig, resume: bool, report: Report) -> BranchState:
    """The previous run on the branch finished (new run) or can be continued (``--resume``).

    Raises:
        PreflightFailed: check ``branch``.
    """
    head = repo.head(cfg.branch)
    st = BranchState(head=str(head) if head else None)
    pend = repo.head(pending_branch(cfg.branch))
    if head is not None:
        st.head_meta = repo.get_commit(head).meta
    run = st.head_meta.get("run") if isinstance(st.head_meta.get("run"), dict) else None
    if pend is not None:
        pm = repo.get_commit(pend).meta
        if head is None or int(pm.get("step", -1)) > int(st.head_meta.get("step", -1)):
            st.stale_pending = str(pend)
    if resume:
        if head is None:
            raise PreflightFailed("branch", f"nothing to resume: there is no branch {cfg.branch}")
        if run is None:
            raise PreflightFailed(
                "branch", f"{cfg.branch} ({_short(head)}) is not a trainer checkpoint; cannot resume it"
            )
        step = int(st.head_meta.get("step", 0))
        if run.get("status") == "finished" and cfg.steps <= step:
            raise PreflightFailed(
                "branch",
                f"nothing to resume: the run on {cfg.branch} finished at step {step} (commit {_short(head)}); "
                f"pass --steps N (N > {step}) to train it further",
            )
        text = f"resuming {cfg.branch} at step {step} (commit {_short(head)}, run {run.get('status')})"
        if st.stale_pending:
            text += (
                f"; a checkpoint staged at step {repo.get_commit(st.stale_pending).meta.get('step')} never reached "
                f"the branch (the run was stopped while committing it) and is discarded"
            )
        report("preflight", check="branch", text=text)
        return st
    if head is None:
        report("preflight", check="branch", text=f"branch {cfg.branch} is new")
        return st
    if run is None:
        raise PreflightFailed(
            "branch",
            f"{cfg.branch} ({_short(head)}) holds commits that are not trainer checkpoints; train on a new branch",
        )
    if run.get("status") != "finished":
        raise PreflightFailed(
            "branch",
            f"the previous run on {cfg.branch} did not finish: it stopped at step {st.head_meta.get('step')} of "
            f"{st.head_meta.get('steps')} (commit {_short(head)}). Continue it with `mstore train --resume "
            f"{cfg.branch}`, or train on a new branch",
        )
    report("preflight", check="branch", text=f"{cfg.branch} continues after a finished run ({_short(head)})")
    return st


def check_base(repo: Any, rev: str, scratch: Path, report: Report, shown: str | None = None) -> tuple[str, Path, Any]:
    """The base resolves to a model (or full checkpoint) commit whose every byte verifies.

    Returns:
        (commit id, verified checkout directory, commit).

    Raises:
        PreflightFailed: check ``base``.
    """
    try:
        oid = str(repo.resolve(rev))
    except mstore.MstoreError as exc:
        raise PreflightFailed("base", f"base {rev!r} does not resolve: {exc}") from None
    commit = repo.get_commit(oid)
    names = {e.path for e in repo.ls(oid, recursive=False)}
    if commit.kind not in MODEL_KINDS:
        raise PreflightFailed("base", f"base {rev} ({_short(oid)}) is a {commit.kind} commit, not a model")
    if "adapter_config.json" in names and "config.json" not in names:
        raise PreflightFailed(
            "base",
            f"base {rev} ({_short(oid)}) is a LoRA adapter; train from its base model, or merge the adapter first",
        )
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise PreflightFailed(
            "base", f"base {rev} ({_short(oid)}) has no config.json and safetensors weights at its top level"
        )
    dest = scratch / f"base-{oid[:12]}"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        co = repo.checkout(oid, dest)
    except mstore.IntegrityError as exc:
        raise PreflightFailed("base", f"base {rev} ({_short(oid)}) is damaged in the store: {exc}") from None
    params = commit.stats.get("parameters")
    detail = f"{co.files} files, {_human(co.bytes)} verified" + (f", {params:,} parameters" if params else "")
    report("preflight", check="base", text=f"base {shown or rev} {_short(oid)} ok ({detail})")
    return oid, dest, commit


def check_data(repo: Any, rev: str, what: str, report: Report | None, shown: str | None = None) -> Dataset:
    """The dataset resolves to a commit of JSONL records whose every byte verifies.

    Raises:
        PreflightFailed: check ``data``.
    """
    try:
        oid = str(repo.resolve(rev))
    except mstore.MstoreError as exc:
        raise PreflightFailed("data", f"{what} {rev!r} does not resolve: {exc}") from None
    kind = repo.get_commit(oid).kind
    if kind not in DATA_KINDS:
        raise PreflightFailed("data", f"{what} {rev} ({_short(oid)}) is a {kind} commit, not a dataset")
    try:
        ds = load_dataset(repo, rev, oid)
    except DataError as exc:
        raise PreflightFailed("data", str(exc)) from None
    except mstore.IntegrityError as exc:
        raise PreflightFailed("data", f"{what} {rev} ({_short(oid)}) is damaged in the store: {exc}") from None
    if report is not None:
        report(
            "preflight",
            check="data",
            text=f"{what} {shown or rev} {_short(oid)} ok ({len(ds.files)} files, {ds.n_records:,} records, verified)",
        )
    return ds


def lineage_ledger(repo: Any, base_id: str, branch: BranchState) -> dict[str, Any]:
    """What the lineage has already trained on: the base's ledger plus the branch head's."""
    led = ledger_mod.load(repo, base_id)
    if branch.head is None:
        return led
    head = ledger_mod.load(repo, branch.head)
    return ledger_mod.merge(led, {fid: e["seen"] for fid, e in head["files"].items()},
                            {fid: e["records"] for fid, e in head["files"].items()}, head["datasets"])


def check_seen(order: DataOrder, lineage: dict[str, Any], allow: bool, report: Report) -> list[str]:
    """None of the planned training records is in the lineage's ledger (by file id).

    Returns:
        the overrides taken (``["allow_seen_data"]`` or empty).

    Raises:
        PreflightFailed: check ``seen``, unless ``allow``.
    """
    hit = ledger_mod.overlap(lineage, order.planned())
    if not hit:
        report("preflight", check="seen", text="data not yet seen by this lineage")
        return []
    paths = {f.id: f.path for f in order.ds.files}
    n = sum(ledger_mod.count(r) for r in hit.values())
    shown = "; ".join(f"{paths.get(fid, fid[:12])} records {ledger_mod.fmt_ranges(r, 2)}" for fid, r in
                      list(hit.items())[:3])
    more = f" and {len(hit) - 3} more files" if len(hit) > 3 else ""
    text = (
        f"{n:,} of the {order.n_train:,} planned training records were already trained on by this lineage "
        f"({len(hit)} files: {shown}{more})"
    )
    if not allow:
        raise PreflightFailed("seen", text + "; pass --allow-seen-data to train on them again (recorded)")
    report("preflight", check="seen", text=f"warning: {text}; continuing because of --allow-seen-data", warn=True)
    return ["allow_seen_data"]


def check_device(cfg: TrainConfig, report: Report) -> tuple[Any, Any]:
    """The requested device exists (never silently replaced by another).

    Raises:
        PreflightFailed: check ``device``.
    """
    import torch

    from . import modeling

    device = modeling.select_device(cfg.device)
    amp = modeling.autocast_dtype(device, cfg.precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        text = f"device {device} ({name}, {'bf16 autocast' if amp is not None else 'float32'})"
    else:
        n = torch.get_num_threads()
        text = f"device cpu (float32, {n} thread{'s' if n != 1 else ''})"
    report("preflight", check="device", text=text)
    return device, amp


@dataclass
class DiskPlan:
    """The disk a run needs, by where it goes."""

    checkpoints: int
    first_bytes: int
    changed_bytes: int
    staging_bytes: int

    @property
    def store_bytes(self) -> int:
        return self.first_bytes + max(self.checkpoints - 1, 0) * self.changed_bytes


def plan_disk(cfg: TrainConfig, start_step: int, model: Any, extra_files: int) -> DiskPlan:
    """Estimate what the run's checkpoints add to the store, after dedup.

    Unchanged files (tokenizer, config, frozen weights) are stored once; every checkpoint after
    the first adds its trainable tensors and their two AdamW moments (float32), which change at
    every step. No credit is taken for compression, so the estimate errs high.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    saved = trainable if cfg.lora is not None else total
    changed = 4 * (saved + 2 * trainable)
    n = 0
    if cfg.steps > start_step:
        # every multiple of save_every after start_step, plus the final step if it is not one
        n = cfg.steps // cfg.save_every - start_step // cfg.save_every + (1 if cfg.steps % cfg.save_every else 0)
    first = changed + extra_files
    return DiskPlan(n, first, changed, STAGING_COPIES * first)


def check_disk(repo: Any, scratch: Path, plan: DiskPlan, quota: int | None, report: Report) -> None:
    """Enough free space for the planned checkpoints (store) and staging (work directory).

    ``quota`` caps the space considered free (a quota the file system does not show).

    Raises:
        PreflightFailed: check ``disk``.
    """
    store_path, work_path = Path(repo.root), Path(scratch)
    need = {store_path: plan.store_bytes}
    same = store_path.stat().st_dev == work_path.stat().st_dev
    if same:
        need[store_path] += plan.staging_bytes
    else:
        need[work_path] = plan.staging_bytes
    for path, n in need.items():
        free = shutil.disk_usage(path).free
        limit = free if quota is None else min(free, quota)
        where = "the store" if path == store_path else "the work directory"
        source = f"--disk-quota {_human(quota)}" if quota is not None and quota < free else f"free on {where}'s disk"
        if n > limit:
            raise PreflightFailed(
                "disk",
                f"not enough disk for {plan.checkpoints} checkpoints: needs ~{_human(n)} "
                f"({_human(plan.first_bytes)} for the first, {_human(plan.changed_bytes)} per later one after dedup, "
                f"plus staging), only {_human(limit)} {source}; free space, or save less often (--save-every)",
            )
    total = sum(need.values())
    free = shutil.disk_usage(store_path).free
    limit = free if quota is None else min(free, quota)
    report(
        "preflight",
        check="disk",
        text=f"disk ok (needs ~{_human(total)} for {plan.checkpoints} checkpoints after dedup, {_human(limit)} "
        f"{'allowed' if quota is not None and quota < free else 'free'})",
    )
