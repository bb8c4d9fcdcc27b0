"""Growth sized to the slot (issue 23, Deliver 3): a bottleneck conv blueprint that grows with the slot, budgets
relative to the host, a controller that proposes only what fits and moves on from a refusal, and a run that
cannot grow says so at build, in its summary, its outcome line and `esper reports`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import UNHURRIED, esper, events, out, summary, train
from test_tamiyo import ctrl, obs, seeds_cfg, slot, tamiyo

from esper.core.config import SeedsConfig, from_dict
from esper.core.errors import ConfigError
from esper.core.kasmina.blueprints import BUILTIN
from esper.core.kasmina.kinds import SlotShape

WIDE = ["data.task=digits_images", "data.batch_size=256", "host.factory=cnn", "host.channels=[64, 64]",
        "host.kernels=[3, 3]", "host.stride=1", "host.norm='batch'", "seeds.blend.mode='residual'",
        "seeds.slots=[{name='s1', layer='conv1'}, {name='s2', layer='conv2'}]"]
GROW_AT_ONCE = [*UNHURRIED, "controller.plateau_min_delta=1.0", "controller.warmup_epochs=0",
                "controller.plateau_window=1", "controller.isolation=inline", "trainer.epochs=2"]


@pytest.mark.parametrize("shape", [SlotShape("channels2d", (64, 8, 8)), SlotShape("channels2d", (512, 2, 2)),
                                   SlotShape("channels1d", (6, 19)), SlotShape("channels1d", (128, 40))])
def test_the_bottleneck_is_the_identity_at_birth_and_counts_its_parameters_exactly(shape: SlotShape) -> None:
    bp = BUILTIN["conv_bottleneck"]
    module = bp.build(shape)
    x = torch.randn(3, *shape.shape)
    assert torch.equal(module(x), x)
    n = sum(p.numel() for p in module.parameters())
    assert bp.bounds(shape) == (n, n)
    # it grows like C^2/16 per tap, not 8C^2 per tap: at real CNN widths it is 40-70x smaller than conv_block
    assert n * 40 < BUILTIN["conv_block"].bounds(shape)[1] or shape.channels < 16


def test_a_relative_budget_is_a_share_of_the_host() -> None:
    cfg = from_dict({}, ['seeds.param_budget="5%"'])
    assert cfg.seeds.param_budget == "5%" and cfg.seeds.budget_for(100_000) == 5000
    assert cfg.seeds.budget_for(10) == 1  # never zero
    assert from_dict({}, ['seeds.param_budget="12.5%"']).seeds.budget_for(1000) == 125
    with pytest.raises(ValueError, match="resolve it"):
        _ = cfg.seeds.budget


@pytest.mark.parametrize("bad", ['"5"', '"-5%"', '"0%"', '"2000%"', '"five%"', "0", "true", '"5%%"'])
def test_a_bad_budget_is_a_config_error_naming_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match="seeds.param_budget"):
        from_dict({}, [f"seeds.param_budget={bad}"])


def test_a_run_with_a_relative_budget_judges_g0_by_the_resolved_count(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *WIDE, *GROW_AT_ONCE, "seeds.blueprints=['conv_bottleneck']", 'seeds.param_budget="10%"')
    assert r.exit_code == 0, out(r)
    g0 = [e["attributes"] for e in events(run, "gate.result") if e["attributes"]["gate"] == "G0"]
    host_params = 64 * 1 * 9 + 64 + 64 * 64 * 9 + 64 + 2 * 2 * 64 + 64 * 8 * 8 * 10 + 10  # conv, conv, 2 BN, head
    assert g0 and all(a["attributes"]["budget"] == host_params // 10 for a in g0), g0


def test_the_policy_proposes_only_pairs_within_the_budget() -> None:
    big = {"residual_mlp": 300, "lowrank": 100, "bottleneck": 200}
    t = tamiyo(seeds=seeds_cfg(param_budget=150))
    decisions = [t.decide(obs(i, 1.0, slots=[slot("s1", params=big), slot("s2", params=big)])) for i in range(3)]
    proposed = [(c.slot, c.blueprint) for d in decisions for c in d.proposed]
    assert proposed and {b for _, b in proposed} == {"lowrank"}  # the only blueprint of 100 <= 150 parameters
    assert not [r for d in decisions for r in d.rejected]  # nothing over budget was ever proposed


def test_a_pair_refused_when_applied_is_not_asked_again_under_the_same_budget() -> None:
    t = tamiyo(controller=ctrl(warmup_epochs=0, plateau_window=1))
    first = t.decide(obs(0, 1.0)).accepted
    second = t.decide(obs(1, 1.0)).accepted
    assert [(c.slot, c.blueprint) for c in first + second] == [("s1", "residual_mlp")]
    t.aborted(second[0].command_id, "G0 failed: not finite")
    (third,) = t.decide(obs(2, 1.0)).accepted
    assert (third.slot, third.blueprint) == ("s1", "lowrank")  # the next pair, not the refused one
    refused = t.store.view().refused
    assert [(r.slot, r.blueprint, r.budget) for r in refused] == [("s1", "residual_mlp", 20000)]
    # a different budget is a different question: the pair may be proposed again
    again = tamiyo(controller=ctrl(warmup_epochs=0, plateau_window=1), seeds=seeds_cfg(param_budget=30000))
    again.store.restore(t.store.to_dict())
    t.aborted(third.command_id, "test: not applied")
    again.store.restore(t.store.to_dict())
    (fourth,) = again.decide(obs(3, 1.0)).accepted
    assert (fourth.slot, fourth.blueprint) == ("s1", "residual_mlp")


def test_a_slot_no_blueprint_fits_is_a_warning_at_build_and_the_run_says_why_nothing_grew(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *WIDE, *GROW_AT_ONCE, "seeds.blueprints=['conv_block']")
    assert r.exit_code == 0, out(r)
    unfit = [e for e in events(run, "slot.unfit")]
    assert [e["attributes"]["slot"] for e in unfit] == ["s1", "s2"] and {e["level"] for e in unfit} == {"WARNING"}
    why = unfit[0]["attributes"]["reason"]
    assert "conv_block 295,232" in why and "smallest budget that fits is 295,232" in why and "conv_bottleneck" in why
    s = summary(run)
    assert set(s["growth"]["unfit_slots"]) == {"s1", "s2"} and "nothing grew" in s["growth"]["warning"]
    assert "warning: nothing grew" in r.stdout  # the outcome lines
    assert not events(run, "command.rejected")  # the controller never proposed what cannot fit
    rep = esper("reports", str(run))
    assert rep.exit_code == 0 and "why: nothing grew" in rep.stdout and "295,232" in rep.stdout


def test_the_same_wide_host_grows_with_the_bottleneck(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *WIDE, *GROW_AT_ONCE, "seeds.blueprints=['conv_block', 'conv_bottleneck']")
    assert r.exit_code == 0, out(r)
    assert not events(run, "slot.unfit")
    grown = [s for s in summary(run)["seeds"] if s["stage"] != "DORMANT"]
    assert grown and {s["blueprint"] for s in grown} == {"conv_bottleneck"}


def test_seeds_config_keeps_an_absolute_budget_absolute() -> None:
    assert SeedsConfig(param_budget=1234).budget == 1234 == SeedsConfig(param_budget=1234).budget_for(10**9)
