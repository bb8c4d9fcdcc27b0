"""`esper bench`: the document's shape and units, the statistics, and the failure paths. Speed is never asserted."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from conftest import BASE_TOML, SHIPPED
from rich.console import Console
from typer.testing import CliRunner

from esper.app.bench.baseline import PlainNet
from esper.app.bench.memory import run_child
from esper.app.bench.state import linear_stack, stack_components
from esper.app.bench.stats import (
    SCHEMA,
    Absolute,
    BenchError,
    BenchPlan,
    Comparison,
    Speedup,
    alternate,
    summarize,
)
from esper.cli.bench import bench, results_table
from esper.core.config import BenchConfig
from esper.core.errors import ExitCode
from esper.core.model.host import MLPHost
from esper.core.tolaria import live_tensors

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# not registered in esper.cli.main here: a one-command app runs the same function the `esper bench` entry will
app = typer.Typer(pretty_exceptions_enable=False)
app.command()(bench)

UNITS = {"ms", "ms/step", "us", "us/step", "MiB", "s", "%", "steps/s"}


def _invoke(tmp_path: Path, *extra: str) -> Any:
    return runner.invoke(app, ["--config", str(BASE_TOML), "--set", f'run.output_dir="{tmp_path}"',
                               *extra])


def _check_stats(block: dict[str, Any], n: int) -> None:
    assert block["n"] == n == len(block["samples"])
    assert block["min"] <= block["median"] <= block["max"]
    assert block["median"] == pytest.approx(statistics.median(block["samples"]))
    assert all(v > 0 for v in block["samples"])


# --- the smoke run: esper bench --quick --json ---------------------------------------------------------


@pytest.mark.slow
def test_quick_json_document_has_every_figure_with_its_unit(tmp_path: Path) -> None:
    allowed = os.sched_getaffinity(0)
    result = _invoke(tmp_path, "--set", "bench.warmup=0", "--set", "bench.repeats=2", "--quick", "--json")
    assert result.exit_code == 0, result.output
    assert os.sched_getaffinity(0) == allowed  # the one-core rows put the process's cores back
    doc = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert doc["schema"] == SCHEMA and doc["quick"] is True
    m = doc["machine"]
    assert m["torch"] == torch.__version__ and m["torch_threads"] == torch.get_num_threads()
    assert m["cores_available"] >= 1 and m["python"].count(".") == 2 and m["platform"]
    assert doc["plan"]["repeats"] == 2 and doc["plan"]["warmup"] == 0
    assert doc["plan"]["rollback_sizes"] == [0, 1_000_000]

    by_id = {r["id"]: r for r in doc["results"]}
    expected = {"P-1", "P-1L", "P-1/cnn", "P-1c", "P-1+c", "P-2/default", "P-2/default/SLA", "P-2/1M", "P-2/1M/SLA",
                "P-3/default", "P-3b/default", "P-3/default/SLA", "P-4/default", "P-4b/default",
                "P-3/1M", "P-4/1M", "P-3/1M/1core", "P-4/1M/1core",
                "P-5/fire", "P-5/may", "P-5/validate", "P-6", "P-6/mediated", "MEM",
                "P-8/--version", "P-8/runs", "P-8/lifecycle", "P-9", "P-7/default", "P-7/cnn"}
    assert expected <= set(by_id), sorted(expected - set(by_id))
    for rid in ("P-8/--version", "P-8/runs", "P-8/lifecycle"):  # real interpreters, started as a shell would
        row = by_id[rid]
        assert row["unit"] == "s" and row["extra"]["goal_s"] == 1.0
        assert row["extra"]["worst_s"] == max(row["esper"]["samples"]) > 0
    goals = {"P-1": 1.15, "P-1+c": 1.15, "P-2/default": 1.5, "P-2/1M": 1.5, "P-3/default": 1.2, "P-4/default": 1.0}
    for rid, goal in goals.items():
        assert by_id[rid]["goal"] == {"max_ratio": goal}
    assert by_id["P-2/1M/SLA"]["goal"] == {"max": 500.0, "unit": "ms", "applies_to": "max"}
    assert by_id["P-2/1M"]["size"]["params"] == pytest.approx(1_000_000, rel=0.1)
    assert by_id["P-2/1M"]["size"]["bytes"] >= 2 * 4 * by_id["P-2/1M"]["size"]["params"]  # weights + momentum
    assert by_id["P-1"]["size"]["seed_stages"] == {"s1": "BLENDING", "s2": "TRAINING"}
    # the base config's host is the mlp: the realistic-host row says why it is not there
    assert by_id["P-1/cnn"]["kind"] == "skipped" and "host.factory is 'mlp'" in by_id["P-1/cnn"]["reason"]
    assert by_id["P-7/cnn"]["kind"] == "skipped" and "host.factory is 'mlp'" in by_id["P-7/cnn"]["reason"]
    assert by_id["P-7/default"]["goal"] is None and by_id["P-7/default"]["size"]["pairs"] == 1
    assert by_id["P-1L"]["kind"] == "ratio" and by_id["P-1L"]["goal"] is None  # dev installs lightning

    for r in doc["results"]:
        if r["kind"] == "skipped":
            assert r["met"] is None and r["goal"] is None and r["reason"]
            continue
        assert r["unit"] in UNITS, r
        if r["kind"] == "ratio":
            n = len(r["baseline"]["samples"])
            _check_stats(r["baseline"], n)
            _check_stats(r["esper"], n)
            pairs = [e / b for b, e in zip(r["baseline"]["samples"], r["esper"]["samples"], strict=True)]
            assert r["ratio"]["per_pair"] == pytest.approx(pairs)
            assert r["ratio"]["median"] == pytest.approx(statistics.median(pairs))
            assert r["ratio"]["unit"] == "esper/baseline"
            if r["goal"] is not None:
                assert r["met"] is (r["ratio"]["median"] <= r["goal"]["max_ratio"])
        elif r["kind"] == "speedup":  # real runs at 1 and 2 processes: their paces, and the ratio of the medians
            one, two = r["baseline"], r["esper"]
            _check_stats(one, one["n"])
            _check_stats(two, two["n"])
            assert r["ratio"]["median"] == pytest.approx(two["median"] / one["median"])
            if r["goal"] is not None:
                assert r["met"] is (r["ratio"]["median"] >= r["goal"]["min_ratio"])
        else:
            assert r["kind"] == "absolute"
            v = r["value"]
            assert v["min"] <= v["p50"] <= v["p99"] <= v["max"]
            if r["goal"] is not None:
                assert r["met"] is (v["max"] <= r["goal"]["max"])
        if r["goal"] is None:
            assert r["met"] is None
    assert by_id["P-5/fire"]["value"]["n"] == 2
    assert by_id["P-6"]["extra"]["accepted_commands"] > 0
    # a real run of the job, each of its epochs checkpointed: the loop's share spent checkpointing
    p9 = by_id["P-9"]
    assert p9["unit"] == "%" and p9["size"] == {"epochs": 2, "checkpoints": 2}
    assert 0 < p9["value"]["max"] < 100 and p9["goal"]["max"] == 3.5
    assert by_id["MEM"]["esper"]["median"] > 50  # MiB: a torch process, not the launcher
    s = doc["summary"]
    graded = [r for r in doc["results"] if r["met"] is not None]
    assert s["goals"] == len(graded) and s["met"] == sum(r["met"] for r in graded)
    assert sorted(s["missed"]) == sorted(r["id"] for r in graded if not r["met"])
    assert set(doc["sections_s"]) and doc["wall_s"] > 0
    assert not list(tmp_path.glob(".bench-*"))  # scratch removed


def test_unsupported_config_is_a_config_error_and_leaves_no_scratch(tmp_path: Path) -> None:
    result = _invoke(tmp_path, "--set", "seeds.enabled=false", "--quick", "--json")
    assert result.exit_code == int(ExitCode.CONFIG), result.output
    # --json: the failure is one JSON error document on stdout, the message on stderr too
    assert json.loads(result.stdout) == {"error": "P-1 needs seeds.enabled = true and at least two seeds.slots",
                                         "exit_code": 3, "key": "seeds.enabled"}
    assert "seeds.enabled" in result.stderr
    assert not list(tmp_path.glob(".bench-*"))


def test_table_shows_every_result_with_goal_and_verdict() -> None:
    doc = {
        "quick": True,
        "machine": {"cores_available": 2, "torch": "x", "torch_threads": 2, "python": "3.11.7"},
        "results": [
            Comparison("P-1", "step", "ms/step", "plain", "esper", [1.0, 2.0], [1.5, 2.2], 1.05).to_dict(),
            Absolute("P-2/1M/SLA", "sla", "ms", [3.0, 600.0], goal_max=500.0).to_dict(),
            Absolute("P-5/fire", "fire", "us", [40.0, 42.0]).to_dict(),
            Speedup("P-7/cnn", "scale-out", [20.0, 24.0], [30.0, 36.0], goal_min=1.8).to_dict(),
        ],
    }
    console = Console(width=200, record=True)
    console.print(results_table(doc))
    text = console.export_text()
    assert "P-1 step" in text and "1.30x" in text and "<= 1.05x" in text
    assert "P-2/1M/SLA" in text and "<= 500 ms" in text
    lines = {ln.split()[1]: ln for ln in text.splitlines() if ln.startswith("│ P-")}
    assert lines["P-1"].rstrip(" │").endswith("no")
    assert lines["P-2/1M/SLA"].rstrip(" │").endswith("no")
    assert lines["P-5/fire"].rstrip(" │").endswith("-")
    assert "1.50x" in lines["P-7/cnn"] and ">= 1.8x" in lines["P-7/cnn"]  # median 33 over median 22
    assert lines["P-7/cnn"].rstrip(" │").endswith("no")


# --- statistics and pairing ----------------------------------------------------------------------------


def test_summarize_percentiles_and_empty() -> None:
    s = summarize([float(v) for v in range(1, 101)])
    assert s["median"] == 50.5 and s["min"] == 1 and s["max"] == 100 and s["n"] == 100
    assert s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    with pytest.raises(BenchError):
        summarize([])


def test_alternate_runs_abab_after_untimed_warmup() -> None:
    log: list[str] = []
    values = iter(range(1, 100))

    def a() -> float:
        log.append("A")
        return float(next(values))

    def b() -> float:
        log.append("B")
        return float(next(values))

    base, mine = alternate(a, b, warmup=2, repeats=3)
    assert log == ["A", "B"] * 5
    assert base == [5.0, 7.0, 9.0] and mine == [6.0, 8.0, 10.0]  # warm-up figures are dropped


def test_alternate_rejects_a_zero_baseline() -> None:
    with pytest.raises(BenchError, match="non-positive"):
        alternate(lambda: 0.0, lambda: 1.0, warmup=0, repeats=2)


def test_comparison_ratio_is_median_of_pairs_and_goal_verdict() -> None:
    c = Comparison("X", "x", "ms", "b", "e", [1.0, 2.0, 4.0], [1.0, 3.0, 4.4], 1.05)
    assert c.ratios == pytest.approx([1.0, 1.5, 1.1])
    assert c.ratio == pytest.approx(1.1) and c.met is False
    assert Comparison("X", "x", "ms", "b", "e", [1.0], [1.0], 1.05).met is True
    assert Comparison("X", "x", "ms", "b", "e", [1.0], [9.0], None).met is None


def test_absolute_goal_judges_the_worst_sample() -> None:
    assert Absolute("A", "a", "ms", [1.0, 499.0], goal_max=500.0).met is True
    assert Absolute("A", "a", "ms", [1.0, 501.0], goal_max=500.0).met is False
    assert Absolute("A", "a", "ms", [1.0]).met is None


def test_plan_quick_is_reduced_and_full_follows_config() -> None:
    cfg = BenchConfig(warmup=4, repeats=9, rollback_sizes=[0, 5_000_000])
    quick = BenchPlan.from_config(cfg, quick=True)
    full = BenchPlan.from_config(cfg, quick=False)
    assert (quick.warmup, quick.repeats, quick.rollback_sizes) == (1, 3, (0, 1_000_000))
    assert (full.warmup, full.repeats, full.rollback_sizes) == (4, 9, (0, 5_000_000))
    assert full.memory_concurrent is False


# --- building blocks ------------------------------------------------------------------------------------


def test_linear_stack_has_the_size_and_optimizer_state() -> None:
    model, opt = linear_stack(264_000, seed=0)
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(264_000, rel=0.1)
    tensors = live_tensors(stack_components(model, opt))
    momentum = [k for k in tensors if k.startswith("optimizer/") and k.endswith("momentum_buffer")]
    assert len(momentum) == len(list(model.parameters()))
    assert sum(t.numel() for t in tensors.values()) == 2 * params
    assert all(p.grad is None for p in model.parameters())


def test_plain_net_refuses_blend_modes_it_does_not_implement() -> None:
    host = MLPHost(4, 3, [4, 4], "relu")
    with pytest.raises(BenchError, match="channel"):
        PlainNet(host, "hidden1", torch.nn.Identity(), "hidden2", torch.nn.Identity(), "channel")


def test_plain_net_seed_path_substitutes_the_training_seed() -> None:
    torch.manual_seed(0)
    host = MLPHost(4, 3, [4, 4], "relu")
    blend_seed, train_seed = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    net = PlainNet(host, "hidden1", blend_seed, "hidden2", train_seed, "convex")
    net.alpha = 0.25
    x = torch.randn(5, 4)
    logits, seed_logits = net(x)
    h1 = host.hidden1(x)
    h1 = 0.75 * h1 + 0.25 * blend_seed(h1)
    h2 = host.hidden2(h1)
    assert torch.allclose(logits, host.head(h2))
    assert torch.allclose(seed_logits, host.head(train_seed(h2)))
    # the seed path trains the seed only: no gradient reaches the host below the seed
    seed_logits.sum().backward()
    assert host.hidden1[0].weight.grad is None and train_seed.weight.grad is not None


def test_child_rss_is_the_childs_own_not_the_parents(tmp_path: Path) -> None:
    # this test process holds torch (hundreds of MiB); a child forked from it would report that as its peak
    small, _ = run_child([sys.executable, "-c", "pass"], tmp_path, 60.0)
    grown, _ = run_child([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                          tmp_path, 60.0)
    assert small < 60.0  # MiB: a bare interpreter
    assert grown - small > 150.0


def test_failing_child_is_an_error_with_its_stderr(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="exited 3.*boom"):
        run_child([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], tmp_path, 60.0)


@pytest.mark.slow
def test_quick_bench_runs_on_the_shipped_config(tmp_path: Path) -> None:
    # MNIST-1D on the cnn host: every P-1 row is measured, P-1/cnn on its own (reduced) realistic host
    result = runner.invoke(app, ["--config", str(SHIPPED), "--set", f'run.output_dir="{tmp_path}"', "--set",
                                 "bench.warmup=0", "--set", "bench.repeats=1", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    by_id = {r["id"]: r for r in json.loads(result.stdout)["results"]}
    for rid in ("P-1", "P-1L", "P-1+c", "P-1/cnn"):
        assert by_id[rid]["kind"] == "ratio", by_id[rid]
    assert by_id["P-1/cnn"]["goal"] == {"max_ratio": 1.05} and by_id["P-1"]["goal"] == {"max_ratio": 1.15}
    assert by_id["P-1/cnn"]["size"]["host_params"] > by_id["P-1"]["size"]["host_params"]
    # P-7 on the job and on P-1/cnn's (quick: reduced) host: real 1- and 2-process runs of each
    default, cnn = by_id["P-7/default"], by_id["P-7/cnn"]
    assert default["kind"] == cnn["kind"] == "speedup" and cnn["goal"] == {"min_ratio": 1.8}
    assert cnn["size"]["params"] > default["size"]["params"]
    assert not list(tmp_path.glob(".bench-*"))


@pytest.mark.slow
def test_scale_out_names_why_a_host_has_no_cnn_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["--config", str(BASE_TOML), "--set", 'data.task="synthetic"', "--set",
                                 "run.threads=1", "--scale-out", "--quick"])
    assert result.exit_code == 0, result.output
    assert "P-7/default" in result.stdout and "ratio" in result.stdout
    assert "P-7/cnn skipped: host.factory is 'mlp'" in result.stdout
