"""Esper: morphogenetic training for PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from esper.core.kasmina.grown import GrownModel


def load_model(directory: Path | str) -> GrownModel:
    """Rebuild a network written by ``esper export`` as a plain ``nn.Module`` in eval mode (weights verified
    against their digest first). Imported on first use: ``import esper`` stays light."""
    from esper.app.export import load_model as load

    return load(directory)
