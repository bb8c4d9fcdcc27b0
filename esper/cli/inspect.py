"""`esper inspect-checkpoint PATH [--verify] [--json]` (SPEC C-7): a checkpoint's manifest as tables, plus
integrity per file.

Inspect reads the manifest only and never loads a tensor (the tensor summary comes from the manifest), so it
works on a damaged checkpoint for triage. Every file is hashed and its header checked each time.

A checkpoint's config may name code (``module:function`` plug-ins) and paths: they are listed, and the ones a
resume would refuse unless the operator's own config names them (code; absolute or climbing paths) are flagged
with a warning on stderr. They are not damage: they never change the exit code.

Exit codes:
- 0: shown; integrity problems (mismatch, missing, truncated, extra file, bad manifest) are shown and warned
  about on stderr but do not fail the command without ``--verify``.
- 4 with ``--verify``: any integrity problem (each named on stderr; the tables/JSON are still printed first).
- 4 always: the path is not a checkpoint (e.g. a ``.pt`` file: never opened), or the checkpoint holds a
  pickle/torch.save archive or a non-regular file (a safety problem, not just damage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from esper.cli.common import JsonOpt, handle_errors, print_json, stderr, stdout
from esper.core.checkpoint import STRUCTURAL_KEYS
from esper.core.errors import CheckpointError

if TYPE_CHECKING:
    from esper.core.checkpoint import VerifyReport

VerifyOpt = Annotated[bool, typer.Option("--verify", help="Exit 4 on any integrity problem.")]
_MISSING = "-"


@handle_errors
def inspect_checkpoint(
    path: Annotated[Path, typer.Argument(help="Checkpoint dir, run dir, checkpoints dir or manifest.json.",
                                         show_default=False)],
    verify: VerifyOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a checkpoint: identity, trainer + emergency state, slots, metrics, tensors, optimizer groups,
    integrity per file."""
    from esper.core.checkpoint import verify_checkpoint  # hashing tensors needs torch: this command alone pays

    report = verify_checkpoint(path)
    doc = inspection(report)
    if as_json:
        print_json(doc)
    else:
        render(doc, stdout())
    flagged = doc["flagged"]
    if flagged:  # not damage, so never a failure by itself; what a resume refuses unless the operator names it
        listed = "; ".join(f"{r['key']} = {r['value']!r}" for r in flagged)
        stderr().print(f"warning: checkpoint {report.path} names code or paths outside it: {listed}. A resume "
                       "uses them only if your own config names the same values.", highlight=False, markup=False)
    if report.ok:
        return
    problems = "; ".join(report.problems)
    if report.unsafe:
        raise CheckpointError(f"checkpoint {report.path} is unsafe: {problems}")
    if verify:
        raise CheckpointError(f"checkpoint {report.path} failed verification: {problems}")
    stderr().print(f"[bold yellow]warning:[/] checkpoint {_esc(str(report.path))} has integrity problems: "
                   f"{_esc(problems)} (use --verify to fail on them)", highlight=False)


# the manifest fields this view shows; the others are listed by name only (other_keys)
_IDENTITY = ("run_id", "epoch", "global_step", "saved_at", "reason", "schema_version", "config_hash", "versions")
_SHOWN = {*_IDENTITY, "config_toml", "trainer_state", "emergency", "seeds", "controller", "metrics", "optimizer"}


def inspection(report: VerifyReport) -> dict[str, Any]:
    """The one JSON document --json prints; the tables render the same content. Values come from the manifest as
    read (also when it fails its schema: triage needs to see what is there), next to every problem found."""
    raw = report.document or {}
    emergency = _dict(raw.get("emergency"))
    optimizer = _dict(raw.get("optimizer"))
    seeds = raw.get("seeds")
    tensors = raw.get("tensors")
    return {
        "path": str(report.path),
        "identity": {k: raw.get(k) for k in _IDENTITY},
        "trainer": {"state": raw.get("trainer_state")},
        "emergency": {"level": emergency.get("level"), "history": emergency.get("history")},
        "seeds": [_seed_row(s) for s in seeds] if isinstance(seeds, list) else None,
        "controller": raw.get("controller"),
        "metrics": raw.get("metrics"),
        "tensors": _tensor_summary(tensors) if isinstance(tensors, dict) else None,
        "optimizer": {"groups": optimizer.get("groups")},
        "references": [r.to_dict() for r in report.references],
        "flagged": [r.to_dict() for r in report.references if _flag(r.kind, r.value)],
        "other_keys": sorted(k for k in raw if k not in _SHOWN and k not in STRUCTURAL_KEYS),
        "integrity": report.to_dict(),
    }


def _flag(kind: str, value: str) -> bool:
    """Code always; a path when it is absolute or climbs (``..``): it would write outside the run directory."""
    return kind == "code" or Path(value).is_absolute() or ".." in Path(value).parts


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _seed_row(seed: Any) -> dict[str, Any]:
    seed = _dict(seed)
    history = seed.get("history")
    last = history[-1] if isinstance(history, list) and history else None
    row = {k: seed.get(k) for k in ("slot", "seed_id", "blueprint", "stage", "alpha", "epochs_in_stage")}
    row["last_transition"] = last
    row["transitions"] = len(history) if isinstance(history, list) else None
    return row


def _tensor_summary(tensors: dict[str, Any]) -> dict[str, Any]:
    total = {"count": 0, "parameters": 0, "bytes": 0}
    dtypes: dict[str, int] = {}
    for entry in tensors.values():
        if not isinstance(entry, dict):
            continue
        for k in total:
            if type(entry.get(k)) is int:
                total[k] += entry[k]
        if isinstance(entry.get("dtypes"), dict):
            for d, n in entry["dtypes"].items():
                if type(n) is int:
                    dtypes[d] = dtypes.get(d, 0) + n
    return {"files": tensors, "total": {**total, "dtypes": dtypes}}


# --------------------------------------------------------------------------------------------------- tables


def render(doc: dict[str, Any], console: Console) -> None:
    """Print the inspection document as Rich tables."""
    ident = doc["identity"]
    versions = ident.get("versions")
    kv = _kv_table(f"checkpoint {doc['path']}")
    for key in ("run_id", "epoch", "global_step", "saved_at", "reason", "schema_version", "config_hash"):
        kv.add_row(key, _cell(ident.get(key)))
    if isinstance(versions, dict):
        for name, v in versions.items():
            kv.add_row(f"version.{name}", _cell(v))
    else:
        kv.add_row("versions", _cell(versions))
    console.print(kv)

    state = _kv_table("trainer + emergency")
    state.add_row("trainer_state", _cell(doc["trainer"]["state"]))
    state.add_row("emergency level", _cell(doc["emergency"]["level"]))
    history = doc["emergency"]["history"]
    state.add_row("emergency events", _cell(len(history) if isinstance(history, list) else history))
    console.print(state)
    if isinstance(history, list) and history:
        console.print(_records_table("emergency history", history))

    console.print(_seeds_table(doc["seeds"]))

    metrics = _kv_table("metrics at save time")
    if isinstance(doc["metrics"], dict) and doc["metrics"]:
        for k, v in doc["metrics"].items():
            metrics.add_row(str(k), _cell(v))
    else:
        metrics.add_row(_MISSING, _cell(doc["metrics"]))
    console.print(metrics)

    if isinstance(doc["controller"], dict) and doc["controller"]:
        ctl = _kv_table("controller")
        for k, v in doc["controller"].items():
            ctl.add_row(str(k), _cell(v))
        console.print(ctl)

    console.print(_tensors_table(doc["tensors"]))

    groups = doc["optimizer"]["groups"]
    if isinstance(groups, list) and groups:
        # a group's parameter indices as their count: a real model's would fill the terminal (--json has them)
        shown = [{**g, "params": f"{len(g['params'])} tensors"} if isinstance(g, dict) and isinstance(
            g.get("params"), list) else g for g in groups]
        console.print(_records_table("optimizer param groups", shown, index="group"))
    else:
        table = _kv_table("optimizer param groups")
        table.add_row(_MISSING, _cell(groups))
        console.print(table)

    if doc["references"]:
        refs = Table(title="code references and paths in the checkpoint's config", title_justify="left")
        for col in ("key", "kind", "value", "flag"):
            refs.add_column(col)
        flagged = {r["key"] for r in doc["flagged"]}
        for r in doc["references"]:
            refs.add_row(_esc(r["key"]), r["kind"], _esc(r["value"]), "[yellow]named by the checkpoint[/]"
                         if r["key"] in flagged else "")
        console.print(refs)

    console.print(_integrity_table(doc["integrity"]))


def _kv_table(title: str) -> Table:
    table = Table(title=_esc(title), title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    return table


def _records_table(title: str, records: list[Any], index: str = "#") -> Table:
    columns: list[str] = []
    for r in records:
        if isinstance(r, dict):
            columns += [str(k) for k in r if str(k) not in columns]
    columns = columns or ["value"]
    table = Table(title=title, title_justify="left")
    table.add_column(index)
    for c in columns:
        table.add_column(_esc(c))
    for i, r in enumerate(records):
        if isinstance(r, dict):
            table.add_row(str(i), *(_cell(r.get(c)) for c in columns))
        else:
            table.add_row(str(i), _cell(r), *([_MISSING] * (len(columns) - 1)))
    return table


def _seeds_table(seeds: Any) -> Table:
    table = Table(title="slots", title_justify="left")
    for col in ("slot", "seed", "blueprint", "stage", "alpha", "epochs in stage", "last transition",
                "reason"):
        table.add_column(col)
    if not isinstance(seeds, list) or not seeds:
        table.add_row(_cell(seeds if seeds else None), *([_MISSING] * 7))
        return table
    for s in seeds:
        if not isinstance(s, dict):
            table.add_row(_cell(s), *([_MISSING] * 7))
            continue
        last = s.get("last_transition")
        if isinstance(last, dict):
            move = f"{last.get('source', '?')} → {last.get('dest', '?')}"
            if last.get("trigger"):
                move += f" ({last['trigger']})"
            if last.get("utc"):
                move += f" @ {last['utc']}"
            reason = last.get("reason")
        else:
            move, reason = _cell(last), None
        alpha = s.get("alpha")
        table.add_row(_cell(s.get("slot")), _cell(s.get("seed_id")), _cell(s.get("blueprint")),
                      _cell(s.get("stage")), f"{alpha:.3f}" if isinstance(alpha, float) else _cell(alpha),
                      _cell(s.get("epochs_in_stage")), _esc(move), _cell(reason))
    return table


def _tensors_table(summary: Any) -> Table:
    table = Table(title="tensors (from the manifest)", title_justify="left")
    for col in ("file", "count", "parameters", "bytes", "dtypes"):
        table.add_column(col)
    if not isinstance(summary, dict):
        table.add_row(_cell(summary), _MISSING, _MISSING, _MISSING, _MISSING)
        return table
    rows = [*summary["files"].items(), ("total", summary["total"])]
    for name, entry in rows:
        if not isinstance(entry, dict):
            table.add_row(_esc(str(name)), _cell(entry), _MISSING, _MISSING, _MISSING)
            continue
        dtypes = entry.get("dtypes")
        dt = ", ".join(f"{k}×{v}" for k, v in dtypes.items()) if isinstance(dtypes, dict) else dtypes
        table.add_row(_esc(str(name)), _cell(entry.get("count")), _cell(entry.get("parameters")),
                      _cell(entry.get("bytes")), _cell(dt))
    return table


def _integrity_table(integrity: dict[str, Any]) -> Table:
    verdict = "[green]ok[/]" if integrity["ok"] else "[bold red]FAILED[/]"
    table = Table(title=f"integrity: {verdict}", title_justify="left")
    for col in ("file", "status", "bytes", "detail"):
        table.add_column(col)
    problems = [p for p in integrity["problems"] if p.startswith("manifest.json: ")]
    table.add_row("manifest.json", "[green]ok[/]" if not problems else "[red]invalid[/]", _MISSING,
                  _esc("; ".join(p.removeprefix("manifest.json: ") for p in problems)))
    for f in integrity["files"]:
        status = f["status"]
        style = "green" if status == "ok" else "red"
        table.add_row(_esc(f["file"]), f"[{style}]{status}[/]", _cell(f["actual_bytes"]), _esc(f["detail"]))
    return table


def _cell(value: Any) -> str:
    if value is None or value == "":
        return _MISSING
    if isinstance(value, dict | list):
        return _esc(json.dumps(value, default=str))
    return _esc(str(value))


def _esc(text: str) -> str:
    return text.replace("[", "\\[")
