"""``python -m esper`` runs the CLI (runbooks use this so they never depend on PATH)."""

from esper.cli.main import run

run()
