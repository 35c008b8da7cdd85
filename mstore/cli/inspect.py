"""log, show, ls, cat, status, diff: the read-only commands."""

from __future__ import annotations

import json

import click

from . import _output as out
from ._common import json_option, state


def _default_rev(repo, rev: str | None) -> str:
    if rev:
        return rev
    branches = repo.branches()
    if len(branches) == 1:
        return branches[0].name
    from ..errors import UserError

    names = ", ".join(b.name for b in branches[:10]) or "none yet"
    raise UserError(f"name a branch or commit (branches: {names})")


@click.command()
@click.argument("rev", required=False)
@click.option("--oneline", is_flag=True, help="One line per commit: short id, kind, message.")
@click.option("-n", "--max-count", "limit", type=click.IntRange(min=1), help="Show at most N commits.")
@json_option
@click.pass_context
def log(ctx: click.Context, rev: str | None, oneline: bool, limit: int | None, as_json: bool) -> None:
    """List the commits reachable from REV (a branch, tag or id), newest first."""
    with state(ctx).repo() as repo:
        entries = repo.log(_default_rev(repo, rev), limit=limit)
        if as_json:
            out.emit_json([{"id": e.id, **_brief(e.commit)} for e in entries])
            return
        for e in entries:
            c = e.commit
            if oneline:
                out.echo(f"{e.id.short} {c.kind:<10} {c.message}")
                continue
            out.echo(f"commit {e.id}")
            out.echo(f"Kind:   {c.kind}")
            out.echo(f"Author: {c.author}   {out.fmt_time(c.time)}")
            size = c.stats.get("bytes")
            line = f"Size:   {out.human_bytes(size)} in {c.stats.get('files', 0)} files"
            if c.stats.get("tensors"):
                line += f", {c.stats['tensors']} tensors, {c.stats['parameters']:,} parameters"
            out.echo(line)
            meta = _scalars(c.meta)
            if meta:
                out.echo("Meta:   " + ", ".join(f"{k}={v}" for k, v in meta))
            metrics = _scalars(c.metrics)
            receipts = c.metrics.get("receipts") if isinstance(c.metrics.get("receipts"), dict) else {}
            if metrics or receipts:
                shown = [f"{k}={v}{_verified_mark(receipts.get(k))}" for k, v in metrics]
                out.echo("Metrics: " + ", ".join(shown))
            out.echo("")
            out.echo(f"    {c.message}")
            out.echo("")


def _scalars(d: dict) -> list[tuple[str, object]]:
    """Only the scalar entries of a metadata dict (nested records are for --json and show)."""
    return [(k, v) for k, v in sorted(d.items()) if isinstance(v, (str, int, float, bool)) or v is None]


def _verified_mark(receipt) -> str:
    if not isinstance(receipt, dict):
        return ""
    return " (verified)" if receipt.get("verified") else " (VERIFICATION FAILED)"


def _receipt_line(name: str, r: dict) -> str:
    """One line per metric receipt: is it verified, and against what."""
    ck = r.get("checkpoint") or {}
    data = r.get("eval_data") or {}
    against = f"tree {str(ck.get('tree', ''))[:7]}, eval split {str(data.get('split', ''))[:7]}"
    if r.get("verified"):
        return f"{name} = {r.get('value')}  verified: recomputed from the committed bytes ({against})"
    return (
        f"{name}  VERIFICATION FAILED ({r.get('status', 'failed')}): in-loop {r.get('in_loop')}, "
        f"recomputed {r.get('recomputed')} ({against})"
    )


def _brief(c) -> dict:
    return {
        "parents": list(c.parents),
        "time": c.time,
        "author": c.author,
        "kind": c.kind,
        "message": c.message,
        "meta": c.meta,
        "metrics": c.metrics,
        "stats": c.stats,
    }


@click.command()
@click.argument("rev", required=False)
@json_option
@click.pass_context
def show(ctx: click.Context, rev: str | None, as_json: bool) -> None:
    """Show everything recorded about a commit: kind, size, metadata, metrics, inputs, provenance.

    With --json the whole commit is one document, e.g. `mstore show exp1 --json | jq .provenance`.
    """
    with state(ctx).repo() as repo:
        d = repo.show(_default_rev(repo, rev))
        if as_json:
            out.emit_json(d)
            return
        refs = f" ({', '.join(d['refs'])})" if d["refs"] else ""
        out.echo(f"commit {d['id']}{refs}")
        out.echo(f"kind      {d['kind']}")
        out.echo(f"message   {d['message']}")
        out.echo(f"author    {d['author']}")
        out.echo(f"time      {out.fmt_time(d['time'])} ({out.ago(d['time'])})")
        out.echo(f"parents   {' '.join(p[:7] for p in d['parents']) or '(none: first version)'}")
        st = d["stats"]
        out.echo(f"size      {out.human_bytes(st.get('bytes'))} in {st.get('files', 0)} files")
        if st.get("tensors"):
            dtypes = ", ".join(f"{k}×{v}" for k, v in st.get("dtypes", {}).items())
            out.echo(f"tensors   {st['tensors']} ({st['parameters']:,} parameters; {dtypes})")
        for section in ("meta", "metrics", "params", "inputs"):
            if d[section]:
                out.echo(f"{section}")
                for k, v in sorted(d[section].items()):
                    if section == "metrics" and k == "receipts" and isinstance(v, dict):
                        for name, r in sorted(v.items()):
                            out.echo(f"  {_receipt_line(name, r) if isinstance(r, dict) else f'{name} {r}'}")
                    elif isinstance(v, dict):
                        out.echo(f"  {k:<20} {json.dumps(v, sort_keys=True)[:200]}")
                    else:
                        out.echo(f"  {k:<20} {v}")
        p = d["provenance"]
        out.echo("provenance")
        code = p.get("code")
        if code:
            out.echo(f"  code       {code['commit'][:12]}{' (dirty)' if code.get('dirty') else ''}")
        out.echo(f"  command    {' '.join(p.get('command', []))}")
        out.echo(f"  cwd        {p.get('cwd', '')}")
        out.echo(
            f"  host       {p.get('user', '')}@{p.get('host', '')}  python {p.get('python', '')}  "
            f"mstore {p.get('mstore', '')}"
        )
        pk = p.get("packages") or {}
        if pk:
            out.echo("  packages   " + ", ".join(f"{k} {v}" for k, v in sorted(pk.items())))


@click.command()
@click.argument("spec", metavar="REV[:PATH]", required=False)
@click.option("--no-recursive", is_flag=True, help="Only the top level of the directory.")
@json_option
@click.pass_context
def ls(ctx: click.Context, spec: str | None, no_recursive: bool, as_json: bool) -> None:
    """List files of a commit with sizes; for safetensors: tensors, dtypes and parameters."""
    with state(ctx).repo() as repo:
        entries = repo.ls(_default_rev(repo, spec), recursive=not no_recursive)
        if as_json:
            out.emit_json([e.to_dict() for e in entries])
            return
        rows = []
        for e in entries:
            desc = ""
            if e.safetensors:
                s = e.safetensors
                desc = f"{s['tensors']} tensors, {s['parameters']:,} params, " + ", ".join(
                    f"{k}×{v}" for k, v in sorted(s["dtypes"].items())
                )
            rows.append((e.path + ("/" if e.kind == "tree" else ""), out.human_bytes(e.size), e.id[:7], desc))
        out.table(rows, ("path", "size", "id", "tensors"))


@click.command()
@click.argument("spec", metavar="REV:PATH")
@click.pass_context
def cat(ctx: click.Context, spec: str) -> None:
    """Write a file of a commit to stdout, verified chunk by chunk and as a whole.

    Example: mstore cat exp1:model.safetensors > m.safetensors
    """
    with state(ctx).repo() as repo:
        with repo.open_file(spec) as f:
            while True:
                data = f.read(1 << 20)
                if not data:
                    break
                out.write_bytes(data)
        out.flush()


def _render_diff(result, as_json: bool, title: str) -> None:
    if as_json:
        out.emit_json(result.to_dict())
        return
    out.echo(title)
    unchanged = 0
    for f in result.files:
        if f.status == "unchanged":
            unchanged += 1
            continue
        sizes = ""
        if f.status == "modified":
            sizes = f"  {out.human_bytes(f.old_size)} -> {out.human_bytes(f.new_size)}"
        elif f.status == "added":
            sizes = f"  {out.human_bytes(f.new_size)}"
        elif f.status == "removed":
            sizes = f"  {out.human_bytes(f.old_size)}"
        out.echo(f"{f.status:<9} {f.path}{sizes}")
        if f.note:
            out.echo(f"          ({f.note})")
        same = 0
        for t in f.tensors:
            if t.status == "unchanged":
                same += 1
                continue
            if t.status == "changed":
                how = ""
                if t.max_abs_diff is not None:
                    how = f"  max|Δ| {t.max_abs_diff:.4g}  rel L2 {t.rel_l2:.4g}"
                out.echo(f"  ~ {t.name} {t.new['dtype']}{t.new['shape']}{how}")
            elif t.status == "added":
                out.echo(f"  + {t.name} {t.new['dtype']}{t.new['shape']}")
            elif t.status == "removed":
                out.echo(f"  - {t.name} {t.old['dtype']}{t.old['shape']}")
            else:
                out.echo(
                    f"  ! {t.name} {t.status.replace('_', ' ')}: "
                    f"{t.old['dtype']}{t.old['shape']} -> {t.new['dtype']}{t.new['shape']}"
                )
        if same:
            out.echo(f"  ({same} tensors unchanged)")
    if unchanged:
        out.echo(f"({unchanged} file{'s' if unchanged != 1 else ''} unchanged)")
    if not any(f.status != "unchanged" for f in result.files):
        out.echo("no changes")


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("-b", "--branch", required=True, help="Branch whose head PATH is compared with.")
@click.option("--no-magnitudes", is_flag=True, help="Skip computing how much changed tensors moved (faster).")
@json_option
@click.pass_context
def status(ctx: click.Context, path: str, branch: str, no_magnitudes: bool, as_json: bool) -> None:
    """What committing PATH to BRANCH would change, by file and by tensor. Stores nothing."""
    with state(ctx).repo() as repo:
        result = repo.status(path, branch, magnitudes=not no_magnitudes)
        head = result.old[:7] if result.old else "(new branch)"
        _render_diff(result, as_json, f"{path} against {branch} {head}:")


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--no-magnitudes", is_flag=True, help="Skip computing how much changed tensors moved (faster).")
@json_option
@click.pass_context
def diff(ctx: click.Context, a: str, b: str, no_magnitudes: bool, as_json: bool) -> None:
    """Compare versions A and B: files and tensors added, removed, changed (max |Δ|, relative L2)."""
    with state(ctx).repo() as repo:
        result = repo.diff(a, b, magnitudes=not no_magnitudes)
        _render_diff(result, as_json, f"{a} ({result.old[:7]}) -> {b} ({result.new[:7]}):")
