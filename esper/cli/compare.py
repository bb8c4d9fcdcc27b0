"""`esper compare`: the configured run grown, the host alone and optionally a static larger host, over run seeds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from esper.cli.common import (
    ConfigOpt,
    JsonOpt,
    QuietOpt,
    SetOpt,
    global_options,
    handle_errors,
    load_config,
    print_json,
    stderr,
    stdout,
)
from esper.cli.view import si
from esper.core.errors import ConfigError

if TYPE_CHECKING:
    from esper.app.compare import Comparison, RunResult

SeedsOpt = Annotated[str, typer.Option("--seeds", help="Run seeds: a range 1..5 or a list 1,3,7.")]
StaticOpt = Annotated[list[str] | None, typer.Option(
    "--static-host", help="Also run a static host: KEY=VALUE on top of the config, seeds disabled (repeatable), "
                          "e.g. 'host.channels=[25,25,25]'.", show_default=False)]
ScratchOpt = Annotated[list[str] | None, typer.Option(
    "--scratch", help="Also train the final-size network from scratch: KEY=VALUE on top of the config, seeds "
                      "disabled (repeatable), e.g. 'host.n_layers=2'; adds the compute-to-target table.",
    show_default=False)]
TargetOpt = Annotated[float | None, typer.Option(
    "--target", help="The primary metric to reach for the compute-to-target table (default: each seed's scratch "
                     "run's final value).", show_default=False)]
FromOpt = Annotated[Path | None, typer.Option(
    "--from", help="Read the runs an earlier comparison left in DIR (VARIANT-sSEED) instead of training: the "
                   "tables again, e.g. with another --target. Writes nothing.", show_default=False)]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Directory of the runs (default: run.output_dir/compare-ID); VARIANT-sSEED each.",
    show_default=False)]


def _percent(metric: str | None) -> bool:
    return bool(metric and metric.endswith("accuracy"))


def _value(v: float | None, pct: bool) -> str:
    return "-" if v is None else f"{100 * v:.2f}%" if pct else f"{v:.4f}"


def _delta(v: float | None, pct: bool) -> str:
    return "-" if v is None else f"{100 * v:+.2f} pts" if pct else f"{v:+.4f}"


def _tables(result: Comparison) -> list[Table]:
    doc = result.to_doc()
    metric, pct = result.primary_metric or "primary", _percent(result.primary_metric)
    arrow = {"max": " (higher is better)", "min": " (lower is better)"}.get(result.direction or "", "")
    t = Table(title=f"{metric}{arrow} over run seeds {', '.join(map(str, result.seeds))}", expand=False)
    for col in ("variant", "runs ok", f"mean {metric}", "min", "max", "mean val_loss", "params", "mean FLOPs",
                "mean wall"):
        t.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for name, v in doc["variants"].items():
        p, params = v["primary"], v["params"]
        pr = "-" if params["min"] is None else (f"{params['min']:,}" if params["min"] == params["max"]
                                                else f"{params['min']:,}-{params['max']:,}")
        wall = v["wall_s"]["mean"]
        t.add_row(*(Text(c) for c in (
            name, f"{v['completed']}/{len(v['runs'])}", _value(p["mean"], pct), _value(p["min"], pct),
            _value(p["max"], pct), _value(v["val_loss"]["mean"], False), pr, _flops(v["flops"]["mean"]),
            "-" if wall is None else f"{wall:.1f} s")))
    tables = [t]
    d = Table(title="per seed", expand=False)
    d.add_column("seed", justify="right")
    names = [v.name for v in result.variants]
    for n in names:
        d.add_column(n, justify="right")
    for key in doc["deltas"]:
        d.add_column(key.replace("-", " - "), justify="right")
    runs = {(r.variant, r.seed): r for r in result.runs}
    for s in result.seeds:
        cells = [str(s)]
        for n in names:
            r = runs.get((n, s))
            cells.append("not run" if r is None else _value(r.primary, pct) if r.ok else
                         f"{r.status} (exit {r.exit_code})")
        cells += [_delta(dd["per_seed"].get(str(s)), pct) for dd in doc["deltas"].values()]
        d.add_row(*(Text(c) for c in cells))
    for label, agg in (("min", "min"), ("mean", "mean")):
        d.add_row(*(Text(c) for c in [label, *[""] * len(names),
                                        *[_delta(dd[agg], pct) for dd in doc["deltas"].values()]]))
    tables.append(d)
    compute = doc.get("compute_to_target")
    if compute is not None:
        tables.append(_compute_table(result, compute, pct))
    return tables


def _flops(n: float | None) -> str:
    return "-" if n is None else si(n)


def _compute_table(result: Comparison, compute: dict[str, Any], pct: bool) -> Table:
    target = "each seed's scratch final" if result.target is None else _value(result.target, pct)
    t = Table(title=f"training FLOPs to reach the target ({target}); saving = 1 - FLOPs / scratch's", expand=False)
    t.add_column("seed", justify="right")
    t.add_column("target", justify="right")
    names = [v.name for v in result.variants]
    for n in names:
        t.add_column(f"{n} FLOPs (s)", justify="right", no_wrap=True)
    savers = list(compute["saving"])
    for n in savers:
        t.add_column(f"{n} saving", justify="right")
    for s in result.seeds:
        entry = compute["per_seed"].get(str(s)) or {}
        if entry.get("target") is None:
            t.add_row(*(Text(c) for c in [str(s), "-", *["-"] * (len(names) + len(savers))]))
            continue
        cells = [str(s), _value(entry["target"], pct)]
        for n in names:
            hit = entry["reached"].get(n)
            cells.append("not reached" if hit is None else f"{_flops(hit['flops'])} ({hit['seconds']:.1f} s)")
        cells += [_saving(entry["saving"].get(n)) for n in savers]
        t.add_row(*(Text(c) for c in cells))
    for label in ("min", "mean", "max"):
        t.add_row(*(Text(c) for c in [label, "", *[""] * len(names),
                                        *[_saving(compute["saving"][n][label]) for n in savers]]))
    return t


def _saving(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def _progress(quiet: bool) -> Any:
    err = stderr()

    def report(run: RunResult, done: int, total: int) -> None:
        what = (f"{run.primary:.4f}" if run.ok and run.primary is not None else f"{run.status}, exit {run.exit_code}")
        if not quiet or not run.ok:
            err.print(f"[{done}/{total}] {run.variant} seed {run.seed}: {what} ({run.wall_s:.1f} s) {run.run_dir}",
                      highlight=False, markup=False)
            if run.error:
                err.print(f"  {run.error}", highlight=False, markup=False)

    return report


@handle_errors
def compare_cmd(
    ctx: typer.Context,
    seeds: SeedsOpt = "1..3",
    static_host: StaticOpt = None,
    scratch: ScratchOpt = None,
    target: TargetOpt = None,
    out: OutOpt = None,
    reuse: FromOpt = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Does growing pay on this model? Trains the configured run grown, the host alone (seeds.enabled=false) and,
    with --static-host, a static larger host, and with --scratch, the final-size network from scratch, over every
    run seed; prints the primary metric per variant (mean, min, max), val loss, params, training FLOPs and wall
    time, and grown minus host per seed. With --scratch (or --target): the training FLOPs each variant needs to
    reach the target, growth's saving against scratch per seed, and OUT/compute.png (metric against FLOPs).

    Each run is a real run directory (OUT/grown-s1, OUT/host-s1, ...; `esper plot` them); OUT/compare.json holds
    the --json document. Exit code: the worst run's.
    """
    from esper.app.compare import compare, parse_seeds  # torch and the engine: this command alone pays for them

    quiet = quiet or global_options(ctx).quiet
    try:
        seed_list = parse_seeds(seeds)
    except ConfigError as exc:  # a malformed option is a usage error (exit 2), like any other bad option value
        raise typer.BadParameter(str(exc).split(": ", 1)[1], param_hint="--seeds") from None
    if reuse is not None:
        if static_host or scratch or out is not None:
            raise typer.BadParameter("--from reads the variants and runs of DIR: leave out --static-host, "
                                     "--scratch and --out", param_hint="--from")
        from esper.app.compare import reanalyse

        _show(reanalyse(reuse, target), as_json)
    cfg = load_config(ctx, config, sets).config
    result = compare(cfg, seed_list, list(static_host or []), out, progress=_progress(quiet or as_json),
                     scratch=list(scratch or []), target=target)
    _show(result, as_json)


def _show(result: Comparison, as_json: bool) -> None:
    """Print the comparison (tables, or the --json document) and exit with the worst run's code."""
    from esper.core.records import machine

    if as_json:
        print_json(result.to_doc())
    else:
        console = stdout()
        if not console.is_terminal:
            console.width = max(console.width, 160)  # a log or pipe: never squeeze figures into ellipses
        for table in _tables(result):
            console.print(table)
        console.print(f"runs: {result.out}  ({Path(result.out) / 'compare.json'})", highlight=False, markup=False)
        console.print(machine.line(), highlight=False, markup=False)
        if result.stopped:
            stderr().print("stopped: the remaining runs were not started", highlight=False, markup=False)
    raise typer.Exit(result.exit_code)

