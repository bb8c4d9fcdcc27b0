"""Field reports (T-12): outcome classification, the controller's report windows, the checksummed log and its
reader's corruption handling, retention, and `esper reports`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from esper.cli.reports import reports as reports_cmd
from esper.core.config import ControllerConfig, SeedsConfig
from esper.core.errors import ExitCode
from esper.core.tamiyo import (
    FILENAME,
    FieldReport,
    FieldReportError,
    FieldReportLog,
    FieldReportLogMissing,
    Outcome,
    Tamiyo,
    TamiyoError,
    classify,
    prune,
    read_reports,
)
from esper.core.tamiyo.reports import checksum
from esper.core.tamiyo.state import EpochMetrics

RUN = "run-rep"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def seeds_cfg(**kw: object) -> SeedsConfig:
    """These tests reason about one live seed at a time: pin max_active instead of leaning on the default."""
    return SeedsConfig(**{"max_active": 1, **kw})  # type: ignore[arg-type]


def metrics(epoch: int, loss: float, acc: float) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, train_loss=loss, val_loss=loss, val_accuracy=acc)


def report(n: int, *, outcome: Outcome = Outcome.SUCCESS, blueprint: str = "lowrank", slot: str = "s1",
           issued: datetime = T0, kind: str = "germinate") -> FieldReport:
    return FieldReport(report_id=f"rpt-cmd-0001-{n:03d}", run_id=RUN, command_id=f"cmd-0001-{n:03d}", kind=kind,
                       slot=slot, blueprint=blueprint, outcome=outcome, outcome_reason="crafted", applied_epoch=1,
                       window_epochs=2, metrics_before=metrics(1, 1.0, 0.5), metrics_after=metrics(3, 0.8, 0.6),
                       issued_at=issued.isoformat())


# --- classification -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("after", "expected"), [
    (metrics(3, 0.90, 0.60), Outcome.SUCCESS),      # loss -10%
    (metrics(3, 1.00, 0.65), Outcome.SUCCESS),      # accuracy +5 points, loss flat
    (metrics(3, 1.10, 0.60), Outcome.REGRESSION),   # loss +10%
    (metrics(3, 1.00, 0.55), Outcome.REGRESSION),   # accuracy -5 points
    (metrics(3, 0.99, 0.605), Outcome.NEUTRAL),     # -1%, +0.5 points: below the 2% threshold
    (metrics(3, 0.90, 0.40), Outcome.NEUTRAL),      # mixed: loss better, accuracy much worse
])
def test_classify_crafted_windows(after: EpochMetrics, expected: Outcome) -> None:
    outcome, why = classify(metrics(1, 1.0, 0.6), after, 0.02, "val_accuracy", "max")
    assert outcome is expected
    assert "epochs 1 -> 3" in why and "val_accuracy 0.6000 -> " in why


@pytest.mark.parametrize(("after", "expected"), [
    (EpochMetrics(epoch=3, train_loss=1.0, val_loss=1.0, val_mae=0.25), Outcome.SUCCESS),  # error -0.05: better
    (EpochMetrics(epoch=3, train_loss=1.0, val_loss=1.0, val_mae=0.35), Outcome.REGRESSION),  # error +0.05
    (EpochMetrics(epoch=3, train_loss=1.0, val_loss=0.9, val_mae=0.35), Outcome.NEUTRAL),  # mixed
])
def test_classify_judges_a_primary_metric_that_improves_downwards(after: EpochMetrics, expected: Outcome) -> None:
    before = EpochMetrics(epoch=1, train_loss=1.0, val_loss=1.0, val_mae=0.3)
    outcome, why = classify(before, after, 0.02, "val_mae", "min")
    assert outcome is expected and "val_mae 0.3000 -> " in why


def test_classify_by_the_loss_alone_when_it_is_primary() -> None:
    before = EpochMetrics(epoch=1, train_loss=1.0, val_loss=1.0)
    assert classify(before, EpochMetrics(epoch=2, train_loss=1.0, val_loss=0.9), 0.02, "val_loss", "min")[0] \
        is Outcome.SUCCESS
    assert classify(before, EpochMetrics(epoch=2, train_loss=1.0, val_loss=1.0), 0.02, "val_loss", "min")[0] \
        is Outcome.NEUTRAL


def test_epoch_metrics_carry_only_val_named_task_metrics() -> None:
    with pytest.raises(ValueError, match="val_<name>"):
        EpochMetrics(epoch=1, train_loss=1.0, val_loss=1.0, accuracy=0.5)
    m = EpochMetrics.model_validate({"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5})
    assert m.metric("val_accuracy") == 0.5
    assert m.model_dump() == {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5}  # flat, as before


# --- the controller's report windows ---------------------------------------------------------------------


def slot(name: str, stage: str = "DORMANT", blueprint: str | None = None, epochs: int = 0,
         gain: float | None = None) -> dict[str, Any]:
    return {"name": name, "kind": "features", "shape": [6], "compatible": ["residual_mlp", "lowrank", "bottleneck"],
            "stage": stage, "blueprint": blueprint, "epochs_in_stage": epochs, "alpha": 0.0,
            "seed_loss_improvement": None, "counterfactual_gain": gain,
            "candidate_params": {"residual_mlp": 10, "lowrank": 10, "bottleneck": 10}}


def obs(epoch: int, loss: float, acc: float, s1: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"run_id": RUN, "epoch": epoch, "train_loss": loss, "val_loss": loss,
            "val_metrics": {"val_accuracy": acc}, "primary_metric": "val_accuracy", "direction": "max",
            "step_latency_ms": 5.0, "rollbacks_total": 0, "total_params": 100,
            "slots": [s1 or slot("s1"), slot("s2")]}


def step(t: Tamiyo, o: dict[str, Any]) -> tuple[list[Any], list[FieldReport]]:
    d = t.decide(o)
    for c in d.accepted:
        t.applied(c)
    return list(d.accepted), t.observe_outcomes(o)


def fresh() -> Tamiyo:
    return Tamiyo(ControllerConfig(), seeds_cfg(), RUN, clock=lambda: T0.isoformat())


def test_germinate_then_fossilize_reports_success_after_window() -> None:
    t = fresh()
    step(t, obs(0, 1.0, 0.5))
    step(t, obs(1, 1.0, 0.5))
    (germ,), none = step(t, obs(2, 1.0, 0.5))
    assert germ.kind == "germinate" and none == []
    _, none = step(t, obs(3, 0.9, 0.55, slot("s1", "TRAINING", "residual_mlp")))
    assert none == []  # window of 2 epochs not over yet
    (foss,), (rep,) = step(t, obs(4, 0.8, 0.6, slot("s1", "PROBATIONARY", "residual_mlp", 1, gain=0.1)))
    assert foss.kind == "fossilize"
    assert (rep.command_id, rep.kind, rep.outcome, rep.blueprint) == (germ.command_id, "germinate",
                                                                       Outcome.SUCCESS, "residual_mlp")
    assert rep.metrics_before.epoch == 2 and rep.metrics_after.epoch == 4 and rep.issued_at == T0.isoformat()
    step(t, obs(5, 0.8, 0.6, slot("s1", "FOSSILIZED", "residual_mlp")))
    _, (frep,) = step(t, obs(6, 0.75, 0.65, slot("s1", "FOSSILIZED", "residual_mlp")))
    assert (frep.command_id, frep.outcome) == (foss.command_id, Outcome.SUCCESS)
    assert t.state_dict()["reports_filed"] == 2 and t.state_dict()["windows"] == []


def test_seed_culled_before_window_end_is_aborted() -> None:
    t = Tamiyo(ControllerConfig(stall_epochs=1, report_window_epochs=3), seeds_cfg(), RUN,
               clock=lambda: T0.isoformat())
    step(t, obs(0, 1.0, 0.5))
    step(t, obs(1, 1.0, 0.5))
    (germ,), _ = step(t, obs(2, 1.0, 0.5))
    (cull,), (rep,) = step(t, obs(3, 1.0, 0.5, slot("s1", "TRAINING", "residual_mlp", 1)))
    assert cull.kind == "cull" and cull.reason_code == "stalled"
    assert (rep.command_id, rep.outcome) == (germ.command_id, Outcome.ABORTED)
    assert cull.command_id in rep.outcome_reason


def test_seed_gone_without_controller_cull_is_aborted() -> None:
    t = fresh()
    step(t, obs(0, 1.0, 0.5))
    step(t, obs(1, 1.0, 0.5))
    (germ,), _ = step(t, obs(2, 1.0, 0.5))
    _, (rep,) = step(t, obs(3, 1.0, 0.5, slot("s1", "CULLED", "residual_mlp")))  # a gate culled it
    assert rep.outcome is Outcome.ABORTED and "CULLED" in rep.outcome_reason


def test_explicit_abort_of_applied_command() -> None:
    t = fresh()
    step(t, obs(0, 1.0, 0.5))
    step(t, obs(1, 1.0, 0.5))
    (germ,), _ = step(t, obs(2, 1.0, 0.5))
    t.aborted(germ.command_id, "fast rollback undid it")
    t.decide(obs(3, 1.0, 0.5, slot("s1", "TRAINING", "residual_mlp")))
    (rep,) = t.observe_outcomes(obs(3, 1.0, 0.5, slot("s1", "TRAINING", "residual_mlp")))
    assert rep.outcome is Outcome.ABORTED and rep.outcome_reason == "fast rollback undid it"
    with pytest.raises(TamiyoError, match='no such accepted command'):
        t.aborted("cmd-9999-999", "nope")


# --- the log and its reader -------------------------------------------------------------------------------


def write(path: Path, *reps: FieldReport) -> None:
    log = FieldReportLog(path)
    for r in reps:
        assert log.append(r) is True


def test_round_trip_with_checksums(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    write(path, report(1), report(2, outcome=Outcome.REGRESSION))
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["sha256"] == checksum(rec["body"])
    got, problems = read_reports(path)
    assert problems == [] and got == [report(1), report(2, outcome=Outcome.REGRESSION)]


def test_truncated_tail_is_skipped_and_reported(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    write(path, report(1), report(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # crash mid-write of the second record
    got, problems = read_reports(path)
    assert [r.report_id for r in got] == [report(1).report_id]
    assert [(p.line, p.kind) for p in problems] == [(2, "truncated")]


def test_flipped_byte_mid_file_skips_only_that_record(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    write(path, report(1), report(2), report(3))
    data = bytearray(path.read_bytes())
    second = data.index(b"\n") + 1
    pos = data.index(b'"crafted"', second) + 2  # inside record 2's body: still JSON, checksum now wrong
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    got, problems = read_reports(path)
    assert [r.report_id for r in got] == [report(1).report_id, report(3).report_id]
    assert [(p.line, p.kind, p.report_id) for p in problems] == [(2, "checksum", report(2).report_id)]
    # a flip that breaks the JSON itself is also skipped alone
    data = bytearray(path.read_bytes())
    data[second] = ord("#")
    path.write_bytes(bytes(data))
    got, problems = read_reports(path)
    assert [r.report_id for r in got] == [report(1).report_id, report(3).report_id]
    assert [(p.line, p.kind) for p in problems] == [(2, "corrupt")]


def test_record_without_issued_at_rejected_at_write_and_read(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    body = report(1).to_dict()
    del body["issued_at"]
    with pytest.raises(FieldReportError, match="issued_at"):
        FieldReportLog(path).append(body)
    assert not path.exists()
    with pytest.raises(FieldReportError, match="issued_at"):
        FieldReportLog(path).append({**report(1).to_dict(), "issued_at": ""})
    with pytest.raises(FieldReportError):
        FieldReportLog(path).append({**report(1).to_dict(), "issued_at": "2024-05-01T12:00:00"})  # not UTC
    # a writer that bypassed the log: correct checksum, but no timestamp
    forged = json.dumps({"body": body, "sha256": checksum(body)})
    write(path, report(2))
    with path.open("a") as fh:
        fh.write(forged + "\n")
    write(path, report(3))
    got, problems = read_reports(path)
    assert [r.report_id for r in got] == [report(2).report_id, report(3).report_id]
    assert [(p.line, p.kind) for p in problems] == [(2, "invalid")] and "issued_at" in problems[0].detail


def test_duplicated_id_is_rejected_at_read_and_write(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    write(path, report(1), report(2))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1] + lines[0])
    got, problems = read_reports(path)
    assert [r.report_id for r in got] == [report(1).report_id, report(2).report_id]
    assert [(p.line, p.kind, p.report_id) for p in problems] == [(3, "duplicate", report(1).report_id)]
    log = FieldReportLog(path)
    # the same report re-filed (an exact resume re-derives it, with a new issued_at): nothing written
    assert log.append(report(1, issued=T0 + timedelta(hours=1))) is False
    with pytest.raises(FieldReportError, match="different report"):
        log.append(report(1, outcome=Outcome.REGRESSION))
    assert len(path.read_bytes().splitlines()) == 3


def test_appends_after_truncated_tail_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    write(path, report(1), report(2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])  # torn record 2, no trailing newline
    write(path, report(3), report(4))
    assert path.read_bytes().count(b"\n") == 4  # the writer started a fresh line after the torn tail
    got, problems = read_reports(path)
    assert [r.report_id for r in got] == [report(1).report_id, report(3).report_id, report(4).report_id]
    assert [(p.line, p.kind) for p in problems] == [(2, "corrupt")]


def test_missing_log_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(FieldReportLogMissing):
        read_reports(tmp_path / FILENAME)


def test_retention_uses_issued_at_only() -> None:
    old = report(1, issued=T0 - timedelta(days=10))
    edge = report(2, issued=T0 - timedelta(days=7))
    new = report(3, issued=T0 - timedelta(hours=1))
    assert prune([old, edge, new], timedelta(days=7), T0) == [edge, new]
    assert prune([old, edge, new], timedelta(0), T0) == []
    with pytest.raises(FieldReportError):
        prune([new], timedelta(days=1), T0.replace(tzinfo=None))
    with pytest.raises(FieldReportError):
        prune([new], timedelta(days=-1), T0)


# --- esper reports --------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / RUN
    run.mkdir()
    write(run / FILENAME, report(1, blueprint="lowrank", slot="s1"),
          report(2, outcome=Outcome.REGRESSION, blueprint="residual_mlp", slot="s2", kind="fossilize"),
          report(3, outcome=Outcome.ABORTED, blueprint="lowrank", slot="s2"))
    with (run / FILENAME).open("ab") as fh:
        fh.write(b'{"body": {"report_id": "rpt-x"')  # torn tail
    write(run / FILENAME, report(4, outcome=Outcome.NEUTRAL, blueprint="lowrank", slot="s1"))
    return run


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(reports_cmd)
    return app


def test_reports_cli_json(run_dir: Path) -> None:
    result = CliRunner().invoke(cli(), [str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["reports"] == 4
    assert doc["by_blueprint"]["lowrank"] == {"SUCCESS": 1, "NEUTRAL": 1, "REGRESSION": 0, "ABORTED": 1}
    assert doc["by_blueprint"]["residual_mlp"]["REGRESSION"] == 1
    assert doc["by_slot"]["s2"] == {"SUCCESS": 0, "NEUTRAL": 0, "REGRESSION": 1, "ABORTED": 1}
    assert [r["command_id"] for r in doc["regressions"]] == ["cmd-0001-002"]
    assert [(p["line"], p["kind"]) for p in doc["skipped"]] == [(4, "corrupt")]


def test_reports_cli_human(run_dir: Path) -> None:
    result = CliRunner().invoke(cli(), [str(run_dir)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "4 field reports" in out and "REGRESSION 1" in out
    assert "cmd-0001-002" in out  # the regression, by command id
    assert "skipped" in out and "corrupt" in out


def test_reports_cli_missing_run_is_usage_error(tmp_path: Path) -> None:
    # a path that is not a run directory (missing, or a directory holding no run) is a usage error; --json
    # prints it as the one JSON error document
    for target in (tmp_path / "nope", tmp_path):
        result = CliRunner().invoke(cli(), [str(target), "--json"])
        assert result.exit_code == int(ExitCode.USAGE), result.output
        doc = json.loads(result.stdout)
        assert doc["exit_code"] == 2 and str(target) in doc["error"] and "run directory" in doc["error"]


def test_reports_cli_on_a_run_without_reports_says_zero(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")  # a run directory whose controller never filed a report
    result = CliRunner().invoke(cli(), [str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("0 field reports")
    result = CliRunner().invoke(cli(), [str(run), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["reports"] == 0 and doc["records"] == [] and doc["skipped"] == []
