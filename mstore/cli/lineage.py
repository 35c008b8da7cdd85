"""import-model, import-data, lineage, seen: models and data with a recorded past."""

from __future__ import annotations

import click

from .. import lineage as lin
from . import _output as out
from ._common import json_option, state

_dry_run = click.option("--dry-run", is_flag=True, help="Check and count, say what would be stored; store nothing.")
_allow = click.option(
    "--allow-regression", is_flag=True, help="Commit even if it looks like a regression of the branch head (recorded)."
)


def _commit_line(verb: str, res, branch: str) -> str:
    c = res.commit
    if c.dry_run:
        return f"would {verb} to {branch}: {out.human_bytes(c.stats.get('bytes'))}, {out.human_bytes(c.new_bytes)} new"
    return (
        f"{verb} to {branch} {c.id.short}: {out.human_bytes(c.stats.get('bytes'))} in {c.stats.get('files', 0)} files "
        f"({out.human_bytes(c.new_bytes)} new)"
    )


@click.command("import-model")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("-b", "--branch", required=True, help="Branch to commit the model to, e.g. models/base.")
@click.option("-m", "--message", help="Commit message (default: import FOLDER (ARCHITECTURE)).")
@_allow
@_dry_run
@json_option
@click.pass_context
def import_model(ctx, path, branch, message, allow_regression, dry_run, as_json) -> None:
    """Commit a local Hugging Face model folder (config, tokenizer, safetensors) as a model.

    The folder is checked first: config.json must parse, weights must be safetensors (every
    shard an index names must exist), and a tokenizer must be there. The commit records the
    architecture and sizes; `mstore train --base BRANCH` trains from it.
    """
    with state(ctx).repo() as repo:
        res = lin.import_model(repo, path, branch, message, allow_regression=allow_regression, dry_run=dry_run)
        for w in res.warnings:
            out.warn(w)
        if as_json:
            c = res.commit
            out.emit_json(
                {
                    "id": c.id,
                    "branch": branch,
                    "dry_run": c.dry_run,
                    "stats": c.stats,
                    "new_bytes": c.new_bytes,
                    **res.summary,
                    "warnings": res.warnings,
                }
            )
            return
        m = res.summary["model"]
        facts = ", ".join(
            str(x)
            for x in (m.get("model_type"), f"{m['num_hidden_layers']} layers" if "num_hidden_layers" in m else None)
            if x
        )
        params = res.commit.stats.get("parameters")
        out.echo(
            _commit_line("imported", res, branch)
            + f"; {facts}"
            + (f", {params:,} parameters" if params else "")
            + f" in {res.summary['shards']} safetensors file{'s' if res.summary['shards'] != 1 else ''}"
        )


@click.command("import-data")
@click.argument("path", type=click.Path(exists=True))
@click.option("-b", "--branch", required=True, help="Branch to commit the dataset to, e.g. data/syllo.")
@click.option("-m", "--message", help="Commit message (default: import NAME (N files, M records)).")
@click.option(
    "--tokenizer",
    metavar="PATH|REV",
    help="Count tokens with this tokenizer: a tokenizer.json, a folder holding one, or a model revision.",
)
@click.option("--text-field", default="text", show_default=True, help="Record field holding the text (for tokens).")
@_allow
@_dry_run
@json_option
@click.pass_context
def import_data(ctx, path, branch, message, tokenizer, text_field, allow_regression, dry_run, as_json) -> None:
    """Commit JSONL files (one file, or a folder of them) as a dataset, with record counts.

    Every line must be a JSON object (a record); blank lines are not records. The commit
    records the records per file (and tokens, with --tokenizer), so `mstore seen` and the
    trainer's data ledger can speak in records.
    """
    with state(ctx).repo() as repo:
        res = lin.import_data(
            repo,
            path,
            branch,
            message,
            tokenizer=tokenizer,
            text_field=text_field,
            allow_regression=allow_regression,
            dry_run=dry_run,
        )
        for w in res.warnings:
            out.warn(w)
        if as_json:
            c = res.commit
            out.emit_json(
                {
                    "id": c.id,
                    "branch": branch,
                    "dry_run": c.dry_run,
                    "stats": c.stats,
                    "new_bytes": c.new_bytes,
                    "data": res.summary,
                    "warnings": res.warnings,
                }
            )
            return
        s = res.summary
        tokens = f", {s['tokens']:,} tokens" if "tokens" in s else ""
        out.echo(
            _commit_line("imported", res, branch)
            + f"; {len(s['files'])} JSONL files, {s['records']:,} records"
            + tokens
        )


def _fmt_metric(name: str, m: dict) -> str:
    v = m.get("value")
    if not isinstance(v, (int, float)):
        return f"{name} -"
    return f"{name} {v:.4g} {'(verified)' if m.get('verified') else '(NOT verified)'}"


def _describe(n: dict) -> str:
    if n.get("missing"):
        return f"{n['id'][:7]} (missing: {n['missing']})"
    name = ", ".join(n.get("refs") or [])
    parts = [f"{name} {n['id'][:7]}" if name else n["id"][:7], n.get("kind", "")]
    if "step" in n:
        parts.append(f"step {n['step']}" + (f"/{n['steps']}" if "steps" in n else ""))
    run = n.get("run") or {}
    if run.get("method"):
        parts.append(run["method"])
    if run.get("status") and run.get("status") != "finished":
        parts.append(f"run {run['status']}")
    d = n.get("data")
    if d:
        parts.append(
            f"{d.get('files', 0)} files, {d.get('records', 0):,} records"
            + (f", {d['tokens']:,} tokens" if "tokens" in d else "")
        )
    if n.get("model"):
        parts.append(str(n["model"]))
    if n.get("parameters"):
        parts.append(f"{n['parameters']:,} parameters")
    for mname, m in (n.get("metrics") or {}).items():
        parts.append(_fmt_metric(mname, m))
    return " · ".join(p for p in parts if p)


def _tree_lines(n: dict, prefix: str = "") -> list[str]:
    lines = []
    inputs = n.get("inputs", [])
    for i, inp in enumerate(inputs):
        last = i == len(inputs) - 1
        was = (
            f" (given as {inp['rev']})"
            if inp.get("rev") and inp["rev"] not in (inp["node"].get("refs") or []) and inp["rev"] != inp["node"]["id"]
            else ""
        )
        lines.append(f"{prefix}{'└── ' if last else '├── '}{inp['name']}: {_describe(inp['node'])}{was}")
        lines.extend(_tree_lines(inp["node"], prefix + ("    " if last else "│   ")))
    return lines


@click.command()
@click.argument("ref")
@click.option("--dot", "as_dot", is_flag=True, help="Print a graphviz digraph (pipe into `dot -Tsvg`).")
@click.option("--depth", type=click.IntRange(min=1), default=lin.MAX_DEPTH, show_default=True, help="How far back.")
@json_option
@click.pass_context
def lineage(ctx, ref, as_dot, depth, as_json) -> None:
    """What REF was made from: its recorded inputs (base model, data), and theirs, back to the roots.

    Inputs come from the commits themselves (the trainer and `mstore run` record them by id),
    so the answer holds even after the branches that named them have moved or been deleted.
    """
    if as_dot and as_json:
        raise click.UsageError("give either --json or --dot")
    with state(ctx).repo() as repo:
        tree = lin.lineage(repo, ref, max_depth=depth)
        if as_json:
            out.emit_json(tree)
            return
        if as_dot:
            out.echo(lin.to_dot(tree).rstrip("\n"))
            return
        out.echo(_describe(tree))
        for line in _tree_lines(tree):
            out.echo(line)


@click.command()
@click.argument("data", metavar="DATA[:PATH]")
@click.option("--by", "by", metavar="REF", help="Only this checkpoint's lineage (default: every branch).")
@click.option("--files", "show_files", is_flag=True, help="List every file, with the record ranges seen.")
@json_option
@click.pass_context
def seen(ctx, data, by, show_files, as_json) -> None:
    """Which records of a dataset (or one of its files) were trained on, and by what.

    Reads the data ledger every trainer checkpoint carries: the files (by content id) and
    record ranges its whole lineage has consumed. Without --by, every branch is asked.
    """
    with state(ctx).repo() as repo:
        res = lin.seen(repo, data, by)
        if as_json:
            out.emit_json(res)
            return
        d = res["data"]
        out.echo(f"{d['rev']} {d['id'][:7]}: {d['files']} files, {d['records']:,} records")
        if not res["by"]:
            out.echo("  not trained on by any branch")
        for c in res["by"]:
            if not c["ledger"]:
                out.echo(f"  {c['ref']} {c['id'][:7]}: no data ledger (not a trainer checkpoint)")
                continue
            pct = 100.0 * c["records_seen"] / d["records"] if d["records"] else 0.0
            out.echo(
                f"  {c['ref']} {c['id'][:7]} (step {c['step']}): {c['records_seen']:,} of {d['records']:,} records "
                f"({pct:.1f} %), {c['files_seen']} of {d['files']} files touched, {c['files_complete']} complete"
            )
            if show_files or d["files"] <= 5:
                for f in c["files"]:
                    ranges = ", ".join(f"{a}-{b - 1}" for a, b in f["ranges"][:6])
                    more = f" (+{len(f['ranges']) - 6} ranges)" if len(f["ranges"]) > 6 else ""
                    out.echo(f"    {f['path']}  {f['seen']:,}/{f['records']:,}  {ranges}{more}")
