"""The training loop: preflight, then steps, checkpoints committed as they come, exact resume.

:func:`train` starts a run, :func:`resume` continues one from its branch head. Both report
progress through a ``report(event, **fields)`` callable (the CLI renders it) and return a
:class:`RunResult`. Determinism on the CPU: the data order is a function of the recorded
position, dropout draws from the torch generator whose state every checkpoint stores, and the
optimizer state is saved exactly; verification (the only other work that touches torch)
restores the generator when it is done, so a run resumed from any checkpoint computes the same
losses, bit for bit, as one that never stopped.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import env
from . import ledger as ledger_mod
from .config import TrainConfig
from .errors import ConfigError, ResumeError

Report = Callable[..., None]


@dataclass
class Hooks:
    """Fault injection for tests: tamper with a checkpoint the way real bugs do.

    Attributes:
        after_save: called with (step, staging directory, model) after a checkpoint is written
            and before it is committed (e.g. corrupt the weights, as a broken save would; or
            record the live model's outputs to compare with the committed checkpoint's).
        in_loop_metric: maps the in-loop metric before it is recorded (e.g. report a better
            number than the weights give, as in incident 3).
        hold: ``POINT:STEP`` to stop the process there (see :func:`trainer.committer.make_hold`).
    """

    after_save: Callable[[int, Path, Any], None] | None = None
    in_loop_metric: Callable[[int, float], float] | None = None
    hold: str | None = None


@dataclass
class RunResult:
    """What a run did."""

    branch: str
    head: str | None
    steps: int
    checkpoints: list[Any] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: str | None = None


def _silent(event: str, **fields: Any) -> None:
    pass


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def train(
    cfg: TrainConfig,
    repo: Any,
    *,
    report: Report | None = None,
    hooks: Hooks | None = None,
    argv: list[str] | None = None,
    cwd: str | None = None,
) -> RunResult:
    """Fine-tune ``cfg.base`` on ``cfg.data``, committing checkpoints to ``cfg.branch``.

    Raises:
        PreflightFailed: a pre-flight check failed (nothing trained, nothing committed).
        ConfigError: inconsistent options.
        mstore.MstoreError: a store operation failed (the branch keeps its last checkpoint).
    """
    if cfg.base is None or cfg.data is None:
        raise ConfigError("a new run needs --base REV and --data REV (or --resume BRANCH)")
    return _Run(cfg, repo, report or _silent, hooks or Hooks(), argv, cwd, resume=False).run()


def resume(
    branch: str,
    repo: Any,
    *,
    report: Report | None = None,
    hooks: Hooks | None = None,
    argv: list[str] | None = None,
    cwd: str | None = None,
    **overrides: Any,
) -> RunResult:
    """Continue the run whose last checkpoint is the head of ``branch``, exactly.

    Everything that decides the numbers comes from the head commit (its ``params``, inputs by
    id, and ``trainer_state/``); ``overrides`` may change only ``steps`` (to train further) and
    where the run executes (device, threads, work_dir, disk_quota, log_every).

    Raises:
        PreflightFailed: nothing to resume, or a check failed.
        ResumeError: the head is not a resumable trainer checkpoint.
    """
    from .config import RESUMABLE

    bad = sorted(k for k, v in overrides.items() if v is not None and k not in RESUMABLE)
    if bad:
        raise ConfigError(
            f"--resume restores {', '.join(bad)} from the checkpoint; to change them, start a new run "
            f"with --base {branch}"
        )
    head = repo.head(branch)
    if head is None:
        from .errors import PreflightFailed

        raise PreflightFailed("branch", f"nothing to resume: there is no branch {branch}")
    c = repo.get_commit(head)
    if "run" not in c.meta or "base" not in c.inputs or "data" not in c.inputs:
        raise ResumeError(f"{branch} ({str(head)[:7]}) is not a trainer checkpoint; cannot resume it")
    cfg = TrainConfig.from_params(
        branch,
        c.params,
        base=c.inputs["base"],
        data=c.inputs["data"],
        eval_data=c.inputs.get("eval_data"),
        **{k: v for k, v in overrides.items() if v is not None},
    )
    prov = c.provenance.get("trainer", {}) if isinstance(c.provenance.get("trainer"), dict) else {}
    if cfg.threads is None:
        # Bit-exact resumption on the CPU needs the same number of threads (matmul blocking).
        cfg.threads = (prov.get("runtime") or {}).get("torch_threads")
    cfg.extra["revs"] = prov.get("inputs", {})
    cfg.extra["overrides"] = prov.get("overrides", [])
    return _Run(cfg, repo, report or _silent, hooks or Hooks(), argv, cwd, resume=True).run()


class _Run:
    def __init__(self, cfg, repo, report, hooks, argv, cwd, resume):
        self.cfg = cfg
        self.repo = repo
        self.report = report
        self.hooks = hooks
        self.argv = argv
        self.cwd = cwd
        self.resuming = resume

    def run(self) -> RunResult:
        env.go_offline()
        import torch

        env.quiet_transformers()
        self.cfg.validate()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if self.cfg.work_dir:
            Path(self.cfg.work_dir).mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="mstore-train-", dir=self.cfg.work_dir))
        try:
            self._preflight()
            inputs = [self.base_id, self.ds.commit] + ([self.eval_ds.commit] if self.eval_ds else [])
            with self.repo.lease(inputs, note=f"training {self.cfg.branch}"):
                return self._train()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # -- before the first step -------------------------------------------------------------------
    def _preflight(self) -> None:
        from . import preflight as pf
        from .data import DataOrder

        cfg, repo, report = self.cfg, self.repo, self.report
        revs = cfg.extra.get("revs") or {}

        def shown(name: str) -> str | None:
            rev = (revs.get(name) or {}).get("rev")
            return f"{rev} (as recorded)" if rev else None

        self.branch_state = pf.check_branch(repo, cfg, self.resuming, report)
        self.base_id, self.base_dir, _base_commit = pf.check_base(repo, cfg.base, self.scratch, report, shown("base"))
        self.ds = pf.check_data(repo, cfg.data, "data", report, shown("data"))
        self.eval_ds = (
            pf.check_data(repo, cfg.eval_data, "eval data", report, shown("eval_data")) if cfg.eval_data else None
        )
        self.order = DataOrder(
            self.ds,
            seed=cfg.seed,
            block=cfg.shuffle_block,
            eval_records=cfg.eval_records if cfg.eval_every else 0,
            eval_seed=cfg.eval_seed,
            eval_ds=self.eval_ds,
        )
        if self.resuming:
            self.inherited = ledger_mod.load(repo, self.branch_state.head)
            pos = (self.branch_state.head_meta.get("data_position") or {}).get("records", 0)
            report("preflight", check="seen",
                   text=f"data position restored: record {pos:,} ({self.order.position(pos)['epoch']} epochs done); "
                   "the ledger continues from the head")
            self.overrides = list(cfg.extra.get("overrides", []))
        else:
            self.inherited = pf.lineage_ledger(repo, self.base_id, self.branch_state)
            self.overrides = pf.check_seen(self.order, self.inherited, cfg.allow_seen_data, report)
        self.device, self.amp = pf.check_device(cfg, report)

    def _build(self) -> None:
        import torch

        from . import checkpoint as ck
        from . import modeling
        from . import preflight as pf

        cfg = self.cfg
        self.tokenizer = modeling.load_tokenizer(self.base_dir)
        self.state = ck.TrainingState()
        if self.resuming:
            head = self.branch_state.head
            self.resume_dir = self.scratch / f"resume-{head[:12]}"
            self.repo.checkout(head, self.resume_dir)
            if cfg.lora is not None:
                self.model = modeling.load_adapter(
                    modeling.load_model(self.base_dir, self.device), self.resume_dir, trainable=True
                )
            else:
                self.model = modeling.load_model(self.resume_dir, self.device)
        else:
            self.model = modeling.load_model(self.base_dir, self.device)
            if cfg.lora is not None:
                torch.manual_seed(cfg.seed)  # LoRA's initial A matrices
                self.model = modeling.wrap_lora(self.model, cfg.lora)
        self.model.train()
        named = modeling.trainable_parameters(self.model)
        if not named:
            raise ConfigError("the model has no trainable parameters")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg))
        if self.resuming:
            doc, self.state = ck.read_state(self.resume_dir)
            want = self.branch_state.head_meta.get("step")
            if self.state.step != want:
                raise ResumeError(f"checkpoint state is at step {self.state.step} but its commit says {want}")
            ck.restore_optimizer(self.optimizer, self.param_names, self.resume_dir, doc)
            self.scheduler.load_state_dict(doc["scheduler"])
            ck.restore_rng(self.resume_dir, doc)
            shutil.rmtree(self.resume_dir, ignore_errors=True)
        else:
            # dropout draws from torch's generator; Python's and NumPy's are seeded too (as HF's
            # set_seed does) so that the states every checkpoint stores are a function of the run
            import random

            import numpy as np

            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
        extra = sum(p.stat().st_size for p in self.base_dir.iterdir() if p.name.startswith("tokenizer"))
        plan = pf.plan_disk(cfg, self.state.step, self.model, extra + (64 << 10))
        pf.check_disk(self.repo, self.scratch, plan, cfg.disk_quota, self.report)

    def _eval_batches(self) -> None:
        from .data import record_text
        from .evaluate import encode

        split = self.order.eval_split() if self.cfg.eval_every else None
        self.split = split
        self.eval_batches = []
        if split is None:
            return
        bs = self.cfg.batch_size
        for i in range(0, len(split.records), bs):
            chunk = split.records[i : i + bs]
            texts = [record_text(f.records[k], self.cfg.text_field, f"{f.path} record {k}") for f, k in chunk]
            self.eval_batches.append(encode(self.tokenizer, texts, self.cfg.seq_len))

    # -- the loop ----------------------------------------------------------------------------------
    def _train(self) -> RunResult:
        import torch

        from . import evaluate, modeling
        from .committer import Committer, make_hold
        from .data import record_text

        cfg = self.cfg
        self._build()
        self._eval_batches()
        self._identity()
        hold = make_hold(self.hooks.hold, self.report)
        committer = Committer(
            self.repo,
            cfg.branch,
            self.branch_state.head,
            verify=self._verify,
            report=self.report,
            argv=self.argv,
            cwd=self.cwd,
            hold=hold,
        )
        amp = modeling.autocast(self.device, self.amp)
        st = self.state
        start_step, t0 = st.step, time.monotonic()
        window: list[float] = []
        self.report("start", step=st.step, steps=cfg.steps, branch=cfg.branch)
        try:
            while st.step < cfg.steps:
                recs = self.order.take(st.records, cfg.batch_size * cfg.grad_accum)
                st.records += len(recs)
                micro = [recs[i : i + cfg.batch_size] for i in range(0, len(recs), cfg.batch_size)]
                batches = [
                    evaluate.encode(
                        self.tokenizer,
                        [record_text(f.records[k], cfg.text_field, f"{f.path} record {k}") for f, k in m],
                        cfg.seq_len,
                    )
                    for m in micro
                ]
                targets = sum(b.targets for b in batches)
                total = 0.0
                for b in batches:
                    s = evaluate.loss_sum(self.model, b.to(self.device), amp)
                    (s / targets).backward()
                    total += float(s.detach())
                    st.tokens += b.tokens
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                st.step += 1
                loss = total / max(targets, 1)
                st.history.append({"step": st.step, "loss": loss, "lr": lr, "tokens": st.tokens})
                window.append(loss)
                in_loop = None
                if cfg.eval_every and (st.step % cfg.eval_every == 0 or st.step == cfg.steps):
                    in_loop = evaluate.eval_loss(self.model, self.eval_batches, self.device, self.amp)
                    if self.hooks.in_loop_metric is not None:
                        in_loop = self.hooks.in_loop_metric(st.step, in_loop)
                if st.step % cfg.log_every == 0 or in_loop is not None or st.step == cfg.steps:
                    rate = (time.monotonic() - t0) / max(st.step - start_step, 1)
                    self.report("step", step=st.step, steps=cfg.steps, tokens=st.tokens, loss=loss, lr=lr,
                                eval=in_loop, eta=rate * (cfg.steps - st.step))
                if st.step % cfg.save_every == 0 or st.step == cfg.steps:
                    committer.submit(self._save(st, lr, loss, window, in_loop))
                    window = []
                committer.poll()
                if self.hooks.hold == f"step:{st.step}":
                    committer.drain()  # "between commits": nothing in flight when the test kills
                hold("step", st.step)
            committer.drain()
        except KeyboardInterrupt:
            # Checkpoints already written are committed before stopping (a second Ctrl-C abandons
            # them; the branch keeps its last complete checkpoint either way).
            self.report("interrupted", step=st.step, queued=len(committer.jobs))
            committer.drain()
            raise
        finally:
            committer.close()
        self._drop_pending()
        best = self.repo.head(f"{cfg.branch}.best")
        return RunResult(
            cfg.branch,
            committer.head,
            st.step,
            committer.done,
            st.history,
            str(best) if best else None,
        )

    def _drop_pending(self) -> None:
        """Remove ``BRANCH.pending`` after a finished run (its commits are the branch's, by tree)."""
        import mstore

        name = f"{self.cfg.branch}.pending"
        try:
            if self.repo.head(name) is not None:
                self.repo.delete_branch(name)
        except mstore.MstoreError as exc:  # e.g. a protected-ref pattern: harmless to leave
            self.report("warning", text=f"could not remove {name}: {exc}")

    def _identity(self) -> None:
        """Run id, inputs, params and provenance: the same for every checkpoint of this run."""
        from . import modeling

        cfg = self.cfg
        head_run = self.branch_state.head_meta.get("run") if self.resuming else None
        self.run_meta = {
            "id": head_run["id"] if head_run else uuid.uuid4().hex[:16],
            "method": cfg.method,
            "started": head_run.get("started") if head_run else _now(),
            "resumed_from": self.branch_state.head if self.resuming else None,
        }
        self.inputs = {"base": self.base_id, "data": self.ds.commit}
        if self.eval_ds is not None:
            self.inputs["eval_data"] = self.eval_ds.commit
        self.params_rec = cfg.params()
        if cfg.lora is not None:
            self.params_rec["lora"]["targets"] = modeling.lora_targets(self.model)
        revs = dict(cfg.extra.get("revs") or {})
        for name, oid in self.inputs.items():
            rev = {"base": cfg.base, "data": cfg.data, "eval_data": cfg.eval_data}[name]
            if name not in revs or rev != oid:
                revs[name] = {"rev": rev, "id": oid}
        precision = "bf16-autocast" if self.amp is not None else "fp32"
        self.provenance = env.provenance(
            self.device,
            precision,
            inputs=revs,
            overrides=self.overrides,
            run=self.run_meta["id"],
            **({"resumed_from": self.branch_state.head} if self.resuming else {}),
        )
        if self.split is not None:
            self.split_desc = self.split.desc

    def _save(self, st, lr: float, loss: float, window: list[float], in_loop: float | None):
        from . import checkpoint as ck
        from . import modeling
        from .committer import Job

        cfg = self.cfg
        d = self.scratch / f"ckpt-{st.step:09d}"
        modeling.save_weights(self.model, self.tokenizer, d, self.base_id)
        ck.save_state(d, st, self.order.position(st.records), self.optimizer, self.param_names, self.scheduler)
        if self.hooks.after_save is not None:
            self.hooks.after_save(st.step, d, self.model)
        led = self._ledger(st)
        (d / ledger_mod.LEDGER_FILE).write_bytes(ledger_mod.to_bytes(led))
        finished = st.step == cfg.steps
        meta = {
            "step": st.step,
            "steps": cfg.steps,
            "tokens": st.tokens,
            "lr": lr,
            "epoch": round(st.records / self.order.n_train, 4),
            "train": {"loss": _finite(loss), "loss_mean": _finite(sum(window) / len(window)) if window else None,
                      "window_steps": len(window)},
            "data_position": self.order.position(st.records),
            "run": {**self.run_meta, "status": "finished" if finished else "running"},
            "ledger": ledger_mod.summary(led),
        }
        msg = f"step {st.step}/{cfg.steps}: loss {loss:.4f}"
        if in_loop is not None:
            msg += f", eval {in_loop:.4f}"
        return Job(st.step, d, msg, meta, self.params_rec, self.inputs, self.provenance, in_loop)

    def _ledger(self, st) -> dict[str, Any]:
        """The lineage's ledger after this run consumed ``st.records`` records."""
        consumed = self.order.consumed(st.records)
        trained_ds = {
            self.ds.commit: {
                "files": len(self.ds.files),
                "records": self.ds.n_records,
                "epochs": st.records // self.order.n_train,
            }
        }
        led = ledger_mod.merge(self.inherited, consumed, self.order.record_counts(), trained_ds)
        ids = {f.id for f in self.ds.files}
        led["datasets"][self.ds.commit]["trained"] = sum(
            ledger_mod.count(e["seen"]) for fid, e in led["files"].items() if fid in ids
        )
        return led

    def _verify(self, job) -> dict[str, Any] | None:
        from . import evaluate

        if job.in_loop is None:
            return None
        r = evaluate.verify(
            self.repo,
            job.staged,
            method=self.cfg.method,
            base_dir=self.base_dir,
            batches=self.eval_batches,
            in_loop=job.in_loop,
            tolerance=self.cfg.verify_tolerance,
            device=self.device,
            amp_dtype=self.amp,
            split=self.split_desc,
            scratch=self.scratch,
        )
        job.message += " (verified)" if r.get("verified") else " (VERIFICATION FAILED)"
        return r


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """The learning-rate multiplier at an optimizer step: warmup, then cosine/linear/constant."""
    warm, total, kind = cfg.warmup_steps, cfg.steps, cfg.schedule

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant" or total <= warm:
            return 1.0
        progress = min(max((step - warm) / (total - warm), 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
