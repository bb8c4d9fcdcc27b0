"""Experiment loggers (issue 27): CSV and MLflow beside TensorBoard, each a subscriber of the run's one emitter, so a
logger never shows what ``events.jsonl`` does not hold. ``telemetry.loggers`` picks them; per-step scalars come from
the ``train.step`` events the trainer emits every ``telemetry.log_every_steps`` steps.

- ``csv``: ``RUN/csv/epochs.csv`` (one row per epoch: every scalar of the epoch's row; a column appears when its key
  first does, and the file is rewritten then) and ``RUN/csv/steps.csv`` (global_step, epoch, train_loss, lr).
  A row for an epoch or step the run trains again (after a rollback or a resume) replaces the old one and drops
  what came after it, so the files always hold the run as it stands.
- ``mlflow`` (optional extra, ``pip install 'esper[mlflow]'``): one MLflow run per Esper run (tag
  ``esper.run_id``; a resumed session continues it), the resolved config as params, the epoch scalars at step =
  epoch, the per-step scalars at step = global step, terminated FINISHED / FAILED / KILLED with the Esper run.
  The store is ``telemetry.mlflow_tracking_uri``; empty: MLflow's local file store in ``mlruns/`` beside the run
  directory (MLflow 3 keeps that store behind ``MLFLOW_ALLOW_FILE_STORE``, which Esper sets for it).
- ``tensorboard``: ``esper.core.records.tensorboard``.

A logger whose package is not installed is a ConfigError (exit 3) before anything is written.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from esper.core.config import EsperConfig
from esper.core.errors import ConfigError
from esper.core.io import confine
from esper.core.records import tensorboard
from esper.core.records.rundir import write_atomic
from esper.core.records.scalars import scalars
from esper.core.records.telemetry import Emitter

STEP_EVENT = "train.step"
STEP_COLUMNS = ("global_step", "epoch", "train_loss", "lr")
_MAX_CSV_BYTES = 1 << 30


class Logger(Protocol):
    def __call__(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class CSVLogger:
    """``epochs.csv`` and ``steps.csv`` under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        self.epochs_path, self.steps_path = directory / "epochs.csv", directory / "steps.csv"
        self.columns: list[str] = ["epoch"]
        self.rows: dict[int, dict[str, int | float]] = {}
        for row in self._read(self.epochs_path):  # a resumed session keeps the earlier epochs
            epoch = _int(row.get("epoch"))
            if epoch is not None:
                self.rows[epoch] = {k: v for k, v in ((k, _number(v)) for k, v in row.items()) if v is not None}
                self.columns += [k for k in row if k not in self.columns]
        self.last_step = max((s for r in self._read(self.steps_path) if (s := _int(r.get("global_step"))) is not None),
                             default=0)

    def __call__(self, record: dict[str, Any]) -> None:
        attrs = record["attributes"]
        if record["event"] == "epoch.completed" and record["epoch"] is not None:
            epoch = int(record["epoch"])
            self.rows = {e: r for e, r in self.rows.items() if e < epoch}  # trained again: what followed is gone
            self.rows[epoch] = {"epoch": epoch, **scalars(attrs)}
            self.columns += [k for k in self.rows[epoch] if k not in self.columns]
            write_atomic(self.epochs_path, self._text(self.columns, [self.rows[e] for e in sorted(self.rows)]))
        elif record["event"] == STEP_EVENT:
            step = int(attrs["global_step"])
            row = {"global_step": step, "epoch": record["epoch"], "train_loss": attrs["train_loss"], "lr": attrs["lr"]}
            if step <= self.last_step:  # a rollback or a resume trains this step again
                kept = [r for r in self._read(self.steps_path) if (_int(r.get("global_step")) or 0) < step]
                write_atomic(self.steps_path, self._text(list(STEP_COLUMNS), kept))
            new = not self.steps_path.exists()
            with self.steps_path.open("a", encoding="utf-8", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=STEP_COLUMNS)
                if new:
                    w.writeheader()
                w.writerow(row)
            self.last_step = step

    @staticmethod
    def _text(columns: list[str], rows: list[dict[str, Any]]) -> str:
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return out.getvalue()

    @staticmethod
    def _read(path: Path) -> list[dict[str, str]]:
        """The rows of an earlier session's file, read as outside input (bounded, no symbolic link): a row that
        does not parse is left out."""
        try:
            raw = confine.read_bytes(path, _MAX_CSV_BYTES)
        except FileNotFoundError:
            return []
        except confine.UnsafePath as exc:
            raise ConfigError(f"telemetry.loggers csv: {exc}") from None
        text = raw.decode("utf-8", errors="replace")
        return [r for r in csv.DictReader(io.StringIO(text)) if None not in r]

    def close(self) -> None:
        return None


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _number(v: Any) -> int | float | None:
    whole = _int(v)
    if whole is not None:
        return whole
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class MLflowLogger:
    """One MLflow run per Esper run, through ``MlflowClient`` (no global MLflow state)."""

    def __init__(self, cfg: EsperConfig, run_dir: Path) -> None:
        uri = cfg.telemetry.mlflow_tracking_uri or (run_dir.resolve().parent / "mlruns").as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the local store by name
        client_cls = importlib.import_module("mlflow.tracking").MlflowClient
        self.client = client_cls(tracking_uri=uri)
        self.uri = uri
        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id: str | None = None

    def _open(self, esper_run: str) -> str:
        name = self.cfg.telemetry.mlflow_experiment
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        same = self.client.search_runs([experiment], filter_string=f"tags.`esper.run_id` = '{esper_run}'",
                                       max_results=1)
        if same:
            run_id: str = same[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(experiment, run_name=esper_run,
                                     tags={"esper.run_id": esper_run, "esper.run_dir": str(self.run_dir)})
        params = _flatten(self.cfg.to_dict())
        mlflow_entities = importlib.import_module("mlflow.entities")
        batch = [mlflow_entities.Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(run.info.run_id, params=batch[i:i + 100])
        return str(run.info.run_id)

    def __call__(self, record: dict[str, Any]) -> None:
        event, attrs = record["event"], record["attributes"]
        if event in ("run.started", "run.resuming"):
            self.run_id = self._open(record["run_id"])
        if self.run_id is None:
            return
        if event == "epoch.completed" and record["epoch"] is not None:
            metrics = importlib.import_module("mlflow.entities").Metric
            ts = int(float(record["monotonic_ms"]))
            batch = [metrics(k, float(v), ts, int(record["epoch"])) for k, v in sorted(scalars(attrs).items())]
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        elif event == STEP_EVENT:
            step = int(attrs["global_step"])
            self.client.log_metric(self.run_id, "step/train_loss", float(attrs["train_loss"]), step=step)
            self.client.log_metric(self.run_id, "step/lr", float(attrs["lr"]), step=step)
        elif event == "run.finished":
            status = {"COMPLETED": "FINISHED", "STOPPED": "KILLED"}.get(str(attrs.get("status")), "FAILED")
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None

    def close(self) -> None:
        if self.run_id is not None:  # the run ended without its run.finished record (a crash): said so
            self.client.set_terminated(self.run_id, status="FAILED")
            self.run_id = None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


PACKAGES = {"mlflow": ("mlflow", "mlflow"), "tensorboard": ("tensorboard", "tensorboard")}


def wanted(cfg: EsperConfig) -> list[str]:
    names = list(cfg.telemetry.loggers)
    if cfg.telemetry.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def require(cfg: EsperConfig) -> None:
    """ConfigError (exit 3) when a logger asked for needs a package that is not installed."""
    for name in wanted(cfg):
        if name in PACKAGES:
            module, extra = PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"telemetry.loggers: {name!r} needs the optional {module!r} package, which is not "
                                  f"installed: pip install 'esper[{extra}]' (or leave {name!r} out)")


def attach(cfg: EsperConfig, run_dir: Path, emitter: Emitter) -> list[Logger]:
    """Every logger the config asks for, subscribed to ``emitter``; ``close()`` each when the session ends."""
    require(cfg)
    makers: dict[str, Callable[[], Logger]] = {
        "csv": lambda: CSVLogger(run_dir / "csv"),
        "mlflow": lambda: MLflowLogger(cfg, run_dir),
        "tensorboard": lambda: tensorboard.TensorBoardWriter(run_dir / tensorboard.DIRNAME),
    }
    out: list[Logger] = []
    for name in wanted(cfg):
        logger = makers[name]()
        emitter.subscribe(logger)
        out.append(logger)
    return out
