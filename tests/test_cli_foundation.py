"""The CLI skeleton: `esper lifecycle`, `esper config show|validate`, global options, exit codes, streams."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from esper.cli.main import app
from esper.core.config import ENV_VAR
from esper.statemachines import TABLES

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "esper.toml"
SEED_STAGES = ["DORMANT", "GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED",
               "CULLED", "EMBARGOED", "RESETTING", "TERMINATED"]

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test starts where a user would: the repo root, no $ESPER_CONFIG.
    monkeypatch.chdir(REPO)
    monkeypatch.delenv(ENV_VAR, raising=False)


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def assert_clean_failure(result: Result, code: int) -> None:
    """Exited with ``code`` through typer.Exit (no escaped exception) and printed no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""


def one_json(result: Result) -> object:
    """stdout must be exactly one JSON document: json.loads of the whole of it."""
    return json.loads(result.stdout)


# --- esper lifecycle -----------------------------------------------------------------------------------


def test_lifecycle_seed_json_is_the_contract() -> None:
    result = invoke("lifecycle", "seed", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = one_json(result)
    assert isinstance(doc, dict)
    assert [s["name"] for s in doc["states"]] == SEED_STAGES
    assert [s["value"] for s in doc["states"]] == list(range(1, 12))
    got = {(t["trigger"], tuple(t["from"]), t["to"], t["gate"]) for t in doc["transitions"]}
    assert got == {(e.trigger, e.sources, e.dest, e.gate) for e in TABLES["seed"].edges}
    assert len(doc["transitions"]) == 11
    active = ("GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY")
    assert ("cull", active, "CULLED", None) in got
    assert doc["gates"] == ["G0", "G1", "G2", "G3", "G4", "G5"]
    assert doc["initial"] == "DORMANT" and doc["terminal"] == ["TERMINATED"]


@pytest.mark.parametrize("machine", ["seed", "trainer", "emergency"])
def test_lifecycle_json_flag_equals_format_json(machine: str) -> None:
    a, b = invoke("lifecycle", machine, "--json"), invoke("lifecycle", machine, "-f", "json")
    assert a.exit_code == b.exit_code == 0
    assert one_json(a) == one_json(b) == TABLES[machine].to_dict()


def test_lifecycle_default_is_seed_table() -> None:
    result = invoke("lifecycle")
    assert result.exit_code == 0, result.output
    assert "seed lifecycle: states" in result.stdout and "PROBATIONARY" in result.stdout


@pytest.mark.parametrize("machine", ["seed", "trainer", "emergency"])
def test_lifecycle_mermaid_one_line_per_source_trigger(machine: str) -> None:
    table = TABLES[machine]
    result = invoke("lifecycle", machine, "--format", "mermaid")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "stateDiagram-v2"
    assert f"    [*] --> {table.initial}" in lines
    edge_lines = [ln.strip() for ln in lines[1:] if "[*]" not in ln]
    expected = sorted(
        f"{s} --> {e.dest}: {e.trigger}" + (f" [{e.gate}]" if e.gate else "")
        for e in table.edges
        for s in e.sources
    )
    assert sorted(edge_lines) == expected
    assert sorted(ln.strip() for ln in lines if ln.endswith("--> [*]")) == sorted(
        f"{t} --> [*]" for t in table.terminal)


@pytest.mark.parametrize("machine", ["seed", "trainer", "emergency"])
def test_lifecycle_table_lists_every_state_and_trigger(machine: str) -> None:
    table = TABLES[machine]
    result = invoke("lifecycle", machine, "--format", "table")
    assert result.exit_code == 0, result.output
    states_part, sep, edges_part = result.stdout.partition(f"{machine} lifecycle: transitions")
    assert sep and states_part.startswith(f"{machine} lifecycle: states")
    # every name whole (never elided with "…") in the rows' leading cells, in table order, at 80 columns
    assert _cells(states_part, 0) == [str(v) for _, v, _ in table.states]
    assert [c.split(" ")[0] for c in _cells(states_part, 1)] == list(table.state_names)
    assert _cells(edges_part, 0) == [e.trigger for e in table.edges]
    assert _cells(edges_part, 2) == [e.dest for e in table.edges]
    assert "…" not in result.stdout


def _cells(text: str, col: int) -> list[str]:
    """Non-empty cells of column ``col`` in a rich table's body rows (continuation lines have them empty)."""
    rows = [ln.split("│")[1:-1] for ln in text.splitlines() if ln.startswith("│")]
    return [r[col].strip() for r in rows if r[col].strip()]


def test_lifecycle_unknown_machine_is_usage_error() -> None:
    result = invoke("lifecycle", "kasmina")
    assert result.exit_code == 2
    assert "Traceback" not in result.output and result.stdout == ""


def test_lifecycle_unknown_format_is_usage_error() -> None:
    result = invoke("lifecycle", "seed", "--format", "dot")
    assert result.exit_code == 2 and result.stdout == ""


# --- esper config --------------------------------------------------------------------------------------


def test_config_validate_shipped_file() -> None:
    result = invoke("config", "validate")
    assert result.exit_code == 0, result.output
    assert "esper.toml is valid" in result.stderr and result.stdout == ""


def test_config_validate_json() -> None:
    result = invoke("config", "validate", "--json")
    assert result.exit_code == 0, result.output
    doc = one_json(result)
    assert isinstance(doc, dict) and doc["valid"] is True and doc["path"] == "esper.toml"
    assert len(doc["hash"]) == 64


def test_config_validate_names_trainer_epochs() -> None:
    result = invoke("config", "validate", "--set", 'trainer.epochs="ten"')
    assert_clean_failure(result, 3)
    assert "trainer.epochs" in result.stderr and "'ten'" in result.stderr


def test_config_validate_json_failure_is_one_json_error_document() -> None:
    result = invoke("config", "validate", "--json", "--set", "trainer.epochs=0")
    assert result.exit_code == 3 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    doc = one_json(result)
    assert doc == {"error": doc["error"], "exit_code": 3, "key": "trainer.epochs"}  # type: ignore[index]
    assert "trainer.epochs" in doc["error"] and "trainer.epochs" in result.stderr  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "trainer.epoch=3"], "did you mean 'trainer.epochs'?"),
        (["--set", "trainer.epochs"], "malformed --set 'trainer.epochs'"),
        (["--config", "does/not/exist.toml"], "config file not found: does/not/exist.toml"),
        (["--set", "faults=[{name='nan_los', at='1'}]"], "did you mean 'nan_loss'?"),
    ],
)
def test_config_errors_exit_3_without_traceback(args: list[str], needle: str) -> None:
    for command in ("validate", "show"):
        result = invoke("config", command, *args)
        assert_clean_failure(result, 3)
        assert needle in result.stderr


def test_config_syntax_error_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer]\nepochs = = 3\n", encoding="utf-8")
    result = invoke("config", "validate", "--config", str(bad))
    assert_clean_failure(result, 3)
    assert str(bad) in result.stderr and "line 2" in result.stderr


def test_config_show_json_is_one_document_and_reflects_set() -> None:
    result = invoke("config", "show", "--json", "--set", "trainer.epochs=3", "--set", "data.task=synthetic")
    assert result.exit_code == 0, result.output
    doc = one_json(result)
    assert isinstance(doc, dict)
    assert doc["trainer"]["epochs"] == 3 and doc["data"]["task"] == "synthetic"
    assert doc["run"]["seed"] == 42


def test_config_show_toml_parses_and_reflects_set() -> None:
    result = invoke("config", "show", "--set", "seeds.blend.steps=7")
    assert result.exit_code == 0, result.output
    first, _, body = result.stdout.partition("\n")
    assert first.startswith("# resolved from esper.toml") and "seeds.blend.steps=7" in first
    assert tomllib.loads(body)["seeds"]["blend"]["steps"] == 7


def _cfg(tmp_path: Path, name: str, epochs: int) -> Path:
    path = tmp_path / name
    path.write_text(f"[trainer]\nepochs = {epochs}\n", encoding="utf-8")
    return path


def _epochs(result: Result) -> int:
    assert result.exit_code == 0, result.output
    doc = one_json(result)
    assert isinstance(doc, dict)
    return int(doc["trainer"]["epochs"])


def test_global_config_used_by_command(tmp_path: Path) -> None:
    a = _cfg(tmp_path, "a.toml", 5)
    assert _epochs(invoke("--config", str(a), "config", "show", "--json")) == 5


def test_command_config_beats_global(tmp_path: Path) -> None:
    a, b = _cfg(tmp_path, "a.toml", 5), _cfg(tmp_path, "b.toml", 6)
    assert _epochs(invoke("--config", str(a), "config", "show", "--config", str(b), "--json")) == 6
    # the global path is never read when the command names its own
    missing = str(tmp_path / "none.toml")
    assert _epochs(invoke("--config", missing, "config", "show", "-c", str(b), "--json")) == 6


def test_global_and_command_sets_combine_command_last(tmp_path: Path) -> None:
    result = invoke("--set", "trainer.epochs=8", "--set", "trainer.lr=0.5",
                    "config", "show", "--set", "trainer.epochs=9", "--json")
    doc = one_json(result)
    assert isinstance(doc, dict)
    assert doc["trainer"]["epochs"] == 9 and doc["trainer"]["lr"] == 0.5


def test_env_var_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(_cfg(tmp_path, "env.toml", 4)))
    assert _epochs(invoke("config", "show", "--json")) == 4
    assert _epochs(invoke("config", "show", "--config", str(_cfg(tmp_path, "x.toml", 2)), "--json")) == 2


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("esper ")


# --- the installed console script ----------------------------------------------------------------------


def test_installed_console_script(tmp_path: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)
    exe = shutil.which("esper", path=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    assert exe is not None, f"console script `esper` not installed next to {sys.executable}"
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}

    ok = subprocess.run([exe, "lifecycle", "seed", "--format", "json"], capture_output=True, text=True,
                        cwd=tmp_path, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert [s["name"] for s in doc["states"]] == SEED_STAGES
    assert [s["value"] for s in doc["states"]] == list(range(1, 12))

    bad = tmp_path / "bad.toml"
    bad.write_text('[trainer]\nepochs = "ten"\n', encoding="utf-8")
    fail = subprocess.run([exe, "config", "validate", "--config", str(bad)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert fail.returncode == 3, fail.stderr
    assert "trainer.epochs" in fail.stderr and str(bad) in fail.stderr
    assert "Traceback" not in fail.stderr and fail.stdout == ""


@pytest.mark.parametrize("fmt", [["--format", "json"], ["-f", "json"], ["--format=json"]])
def test_format_json_gets_the_json_error_document_too(fmt: list[str]) -> None:
    """Issue 27: `esper lifecycle nosuch --format json` exited 2 with nothing on stdout."""
    r = CliRunner().invoke(app, ["lifecycle", "nosuch", *fmt])
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 2 and "'nosuch' is not one of" in doc["error"] and doc["key"] == "machine"


def test_a_skipped_bench_row_keeps_its_brackets() -> None:
    """Issue 27: Rich markup ate `[bench]` from `pip install -e ".[bench]"` in a skipped row's reason."""
    from rich.console import Console

    from esper.cli.bench import results_table

    machine = {"cores_available": 2, "torch": "2.13", "torch_threads": 1, "python": "3.11.7"}
    doc = {"machine": machine, "quick": True, "results": [{"id": "P-1L", "name": "vs Lightning", "kind": "skipped",
                        "reason": 'the lightning package is not installed (pip install -e ".[bench]")'}]}
    console = Console(width=250, record=True)
    console.print(results_table(doc))
    assert 'pip install -e ".[bench]"' in console.export_text()


def test_no_config_file_anywhere_runs_on_the_built_in_defaults(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    shown = CliRunner().invoke(app, ["config", "show", "--set", "trainer.epochs=2"])
    assert shown.exit_code == 0 and "built-in defaults" in shown.stdout
    assert tomllib.loads(shown.stdout)["trainer"]["epochs"] == 2
    listed = CliRunner().invoke(app, ["runs", str(tmp_path), "--json"])
    assert listed.exit_code == 0, listed.output


def test_tables_written_to_a_pipe_are_not_squeezed_to_80_columns() -> None:
    """Issue 27: `esper faults list | cat` squeezed "what it does" to ~6 characters; `esper runs | cat` cut every
    column to "COM…"."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([str(Path(sys.executable).parent / "esper"), "faults", "list"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0 and "…" not in done.stdout
    assert "the training loss of one step becomes NaN" in done.stdout
