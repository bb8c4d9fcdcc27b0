"""`esper config show|validate`."""

from __future__ import annotations

import typer

from esper.cli.common import ConfigOpt, JsonOpt, SetOpt, handle_errors, load_config, print_json, stderr

app = typer.Typer(help="Show or validate the resolved configuration.", no_args_is_help=True)


@app.command("show")
@handle_errors
def show(ctx: typer.Context, config: ConfigOpt = None, sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Print the resolved config (file + --set overrides + defaults) as TOML, or JSON with --json."""
    resolved = load_config(ctx, config, sets)
    if as_json:
        print_json(resolved.config.to_dict())
    else:
        extra = f" with {list(resolved.overrides)}" if resolved.overrides else ""
        typer.echo(f"# resolved from {resolved.source}{extra}")
        typer.echo(resolved.config.to_toml(), nl=False)


@app.command("validate")
@handle_errors
def validate(
    ctx: typer.Context, config: ConfigOpt = None, sets: SetOpt = None, as_json: JsonOpt = False
) -> None:
    """Validate the config as `train` would: the schema, then the device, every plug-in reference (imported) and
    every blueprint name; exit 0 when valid, 3 naming the key when not."""
    resolved = load_config(ctx, config, sets)
    from esper.app.preflight import preflight  # builds the task and host: torch, for this command alone

    preflight(resolved.config)
    doc = {"valid": True, "path": str(resolved.path) if resolved.path else None, "hash": resolved.config.config_hash()}
    if as_json:
        print_json(doc)
    else:
        stderr().print(f"ok: {resolved.source} is valid (hash {doc['hash'][:12]})", highlight=False, markup=False)
