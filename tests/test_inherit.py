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
    latest,
    metrics_without_wall_clock,
    out,
    summary,
    tensors,
)
from torch import nn
from typer.testing import CliRunner

from esper.cli.main import app
from esper.core.config import ControllerConfig, SeedsConfig, from_dict
from esper.core.kasmina.blueprints import param_count
from esper.core.kasmina.inherit import InheritError, copy_layer
from esper.core.model.host import build_host
from esper.core.model.transformer import Block
from esper.core.tamiyo import ControllerState, Observation
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
