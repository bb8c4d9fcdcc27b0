"""Bounded torch.profiler window (T-13): traces go to the run directory; an export failure is a WARNING event
and never re-runs or aborts training."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.profiler

from esper.core.config import ProfilerConfig
from esper.core.errors import ConfigError


class ProfilerWindow:
    """Profiles ``wait + warmup + active`` steps once, then stays off."""

    def __init__(self, cfg: ProfilerConfig, run_dir: Path, emit: Callable[..., Any]) -> None:
        self.cfg = cfg
        self.emit = emit
        self.prof: torch.profiler.profile | None = None
        self.exported: list[str] = []
        if not cfg.enabled:
            return
        if torch.profiler.ProfilerActivity.CPU not in torch.profiler.supported_activities():
            raise ConfigError("trainer.profiler.enabled: this torch build cannot profile the CPU")
        self.dir = Path(cfg.dir) if Path(cfg.dir).is_absolute() else run_dir / cfg.dir
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"trainer.profiler.dir = {cfg.dir!r}: cannot create {self.dir}: {exc}") from exc
        if not os.access(self.dir, os.W_OK):
            raise ConfigError(f"trainer.profiler.dir = {cfg.dir!r}: {self.dir} is not writable")
        self.prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            schedule=torch.profiler.schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=1),
            on_trace_ready=self._export)

    def __enter__(self) -> ProfilerWindow:
        if self.prof is not None:
            self.prof.__enter__()
            self.emit("tolaria", "profiler.started", "INFO", dir=str(self.dir), wait=self.cfg.wait,
                      warmup=self.cfg.warmup, active=self.cfg.active)
        return self

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def __exit__(self, *exc: object) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)

    def _export(self, prof: torch.profiler.profile) -> None:
        path = self.dir / f"trace-step{prof.step_num}.json"
        try:
            prof.export_chrome_trace(str(path))
        except (OSError, RuntimeError) as exc:
            self.emit("tolaria", "profiler.export_failed", "WARNING", path=str(path), error=str(exc))
            return
        self.exported.append(str(path))
        self.emit("tolaria", "profiler.exported", "INFO", path=str(path))
