"""Growing seeds into conv hosts with the whole shell around them (issue 13, model side): a `cnn` host on digits
as images grows and fossilizes a conv seed end to end; exact resume and both rollback paths with conv seeds
(1-D and 2-D); the controller only proposes blueprints that fit a slot; bad slot/host/blueprint input exits 3 at
build naming the key and the shapes, with the bracketed text intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import (
    UNHURRIED,
    assert_same_tensors,
    events,
    latest,
    make_config,
    metrics_without_wall_clock,
    out,
    resume,
    summary,
    tensors,
    train,
)

from esper.core.errors import ExitCode
from esper.core.kasmina.blueprints import BUILTIN
from esper.core.kasmina.kinds import SlotShape
from esper.core.records.rundir import RunDir
from esper.core.tolaria.rollback import live_tensors
from esper.core.tolaria.train_state import EpochStats
from esper.core.tolaria.trainer import Trainer

SLOTS = "seeds.slots=[{name='s1', layer='conv1'}, {name='s2', layer='conv2'}]"
IMAGES = ["data.task=digits_images", "host.factory=cnn", "host.channels=[4, 4]",
          "host.kernels=[3, 3]", "host.stride=1", SLOTS, "seeds.blueprints=['conv_block', 'conv_dwsep']",
          "seeds.blend.mode='residual'"]
SIGNAL = ["data.task=plugins_fixture:digits_signal", "host.factory=cnn", "host.channels=[4, 4]",
          "host.kernels=[5, 3]", "host.stride=2", SLOTS, "seeds.blueprints=['conv_dwsep', 'conv_block']",
          "seeds.blend.mode='residual'"]
# germinate as soon as the plateau window is full, pass G2 after one epoch, fossilize whatever the gain
GROW = [*UNHURRIED, "controller.plateau_min_delta=1.0", "controller.warmup_epochs=0", "controller.plateau_window=1",
        "seeds.min_training_epochs=1", "seeds.g2_min_improvement=0.0", "seeds.blend.steps=10",
        "controller.fossilize_min_improvement=-10.0"]
HOSTS = {"cnn2d": IMAGES, "cnn1d": SIGNAL}


def path(seed: dict[str, Any]) -> list[str]:
    return [h["dest"] for h in seed["history"]]


@pytest.mark.slow
def test_a_cnn_host_on_digit_images_grows_and_fossilizes_conv_seeds_end_to_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *IMAGES, *GROW, "trainer.epochs=7")
    assert r.exit_code == 0, out(r)
    s = summary(run)
    assert s["status"] == "COMPLETED"
    s1, s2 = s["seeds"]
    assert (s1["stage"], s1["blueprint"]) == ("FOSSILIZED", "conv_block")
    assert path(s1) == ["GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED"]
    assert s2["blueprint"] == "conv_dwsep" and s2["stage"] in ("SHADOWING", "PROBATIONARY", "FOSSILIZED")
    gates = [(e["attributes"]["gate"], e["attributes"]["passed"]) for e in events(run, "gate.result")
             if e["attributes"]["slot"] == "s1"]
    assert gates == [("G0", True), ("G1", True), ("G2", True), ("G3", True), ("G4", True)]
    g0 = next(e for e in events(run, "gate.result") if e["attributes"]["gate"] == "G0")
    assert g0["attributes"]["attributes"]["slot_shape"] == "channels2d [N, 4, 8, 8]"
    # the observation told the controller each slot's layout; the grown model holds the fossilized seed
    host_params = 40 + 148 + (4 * 64 * 10 + 10)
    seed_params = BUILTIN["conv_block"].bounds(SlotShape("channels2d", (4, 8, 8)))[0]
    assert s["final"]["params"] >= host_params + seed_params
    model = tensors(latest(run), "model")
    assert model["seed.s1.delta.0.weight"].shape == (16, 4, 3, 3)


@pytest.mark.slow
@pytest.mark.parametrize("host", list(HOSTS))
def test_three_epochs_plus_resume_to_six_is_bit_identical_with_conv_seeds_alive(host: str, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    job = [*HOSTS[host], *GROW, 'trainer.lr_policy="constant"']
    r = train(straight, *job, "trainer.epochs=6")
    assert r.exit_code == 0, out(r)
    r = train(split, *job, "trainer.epochs=3")
    assert r.exit_code == 0, out(r)
    assert {x["stage"] for x in summary(split)["seeds"]} & {"TRAINING", "BLENDING"}  # the resume crosses live seeds
    r = resume(split, *job, "trainer.epochs=6", allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)
    for stem in ("model", "optimizer", "rng"):
        assert_same_tensors(tensors(latest(straight), stem), tensors(latest(split), stem))
    assert metrics_without_wall_clock(straight) == metrics_without_wall_clock(split)
    assert [(x["slot"], x["stage"], x["blueprint"], path(x)) for x in summary(straight)["seeds"]] == [
        (x["slot"], x["stage"], x["blueprint"], path(x)) for x in summary(split)["seeds"]]
    assert any(k.startswith("seed.s1.") for k in tensors(latest(split), "model"))


def clone(t: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in t.items()}


@pytest.mark.slow
@pytest.mark.parametrize("host", list(HOSTS))
def test_fast_rollback_restores_conv_seeds_in_place_and_across_a_germination(host: str, tmp_path: Path) -> None:
    cfg = make_config(*HOSTS[host], *UNHURRIED, "rollback.fast_sla_ms=600000.0")
    tr = Trainer(cfg, RunDir.create(cfg, tmp_path / "run"), controller_factory=None)
    try:
        p = tr.build()
        tr.machine.fire("ready", reason="test")
        blueprint = cfg.seeds.blueprints[0]
        p.kasmina.germinate("s1", blueprint, "test: a conv seed before the snapshot")
        p.optimizer.rebuild("test")
        tr.train_step(*p.probe, EpochStats())  # weights and optimizer state of host and seed move
        p.rollback.take()
        good = clone(live_tensors(p.components))
        assert any(k.startswith("model/seed.s1.") and v.dim() >= 3 for k, v in good.items())
        tr.train_step(*p.probe, EpochStats())
        assert any(not (good[k] == v).all() for k, v in live_tensors(p.components).items() if k in good)
        result = p.rollback.rollback("test: in place")
        assert (result.tier, result.path) == ("fast", "in_place")
        assert_same_tensors(clone(live_tensors(p.components)), good)

        p.kasmina.germinate("s2", blueprint, "test: structure changes after the snapshot")
        p.optimizer.rebuild("test")
        tr.train_step(*p.probe, EpochStats())
        result = p.rollback.rollback("test: structural")
        assert (result.tier, result.path) == ("fast", "structural")
        assert (p.kasmina.slots["s2"].module, p.kasmina.slots["s2"].stage) == (None, "DORMANT")
        assert p.kasmina.slots["s1"].stage == "GERMINATED"
        assert_same_tensors(clone(live_tensors(p.components)), good)
    finally:
        tr.close()


# --- the controller proposes only what fits -------------------------------------------------------------


@pytest.mark.slow
def test_the_controller_gives_each_slot_a_blueprint_of_its_kind(tmp_path: Path) -> None:
    """conv1 is channels2d, head.0 (the head's Flatten) is features: the same blueprint list serves both, and each
    slot only ever gets a blueprint that takes its kind."""
    run = tmp_path / "run"
    r = train(run, *IMAGES, *GROW, "trainer.epochs=4", "host.channels=[4, 2]",
              "seeds.slots=[{name='s1', layer='conv1'}, {name='s2', layer='head.0'}]",
              "seeds.blueprints=['lowrank', 'conv_block']", "controller.risk.max_loss_volatility=100.0")
    assert r.exit_code == 0, out(r)
    germinated = {e["attributes"]["command"]["slot"]: e["attributes"]["command"]["blueprint"]
                  for e in events(run, "command.accepted") if e["attributes"]["command"]["kind"] == "germinate"}
    assert germinated == {"s1": "conv_block", "s2": "lowrank"}
    assert events(run, "command.rejected") == []
    assert [(x["slot"], x["blueprint"]) for x in summary(run)["seeds"]] == [("s1", "conv_block"), ("s2", "lowrank")]


@pytest.mark.slow
def test_an_incompatible_request_from_a_policy_is_rejected_with_its_reason(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *GROW, "trainer.epochs=2", "controller.policy=plugins_fixture:propose_conv_block",
              "seeds.blueprints=['conv_block', 'lowrank']", "seeds.slots=[{name='s1', layer='hidden1'}]")
    assert r.exit_code == 0, out(r)
    rejected = events(run, "command.rejected")
    assert rejected and all(e["attributes"]["stage"] == "validator" for e in rejected)
    reason = rejected[0]["attributes"]["reason"]
    assert reason == ("blueprint 'conv_block' does not accept slot 's1' (features [N, 6]); compatible there: "
                      "lowrank")
    assert summary(run)["seeds"][0]["stage"] == "DORMANT"


# --- bad input: exit 3 at build, naming the key and the shapes ------------------------------------------


@pytest.mark.parametrize(("items", "needles"), [
    ([*IMAGES, "seeds.blueprints=['residual_mlp']"],
     ["seeds.slots[0] ('s1' at layer 'conv1', channels2d [N, 4, 8, 8])", "['residual_mlp']",
      "takes features, tokens slots"]),
    (["host.factory=plugins_fixture:pair_host", "data.task=plugins_fixture:make_data",
      "seeds.slots=[{name='s1', layer='pair'}]"],
     ["seeds.slots: layer 'pair' outputs a tuple, not a tensor", "[N, ...]"]),
    ([*IMAGES, "host.kernels=[9, 3]", "host.padding=0"],
     ["host.kernels/host.stride/host.padding: block conv1", "[N, 1, 8, 8]", "[N, 4, 0, 0]"]),
    ([*IMAGES, "seeds.slots=[{name='s1', layer='conv1', kind='channels1d'}]"],
     ["seeds.slots[0].kind = 'channels1d' contradicts layer 'conv1', which outputs [N, 4, 8, 8]"]),
    ([*SIGNAL, "seeds.user_blueprints={shrink='plugins_fixture:shrinking_blueprint'}"],
     ["seeds.user_blueprints.shrink", "(channels1d [N, 4, 31])", "maps [2, 4, 31] to [2, 4, 30]"]),
    (["host.factory=plugins_fixture:make_host", "data.task=digits_images"],
     ["host.factory = 'plugins_fixture:make_host': the factory fails for inputs [N, 1, 8, 8] with 10 outputs"]),
    (["host.factory=plugins_fixture:pair_host", "data.task=digits_images", "seeds.enabled=false"],
     ["host.factory: the host (PairHost) refuses the task's inputs [2, 1, 8, 8] (RuntimeError"]),
])
def test_bad_model_input_exits_3_at_build_naming_the_key_and_the_shapes(items: list[str], needles: list[str],
                                                                        tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *UNHURRIED, *items)
    assert r.exit_code == ExitCode.CONFIG, out(r)
    text = out(r)
    for needle in needles:  # printed as text, not Rich markup: the bracketed shapes survive
        assert needle in text, text
    assert not run.exists()  # refused at build, before the run has a directory


def test_a_failure_message_is_printed_as_text_never_as_rich_markup() -> None:
    import io

    from rich.console import Console

    from esper.cli.train import render_summary

    buf = io.StringIO()
    failure = {"type": "ConfigError", "message": "layer 'x' must output a [batch, features] tensor, not [bold]"}
    render_summary(Console(file=buf, width=200), {"status": "FAILED", "run_id": "r", "epochs_completed": 0,
                                                  "final": {"val_loss": None, "val_accuracy": None, "params": None},
                                                  "seeds": [], "failure": failure, "run_dir": "runs/r"})
    assert "failure: ConfigError: layer 'x' must output a [batch, features] tensor, not [bold]" in buf.getvalue()
