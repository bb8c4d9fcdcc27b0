"""Esper: morphogenetic training for PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from esper.core.kasmina.grown import GrownModel


def train(config: Any = None, **options: Any) -> dict[str, Any]:
    """Run one training session in this process, as ``esper train --quiet`` does, and return its summary (see
    :func:`esper.app.api.train` for the options: ``overrides``, ``run_dir``, ``resume``, ``allow_config_change``,
    ``faults``). ``config``: a TOML path, a dict of sections, an ``EsperConfig``, or None (``$ESPER_CONFIG``,
    ``./esper.toml``, else the built-in defaults)."""
    from esper.app.api import train as run

    return run(config, **options)


def load_model(directory: Path | str) -> GrownModel:
    """Rebuild a network written by ``esper export`` as a plain ``nn.Module`` in eval mode (weights verified
    against their digest first). Imported on first use: ``import esper`` stays light."""
    from esper.app.export import load_model as load

    return load(directory)
