"""``python -m esper`` runs the CLI (runbooks use this so they never depend on PATH)."""

from esper.cli.main import run

if __name__ == "__main__":  # spawn-started worker processes import this module as __mp_main__
    run()
