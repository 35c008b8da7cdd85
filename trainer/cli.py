"""``mstore train`` (a plugin command) and ``python -m trainer``: the same click command.

Nothing here imports torch at module level: ``mstore --help`` lists the command without
loading this module, and ``mstore train --help`` loads it without loading torch.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

import mstore

from .config import LoraSpec, TrainConfig

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | None) -> int | None:
    """``"1.5GB"`` -> 1500000000; ``"512MiB"``; a plain number is bytes.

    Raises:
        click.BadParameter: not a size.
    """
    if text is None:
        return None
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        return int(float(num) * _SIZE_UNITS[unit])
    except (ValueError, KeyError):
        raise click.BadParameter(f"not a size: {text!r} (e.g. 500MB, 2GB, 1GiB)") from None


def _fmt_tokens(n: int) -> str:
    for div, unit in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _fmt_eta(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


class Renderer:
    """Turns the loop's events into lines (text) or JSON lines (``--json``)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def __call__(self, event: str, **f: Any) -> None:
        if self.as_json:
            click.echo(json.dumps({"event": event, **_plain(f)}, sort_keys=True, default=str))
            return
        if event == "preflight":
            click.echo(f"preflight: {f['text']}", err=bool(f.get("warn")))
        elif event == "start":
            click.echo(f"training {f['branch']}: steps {f['step'] + 1}-{f['steps']}")
        elif event == "step":
            parts = [f"step {f['step']}/{f['steps']}", f"{_fmt_tokens(f['tokens'])} tokens", f"loss {f['loss']:.4g}"]
            if f.get("eval") is not None:
                parts.append(f"eval {f['eval']:.4g}")
            parts.append(f"lr {f['lr']:.3g}")
            if f["step"] < f["steps"]:
                parts.append(f"ETA {_fmt_eta(f['eta'])}")
            click.echo(" · ".join(parts))
        elif event == "checkpoint":
            from .evaluate import receipt_line

            c = f["committed"]
            parts = [f"checkpoint step {c.step}"]
            if c.receipt is not None:
                parts.append(receipt_line(c.receipt))
            parts.append(f"committed {c.id[:7]}")
            if c.best:
                parts.append("new best")
            elif c.receipt is not None and not c.receipt.get("verified"):
                parts.append("never eligible as best")
            line = " · ".join(parts)
            failed = c.receipt is not None and not c.receipt.get("verified")
            click.echo(("!!! " + line) if failed else line, err=False)
            if failed:
                click.echo(f"!!! step {c.step}: the recorded metric is NOT verified (see `mstore show {c.id[:12]}`)",
                           err=True)
        elif event == "guard":
            for g in f["findings"]:
                click.echo(
                    f"warning: step {f.get('step')}: {g['what']} {g['new']:.4g} is worse than the previous "
                    f"checkpoint's {g['old']:.4g} ({g['detail']}); committed anyway, a checkpoint is the run's "
                    "state (the override is recorded in its provenance)",
                    err=True,
                )
        elif event == "fault":
            click.echo(f"fault: {f['text']}")
        elif event == "warning":
            click.echo(f"warning: {f['text']}", err=True)
        elif event == "interrupted":
            click.echo(f"interrupted at step {f['step']}: committing the {f['queued']} checkpoint(s) already written "
                       "(Ctrl-C again to abandon them)", err=True)
        sys.stdout.flush()


def _plain(f: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in f.items():
        if hasattr(v, "__dataclass_fields__"):
            from dataclasses import asdict

            v = asdict(v)
        out[k] = v
    return out


def _repo(ctx: click.Context, store: str | None) -> Any:
    root = ctx.find_root().obj
    store = store or getattr(root, "store", None)
    env = dict(os.environ)
    if store:
        env["MSTORE_DIR"] = store
    return mstore.Repo.discover(os.getcwd(), env=env)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--base", metavar="REV", help="Model to start from: a model commit or a full checkpoint (branch/tag/id).")
@click.option("--data", metavar="REV", help="Dataset commit of JSONL files to train on.")
@click.option("-b", "--branch", metavar="BRANCH", help="Branch the run's checkpoints are committed to.")
@click.option("--resume", "resume_branch", metavar="BRANCH", help="Continue the run whose last checkpoint is BRANCH.")
@click.option("--eval-data", metavar="REV", help="Separate dataset to evaluate on (default: hold out --eval-records).")
@click.option("--lora", metavar="r=16[,alpha=32,dropout=0.05,targets=q_proj+v_proj]",
              help="Train a LoRA adapter (peft) instead of all weights.")
@click.option("--steps", type=int, help="Optimizer steps in total (default 1000; with --resume, to train further).")
@click.option("--save-every", type=int, default=200, help="Commit a checkpoint every N steps (and at the end).")
@click.option("--eval-every", type=int, default=200, help="Compute the validation metric every N steps (0: never).")
@click.option("--batch-size", type=int, default=8)
@click.option("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
@click.option("--seq-len", type=int, default=128, help="Tokens per record (longer records are truncated).")
@click.option("--lr", type=float, default=2e-4, help="Peak learning rate (AdamW).")
@click.option("--warmup", "warmup_steps", type=int, default=0, help="Linear warmup steps.")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine")
@click.option("--weight-decay", type=float, default=0.0)
@click.option("--max-grad-norm", type=float, default=1.0, help="Clip gradients to this norm (0: off).")
@click.option("--seed", type=int, default=0, help="Seed of the data order, LoRA init and dropout.")
@click.option("--eval-records", type=int, default=64, help="Records held out of --data for evaluation.")
@click.option("--shuffle-block", type=int, default=32,
              help="Records per shuffled block (the data order shuffles blocks; see docs/trainer.md).")
@click.option("--text-field", default="text", help="Record field holding the text (else prompt+completion).")
@click.option("--verify-tolerance", type=float, default=1e-4,
              help="Relative difference allowed between the in-loop metric and its recomputation.")
@click.option("--allow-seen-data", is_flag=True, help="Train even on records this lineage already trained on.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (a missing device is an error).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              help="auto: bf16 autocast on a CUDA GPU that supports it, else float32.")
@click.option("--threads", type=int, help="CPU threads for torch (default: torch's choice; resumes keep it).")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where checkpoints are staged (default: temp dir).")
@click.option("--disk-quota", metavar="SIZE", help="Treat at most SIZE as free disk (e.g. a quota df does not show).")
@click.option("--log-every", type=int, default=10, help="Print progress every N steps.")
@click.option("-m", "--message", help="A note recorded with the run.")
@click.option("--store", metavar="DIR", help="The repository (default: $MSTORE_DIR, else .mstore at or above cwd).")
@click.option("--json", "as_json", is_flag=True, help="Progress as JSON lines on stdout.")
@click.option("--fault", hidden=True, help="Test only: stop the process at POINT:STEP.")
@click.pass_context
def train(ctx: click.Context, **o: Any) -> None:
    r"""Fine-tune a model from the store on a dataset from the store, committing every checkpoint.

    \b
    mstore train --base models/base --data data/syllo -b runs/syllo-lora --lora r=16 --steps 2000
    mstore train --resume runs/syllo-lora

    Pre-flight checks run first and stop the run with a clear message if the base or data do
    not resolve and verify, the lineage already trained on the data (--allow-seen-data), the
    disk is too small, the device is missing, or the branch's previous run did not finish.
    Each checkpoint is one atomic commit (weights or adapter, optimizer, scheduler, RNG, data
    position) with provenance, a data ledger, and a metric receipt: the eval metric is
    recomputed from the committed bytes before it is recorded as verified.
    """
    from .loop import Hooks, resume
    from .loop import train as run_train

    render = Renderer(o["as_json"])
    quota = parse_size(o["disk_quota"])
    hooks = Hooks(hold=o["fault"])
    with _repo(ctx, o["store"]) as repo:
        if o["resume_branch"]:
            if o["base"] or o["data"] or o["branch"] not in (None, o["resume_branch"]):
                raise click.UsageError("--resume BRANCH takes the base, data and branch from the checkpoint")
            changed = {
                k: o[k] for k in ("lora", "eval_data") if o[k] is not None
            } | {
                k: o[k] for k in ("save_every", "eval_every", "batch_size", "grad_accum", "seq_len", "lr",
                                  "warmup_steps", "schedule", "weight_decay", "max_grad_norm", "seed", "eval_records",
                                  "shuffle_block", "text_field", "verify_tolerance")
                if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
            }
            result = resume(
                o["resume_branch"], repo, report=render, hooks=hooks,
                steps=o["steps"], device=o["device"], precision=o["precision"], threads=o["threads"],
                work_dir=o["work_dir"], disk_quota=quota, log_every=o["log_every"], **changed,
            )
        else:
            missing = [f"--{k}" for k in ("base", "data") if not o[k]] + ([] if o["branch"] else ["-b/--branch"])
            if missing:
                raise click.UsageError(f"missing {', '.join(missing)} (or use --resume BRANCH)")
            cfg = TrainConfig(
                branch=o["branch"], base=o["base"], data=o["data"], eval_data=o["eval_data"],
                lora=LoraSpec.parse(o["lora"]) if o["lora"] else None,
                steps=o["steps"] or 1000, batch_size=o["batch_size"], grad_accum=o["grad_accum"],
                seq_len=o["seq_len"], lr=o["lr"], warmup_steps=o["warmup_steps"], schedule=o["schedule"],
                weight_decay=o["weight_decay"], max_grad_norm=o["max_grad_norm"], seed=o["seed"],
                save_every=o["save_every"], eval_every=o["eval_every"], eval_records=o["eval_records"],
                shuffle_block=o["shuffle_block"], text_field=o["text_field"],
                verify_tolerance=o["verify_tolerance"], allow_seen_data=o["allow_seen_data"], message=o["message"],
                device=o["device"], precision=o["precision"], threads=o["threads"], work_dir=o["work_dir"],
                disk_quota=quota, log_every=o["log_every"],
            )
            result = run_train(cfg, repo, report=render, hooks=hooks)
        if not o["as_json"]:
            failed = [c for c in result.checkpoints if c.receipt is not None and not c.receipt.get("verified")]
            click.echo(
                f"done: {result.branch} at {str(result.head)[:7]} (step {result.steps}); "
                f"{len(result.checkpoints)} checkpoints committed"
                + (f", {len(failed)} with FAILED verification" if failed else "")
                + (f"; best verified: {result.best[:7]} ({result.branch}.best)" if result.best else "")
            )


def main(argv: list[str] | None = None) -> None:
    """``python -m trainer``: run the command and map mstore errors to exit codes like ``mstore``."""
    try:
        train.main(args=argv, prog_name="python -m trainer", standalone_mode=False)
    except mstore.MstoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted: the branch keeps its last complete checkpoint; continue with --resume", err=True)
        sys.exit(130)
