"""The run directory of SPEC §8: config.toml, events.jsonl, metrics.jsonl, checkpoints/, summary.json."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.core import jsonl
from esper.core.config import EsperConfig


def new_run_id(cfg: EsperConfig) -> str:
    if cfg.run.run_id:
        return cfg.run.run_id
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class RunDir:
    path: Path
    run_id: str

    @classmethod
    def create(cls, cfg: EsperConfig, explicit: Path | None) -> RunDir:
        run_id = new_run_id(cfg)
        path = explicit if explicit is not None else Path(cfg.run.output_dir) / run_id
        path.mkdir(parents=True, exist_ok=True)
        (path / "checkpoints").mkdir(exist_ok=True)
        return cls(path, run_id)

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def field_reports(self) -> Path:
        return self.path / "field_reports.jsonl"

    def write_config(self, cfg: EsperConfig) -> None:
        write_atomic(self.config, cfg.to_toml())

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.summary, json.dumps(summary, indent=2) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One epoch's row. Not fsynced: a resume rewrites the file from the checkpoint's history anyway."""
        jsonl.append(self.metrics, [json.dumps(row)], durable=False)

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> int:
        """Replace metrics.jsonl with ``rows`` (a resume: the checkpoint's history); returns the rows dropped."""
        old = len(jsonl.read(self.metrics)[0]) if self.metrics.exists() else 0
        write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))
        return max(0, old - len(rows))


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file + fsync + rename so readers never see a torn file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
