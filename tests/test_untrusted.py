"""Untrusted input (issue 12): a checkpoint names no code, its manifest is schema-checked, paths stay inside the
run dir, parsers are bounded, one writer per run dir, values that validate also run, CLI contract gaps. Every
case asserts a documented exit code, a clear message, no traceback, and a run dir left as it was."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import (
    ESPER,
    GROWING,
    REPO,
    SYNTHETIC,
    esper,
    events,
    out,
    resume,
    rewrite_manifest,
    snapshot,
    train,
    verify,
)
from typer.testing import CliRunner

from esper.cli.main import app
from esper.core.errors import ExitCode

QUICK = [*SYNTHETIC, "run.threads=1", "trainer.epochs=2"]
MORE = [*SYNTHETIC, "run.threads=1", "trainer.epochs=3"]  # a resume that trains one epoch more


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    r = train(run, *QUICK)
    assert r.exit_code == 0, out(r)
    return run


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy, symlinks=True)
    return copy


def ckpt(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def plain_resume(target: Path, *flags: str) -> Any:
    """`esper train --resume TARGET` with no --config (the checkpoint's config is the run's), from a directory
    without an esper.toml and no $ESPER_CONFIG: the case where a checkpoint's config would be trusted."""
    env = {k: v for k, v in os.environ.items() if k != "ESPER_CONFIG"}
    return CliRunner().invoke(app, ["train", "--quiet", "--resume", str(target), *flags], env={**env, "COLUMNS": "250"})


def clean(result: Any) -> str:
    text = out(result)
    assert "Traceback" not in text, text
    return text


# --------------------------------------------------------------------- 1. a checkpoint names no code


@pytest.mark.parametrize(("section", "name", "value", "key"), [
    ("seeds", "user_blueprints", {"x": "os:_exit"}, "seeds.user_blueprints.x"),
    ("data", "task", "evil_task_i12:make", "data.task"),
    ("trainer", "profiler", {"enabled": True, "dir": "/tmp/esper-escape-i12"}, "trainer.profiler.dir"),
])
def test_resume_refuses_code_or_paths_only_the_checkpoint_names(run: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, section: str,
                                                                 name: str, value: Any, key: str) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "evil_task_i12.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef make(cfg): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def edit(doc: dict[str, Any]) -> None:
        cfg = tomllib.loads(doc["config_toml"])
        target = cfg[section].setdefault(name, value) if isinstance(value, dict) else None
        if isinstance(target, dict):
            target.update(value)
        else:
            cfg[section][name] = value
        doc["config_toml"] = tomli_w.dumps(cfg)

    rewrite_manifest(ckpt(run), edit)
    before = snapshot(run)
    r = plain_resume(run)
    assert r.exit_code == ExitCode.CHECKPOINT, out(r)
    text = clean(r)
    assert key in text and "resume refused" in text
    assert snapshot(run) == before  # refused before anything was written
    assert not Path("/tmp/esper-escape-i12").exists() and not marker.exists()  # nothing imported or written
    shown = esper("inspect-checkpoint", str(ckpt(run)), "--json")
    assert any(ref["key"] == key for ref in json.loads(shown.stdout)["references"]), shown.stdout


# -------------------------------------------------------------- 2. the manifest is validated by its schema


@pytest.mark.parametrize(("field", "value"), [
    ("config_hash", 5), ("run_id", None), ("seeds", "x"), ("optimizer", []), ("epoch", "3"),
    ("emergency", {"level": "PANIC"}), ("seeds.0.stage", "HACKED"),
])
def test_a_forged_payload_is_refused_by_verify_and_resume_before_anything_changes(
        run: Path, field: str, value: Any) -> None:
    def edit(doc: dict[str, Any]) -> None:
        if field == "seeds.0.stage":
            doc["seeds"][0]["stage"] = value
        else:
            doc[field] = value

    rewrite_manifest(ckpt(run), edit)  # re-sealed: the digest is a checksum anyone can recompute
    before = snapshot(run)
    v = verify(ckpt(run))
    assert v.exit_code == ExitCode.CHECKPOINT and field.split(".")[0] in clean(v)
    r = resume(run, *MORE, allow=["trainer.epochs"])
    assert r.exit_code == ExitCode.CHECKPOINT, out(r)
    clean(r)
    assert snapshot(run) == before


# ----------------------------------------------------------------------------------- 3. confinement


def test_symlinked_checkpoints_and_latest_are_refused_and_never_echoed(run: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    latest.symlink_to(secret)
    for r in (verify(run), resume(run, *MORE, allow=["trainer.epochs"])):
        assert r.exit_code == ExitCode.CHECKPOINT, out(r)
        assert "TOP-SECRET" not in clean(r)

    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(run / "checkpoints"), elsewhere)
    (run / "checkpoints").symlink_to(elsewhere)
    before = snapshot(elsewhere)
    for r in (verify(run), resume(run, *MORE, allow=["trainer.epochs"])):
        assert r.exit_code == ExitCode.CHECKPOINT, out(r)
        assert "symbolic link" in clean(r) or "symlink" in clean(r)
    assert snapshot(elsewhere) == before


def test_a_sparse_2gib_file_is_refused_by_size_before_it_is_read(run: Path) -> None:
    model = ckpt(run) / "model.safetensors"
    with open(model, "r+b") as fh:
        fh.truncate(2 * 1024**3)
    proc = subprocess.run([str(ESPER), "inspect-checkpoint", str(ckpt(run)), "--verify"], capture_output=True,
                          text=True, timeout=300)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert proc.returncode == ExitCode.CHECKPOINT, proc.stderr
    assert "Traceback" not in proc.stderr and "bytes" in proc.stdout + proc.stderr
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib} KiB: the forged file was read"


# ------------------------------------------------------------------------------------ 4. bounded parsers


@pytest.mark.parametrize("body", [
    "[run]\nseed = " + "[" * 5000 + "]" * 5000 + "\n",
    "[run]\nseed = 1" + "0" * 5000 + "\n",
    "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n",
    "[run]\nseed = 1\n\xff\xfe\n",
])
def test_hostile_config_files_are_exit_3_without_traceback(tmp_path: Path, body: str) -> None:
    path = tmp_path / "hostile.toml"
    path.write_bytes(body.encode("utf-8", "surrogateescape") if "\xff" not in body else body.encode("latin-1"))
    proc = subprocess.run([str(ESPER), "--config", str(path), "config", "validate", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["exit_code"] == ExitCode.CONFIG


def test_hostile_jsonl_lines_are_skipped_and_reported_and_a_resume_goes_on(run: Path) -> None:
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"epoch": \xff\xfe}\n' + b"[" * 100_000 + b"\n" + b'{"epoch": 1' + b"0" * 10_000 + b"}\n")
    with open(run / "events.jsonl", "ab") as fh:
        fh.write(b'{"seq": ' + b"9" * 10_000 + b"}\n" + b"{" * 50_000 + b"\n")
    (run / "field_reports.jsonl").write_bytes(b"\xff\n" + b"[" * 100_000 + b"\n")
    rep = esper("reports", str(run), "--json")
    assert rep.exit_code == 0, out(rep)
    clean(rep)
    r = resume(run, *MORE, allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)
    clean(r)


# -------------------------------------------------------------------------------------- 5. one writer


def test_a_second_writer_is_refused_at_once_touching_nothing(run: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from esper.core.records.runlock import RunLock; "
         "l = RunLock(__import__('pathlib').Path(sys.argv[1])); l.acquire(); print('held', flush=True); "
         "sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        r = resume(run, *MORE, allow=["trainer.epochs"])
        assert r.exit_code == ExitCode.BUSY, out(r)
        assert "in use by another esper process" in clean(r)
        assert snapshot(run) == before
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)


def test_a_finished_run_dir_is_not_appended_to_and_a_bare_checkpoint_needs_run_dir(run: Path,
                                                                                    tmp_path: Path) -> None:
    before = snapshot(run)
    r = train(run, *QUICK)
    assert r.exit_code == ExitCode.USAGE, out(r)
    assert "--resume" in clean(r)
    assert snapshot(run) == before
    bare = tmp_path / "bare"
    shutil.copytree(ckpt(run), bare)
    r = resume(bare, *MORE, allow=["trainer.epochs"])
    assert r.exit_code == ExitCode.USAGE, out(r)
    assert "--run-dir" in clean(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "run"]  # nothing written to the grandparent


# ------------------------------------------------------------------------------- 7. valid means runnable


@pytest.mark.parametrize(("item", "key"), [
    ("run.threads=1099511627776", "run.threads"), ("controller.timeout_ms=1e20", "controller.timeout_ms"),
    ("run.seed=9223372036854775808", "run.seed"), ("run.device=cuda", "run.device"),
    ('seeds.user_blueprints={x="no_such_module_i12:make"}', "seeds.user_blueprints"),
])
def test_values_that_would_crash_are_refused_by_validate_and_train(tmp_path: Path, item: str, key: str) -> None:
    if item == "run.device=cuda":
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present: cuda is a valid device here")
    v = esper("config", "validate", "--set", item, "--json")
    assert v.exit_code == ExitCode.CONFIG, out(v)
    assert key in json.loads(v.stdout)["error"] or json.loads(v.stdout).get("key", "").startswith(key)
    r = train(tmp_path / "r", item)
    assert r.exit_code == ExitCode.CONFIG, out(r)
    clean(r)
    assert not (tmp_path / "r").exists()  # refused before the run has a directory


@pytest.mark.parametrize(("item", "key", "needle"), [
    ('data.task="plugins_fixture:raising_task"', "data.task", "train.csv: no such file"),
    ('data.task="broken_plugin_i12:make"', "data.task", "SyntaxError"),
])
def test_a_raising_factory_or_a_broken_plugin_module_is_exit_3_naming_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, item: str, key: str, needle: str) -> None:
    (tmp_path / "broken_plugin_i12.py").write_text("def make(cfg):\n    return (\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = train(tmp_path / "r", item)
    assert r.exit_code == ExitCode.CONFIG, out(r)
    text = clean(r)
    assert key in text and needle in text


def test_the_largest_seed_trains(tmp_path: Path) -> None:
    r = train(tmp_path / "r", *SYNTHETIC, "run.threads=1", "trainer.epochs=1", "run.seed=9223372036854775807")
    assert r.exit_code == 0, out(r)


@pytest.mark.parametrize("target", ["directory", "missing", "binary"])
def test_an_unreadable_config_via_the_environment_is_exit_3(tmp_path: Path, target: str) -> None:
    path = tmp_path / "cfg.toml"
    if target == "directory":
        path.mkdir()
    elif target == "binary":
        path.write_bytes(b"\x00\xff\xfe\x80" * 64)
    env = {**os.environ, "ESPER_CONFIG": str(path)}
    proc = subprocess.run([str(ESPER), "config", "validate"], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr and str(path) in proc.stderr


# ----------------------------------------------------------------------------- 10. CLI contract gaps


@pytest.mark.parametrize("args", [
    ["--fault", "nan_loss", "--at", "abc"], ["--fault", "nan_loss", "--level", "HALT"], [],
])
def test_simulate_emergency_option_errors_are_usage_errors(args: list[str]) -> None:
    r = esper("simulate-emergency", *args)
    assert r.exit_code == ExitCode.USAGE, out(r)
    clean(r)


def test_an_unknown_fault_is_one_line_with_a_suggestion() -> None:
    r = esper("simulate-emergency", "--fault", "nan_los@1")
    assert r.exit_code in (ExitCode.USAGE, ExitCode.CONFIG), out(r)
    text = clean(r)
    assert "nan_loss" in text and "pydantic" not in text and "errors.pydantic.dev" not in text


def test_reports_on_a_run_without_reports_says_0(run: Path) -> None:
    r = esper("reports", str(run))
    assert r.exit_code == 0, out(r)
    assert clean(r).startswith("0 field reports")


def test_seq_continues_after_a_resume_and_the_config_change_is_a_cli_event(run: Path) -> None:
    r = resume(run, *MORE, allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)
    seqs = [e["seq"] for e in events(run)]
    assert seqs == list(range(1, len(seqs) + 1))  # one sequence across both processes
    assert [e["source"] for e in events(run, "config.changed_on_resume")] == ["cli"]
    assert events(run, "run.resuming")[0]["seq"] > events(run, "run.started")[0]["seq"]


def test_json_error_document_for_a_failing_command(tmp_path: Path) -> None:
    r = esper("inspect-checkpoint", str(tmp_path / "nope"), "--json")
    assert r.exit_code == ExitCode.CHECKPOINT
    doc = json.loads(r.stdout)
    assert set(doc) >= {"error", "exit_code", "key"} and doc["exit_code"] == ExitCode.CHECKPOINT



def test_a_failed_g1_is_a_gate_event_and_a_run_where_every_germination_failed_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *GROWING, "trainer.epochs=4", "seeds.user_blueprints={dead='plugins_fixture:dead_blueprint'}",
              "seeds.blueprints=['dead']")
    assert r.exit_code == 0, out(r)
    gates = [e["attributes"] for e in events(run, "gate.result")]
    failed_g1 = [g for g in gates if g.get("gate") == "G1" and g.get("passed") is False]
    assert failed_g1, gates
    s = json.loads((run / "summary.json").read_text())
    assert s["growth"]["grown"] == 0 and s["growth"]["attempted"] >= 1
    assert "every germination failed" in s["growth"]["warning"] and "G1" in s["growth"]["warning"]
    assert "every germination failed" in out(r)
    assert events(run, "growth.failed")


def test_the_last_commands_get_short_window_field_reports_at_run_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *GROWING, "trainer.epochs=4")
    assert r.exit_code == 0, out(r)
    commands = [e["attributes"] for e in events(run, "command.accepted")]
    assert commands, "the controller issued no command: nothing to report on"
    reports = [json.loads(line)["body"] for line in (run / "field_reports.jsonl").read_text().splitlines()]
    short = [rep for rep in reports if rep.get("short_window")]
    assert short and all(rep["report_id"].endswith("-short") for rep in short)
    assert {rep["command_id"] for rep in reports} >= {commands[-1]["command"]["command_id"]}
    filed = [e["attributes"] for e in events(run, "field_report.filed") if e["attributes"].get("ended")]
    assert len(filed) == len(short)
