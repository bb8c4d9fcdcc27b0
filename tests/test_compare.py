"""`esper compare`: grown vs host alone vs a static host over run seeds; every figure is the runs' own summary."""

from __future__ import annotations

import json
import statistics
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GROWING, esper, out, sets, summary

from esper.app.compare import Comparison, RunResult, parse_seeds, variants
from esper.app.compute_target import compute_to_target
from esper.cli.view import si
from esper.core.errors import ConfigError

# grows at once on the synthetic task, so the grown runs really differ from the host alone
TINY = [*GROWING, "trainer.epochs=3", "controller.isolation=inline"]
STATIC = "host.hidden=[12, 12]"


def compare(out_dir: Path, *args: str, items: list[str] = TINY) -> Any:
    return esper("compare", "--out", str(out_dir), *args, *sets(*items))


def _row(text: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


def pct(v: float) -> str:
    return f"{100 * v:.2f}%"


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out_dir = tmp_path_factory.mktemp("compare") / "cmp"
    result = compare(out_dir, "--seeds", "1..2", "--static-host", STATIC)
    return out_dir, result


def test_every_run_is_a_real_run_dir_with_its_variant_config(table_run: tuple[Path, Any]) -> None:
    out_dir, result = table_run
    assert result.exit_code == 0, out(result)
    names = sorted(p.name for p in out_dir.iterdir() if p.is_dir())
    assert names == ["grown-s1", "grown-s2", "host-s1", "host-s2", "static-s1", "static-s2"]
    for name in names:
        variant, seed = name.split("-s")
        cfg = tomllib.loads((out_dir / name / "config.toml").read_text())
        assert cfg["run"]["seed"] == int(seed) and cfg["run"]["run_id"] == name
        assert cfg["seeds"]["enabled"] is (variant == "grown")
        assert cfg["host"]["hidden"] == ([12, 12] if variant == "static" else [6, 6])
        s = summary(out_dir / name)
        assert s["status"] == "COMPLETED" and s["epochs_completed"] == 3
    grown = summary(out_dir / "grown-s1")
    assert any(seed["blueprint"] for seed in grown["seeds"]), "the grown run germinated nothing"
    assert grown["final"]["params"] > summary(out_dir / "host-s1")["final"]["params"]


def test_table_figures_are_the_runs_summaries(table_run: tuple[Path, Any]) -> None:
    out_dir, result = table_run
    text = result.stdout
    assert "val_accuracy (higher is better) over run seeds 1, 2" in text
    finals = {(v, s): summary(out_dir / f"{v}-s{s}")["final"] for v in ("grown", "host", "static") for s in (1, 2)}
    for v in ("grown", "host", "static"):
        accs = [finals[(v, s)]["val_accuracy"] for s in (1, 2)]
        losses = [finals[(v, s)]["val_loss"] for s in (1, 2)]
        params = {finals[(v, s)]["params"] for s in (1, 2)}
        cells = _row(text, v)
        assert cells[1:6] == ["2/2", pct(statistics.fmean(accs)), pct(min(accs)), pct(max(accs)),
                              f"{statistics.fmean(losses):.4f}"]
        assert cells[6] == (f"{min(params):,}" if len(params) == 1 else f"{min(params):,}-{max(params):,}")
        flops = {summary(out_dir / f"{v}-s{s}")["compute"]["flops"] for s in (1, 2)}
        assert cells[7] == si(statistics.fmean(flops)) and cells[8].endswith(" s")
    deltas = []
    for s in (1, 2):
        g, h, st = (finals[(v, s)]["val_accuracy"] for v in ("grown", "host", "static"))
        deltas.append(g - h)
        assert _row(text, str(s))[1:] == [pct(g), pct(h), pct(st), f"{100 * (g - h):+.2f} pts",
                                          f"{100 * (g - st):+.2f} pts"]
    assert _row(text, "min")[-2] == f"{100 * min(deltas):+.2f} pts"
    assert _row(text, "mean")[-2] == f"{100 * statistics.fmean(deltas):+.2f} pts"


def test_compare_json_document_matches_the_runs(table_run: tuple[Path, Any]) -> None:
    out_dir, _ = table_run
    doc = json.loads((out_dir / "compare.json").read_text())
    assert doc["seeds"] == [1, 2] and doc["exit_code"] == 0 and doc["stopped"] is False
    assert (doc["primary_metric"], doc["direction"]) == ("val_accuracy", "max")
    # where it was measured: figures are bit-reproducible on one CPU kind only
    assert doc["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["cpu"]
    assert list(doc["variants"]) == ["grown", "host", "static"]
    assert doc["variants"]["host"]["overrides"] == ["seeds.enabled=false"]
    assert doc["variants"]["static"]["overrides"] == [STATIC, "seeds.enabled=false"]
    for name, v in doc["variants"].items():
        assert v["completed"] == 2
        for run in v["runs"]:
            s = summary(Path(run["run_dir"]))
            assert Path(run["run_dir"]) == out_dir / f"{name}-s{run['seed']}"
            assert (run["primary"], run["val_loss"], run["params"]) == (
                s["final"]["val_accuracy"], s["final"]["val_loss"], s["final"]["params"])
            assert run["exit_code"] == s["exit_code"] == 0 and run["error"] is None
        prim = [r["primary"] for r in v["runs"]]
        assert v["primary"] == {"mean": statistics.fmean(prim), "min": min(prim), "max": max(prim)}
    g = {r["seed"]: r["primary"] for r in doc["variants"]["grown"]["runs"]}
    h = {r["seed"]: r["primary"] for r in doc["variants"]["host"]["runs"]}
    per_seed = {str(k): g[k] - h[k] for k in (1, 2)}
    assert doc["deltas"]["grown-host"]["per_seed"] == per_seed
    assert doc["deltas"]["grown-host"]["min"] == min(per_seed.values())
    assert set(doc["deltas"]) == {"grown-host", "grown-static"}


def test_json_prints_one_document_and_a_failed_run_sets_the_exit_code(tmp_path: Path) -> None:
    """The static host's factory returns no module: its run is refused at build (exit 3, before it has a run
    directory), its row says so, the other runs complete, and compare exits with the worst run's code."""
    out_dir = tmp_path / "cmp"
    result = compare(out_dir, "--seeds", "1", "--json", "--static-host", 'host.factory="plugins_fixture:not_a_module"',
                     items=[*TINY, "trainer.epochs=1"])
    assert result.exit_code == 3, out(result)
    doc = json.loads(result.stdout)
    assert doc == json.loads((out_dir / "compare.json").read_text())
    runs = {name: v["runs"] for name, v in doc["variants"].items()}
    assert [r["exit_code"] for r in runs["grown"] + runs["host"]] == [0, 0]
    (bad,) = runs["static"]
    assert bad["exit_code"] == 3 and bad["status"] == "ERROR" and bad["primary"] is None
    assert "plugins_fixture:not_a_module" in bad["error"]
    assert doc["variants"]["static"]["completed"] == 0 and doc["variants"]["static"]["primary"]["mean"] is None
    assert doc["deltas"]["grown-static"]["per_seed"] == {} and doc["deltas"]["grown-static"]["min"] is None
    assert not (out_dir / "static-s1" / "summary.json").exists()
    assert "ERROR (exit 3)" in result.stderr or "ERROR, exit 3" in result.stderr


def test_bad_static_host_key_is_exit_3_naming_it_before_any_run(tmp_path: Path) -> None:
    out_dir = tmp_path / "cmp"
    result = compare(out_dir, "--seeds", "1..2", "--static-host", "host.hiden=[12]")
    assert result.exit_code == 3
    assert "--static-host" in result.stderr and "host.hiden: unknown key" in result.stderr
    assert "did you mean 'host.hidden'?" in result.stderr
    assert not out_dir.exists()


def test_existing_run_dirs_are_refused(tmp_path: Path) -> None:
    out_dir = tmp_path / "cmp"
    (out_dir / "host-s2").mkdir(parents=True)
    result = compare(out_dir, "--seeds", "1..2")
    assert result.exit_code == 3 and "host-s2" in result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["host-s2"]


def test_an_out_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cmp").write_text("not a directory")
    result = compare(tmp_path / "cmp", "--seeds", "1")
    assert result.exit_code == 3 and "not a directory" in result.stderr


@pytest.mark.parametrize("text", ["1..x", "5..1", "", "1,,2", "-1..3", "1..2000"])
def test_bad_seeds_are_a_usage_error(tmp_path: Path, text: str) -> None:
    result = compare(tmp_path / "cmp", "--seeds", text)
    assert result.exit_code == 2, out(result)
    assert "--seeds" in result.stderr
    assert not (tmp_path / "cmp").exists()


def test_parse_seeds() -> None:
    assert parse_seeds("1..5") == [1, 2, 3, 4, 5]
    assert parse_seeds(" 3..3 ") == [3]
    assert parse_seeds("1,3,7") == [1, 3, 7]
    assert parse_seeds("7,3,7,1") == [7, 3, 1]
    for bad in ("3..1", "a", "1-3", "1..", "1;2"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


# --- the compute question: the final size from scratch, FLOPs to the target ---------------------------------


def test_scratch_variant_gives_flops_to_target_and_the_saving_from_the_runs_own_rows(tmp_path: Path) -> None:
    out_dir = tmp_path / "cmp"
    result = compare(out_dir, "--seeds", "1", "--scratch", STATIC)
    assert result.exit_code == 0, out(result)
    doc = json.loads((out_dir / "compare.json").read_text())
    section = doc["compute_to_target"]["per_seed"]["1"]
    scratch = summary(out_dir / "scratch-s1")
    assert section["target"] == scratch["final"]["val_accuracy"]
    assert scratch["compute"]["flops"] == doc["variants"]["scratch"]["flops"]["mean"] > 0
    for variant in ("grown", "host", "scratch"):
        rows = [json.loads(line) for line in (out_dir / f"{variant}-s1" / "metrics.jsonl").read_text().splitlines()]
        first = next((r for r in rows if r["val_accuracy"] >= section["target"]), None)
        hit = section["reached"][variant]
        assert (hit is None) == (first is None)
        if first is not None:
            assert (hit["epoch"], hit["flops"]) == (first["epoch"], first["flops"])
    grown, base = section["reached"]["grown"], section["reached"]["scratch"]
    assert section["saving"]["grown"] == (None if grown is None else 1 - grown["flops"] / base["flops"])
    assert "training FLOPs to reach the target" in result.stdout
    assert (out_dir / "compute.png").read_bytes()[:4] == b"\x89PNG"
    # --from reads the same runs again, trains nothing, writes nothing, and takes another target
    before = sorted(p.name for p in out_dir.rglob("*"))
    again = esper("compare", "--from", str(out_dir), "--json")
    assert again.exit_code == 0, out(again)
    reread = json.loads(again.stdout)
    assert reread["compute_to_target"]["per_seed"] == doc["compute_to_target"]["per_seed"]
    assert all(r["wall_s"] is None for v in reread["variants"].values() for r in v["runs"])  # not timed: not shown
    easy = json.loads(esper("compare", "--from", str(out_dir), "--target", "0.0", "--json").stdout)
    reached = easy["compute_to_target"]["per_seed"]["1"]["reached"].values()
    assert all(hit is not None and hit["epoch"] == 1 for hit in reached)
    assert sorted(p.name for p in out_dir.rglob("*")) == before


def test_from_reads_hostile_run_directories_without_a_traceback(tmp_path: Path) -> None:
    out_dir = tmp_path / "cmp"
    (out_dir / "grown-s1").mkdir(parents=True)
    (out_dir / "grown-s1" / "summary.json").write_text('{"exit_code": "zero", "final": [1, 2]}')
    (out_dir / "scratch-s1").mkdir()
    (out_dir / "scratch-s1" / "summary.json").write_bytes(b"\xff\xfe not json")
    (out_dir / "not-a-run").mkdir()
    result = esper("compare", "--from", str(out_dir), "--json")
    assert result.exit_code == 1 and "Traceback" not in out(result)
    doc = json.loads(result.stdout)
    assert [r["status"] for v in doc["variants"].values() for r in v["runs"]] == ["UNREADABLE", "UNREADABLE"]
    for bad in (["--from", str(tmp_path / "missing")], ["--from", str(out_dir), "--scratch", "host.hidden=[4]"]):
        r = esper("compare", *bad)
        assert r.exit_code == 2 and "--from" in r.stderr


def test_bad_scratch_key_is_exit_3_naming_it_before_any_run(tmp_path: Path) -> None:
    out_dir = tmp_path / "cmp"
    result = compare(out_dir, "--seeds", "1", "--scratch", "host.hiden=[12]")
    assert result.exit_code == 3 and "--scratch" in result.stderr and "host.hiden" in result.stderr
    assert not out_dir.exists()


def _run(variant: str, seed: int, curve: list[tuple[int, int, float, float]], exit_code: int = 0) -> RunResult:
    return RunResult(variant, seed, f"/runs/{variant}-s{seed}", exit_code, "COMPLETED" if not exit_code else "FAILED",
                     primary=curve[-1][3] if curve else None, curve=curve)


def test_compute_to_target_arithmetic_not_reached_and_a_failed_scratch_run() -> None:
    c = Comparison("/runs", [1, 2], variants([], ["host.hidden=[12, 12]"]), "val_accuracy", "max")
    c.runs = [
        _run("grown", 1, [(1, 30, 0.1, 0.5), (2, 60, 0.2, 0.81), (3, 90, 0.3, 0.79)]),
        _run("host", 1, [(1, 10, 0.1, 0.5), (2, 20, 0.2, 0.6)]),
        _run("scratch", 1, [(1, 40, 0.1, 0.6), (2, 80, 0.2, 0.8)]),
        _run("grown", 2, [(1, 30, 0.1, 0.9)]),
        _run("host", 2, [(1, 10, 0.1, 0.5)]),
        _run("scratch", 2, [], exit_code=1),
    ]
    doc = compute_to_target(c)
    assert doc is not None
    one = doc["per_seed"]["1"]
    assert one["target"] == 0.8 and one["reached"]["grown"]["flops"] == 60 and one["reached"]["host"] is None
    assert one["saving"] == {"grown": pytest.approx(0.25), "host": None}
    assert doc["per_seed"]["2"]["target"] is None  # no scratch final, no target: nothing is claimed
    assert doc["saving"]["grown"]["seeds"] == 1
    c.target = 0.55  # an explicit target applies to every seed
    fixed = compute_to_target(c)
    assert fixed is not None and fixed["per_seed"]["2"]["reached"]["grown"]["flops"] == 30
    assert fixed["per_seed"]["1"]["saving"]["host"] == pytest.approx(1 - 20 / 40)
