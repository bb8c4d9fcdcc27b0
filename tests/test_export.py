"""`esper export` and `esper.load_model` (issue 23, Deliver 6): the grown network leaves Esper as a plain module
whose outputs are the run's own, and an export directory is read as if an attacker wrote it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import GROWING, UNHURRIED, esper, metrics, out, summary, train

import esper as esper_pkg
from esper.app.export import MANIFEST, WEIGHTS, export_checkpoint
from esper.core.config import from_toml_text
from esper.core.data import build_task
from esper.core.data.loader import val_batches
from esper.core.errors import CheckpointError, ConfigError, UsageError
from esper.core.kasmina.grown import GrownModel

SLOTS = "seeds.slots=[{name='s1', layer='conv1'}, {name='s2', layer='conv2'}]"
# a BatchNorm CNN on digits images whose controller germinates at once and fossilizes whatever the gain
BN_GROWN = ["data.task=digits_images", "data.batch_size=256", "host.factory=cnn", "host.channels=[8, 8]",
            "host.kernels=[3, 3]", "host.stride=1", "host.norm='batch'", SLOTS, "seeds.blueprints=['conv_bottleneck']",
            "seeds.blend.mode='residual'", *UNHURRIED, "controller.plateau_min_delta=1.0",
            "controller.warmup_epochs=0", "controller.plateau_window=1", "seeds.min_training_epochs=1",
            "seeds.g2_min_improvement=0.0", "seeds.blend.steps=4", "controller.fossilize_min_improvement=-10.0",
            "controller.isolation=inline", "seeds.max_active=2"]


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    r = train(run, *BN_GROWN, "trainer.epochs=7")
    assert r.exit_code == 0, out(r)
    assert [s["stage"] for s in summary(run)["seeds"]] == ["FOSSILIZED", "FOSSILIZED"], summary(run)["seeds"]
    return run


def val_figures(model: torch.nn.Module, run: Path) -> dict[str, float]:
    """The run's validation pass (passes.validate) over the exported module: the same batches, the same sums."""
    cfg = from_toml_text((run / "config.toml").read_text())
    task = build_task(cfg)
    sums = dict.fromkeys(["loss", *task.metrics], 0.0)
    seen = 0
    with torch.no_grad():
        for x, y in val_batches(task, cfg.data):
            o = model(x)
            sums["loss"] += float(task.loss(o, y)) * len(y)
            for name, fn in task.metrics.items():
                sums[name] += float(fn(o, y)) * len(y)
            seen += len(y)
    return {f"val_{k}": v / seen for k, v in sums.items()}


@pytest.mark.slow
def test_the_exported_network_gives_the_runs_own_validation_figures_to_the_digit(grown: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    r = esper("export", str(grown), "-o", str(exp), "--json")
    assert r.exit_code == 0, out(r)
    doc = json.loads(r.stdout)
    assert [(s["slot"], s["stage"], s["alpha"]) for s in doc["seeds"]] == [("s1", "FOSSILIZED", 1.0),
                                                                           ("s2", "FOSSILIZED", 1.0)]
    model = esper_pkg.load_model(exp)
    assert isinstance(model, GrownModel) and not model.training
    assert sorted(model.seeds) == ["s1", "s2"]
    last = metrics(grown)[-1]
    assert val_figures(model, grown) == {"val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"]}
    assert sum(p.numel() for p in model.parameters()) == summary(grown)["final"]["params"]
    # a plain module: nothing of Esper's run machinery, and its state dict is the export's weights file
    assert {k.split(".")[0] for k in model.state_dict()} == {"host", "seeds"}


def test_a_seed_mid_lifecycle_is_refused_unless_asked_for_live(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *BN_GROWN, "trainer.epochs=3", "seeds.max_active=1")  # s1 is blending by then
    assert r.exit_code == 0, out(r)
    stage = summary(run)["seeds"][0]["stage"]
    assert stage in ("BLENDING", "SHADOWING", "PROBATIONARY"), stage
    r = esper("export", str(run), "-o", str(tmp_path / "x"))
    assert r.exit_code == 3 and "s1" in r.stderr and stage in r.stderr and "--live" in r.stderr
    assert not (tmp_path / "x").exists()  # nothing written
    done = export_checkpoint(run, tmp_path / "y", live=True)
    assert [(s.slot, s.stage) for s in done.manifest.seeds] == [("s1", stage)]
    assert done.manifest.dropped == {"s2": "DORMANT"}
    model = esper_pkg.load_model(tmp_path / "y")
    assert model.alphas["s1"] == summary(run)["seeds"][0]["alpha"]


def test_an_export_into_a_directory_with_files_is_refused(grown: Path, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an empty directory"):
        export_checkpoint(grown, tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == ["keep.txt"]


def test_a_run_whose_plugin_host_cannot_be_imported_is_named(grown: Path, tmp_path: Path) -> None:
    run = tmp_path / "plugin"
    r = train(run, "data.task=digits_images", "host.factory=plugins_fixture:make_cnn", "seeds.enabled=false",
              "trainer.epochs=1", *UNHURRIED)
    assert r.exit_code == 0, out(r)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.path", [p for p in __import__("sys").path if not p.endswith("tests")])
        __import__("sys").modules.pop("plugins_fixture", None)
        with pytest.raises(ConfigError, match="host.factory.*plugins_fixture"):
            export_checkpoint(run, tmp_path / "out")


@pytest.fixture
def exported(grown: Path, tmp_path: Path) -> Path:
    return export_checkpoint(grown, tmp_path / "exp").out


def test_weights_changed_after_export_are_refused(exported: Path) -> None:
    data = bytearray((exported / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (exported / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest differs"):
        esper_pkg.load_model(exported)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(format="esper.export/9"),
    lambda m: m.update(n_outputs=-1),
    lambda m: m["seeds"][0].update(kind="tokens"),  # a kind its shape cannot have
    lambda m: m["seeds"][0].update(blueprint="nosuch"),
    lambda m: m.update(config_toml="[host]\nfactory = 3\n"),
    lambda m: m.update(extra="field"),
])
def test_a_forged_manifest_is_a_checkpoint_or_config_error(exported: Path, edit: object) -> None:
    doc = json.loads((exported / MANIFEST).read_text())
    edit(doc)  # type: ignore[operator]
    (exported / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises((CheckpointError, ConfigError)):
        esper_pkg.load_model(exported)


@pytest.mark.parametrize("content", [b"", b"{", b"[" * 100_000, b"\xff\xfe", b'{"format": 1}'])
def test_a_broken_manifest_is_a_checkpoint_error(exported: Path, content: bytes) -> None:
    (exported / MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointError, match=MANIFEST):
        esper_pkg.load_model(exported)


def test_a_directory_that_is_no_export_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not an Esper export"):
        esper_pkg.load_model(tmp_path)


@pytest.mark.slow
def test_eval_gives_the_runs_own_validation_figures_without_training(tmp_path: Path) -> None:
    """Issue 27: a checkpoint evaluated on the validation set (mid-lifecycle seeds at their alpha, as the run's
    validation sees them) without training; --set goes on the checkpoint's config."""
    run = tmp_path / "run"
    assert train(run, *GROWING, "trainer.epochs=5").exit_code == 0
    stages = {s["stage"] for s in summary(run)["seeds"]}
    r = esper("eval", str(run), "--json")
    assert r.exit_code == 0, out(r)
    doc = json.loads(r.stdout)
    last = metrics(run)[-1]
    assert doc["epoch"] == 5 and doc["metrics"]["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert doc["metrics"]["val_accuracy"] == pytest.approx(last["val_accuracy"], abs=1e-9)
    assert stages & {"BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED"}, stages  # a seed is in the network
    small = json.loads(esper("eval", str(run), "--json", "--set", "data.eval_batch_size=7").stdout)
    assert small["metrics"]["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)  # other batches, same sums
    assert esper("eval", str(tmp_path / "none")).exit_code == 4
