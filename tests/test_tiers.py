"""The tiers import only downward (ARCHITECTURE.md): cli -> app -> core (the engine) -> statemachines.

Read from the source with ``ast`` (imports inside functions count), so a new upward import fails here whatever
the module does at run time. Inside the engine, the two bottom rooms are pinned too: ``io`` knows nothing but
itself and the error types, ``config`` nothing but itself, ``io`` and the error types.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "esper"
TIER = {"esper.statemachines": 0, "esper.core": 1, "esper.app": 2, "esper.cli": 3}
# what each bottom room of the engine may import from esper (besides itself)
ROOM_ALLOWED = {
    "esper.core.io": {"esper.core.errors"},
    "esper.core.config": {"esper.core.errors", "esper.core.io"},
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def esper_imports(path: Path, package: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of an esper module in the file, relative imports resolved."""
    found: list[tuple[int, str]] = []
    here = module_name(path, package).split(".")
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            if mod == "esper" or mod.startswith("esper."):
                # `from esper.core import x` imports the module esper.core.x when x is one
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    found.append((node.lineno, sub if _is_module(sub, package) else mod))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("esper"))
    return found


def _is_module(dotted: str, package: Path) -> bool:
    p = package.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def tier(mod: str) -> int | None:
    return next((t for prefix, t in TIER.items() if mod == prefix or mod.startswith(prefix + ".")), None)


def room(mod: str) -> str | None:
    return next((r for r in ROOM_ALLOWED if mod == r or mod.startswith(r + ".")), None)


def violations(package: Path) -> list[str]:
    bad: list[str] = []
    for path in sorted(package.rglob("*.py")):
        me = module_name(path, package)
        for line, imported in esper_imports(path, package):
            mine, theirs = tier(me), tier(imported)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{path.relative_to(package.parent)}:{line} imports {imported} (a higher tier)")
            r = room(me)
            if r is not None and room(imported) != r and not any(
                    imported == a or imported.startswith(a + ".") for a in ROOM_ALLOWED[r]):
                bad.append(f"{path.relative_to(package.parent)}:{line} imports {imported} (outside {r})")
    return bad


def test_every_module_belongs_to_a_tier() -> None:
    stray = [module_name(p) for p in PACKAGE.rglob("*.py") if tier(module_name(p)) is None
             and module_name(p) not in {"esper", "esper.__main__"}]
    assert stray == []


def test_no_import_runs_upward() -> None:
    assert violations(PACKAGE) == []


def test_the_engine_keeps_no_application_modules_flat() -> None:
    """The engine's top level holds packages and the error types only: every other module has a room."""
    flat = sorted(p.name for p in (PACKAGE / "core").glob("*.py") if p.name not in {"__init__.py", "errors.py"})
    assert flat == []


@pytest.mark.parametrize(("where", "source", "complaint"), [
    ("core/model/x.py", "from esper.app.session import TrainSession\n", "a higher tier"),
    ("core/tolaria/x.py", "def f():\n    from esper.cli import main\n", "a higher tier"),
    ("app/x.py", "import esper.cli.main\n", "a higher tier"),
    ("statemachines/x.py", "from esper.core import errors\n", "a higher tier"),
    ("core/io/x.py", "from esper.core.config import EsperConfig\n", "outside esper.core.io"),
    ("core/config/x.py", "from ..records import telemetry\n", "outside esper.core.config"),
])
def test_the_rule_catches_an_upward_import(tmp_path: Path, where: str, source: str, complaint: str) -> None:
    """The checker itself: a planted upward import (top level, inside a function, relative) is reported."""
    pkg = tmp_path / "esper"
    for d in ("core/model", "core/tolaria", "core/io", "core/config", "core/records", "app", "cli",
              "statemachines"):
        (pkg / d).mkdir(parents=True, exist_ok=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / where).write_text(source)
    found = violations(pkg)
    assert len(found) == 1 and complaint in found[0] and where.split("/")[-1] in found[0]


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["lifecycle", "seed"], ["faults", "list"],
                                  ["runs", "{tmp}"], ["completion", "zsh"]])
def test_commands_that_need_no_torch_do_not_import_it(tmp_path: Path, args: list[str]) -> None:
    """Issue 27: every command imported torch (1 s idle, 3-7 s under load) before doing anything."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom esper.cli.main import app\n"
            f"r = CliRunner().invoke(app, {argv!r})\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'sklearn', 'matplotlib', 'safetensors') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_modules_stay_small_and_the_loop_reads_in_one_sitting() -> None:
    """Issue 22: no module of the package over 450 lines; the trainer's loop (tolaria/trainer.py) at most 300."""
    package = Path(__file__).resolve().parent.parent / "esper"
    sizes = {p.relative_to(package).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in package.rglob("*.py")}
    assert len(sizes) > 50  # the walk found the package
    assert {name: n for name, n in sizes.items() if n > 450} == {}
    assert sizes["core/tolaria/trainer.py"] <= 300
