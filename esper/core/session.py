"""One training session: resolve the run directory (new or resumed), wire the parts, run, summarise."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from esper.core.checkpoint import LoadedCheckpoint, load_checkpoint, resolve_checkpoint, verify_checkpoint
from esper.core.config import EsperConfig, FaultConfig, from_dict, from_toml_text
from esper.core.errors import CheckpointError, ConfigError
from esper.core.rundir import RunDir
from esper.core.tolaria.trainer import Reporter, Trainer


def parse_fault_flag(text: str) -> FaultConfig:
    """``NAME@EPOCH[:STEP]`` -> a fault entry (validated like the config's ``[[faults]]``)."""
    name, sep, at = text.partition("@")
    if not sep:
        raise ConfigError(f"--fault {text!r}: expected NAME@EPOCH[:STEP], e.g. nan_loss@2:5")
    try:
        return FaultConfig.model_validate({"name": name, "at": at})
    except ValueError as exc:
        raise ConfigError(f"--fault {text!r}: {exc}") from exc


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(old) | set(new)):
        path = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(changed_keys(a, b, path + "."))
        elif a != b:
            keys.append(path)
    return keys


def checkpoint_config(path: Path, overrides: list[str]) -> EsperConfig:
    """The config a checkpoint was trained with (plus ``--set`` overrides): the base of a plain ``--resume``."""
    report = verify_checkpoint(resolve_checkpoint(path))
    if not report.ok or report.manifest is None:
        raise CheckpointError(f"{path}: checkpoint does not verify: {'; '.join(report.problems)}")
    saved = from_toml_text(report.manifest.config_toml, source=f"{path} [config_toml]")
    return from_dict(saved.to_dict(), overrides)


@dataclass
class TrainSession:
    cfg: EsperConfig
    run_dir: RunDir
    resume: LoadedCheckpoint | None = None
    config_changes: list[str] = field(default_factory=list)

    @classmethod
    def prepare(cls, cfg: EsperConfig, *, run_dir: Path | None, resume: Path | None = None,
                faults: list[str] | None = None, allow_config_change: list[str] | None = None) -> TrainSession:
        """Validate everything that can be checked before training: fault flags, checkpoint, config drift."""
        if faults:
            extra = [parse_fault_flag(f) for f in faults]
            cfg = from_dict({**cfg.to_dict(), "faults": [*cfg.to_dict()["faults"], *(f.model_dump() for f in extra)]})
        if resume is None:
            rd = RunDir.create(cfg, run_dir)
            rd.write_config(cfg)
            return cls(cfg, rd)
        loaded = load_checkpoint(resume)
        payload = loaded.payload
        changes: list[str] = []
        if payload["config_hash"] != cfg.config_hash():
            saved = from_toml_text(payload["config_toml"], source=f"{loaded.path}/manifest.json [config_toml]")
            changes = changed_keys(saved.to_dict(), cfg.to_dict())
            allowed = allow_config_change or []
            refused = [k for k in changes if not any(k == a or k.startswith(a + ".") for a in allowed)]
            if refused:
                raise ConfigError(
                    f"resume refused: the config differs from the checkpoint's in {refused}; "
                    f"pass --allow-config-change KEY for each key you mean to change")
        path = run_dir if run_dir is not None else loaded.path.parent.parent
        rd = RunDir(path, payload["run_id"])
        rd.checkpoints.mkdir(parents=True, exist_ok=True)
        rd.write_config(cfg)
        return cls(cfg, rd, loaded, changes)

    def run(self, reporter: Reporter | None) -> dict[str, Any]:
        trainer = Trainer(self.cfg, self.run_dir, reporter=reporter)
        if self.config_changes:
            trainer.emit("cli", "config.changed_on_resume", "WARNING", keys=self.config_changes)
        with graceful_signals(trainer):
            return trainer.run(resume=self.resume)


@contextmanager
def graceful_signals(trainer: Trainer) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. A second SIGINT aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        if trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
