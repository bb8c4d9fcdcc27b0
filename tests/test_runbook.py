"""Runbooks (E-3): the file format, expectations, the step engine, and `esper runbook run`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from typer.testing import CliRunner, Result

from esper.app.proctree import descendants, kill_tree
from esper.app.runbook import (
    MISSING,
    Completed,
    Expectation,
    RunbookError,
    check,
    load_runbook,
    resolve,
    run_command,
    run_runbook,
    same,
)
from esper.cli.runbook import app
from esper.core.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "fixtures" / "runbooks").glob("*.toml"))
runner = CliRunner()

LIFECYCLE_OK = """
[[step]]
name = "seed lifecycle"
run = "esper lifecycle seed --format json"
[step.expect]
"states.0.name" = "DORMANT"
"states.0.value" = { gte = 1, lt = 2 }
"terminal" = { contains = "TERMINATED" }
"initial" = { in = ["DORMANT", "GERMINATED"] }
"transitions" = { exists = true }
"no.such.key" = { exists = false }
"""


def write(tmp_path: Path, body: str, header: str = 'name = "t"\ndescription = "test runbook"\n') -> Path:
    path = tmp_path / "rb.toml"
    path.write_text(header + body, encoding="utf-8")
    return path


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


# --- loading ----------------------------------------------------------------------------------------------


def test_load_parses_steps_defaults_and_placeholders(tmp_path: Path) -> None:
    path = write(tmp_path, '[vars]\nrun = "{workdir}/run"\nepochs = 3\n'
                           '[[step]]\nname = "a"\nrun = "esper train --run-dir {run} --set trainer.epochs={epochs} '
                           '--config \'{runbook_dir}/my config.toml\'"\n'
                           '[[step]]\nname = "b"\nrun = "esper x"\nexit_code = 4\ntimeout_s = 2.5\n'
                           'expect = { "a.0" = 1, "b" = { lt = 2, ne = 0 } }\n')
    rb = load_runbook(path)
    a, b = rb.steps
    assert (a.exit_code, a.timeout_s, a.expectations) == (0, 300.0, ())
    values = rb.placeholders(Path("/w d"))
    assert a.argv(values) == ["train", "--run-dir", "/w d/run", "--set", "trainer.epochs=3",
                              "--config", f"{tmp_path.resolve()}/my config.toml"]
    assert (b.exit_code, b.timeout_s) == (4, 2.5)
    assert b.expectations == (Expectation("a.0", "eq", 1), Expectation("b", "lt", 2), Expectation("b", "ne", 0))


@pytest.mark.parametrize(("body", "needle"), [
    ('[[step]]\nname = "a"\nrun = "esper x"\nbogus = 1\n', "step.0.bogus: unknown key"),
    ('colour = "red"\n[[step]]\nname = "a"\nrun = "esper x"\n', "colour: unknown key"),
    ('[[step]]\nname = "a"\n', "step.0.run: required key is missing"),
    ('[[step]]\nname = "a"\nrun = "esper x"\nexit_code = "0"\n', "step.0.exit_code"),
    ('[[step]]\nname = "a"\nrun = "esper x"\ntimeout_s = 0\n', "step.0.timeout_s"),
    ('[[step]]\nname = "a"\nrun = "esper x"\ntimeout_s = inf\n', "step.0.timeout_s"),
    ('[[step]]\nname = "a"\nrun = "esper x"\ntimeout_s = nan\n', "step.0.timeout_s"),
    ('[[step]]\nname = "a"\nrun = "esper x"\ntimeout_s = 1e300\n', "step.0.timeout_s"),
    ("step = []\n", "step"),
    ('[[step]]\nname = "a"\nrun = "esper x {nope}"\n', "unknown placeholder {nope}"),
    ('[vars]\nworkdir = "x"\n[[step]]\nname = "a"\nrun = "esper x"\n', "shadows the built-in placeholder"),
    ('[vars]\na = "1"\nb = "{a}"\n[[step]]\nname = "a"\nrun = "esper x"\n', "vars.b: unknown placeholder {a}"),
    ('[[step]]\nname = "a"\nrun = "python -m esper x"\n', "must be an esper command line"),
    ('[[step]]\nname = "a"\nrun = "esper x \'unclosed"\n', "cannot split the command line"),
    ('[[step]]\nname = "a"\nrun = "esper x"\n[[step]]\nname = "a"\nrun = "esper y"\n', "duplicate step name"),
    ('[[step]]\nname = "a"\nrun = "esper x"\nexpect = { rollback.tier = "fast" }\n',
     'unknown comparison \'tier\''),
    ('[[step]]\nname = "a"\nrun = "esper x"\nexpect = { "a" = { lt = "5" } }\n', "needs a number"),
    ('[[step]]\nname = "a"\nrun = "esper x"\nexpect = { "a" = { lt = true } }\n', "needs a number"),
    ('[[step]]\nname = "a"\nrun = "esper x"\nexpect = { "a" = { in = "A" } }\n', "needs a list"),
    ('[[step]]\nname = "a"\nrun = "esper x"\nexpect = { "a" = { exists = 1 } }\n', "needs true or false"),
    ('[[step]]\nname = "a"\nrun = "esper x"\nexpect = { "a" = {} }\n', "empty comparison table"),
    ('[[step]]\nname = "a"\nrun = "esper x"\nexpect = { "a..b" = 1 }\n', "malformed JSON path"),
])
def test_malformed_runbooks_are_rejected_naming_the_problem(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(RunbookError) as info:
        load_runbook(write(tmp_path, body))
    assert needle in str(info.value)
    assert info.value.exit_code is ExitCode.CONFIG


def test_missing_header_keys_and_toml_errors_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(RunbookError, match="description: required key is missing"):
        load_runbook(write(tmp_path, '[[step]]\nname = "a"\nrun = "esper x"\n', header='name = "t"\n'))
    with pytest.raises(RunbookError, match="TOML syntax error"):
        load_runbook(write(tmp_path, "[[step]\n"))
    with pytest.raises(RunbookError, match="runbook not found"):
        load_runbook(tmp_path / "absent.toml")


# --- expectations -------------------------------------------------------------------------------------------

DOC: dict[str, Any] = {"rollback": {"tier": "fast", "latency_ms": 12.5, "within_sla": True},
                       "seeds": [{"stage": "TRAINING"}, {"stage": "DORMANT"}], "actions": ["rollback", "cull"],
                       "n": 1, "nothing": None, "msg": "fast rollback; bad step not applied", "bad": math.nan}


def test_resolve_walks_dicts_and_list_indexes() -> None:
    assert resolve(DOC, "rollback.tier") == "fast"
    assert resolve(DOC, "seeds.1.stage") == "DORMANT"
    assert resolve(DOC, "seeds.-1.stage") == "DORMANT"
    assert resolve(DOC, "nothing") is None
    for missing in ("seeds.2.stage", "seeds.x", "rollback.tier.more", "nope", "nothing.x", "seeds.-3"):
        assert resolve(DOC, missing) is MISSING, missing


def test_equality_does_not_coerce_bools_or_strings() -> None:
    assert same(1, 1.0) and same([1, {"a": True}], [1.0, {"a": True}])
    assert not same(True, 1) and not same(1, True) and not same(False, 0)
    assert not same("1", 1) and not same([1], [1, 2]) and not same({"a": 1}, {"a": 1, "b": 2})


@pytest.mark.parametrize(("path", "op", "expected", "passes"), [
    ("rollback.tier", "eq", "fast", True),
    ("rollback.tier", "eq", "full", False),
    ("rollback.within_sla", "eq", 1, False),
    ("rollback.tier", "ne", "full", True),
    ("rollback.tier", "ne", "fast", False),
    ("rollback.latency_ms", "lt", 500, True),
    ("rollback.latency_ms", "lt", 12.5, False),
    ("rollback.latency_ms", "lte", 12.5, True),
    ("rollback.latency_ms", "gt", 12.5, False),
    ("n", "gte", 1, True),
    ("n", "gte", 2, False),
    ("rollback.tier", "lt", 5, False),  # not a number
    ("rollback.within_sla", "gte", 0, False),  # a bool is not a number
    ("bad", "lt", 5, False),  # NaN is never in range
    ("seeds.0.stage", "in", ["TRAINING", "BLENDING"], True),
    ("seeds.0.stage", "in", ["BLENDING"], False),
    ("seeds.0.stage", "not_in", ["BLENDING"], True),
    ("seeds.0.stage", "not_in", ["TRAINING"], False),
    ("actions", "contains", "cull", True),
    ("actions", "contains", "halt", False),
    ("msg", "contains", "bad step", True),
    ("msg", "contains", "good step", False),
    ("n", "contains", 1, False),
    ("nothing", "exists", True, True),
    ("rollback.nope", "exists", True, False),
    ("rollback.nope", "exists", False, True),
    ("rollback", "exists", False, False),
    ("rollback.nope", "eq", "fast", False),
    ("rollback.nope", "ne", "fast", False),  # a missing path never satisfies a comparison
])
def test_comparison_operators(path: str, op: str, expected: Any, passes: bool) -> None:
    result = check(Expectation(path, op, expected), DOC)
    assert result.passed is passes, result.describe()


def test_failed_expectation_describes_what_was_seen() -> None:
    assert check(Expectation("seeds.0.stage", "eq", "X"), DOC).describe() == \
        'expected seeds.0.stage eq "X", saw "TRAINING"'
    assert "path not found" in check(Expectation("seeds.5", "eq", 1), DOC).describe()


# --- engine (scripted commands) ---------------------------------------------------------------------------


class Script:
    """A fake executor: returns scripted results in order and records what it was asked to run."""

    def __init__(self, *results: Completed) -> None:
        self.results = list(results)
        self.calls: list[tuple[list[str], Path, float]] = []

    def __call__(self, argv: list[str], cwd: Path, timeout_s: float) -> Completed:
        self.calls.append((argv, cwd, timeout_s))
        return self.results.pop(0)


def ok(doc: object = None, code: int = 0) -> Completed:
    return Completed(code, "" if doc is None else json.dumps(doc), "some stderr", 0.01)


THREE = ('[[step]]\nname = "one"\nrun = "esper a --dir {workdir}/x"\ntimeout_s = 7\nexpect = { "v" = 1 }\n'
         '[[step]]\nname = "two"\nrun = "esper b"\nexit_code = 3\n'
         '[[step]]\nname = "three"\nrun = "esper c"\nexpect = { "w" = { gt = 0 } }\n')


def test_engine_runs_every_step_in_the_shared_workdir(tmp_path: Path) -> None:
    script = Script(ok({"v": 1}), Completed(3, "not json, and not needed", "", 0.01), ok({"w": 2}))
    result = run_runbook(load_runbook(write(tmp_path, THREE)), tmp_path / "wd", executor=script)
    assert result.passed and [s.status for s in result.steps] == ["passed"] * 3
    argv, cwd, timeout = script.calls[0]
    assert argv == [sys.executable, "-m", "esper", "a", "--dir", f"{tmp_path / 'wd'}/x"]
    assert (cwd, timeout) == (tmp_path / "wd", 7.0)
    assert {c[1] for c in script.calls} == {tmp_path / "wd"}
    assert result.to_dict(kept=False)["failed_step"] is None


@pytest.mark.parametrize(("first", "needle"), [
    (ok({"v": 2}), 'expected v eq 1, saw 2'),
    (ok({"u": 1}), "path not found"),
    (ok({"v": 1}, code=1), "expected exit code 0, saw 1"),
    (Completed(None, "", "partial", 7.0), "timed out after 7 s"),
    (Completed(0, "epoch 1 ...\n{}", "", 0.1), "exactly one JSON document"),
    (Completed(0, '{"v": 1}\n{"v": 1}\n', "", 0.1), "exactly one JSON document"),
    (Completed(0, "", "", 0.1), "stdout began: 'nothing'"),
])
def test_first_failure_stops_the_runbook(tmp_path: Path, first: Completed, needle: str) -> None:
    script = Script(first)
    result = run_runbook(load_runbook(write(tmp_path, THREE)), tmp_path, executor=script)
    assert len(script.calls) == 1  # steps two and three never ran
    assert not result.passed
    assert [s.status for s in result.steps] == ["failed", "skipped", "skipped"]
    failed = result.steps[0]
    assert failed.failure is not None and needle in failed.failure
    doc = result.to_dict(kept=False)
    assert doc["failed_step"] == "one" and doc["passed"] is False and needle in doc["failure"]


def test_all_expectations_of_the_failing_step_are_reported(tmp_path: Path) -> None:
    body = '[[step]]\nname = "s"\nrun = "esper a"\nexpect = { "a" = 1, "b" = 2, "c" = 3 }\n'
    result = run_runbook(load_runbook(write(tmp_path, body)), tmp_path, executor=Script(ok({"a": 1, "b": 0, "c": 0})))
    step = result.steps[0]
    assert [e.passed for e in step.expectations] == [True, False, False]
    assert step.failure == "expected b eq 2, saw 0"  # the first one that failed


def test_run_command_kills_a_command_past_its_timeout(tmp_path: Path) -> None:
    done = run_command([sys.executable, "-c", "import time; print('x', flush=True); time.sleep(60)"], tmp_path, 1.0)
    assert done.exit_code is None  # killed at its timeout: a command left to finish would exit 0
    assert done.stdout == "x\n"
    done = run_command([sys.executable, "-c", "import os,sys; print(os.getcwd()); sys.exit(5)"], tmp_path, 60)
    assert (done.exit_code, done.stdout.strip()) == (5, str(tmp_path))


# --- `esper runbook run` (real esper subprocesses) --------------------------------------------------------


def test_cli_passing_runbook_json_and_keep(tmp_path: Path) -> None:
    body = LIFECYCLE_OK + ('[[step]]\nname = "no config is exit 3"\n'
                           'run = "esper config validate --config {workdir}/absent.toml --json"\nexit_code = 3\n')
    result = invoke("run", str(write(tmp_path, body)), "--json", "--keep")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["runbook"] == "t" and doc["passed"] is True and doc["failed_step"] is None
    assert [s["status"] for s in doc["steps"]] == ["passed", "passed"]
    assert [s["exit_code"] for s in doc["steps"]] == [0, 3]
    assert all(e["passed"] for e in doc["steps"][0]["expectations"]) and len(doc["steps"][0]["expectations"]) == 7
    workdir = Path(doc["workdir"])
    assert doc["workdir_kept"] is True and workdir.is_dir()
    assert doc["steps"][1]["command"] == f"esper config validate --config {workdir}/absent.toml --json"
    assert f"work directory kept: {workdir}" in result.stderr
    workdir.rmdir()


def test_cli_wrong_expectation_exits_7_naming_the_step(tmp_path: Path) -> None:
    body = ('[[step]]\nname = "check the initial stage"\nrun = "esper lifecycle seed --format json"\n'
            'expect = { "initial" = "GERMINATED" }\n'
            '[[step]]\nname = "never runs"\nrun = "esper lifecycle seed --format json"\n')
    result = invoke("run", str(write(tmp_path, body)), "--json")
    assert result.exit_code == ExitCode.EXPECTATION, result.output
    doc = json.loads(result.stdout)
    assert doc["passed"] is False and doc["failed_step"] == "check the initial stage"
    assert [s["status"] for s in doc["steps"]] == ["failed", "skipped"]
    assert doc["steps"][0]["expectations"][0]["seen"] == "DORMANT"
    assert "step 'check the initial stage'" in result.stderr
    assert 'expected initial eq "GERMINATED", saw "DORMANT"' in result.stderr
    assert not Path(doc["workdir"]).exists()  # removed without --keep


def test_cli_table_output_and_timeout(tmp_path: Path) -> None:
    body = '[[step]]\nname = "too slow"\nrun = "esper lifecycle seed --format json"\ntimeout_s = 0.2\n'
    result = runner.invoke(app, ["run", str(write(tmp_path, body))], env={"COLUMNS": "200"})
    assert result.exit_code == ExitCode.EXPECTATION, result.output
    assert "too slow" in result.stdout and "timeout" in result.stdout and "failed" in result.stdout
    assert "failed at step 'too slow': timed out after 0.2 s" in result.stderr


def test_cli_malformed_runbook_exits_3(tmp_path: Path) -> None:
    result = invoke("run", str(write(tmp_path, '[[step]]\nname = "a"\n')), "--json")
    assert result.exit_code == ExitCode.CONFIG
    doc = json.loads(result.stdout)  # --json: the failure is the one JSON error document
    assert doc["exit_code"] == 3 and "step.0.run: required key is missing" in doc["error"]
    assert "step.0.run: required key is missing" in result.stderr


# --- shipped runbooks ---------------------------------------------------------------------------------------


def test_three_runbooks_are_shipped_and_load() -> None:
    assert [p.name for p in SHIPPED] == ["corrupt-checkpoint-triage.toml", "halt-and-resume.toml", "nan-drill.toml"]
    for path in SHIPPED:
        rb = load_runbook(path)
        assert rb.steps and all(s.expectations for s in rb.steps), path
        assert rb.steps[0].args[0] == "simulate-emergency"


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_runbook_passes(path: Path) -> None:
    result = invoke("run", str(path), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["passed"] is True and all(s["status"] == "passed" for s in doc["steps"])



# A step that starts processes in sessions of their own (a nested runbook's steps do): a timeout ends them all.
_TREE = """
import os, subprocess, sys, time
me, pids = sys.argv[0], sys.argv[1]
if len(sys.argv) > 2:  # the middle process, in a session of its own like a nested runbook, and its child
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(pids + ".tmp", "w") as fh:
        fh.write(f"{os.getpid()} {g.pid}")
    os.replace(pids + ".tmp", pids)
else:
    subprocess.Popen([sys.executable, me, pids, "middle"], start_new_session=True)
time.sleep(600)
"""


def _live(*pids: int) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def _tree(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "tree.py"
    script.write_text(_TREE)
    return [sys.executable, str(script), str(tmp_path / "pids")], tmp_path / "pids"


def test_kill_tree_reaches_descendants_in_other_sessions(tmp_path: Path) -> None:
    argv, pids = _tree(tmp_path)
    proc = subprocess.Popen(argv, cwd=tmp_path, start_new_session=True)
    wait_until(pids.exists, "the whole tree to start", 120)
    middle, grandchild = (int(x) for x in pids.read_text().split())
    assert {middle, grandchild} <= descendants(proc.pid)  # ... though not in the step's process group
    assert {proc.pid, middle, grandchild} <= kill_tree(proc.pid)
    proc.wait(30)
    wait_until(lambda: not _live(middle, grandchild), "the tree to be gone", 30)


def test_a_step_timeout_kills_a_tree_that_left_its_process_group(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    argv, pids = _tree(tmp_path)
    real = subprocess.Popen.communicate

    def once_the_tree_is_up(self: subprocess.Popen[str], input: Any = None, timeout: float | None = None) -> Any:
        if timeout is not None:  # the step's wait: let the whole tree start, then let the step run out of time
            wait_until(pids.exists, "the whole tree to start", 120)
            timeout = 0.01
        return real(self, input, timeout)

    monkeypatch.setattr(subprocess.Popen, "communicate", once_the_tree_is_up)
    done = run_command(argv, tmp_path, 300.0)
    assert done.exit_code is None
    middle, grandchild = (int(x) for x in pids.read_text().split())
    wait_until(lambda: not _live(middle, grandchild), "the tree to be gone", 30)


_LONG = ('[[step]]\nname = "train for ever"\nrun = "esper --config {config} train --run-dir {workdir}/run --json '
         '--set data.task=\\"synthetic\\" --set trainer.epochs=100000"\ntimeout_s = 600\n')


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_runbook_stops_its_step_tree_and_removes_its_work_directory(tmp_path: Path, sig: int) -> None:
    """Issue 26: SIGTERM left the step training as an orphan and the work directory behind; SIGINT raced the
    removal of a directory the step still wrote into."""
    book = write(tmp_path, '[vars]\nconfig = "' + str(REPO / "tests" / "data" / "base.toml") + '"\n' + _LONG)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    child = subprocess.Popen([sys.executable, "-m", "esper", "runbook", "run", str(book), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env={**os.environ, "TMPDIR": str(tmp)}, start_new_session=True)
    runs = lambda: [p for p in tmp.glob("esper-runbook-*/run/checkpoints/epoch-*")]  # noqa: E731
    wait_until(lambda: len(runs()) >= 2, "the step to train two epochs", 180)
    step = descendants(child.pid)
    assert step
    child.send_signal(sig)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + sig and "Traceback" not in err, err
    doc = json.loads(out)
    assert doc["exit_code"] == 128 + sig and "its step was stopped, its work directory removed" in doc["error"]
    assert not list(tmp.glob("esper-runbook-*"))  # (torch keeps its own cache dir there)
    wait_until(lambda: not _live(*step), "the step's tree to be gone", 30)


@pytest.mark.slow
def test_an_outer_step_timeout_lets_a_nested_runbook_remove_its_work_directory(tmp_path: Path) -> None:
    inner = write(tmp_path, '[vars]\nconfig = "' + str(REPO / "tests" / "data" / "base.toml") + '"\n' + _LONG)
    outer = tmp_path / "outer.toml"
    outer.write_text(f'name = "outer"\ndescription = "runs a nested runbook"\n[[step]]\nname = "nested"\n'
                     f'run = "esper runbook run {inner}"\ntimeout_s = 15\n')
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = subprocess.run([sys.executable, "-m", "esper", "runbook", "run", str(outer), "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp)},
                          timeout=300)
    assert done.returncode == ExitCode.EXPECTATION, done.stderr
    [step] = json.loads(done.stdout)["steps"]
    assert step["timed_out"] is True, step
    left = list(tmp.glob("esper-runbook-*"))
    assert not left, (step["duration_s"], step["stderr_tail"])  # the inner runbook directory (checkpoints too)
