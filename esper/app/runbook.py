"""Runbooks (SPEC §6 E-3): a TOML file of ``esper`` command steps with expectations on exit code and JSON output.

Format::

    name = "nan-drill"
    description = "what the runbook rehearses and why"

    [vars]                                   # optional; each becomes a {placeholder}
    run = "{workdir}/run"                    # a var may use the built-in placeholders, not other vars

    [[step]]
    name = "inject a NaN"
    run = "esper simulate-emergency --fault nan_loss --run-dir {run} --json"
    exit_code = 0                            # expected exit code (default 0)
    timeout_s = 300                          # default 300; finite, at most a week
    expect = { "matched" = true, "rollback.latency_ms" = { lt = 500 }, "seeds.0.stage" = { in = ["A", "B"] } }

Placeholders (substituted in ``run`` only): ``{workdir}`` is the one temporary directory every step shares (and
the steps' working directory); ``{runbook_dir}`` is the directory holding the runbook file; every ``[vars]`` key.
An unknown placeholder is an error when the runbook is loaded. There is no escape for a literal ``{name}``.

Expectation keys are JSON paths, dotted with integer list indexes (``seeds.0.stage``); quote them in TOML, since
a bare dotted key makes nested tables. A value is compared for equality (``true`` never equals ``1``); a table is a
comparison: ``eq``, ``ne``, ``lt``, ``lte``, ``gt``, ``gte`` (numbers), ``in``, ``not_in`` (a list),
``contains`` (a list item or a substring), ``exists`` (the path resolves, even to null). Several operators in one
table must all hold. A step with expectations requires its command to print exactly one JSON document on stdout.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from esper.app.proctree import Completed, Executor, run_command
from esper.core.errors import EsperError, ExitCode
from esper.core.io.tomlfile import read_toml

BUILTIN_PLACEHOLDERS = ("workdir", "runbook_dir")
OPERATORS = ("eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "contains", "exists")
_NUMERIC_OPS = ("lt", "lte", "gt", "gte")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAIL_CHARS = 2000
MAX_STEP_TIMEOUT_S = 7 * 86_400  # a week: finite, and within what a subprocess wait accepts


class RunbookError(EsperError):
    """The runbook file is missing or malformed (exit 3, like an invalid config)."""

    exit_code = ExitCode.CONFIG


# --- file format ---------------------------------------------------------------------------------------------


class _StepModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: StrictStr = Field(min_length=1)
    run: StrictStr = Field(min_length=1)
    exit_code: StrictInt = 0
    timeout_s: StrictInt | StrictFloat = Field(default=300, gt=0, le=MAX_STEP_TIMEOUT_S, allow_inf_nan=False)
    expect: dict[str, Any] = Field(default_factory=dict)


class _RunbookModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: StrictStr = Field(min_length=1)
    description: StrictStr = Field(min_length=1)
    vars: dict[str, StrictStr | StrictInt | StrictFloat] = Field(default_factory=dict)
    step: list[_StepModel] = Field(min_length=1)


@dataclass(frozen=True)
class Expectation:
    """One check on a step's JSON output: ``path`` ``op`` ``expected``."""

    path: str
    op: str
    expected: Any

    def describe(self) -> str:
        return f"{self.path} {self.op} {json.dumps(self.expected)}"


@dataclass(frozen=True)
class Step:
    """A loaded step: its argv after ``esper``, still holding placeholders, and what it must produce."""

    name: str
    run: str
    args: tuple[str, ...]
    exit_code: int
    timeout_s: float
    expectations: tuple[Expectation, ...]

    def argv(self, values: Mapping[str, str]) -> list[str]:
        """The arguments after ``esper`` with every placeholder substituted."""
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], a) for a in self.args]


@dataclass(frozen=True)
class Runbook:
    name: str
    description: str
    path: Path
    vars: Mapping[str, str]
    steps: tuple[Step, ...]

    def placeholders(self, workdir: Path) -> dict[str, str]:
        """Built-in placeholder values for ``workdir``, then the vars (which may use the built-ins)."""
        builtins = {"workdir": str(workdir), "runbook_dir": str(self.path.resolve().parent)}
        values = dict(builtins)
        for key, raw in self.vars.items():
            values[key] = _PLACEHOLDER.sub(lambda m: builtins[m.group(1)], raw)
        return values


def load_runbook(path: Path) -> Runbook:
    """Read and validate a runbook; every problem is a RunbookError naming the file and the offending key."""
    raw = read_toml(path, RunbookError, f"runbook not found: {path}")
    try:
        model = _RunbookModel.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise RunbookError(f"{path}: {problems}") from None

    for key in model.vars:
        if not _VAR_NAME.match(key):
            raise RunbookError(f"{path}: vars.{key}: a var name must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
        if key in BUILTIN_PLACEHOLDERS:
            raise RunbookError(f"{path}: vars.{key}: shadows the built-in placeholder {{{key}}}")
    var_values = {k: str(v) for k, v in model.vars.items()}
    for key, value in var_values.items():
        for ref in _PLACEHOLDER.findall(value):
            if ref not in BUILTIN_PLACEHOLDERS:
                raise RunbookError(f"{path}: vars.{key}: unknown placeholder {{{ref}}} (a var may use only "
                                   f"{', '.join('{' + b + '}' for b in BUILTIN_PLACEHOLDERS)})")

    known = {*BUILTIN_PLACEHOLDERS, *var_values}
    steps: list[Step] = []
    seen_names: set[str] = set()
    for i, s in enumerate(model.step):
        where = f"{path}: step {i + 1} ({s.name!r})"
        if s.name in seen_names:
            raise RunbookError(f"{where}: duplicate step name")
        seen_names.add(s.name)
        for ref in _PLACEHOLDER.findall(s.run):
            if ref not in known:
                raise RunbookError(f"{where}: run: unknown placeholder {{{ref}}} (known: "
                                   f"{', '.join('{' + k + '}' for k in sorted(known))})")
        try:
            tokens = shlex.split(s.run)
        except ValueError as exc:
            raise RunbookError(f"{where}: run: cannot split the command line: {exc}") from None
        if not tokens or tokens[0] != "esper":
            raise RunbookError(f"{where}: run: must be an esper command line starting with 'esper', got {s.run!r}")
        steps.append(Step(name=s.name, run=s.run, args=tuple(tokens[1:]), exit_code=s.exit_code,
                          timeout_s=float(s.timeout_s), expectations=_parse_expect(s.expect, where)))
    return Runbook(model.name, model.description, path, var_values, tuple(steps))


def _parse_expect(expect: Mapping[str, Any], where: str) -> tuple[Expectation, ...]:
    out: list[Expectation] = []
    for key, value in expect.items():
        _check_path(key, where)
        if not isinstance(value, dict):
            out.append(Expectation(key, "eq", value))
            continue
        if not value:
            raise RunbookError(f"{where}: expect.{key}: empty comparison table (use one of {', '.join(OPERATORS)})")
        for op, operand in value.items():
            if op not in OPERATORS:
                # an unquoted dotted key ("a.b" = 1 written as a.b = 1) lands here as a nested table
                raise RunbookError(f"{where}: expect.{key}: unknown comparison {op!r} "
                                   f"(allowed: {', '.join(OPERATORS)}); if {key}.{op} is a JSON path, "
                                   f"quote it in TOML: \"{key}.{op}\" = ...")
            _check_operand(op, operand, f"{where}: expect.{key}.{op}")
            out.append(Expectation(key, op, operand))
    return tuple(out)


def _check_path(key: str, where: str) -> None:
    if not key or any(part == "" for part in key.split(".")):
        raise RunbookError(f"{where}: expect: malformed JSON path {key!r} (dotted keys and list indexes, "
                           f"like 'seeds.0.stage')")


def _check_operand(op: str, operand: Any, where: str) -> None:
    if op in _NUMERIC_OPS and not _is_number(operand):
        raise RunbookError(f"{where}: needs a number, got {operand!r}")
    if op in ("in", "not_in") and not isinstance(operand, list):
        raise RunbookError(f"{where}: needs a list, got {operand!r}")
    if op == "exists" and not isinstance(operand, bool):
        raise RunbookError(f"{where}: needs true or false, got {operand!r}")


def _describe(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ())) or "<top level>"
    if err.get("type") == "extra_forbidden":
        return f"{loc}: unknown key"
    if err.get("type") == "missing":
        return f"{loc}: required key is missing"
    return f"{loc}: {err.get('msg', 'invalid')} (got {err.get('input')!r})"


# --- expectations -------------------------------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


def resolve(doc: Any, path: str) -> Any:
    """The value at dotted ``path`` in ``doc``, or ``MISSING`` when any segment does not resolve."""
    node = doc
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                return MISSING
            node = node[part]
        elif isinstance(node, list):
            if not re.fullmatch(r"-?\d+", part):
                return MISSING
            index = int(part)
            if not -len(node) <= index < len(node):
                return MISSING
            node = node[index]
        else:
            return MISSING
    return node


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def same(a: Any, b: Any) -> bool:
    """JSON equality without Python's coercions: ``true != 1``, ``1 == 1.0``, lists/tables compared deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class ExpectationResult:
    expectation: Expectation
    seen: Any
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        found = self.seen is not MISSING
        return {"path": self.expectation.path, "op": self.expectation.op, "expected": self.expectation.expected,
                "found": found, "seen": self.seen if found else None, "passed": self.passed, "reason": self.reason}

    def describe(self) -> str:
        seen = "nothing (path not found)" if self.seen is MISSING else json.dumps(self.seen, default=str)
        return f"expected {self.expectation.describe()}, saw {seen}" + (f" ({self.reason})" if self.reason else "")


def check(exp: Expectation, doc: Any) -> ExpectationResult:
    """Evaluate one expectation against a parsed JSON document."""
    seen = resolve(doc, exp.path)
    if exp.op == "exists":
        return ExpectationResult(exp, seen, (seen is not MISSING) == exp.expected, "")
    if seen is MISSING:
        return ExpectationResult(exp, seen, False, "path not found")
    op, want = exp.op, exp.expected
    if op == "eq":
        return ExpectationResult(exp, seen, same(seen, want), "")
    if op == "ne":
        return ExpectationResult(exp, seen, not same(seen, want), "")
    if op in _NUMERIC_OPS:
        if not _is_number(seen) or (isinstance(seen, float) and math.isnan(seen)):
            return ExpectationResult(exp, seen, False, "not a number")
        ok = {"lt": seen < want, "lte": seen <= want, "gt": seen > want, "gte": seen >= want}[op]
        return ExpectationResult(exp, seen, ok, "")
    if op in ("in", "not_in"):
        member = any(same(seen, w) for w in want)
        return ExpectationResult(exp, seen, member if op == "in" else not member, "")
    # contains: a list holding the item, or a string holding the substring
    if isinstance(seen, list):
        return ExpectationResult(exp, seen, any(same(item, want) for item in seen), "")
    if isinstance(seen, str) and isinstance(want, str):
        return ExpectationResult(exp, seen, want in seen, "")
    return ExpectationResult(exp, seen, False, "not a list or string")


# --- execution ------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    name: str
    command: str
    status: str  # passed | failed | skipped
    expected_exit_code: int
    exit_code: int | None = None
    timed_out: bool = False
    duration_s: float = 0.0
    expectations: list[ExpectationResult] = field(default_factory=list)
    failure: str | None = None
    stderr_tail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "command": self.command, "status": self.status,
                "expected_exit_code": self.expected_exit_code, "exit_code": self.exit_code,
                "timed_out": self.timed_out, "duration_s": round(self.duration_s, 3),
                "expectations": [e.to_dict() for e in self.expectations], "failure": self.failure,
                "stderr_tail": self.stderr_tail}


@dataclass
class RunbookResult:
    runbook: Runbook
    workdir: Path
    steps: list[StepResult]

    @property
    def failed_step(self) -> StepResult | None:
        return next((s for s in self.steps if s.status == "failed"), None)

    @property
    def passed(self) -> bool:
        return self.failed_step is None

    def to_dict(self, *, kept: bool) -> dict[str, Any]:
        failed = self.failed_step
        return {"runbook": self.runbook.name, "path": str(self.runbook.path), "description": self.runbook.description,
                "passed": self.passed, "workdir": str(self.workdir), "workdir_kept": kept,
                "steps": [s.to_dict() for s in self.steps], "failed_step": failed.name if failed else None,
                "failure": failed.failure if failed else None}


def esper_argv(args: Sequence[str]) -> list[str]:
    """The interpreter running us, ``-m esper``: a runbook never depends on what ``esper`` PATH finds."""
    return [sys.executable, "-m", "esper", *args]


def run_runbook(rb: Runbook, workdir: Path, *, executor: Executor = run_command,
                on_step: Callable[[int, Step], None] | None = None) -> RunbookResult:
    """Run the steps in order in ``workdir``; the first failing step stops the rest (reported as skipped)."""
    values = rb.placeholders(workdir)
    results: list[StepResult] = []
    failed = False
    for index, step in enumerate(rb.steps):
        args = step.argv(values)
        command = shlex.join(["esper", *args])
        if failed:
            results.append(StepResult(step.name, command, "skipped", step.exit_code))
            continue
        if on_step is not None:
            on_step(index, step)
        result = _run_step(step, command, executor(esper_argv(args), workdir, step.timeout_s))
        failed = result.status == "failed"
        results.append(result)
    return RunbookResult(rb, workdir, results)


def _run_step(step: Step, command: str, done: Completed) -> StepResult:
    result = StepResult(step.name, command, "failed", step.exit_code, exit_code=done.exit_code,
                        timed_out=done.exit_code is None, duration_s=done.duration_s)
    tail = done.stderr[-_TAIL_CHARS:] if done.stderr else None
    if done.exit_code is None:
        result.failure = f"timed out after {step.timeout_s:g} s (killed)"
        result.stderr_tail = tail
        return result
    if done.exit_code != step.exit_code:
        result.failure = f"expected exit code {step.exit_code}, saw {done.exit_code}"
        result.stderr_tail = tail
        return result
    if step.expectations:
        try:
            doc = json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            shown = done.stdout[:200] if done.stdout.strip() else "nothing"
            result.failure = (f"expectations need exactly one JSON document on stdout, but it did not parse "
                              f"({exc}); stdout began: {shown!r}")
            result.stderr_tail = tail
            return result
        result.expectations = [check(e, doc) for e in step.expectations]
        first_bad = next((e for e in result.expectations if not e.passed), None)
        if first_bad is not None:
            result.failure = first_bad.describe()
            return result
    result.status = "passed"
    return result
