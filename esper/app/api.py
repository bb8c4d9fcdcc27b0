"""Esper from Python (a notebook, a sweep script, a test harness): ``esper.train`` runs one training session in
this process exactly as ``esper train --quiet`` does and returns its summary; failures are Esper's typed errors
(:class:`esper.core.errors.EsperError`, whose ``exit_code`` is the CLI's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from esper.app import scaleout
from esper.core import config as config_mod
from esper.core.config import EsperConfig


def resolve(config: str | Path | Mapping[str, Any] | EsperConfig | None, overrides: Sequence[str]) -> EsperConfig:
    """The config as the CLI resolves it: a file path, a dict of sections, an ``EsperConfig``, or None (then
    ``$ESPER_CONFIG``, ``./esper.toml``, else the built-in defaults); ``overrides`` are ``--set`` items."""
    if isinstance(config, EsperConfig):
        return config_mod.from_dict(config.to_dict(), overrides)
    if isinstance(config, Mapping):
        return config_mod.from_dict(config, overrides)
    return config_mod.load(Path(config) if config is not None else None, overrides).config


def train(config: str | Path | Mapping[str, Any] | EsperConfig | None = None, *, overrides: Sequence[str] = (),
          run_dir: str | Path | None = None, resume: str | Path | None = None,
          allow_config_change: Sequence[str] = (), faults: Sequence[str] = ()) -> dict[str, Any]:
    """Train as ``esper train --quiet`` would and return the run's summary (what ``summary.json`` holds: status,
    exit_code, final metrics, seeds, emergencies, rollbacks...). A run that ends HALTED or STOPPED returns its
    summary too (look at ``exit_code``); what keeps a run from starting raises (a ConfigError for a bad config,
    a CheckpointError for a bad ``resume``, a UsageError for a run directory that is not empty...).

    ``resume``: a run directory or checkpoint; with ``config`` None the checkpoint's own config is the base
    (``overrides`` still apply), as a plain ``esper train --resume`` does."""
    plain = resume is not None and config is None
    own = config_mod.operator_config(overrides) if plain else resolve(config, overrides)
    session = scaleout.prepare(own, run_dir=Path(run_dir) if run_dir is not None else None,
                               resume=Path(resume) if resume is not None else None,
                               base="checkpoint" if plain else "config", overrides=list(overrides),
                               faults=list(faults), allow_config_change=list(allow_config_change))
    return session.run(reporter=None)
