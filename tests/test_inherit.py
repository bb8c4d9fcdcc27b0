"""Seeds that start from the host's trained layer (issue 24): layer_copy (output projections zeroed: the identity
at birth) and layer_stack (an exact copy), straight to BLENDING with seeds.skip_training, grown at a fixed epoch
(controller.grow_when = "epoch"); what cannot be copied is refused with the reason."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    UNHURRIED,
    assert_same_tensors,
    events,
    latest,
    metrics_without_wall_clock,
    out,
    resume,
    summary,
    tensors,
    train,
)
from torch import nn
from typer.testing import CliRunner

from esper.cli.main import app
from esper.core.config import ControllerConfig, SeedsConfig, from_dict
from esper.core.errors import ConfigError
from esper.core.kasmina.blueprints import param_count
from esper.core.kasmina.inherit import InheritError, copy_layer
from esper.core.model.host import build_host
from esper.core.model.transformer import Block
from esper.core.tamiyo import ControllerState, Observation
from esper.core.tamiyo.errors import ObservationError
from esper.core.tamiyo.policy import HeuristicPolicy

GROW = REPO / "fixtures" / "configs" / "chars-grow.toml"
GROW4 = REPO / "fixtures" / "configs" / "chars-grow-4.toml"
# the fixture's job, small: a 16-wide host on 32-character windows; the copy grows after epoch 1
SHORT = ["data.block_size=32", "data.batch_size=128", "host.d_model=16", "host.n_heads=2", "trainer.epochs=5",
         "trainer.warmup_steps=10", "controller.grow_at_epoch=1", "seeds.blend.steps=10", *UNHURRIED]


def _block() -> Block:
    torch.manual_seed(0)
    block = Block(16, 2, 4)
    for p in block.parameters():
        nn.init.normal_(p, 0.0, 0.2)  # a trained-looking block: nothing zero
    return block


def test_a_zeroed_copy_is_the_identity_and_an_exact_copy_is_the_layer_without_sharing_anything() -> None:
    block, x = _block(), torch.randn(2, 5, 16)
    calls: list[int] = []
    block.register_forward_hook(lambda *_: calls.append(1))
    zeroed, exact = copy_layer(block, "zeroed", x), copy_layer(block, "exact", x)
    assert torch.equal(zeroed(x), x)
    assert torch.equal(exact(x), block(x))
    calls.clear()
    exact(x)
    zeroed(x)
    assert calls == []  # the host's hooks (the slot's) stay on the host's layer
    with torch.no_grad():
        for p in exact.parameters():
            p.add_(1.0)
    assert not any(torch.equal(a, b) for a, b in zip(exact.parameters(), block.parameters(), strict=True))
    assert all(p.requires_grad for p in zeroed.parameters())


@pytest.mark.parametrize("layer, how, reason", [
    (nn.Linear(16, 16), "zeroed", "no output projection"),
    (nn.Conv1d(16, 8, 3), "exact", "only a layer whose output has its input's shape"),
    (nn.ModuleDict({"proj": nn.Linear(16, 16)}), "zeroed", "cannot take its own output"),
])
def test_what_cannot_be_copied_is_refused_with_the_reason(layer: nn.Module, how: str, reason: str) -> None:
    with pytest.raises(InheritError, match=reason):
        copy_layer(layer, how, torch.randn(2, 16, 16))


def test_an_exact_copy_of_any_shape_keeping_layer_computes_what_the_layer_does() -> None:
    layer, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU()), torch.randn(2, 16, 16)
    assert torch.equal(copy_layer(layer, "exact", x)(x), layer(x))


class _NotResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # zeroed, it maps everything to 0: not the identity


def test_a_zeroed_copy_that_is_not_the_identity_is_refused() -> None:
    with pytest.raises(InheritError, match="not the identity"):
        copy_layer(_NotResidual(), "zeroed", torch.randn(2, 16))


def test_the_schedule_grows_every_free_slot_once_the_epoch_is_reached() -> None:
    from test_tamiyo import RUN, obs, slot

    seeds = SeedsConfig(max_active=2, blueprints=["residual_mlp"],
                        slots=[{"name": n, "layer": f"hidden{i}"} for i, n in enumerate(("s1", "s2", "s3"), 1)])
    policy = HeuristicPolicy(ControllerConfig(grow_when="epoch", grow_at_epoch=3), seeds)
    observation = Observation.model_validate(obs(2, 1.0, slots=[slot("s1"), slot("s2"), slot("s3")]))
    assert policy.decide(observation, ControllerState(run_id=RUN, observed_epochs=2)) == []
    due = policy.decide(observation, ControllerState(run_id=RUN, observed_epochs=3))
    assert [(p.kind, p.slot, p.reason_code) for p in due] == [("germinate", "s1", "schedule"),
                                                              ("germinate", "s2", "schedule")]
    assert "controller.grow_at_epoch 3" in due[0].reason


def test_a_table_of_growth_epochs_grows_each_slot_at_its_own_epoch() -> None:
    from test_tamiyo import RUN, obs, slot

    seeds = SeedsConfig(max_active=3, blueprints=["residual_mlp"],
                        slots=[{"name": n, "layer": f"hidden{i}"} for i, n in enumerate(("s1", "s2", "s3"), 1)])
    policy = HeuristicPolicy(ControllerConfig(grow_when="epoch", grow_at_epoch={"s1": 2, "s2": 4, "s3": 4}), seeds)
    dormant = Observation.model_validate(obs(2, 1.0, slots=[slot("s1"), slot("s2"), slot("s3")]))
    assert policy.decide(dormant, ControllerState(run_id=RUN, observed_epochs=1)) == []
    (first,) = policy.decide(dormant, ControllerState(run_id=RUN, observed_epochs=2))
    assert (first.slot, first.reason_code) == ("s1", "schedule")
    assert "controller.grow_at_epoch 2 for slot s1" in first.reason
    blending = slot("s1", stage="BLENDING", blueprint="residual_mlp")
    one_alive = Observation.model_validate(obs(3, 1.0, slots=[blending, slot("s2"), slot("s3")]))
    assert policy.decide(one_alive, ControllerState(run_id=RUN, observed_epochs=3)) == []
    later = policy.decide(one_alive, ControllerState(run_id=RUN, observed_epochs=4))
    assert [(p.slot, p.reason_code) for p in later] == [("s2", "schedule"), ("s3", "schedule")]
    assert "controller.grow_at_epoch 4 for slot s3" in later[1].reason


@pytest.mark.parametrize(("at", "epochs", "expected"), [
    (3, 20, 3), ("10%", 20, 2), ("12.5%", 20, 3), ("1%", 20, 1), ("99%", 5, 5),
    ({"s1": "15%", "s2": 7}, 20, {"s1": 3, "s2": 7}),
])
def test_a_percentage_of_the_run_resolves_to_an_epoch(at: object, epochs: int, expected: object) -> None:
    assert ControllerConfig(grow_when="epoch", grow_at_epoch=at).grow_epochs(epochs) == expected


def test_an_unresolved_percentage_is_never_read_as_an_epoch() -> None:
    from test_tamiyo import RUN, obs, slot

    seeds = SeedsConfig(blueprints=["residual_mlp"], slots=[{"name": "s1", "layer": "hidden1"}])
    policy = HeuristicPolicy(ControllerConfig(grow_when="epoch", grow_at_epoch="10%"), seeds)
    with pytest.raises(ObservationError, match="relative"):
        policy.decide(Observation.model_validate(obs(2, 1.0, slots=[slot("s1")])),
                      ControllerState(run_id=RUN, observed_epochs=2))


@pytest.mark.parametrize(("value", "message"), [
    ("0", "must be >= 1"), ("true", "valid integer"), ('"0%"', "in \\(0%, 100%\\)"), ('"100%"', "100%"),
    ('"ten"', "percentage"), ("{}", "at least one slot"), ("{s1 = 0}", ">= 1"),
    ('{s1 = "x%", s2 = 1, s3 = 1}', "slot 's1' = 'x%': a relative value is a percentage of trainer.epochs"),
    ("{s1 = 2, s2 = 2, s3 = 2, s9 = 3}", "names no such slot: s9 \\("), ("{s1 = 2}", "leaves out s2, s3 \\("),
])
def test_a_bad_growth_epoch_is_a_config_error_naming_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(tomllib.loads(GROW4.read_text()), [f"controller.grow_at_epoch={value}"])
    assert "grow_at_epoch" in str(err.value)


def _train(run: Path, *items: str, resume: bool = False, config: Path = GROW) -> object:
    flags = [a for item in [*SHORT, *items] for a in ("--set", item)]
    where = ["--resume", str(run), "--allow-config-change", "trainer.epochs"] if resume else ["--run-dir", str(run)]
    return CliRunner().invoke(app, ["--config", str(config), "train", "--quiet", *where, *flags])


def test_the_grow_fixture_copies_the_block_straight_into_blending_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = from_dict(tomllib.loads(GROW.read_text()), SHORT)
    assert cfg.seeds.blueprints == ["layer_copy"] and cfg.seeds.skip_training
    constant = 'trainer.lr_policy="constant"'  # a schedule that does not depend on trainer.epochs: 3 + 2 = 5
    r = _train(tmp_path / "straight", constant)
    assert r.exit_code == 0, out(r)  # type: ignore[arg-type]
    s = summary(tmp_path / "straight")
    (seed,) = s["seeds"]
    assert (seed["blueprint"], seed["stage"]) == ("layer_copy", "FOSSILIZED")
    moves = [(t["source"], t["dest"]) for t in seed["history"]]
    assert moves[:3] == [("DORMANT", "GERMINATED"), ("GERMINATED", "TRAINING"), ("TRAINING", "BLENDING")]
    g2 = seed["history"][2]["gate"]
    assert g2["gate"] == "G2" and g2["passed"] and g2["reason"].startswith("skipped")
    rows = metrics_without_wall_clock(tmp_path / "straight")
    assert rows[0]["seeds_by_stage"] == {"BLENDING": 1}  # grown after epoch 1, blending at once
    two_blocks = build_host(from_dict(tomllib.loads(GROW.read_text()), [*SHORT, "host.n_layers=2"]), (32,), 103)
    assert rows[0]["params"] == param_count(two_blocks)  # the copy is one more block
    assert s["compute"]["by_phase"]["seeds"] == 0  # no isolated training: no seed passes
    # a resume rebuilds the copied seed from the layer and loads its own trained tensors
    first = _train(tmp_path / "split", constant, "trainer.epochs=3")
    assert first.exit_code == 0, out(first)  # type: ignore[arg-type]
    second = _train(tmp_path / "split", constant, resume=True)
    assert second.exit_code == 0, out(second)  # type: ignore[arg-type]
    assert metrics_without_wall_clock(tmp_path / "split") == rows
    for stem in ("model", "optimizer"):
        assert_same_tensors(tensors(latest(tmp_path / "straight"), stem), tensors(latest(tmp_path / "split"), stem))


def test_the_four_block_fixture_stacks_three_copies_on_one_layer(tmp_path: Path) -> None:
    cfg = from_dict(tomllib.loads(GROW4.read_text()), [])
    assert [(s.name, s.layer) for s in cfg.seeds.slots] == [("s1", "block1"), ("s2", "block1"), ("s3", "block1")]
    r = _train(tmp_path / "r", config=GROW4)
    assert r.exit_code == 0, out(r)  # type: ignore[arg-type]
    s = summary(tmp_path / "r")
    assert [(x["slot"], x["stage"]) for x in s["seeds"]] == [(f"s{i}", "FOSSILIZED") for i in (1, 2, 3)]
    four = build_host(from_dict(tomllib.loads(GROW4.read_text()), [*SHORT, "host.n_layers=4"]), (32,), 103)
    assert s["final"]["params"] == param_count(four)
    rows = metrics_without_wall_clock(tmp_path / "r")
    assert rows[0]["seeds_by_stage"] == {"BLENDING": 3}  # all three at once, on the schedule


def test_the_staged_fixture_grows_one_block_then_two_more_at_their_epochs(tmp_path: Path) -> None:
    staged = REPO / "fixtures" / "configs" / "chars-grow-4-staged.toml"
    cfg = from_dict(tomllib.loads(staged.read_text()), [])
    assert cfg.controller.grow_at_epoch == {"s1": "15%", "s2": "30%", "s3": "30%"}
    assert cfg.controller.grow_epochs(cfg.trainer.epochs) == {"s1": 3, "s2": 6, "s3": 6}
    schedule = "controller.grow_at_epoch={s1 = 1, s2 = 3, s3 = 3}"
    constant = 'trainer.lr_policy="constant"'  # a schedule that does not depend on trainer.epochs: 2 + 3 = 5
    r = _train(tmp_path / "r", schedule, constant, config=staged)
    assert r.exit_code == 0, out(r)  # type: ignore[arg-type]
    rows = metrics_without_wall_clock(tmp_path / "r")
    assert rows[0]["seeds_by_stage"] == {"BLENDING": 1, "DORMANT": 2}  # one copy after epoch 1
    assert rows[2]["seeds_by_stage"]["BLENDING"] == 2  # the other two after epoch 3
    s = summary(tmp_path / "r")
    # five epochs: the first copy is part of the network, the later two are still on probation
    assert [(x["slot"], x["stage"]) for x in s["seeds"]] == [("s1", "FOSSILIZED"), ("s2", "PROBATIONARY"),
                                                             ("s3", "PROBATIONARY")]
    born = {e["attributes"]["slot"]: e for e in events(tmp_path / "r", "seed.transition")
            if e["attributes"]["transition"]["dest"] == "GERMINATED"}
    assert {n: e["epoch"] for n, e in born.items()} == {"s1": 1, "s2": 3, "s3": 3}
    assert "grow_at_epoch 3 for slot s2" in born["s2"]["attributes"]["transition"]["reason"]
    # a resume between the two stages grows the later copies at their epoch, once, as the straight run did
    assert _train(tmp_path / "split", schedule, constant, "trainer.epochs=2", config=staged).exit_code == 0
    again = _train(tmp_path / "split", schedule, constant, resume=True, config=staged)
    assert again.exit_code == 0, out(again)  # type: ignore[arg-type]
    assert metrics_without_wall_clock(tmp_path / "split") == rows


def test_a_resnet_block_without_output_projections_is_copied_with_its_last_norm_zeroed() -> None:
    from plugins_fixture import BasicBlock

    torch.manual_seed(0)
    block = BasicBlock(8, 8, 1)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)  # trained-looking: the norm's scale and shift are not zero
    x = block(torch.randn(4, 8, 6, 6))  # the slot's activation: the block's own (post-ReLU) output
    seed = copy_layer(block, "zeroed", x)
    assert torch.equal(seed(x), x)
    assert not seed.bn2.weight.any() and not seed.bn2.bias.any()
    assert torch.equal(seed.bn1.weight, block.bn1.weight) and torch.equal(seed.conv2.weight, block.conv2.weight)
    assert block.bn2.weight.abs().min() > 0  # the host's layer is untouched


def test_a_block_whose_zeroed_last_norm_is_not_the_identity_is_refused() -> None:
    plain = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU())  # no residual path
    with pytest.raises(InheritError, match="not the identity"):
        copy_layer(plain, "zeroed", torch.rand(2, 4, 7))
    with pytest.raises(InheritError, match="no normalization"):
        copy_layer(nn.Conv1d(4, 4, 3, padding=1), "zeroed", torch.rand(2, 4, 7))


@pytest.mark.slow
def test_a_resnet_grows_a_copy_of_its_trained_block_and_resumes_exactly(tmp_path: Path) -> None:
    """The conv analogue of the transformer's layer_copy: a copy of layer1.0 (BatchNorm inside) after it."""
    job = ["data.task=digits_images", "data.batch_size=256", "host.factory=plugins_fixture:make_resnet",
           "host.output='logits'", "host.d_model=8", "seeds.blueprints=['layer_copy']", "seeds.skip_training=true",
           "seeds.blend.mode='residual'", "seeds.blend.steps=4", "seeds.param_budget=5000",
           "seeds.slots=[{name='s1', layer='layer1.0'}]", "controller.grow_when='epoch'", "controller.grow_at_epoch=1",
           "controller.isolation=inline", "controller.fossilize_min_improvement=-10.0", *UNHURRIED]
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = train(straight, *job, "trainer.epochs=5")
    assert r.exit_code == 0, out(r)
    (seed,) = summary(straight)["seeds"]
    assert (seed["blueprint"], seed["stage"]) == ("layer_copy", "FOSSILIZED")
    assert seed["history"][2]["gate"]["reason"].startswith("skipped")  # straight to BLENDING
    rows = metrics_without_wall_clock(straight)
    assert rows[0]["seeds_by_stage"] == {"BLENDING": 1}  # grown after epoch 1, blending at once
    host_only = train(tmp_path / "host", *job, "trainer.epochs=1", "seeds.enabled=false")
    assert host_only.exit_code == 0, out(host_only)
    copied = rows[0]["params"] - metrics_without_wall_clock(tmp_path / "host")[0]["params"]
    assert copied == 2 * 8 * 8 * 9 + 4 * 8  # two 3x3 convs (no bias) and two BatchNorms of 8 channels
    assert train(split, *job, "trainer.epochs=3").exit_code == 0
    r = resume(split, *job, "trainer.epochs=5", allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)
    assert metrics_without_wall_clock(split) == rows
    for stem in ("model", "optimizer", "rng"):
        assert_same_tensors(tensors(latest(straight), stem), tensors(latest(split), stem))
