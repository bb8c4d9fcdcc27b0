"""One training session: resolve the run directory (new or resumed), check what can be checked before training,
run, summarise.

A resume verifies the checkpoint once and parses its config once: the loaded, verified checkpoint is what the
config comparison reads and what the trainer restores from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.core import tensorboard
from esper.core.checkpoint import LoadedCheckpoint, load_checkpoint
from esper.core.config import EsperConfig, FaultConfig, from_dict, from_toml_text
from esper.core.device import preflight
from esper.core.errors import CheckpointError, ConfigError
from esper.core.rundir import RunDir
from esper.core.runlock import RunLock
from esper.core.telemetry import Emitter
from esper.core.tolaria import Reporter, train


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


@dataclass(frozen=True)
class Resume:
    """A verified checkpoint to resume from and the config it was trained with (parsed once)."""

    checkpoint: LoadedCheckpoint
    config: EsperConfig

    @classmethod
    def load(cls, path: Path) -> Resume:
        loaded = load_checkpoint(path)
        text = loaded.manifest.config_toml
        if text is None:
            raise CheckpointError(f"{loaded.path}: the manifest has no config_toml (not a training checkpoint)")
        return cls(loaded, from_toml_text(text, source=f"{loaded.path}/manifest.json [config_toml]"))

    def config_with(self, overrides: list[str]) -> EsperConfig:
        """The checkpoint's own config plus ``--set`` overrides: the base of a plain ``--resume``."""
        return from_dict(self.config.to_dict(), overrides)


@dataclass
class TrainSession:
    cfg: EsperConfig
    run_dir: RunDir
    resume: LoadedCheckpoint | None = None
    config_changes: list[str] = field(default_factory=list)

    @classmethod
    def prepare(cls, cfg: EsperConfig, *, run_dir: Path | None, resume: Resume | None = None,
                faults: list[str] | None = None, allow_config_change: list[str] | None = None) -> TrainSession:
        """Validate everything that can be checked before training: fault flags, checkpoint, config drift."""
        tensorboard.require(cfg.telemetry)
        preflight(cfg)  # a device or precision torch cannot use fails here, before any run dir is written
        if faults:
            extra = [parse_fault_flag(f) for f in faults]
            cfg = from_dict({**cfg.to_dict(), "faults": [*cfg.to_dict()["faults"], *(f.model_dump() for f in extra)]})
        if resume is None:
            rd = RunDir.create(cfg, run_dir)
            rd.write_config(cfg)
            return cls(cfg, rd)
        loaded = resume.checkpoint
        changes: list[str] = []
        if loaded.manifest.config_hash != cfg.config_hash():
            changes = changed_keys(resume.config.to_dict(), cfg.to_dict())
            allowed = allow_config_change or []
            refused = [k for k in changes if not any(k == a or k.startswith(a + ".") for a in allowed)]
            if refused:
                raise ConfigError(
                    f"resume refused: the config differs from the checkpoint's in {refused}; "
                    f"pass --allow-config-change KEY for each key you mean to change")
        if loaded.manifest.run_id is None:
            raise CheckpointError(f"{loaded.path}: the manifest has no run_id (not a training checkpoint)")
        path = run_dir if run_dir is not None else loaded.path.parent.parent
        rd = RunDir(path, loaded.manifest.run_id)
        rd.checkpoints.mkdir(parents=True, exist_ok=True)
        rd.write_config(cfg)
        return cls(cfg, rd, loaded, changes)

    def run(self, reporter: Reporter | None) -> dict[str, Any]:
        # FOR THE LEAD (merge with i12, who owns the lock's wiring): the writer lock held for the whole session,
        # so readers (`esper watch`, `esper runs`) can tell a live run from a dead one.
        with RunLock(self.run_dir.path):
            emitter = Emitter(self.run_dir.events, self.run_dir.run_id, self.cfg.telemetry)
            board = tensorboard.attach(self.cfg.telemetry, self.run_dir.path, emitter)
            try:
                if self.config_changes:
                    emitter.emit("cli", "config.changed_on_resume", "WARNING", keys=self.config_changes)
                return train(self.cfg, self.run_dir, reporter=reporter, emitter=emitter, resume=self.resume)
            finally:
                if board is not None:
                    board.close()
