"""Seeds in slots of every activation kind (issue 13): gates G0-G5, gradient isolation, blending, the fossilized
residual gradient and Kasmina's state round trip, on real `cnn` hosts (1-D and 2-D), an MLP and a token host."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    EventRecorder,
    fake_evaluate,
    make_config,
    new_kasmina,
    perturb,
    seed_to_probationary,
    seed_to_training,
)
from torch import nn

from esper.core.config import EsperConfig
from esper.core.errors import ConfigError
from esper.core.kasmina.kasmina import Kasmina
from esper.core.kasmina.kinds import SlotShape
from esper.core.kasmina.slot import Mode
from esper.core.model.host import build_host, probe_host
from esper.statemachines import GateRejected

N_CLASSES = 3
CNN = ["host.factory=cnn", "host.channels=[4, 5]", "host.kernels=[3, 3]", "host.stride=1",
       "seeds.slots=[{name='s1', layer='conv1'}, {name='s2', layer='conv2'}]"]
# rig name -> (per-sample input shape, overrides, the blueprint that fits its slots, kind of its slots)
RIGS: dict[str, tuple[tuple[int, ...], list[str], str, str]] = {
    "mlp": ((6,), ["host.hidden=[5, 4]"], "residual_mlp", "features"),
    "cnn1d": ((1, 12), [*CNN, "seeds.blueprints=['conv_block', 'conv_dwsep']"], "conv_block", "channels1d"),
    "cnn2d": ((1, 6, 6), [*CNN, "seeds.blueprints=['conv_block', 'conv_dwsep']"], "conv_block", "channels2d"),
    "tokens": ((6,), ["host.factory=plugins_fixture:token_host",
                      "seeds.slots=[{name='s1', layer='tokens', kind='tokens'}]"], "residual_mlp", "tokens"),
}
BASE = ["seeds.blend.steps=3", "seeds.min_training_epochs=1", "seeds.embargo_epochs=1"]


@dataclass
class Rig:
    k: Kasmina
    rec: EventRecorder
    host: nn.Module
    cfg: EsperConfig
    x: torch.Tensor
    y: torch.Tensor
    blueprint: str
    kind: str

    def plain(self) -> nn.Module:
        """The same host (same seed) without Kasmina's hooks."""
        return build_host(self.cfg, tuple(self.x.shape[1:]), N_CLASSES)


def rig(name: str, *overrides: str, build: Any = None) -> Rig:
    shape, extra, blueprint, kind = RIGS[name]
    cfg = make_config(*BASE, *extra, *overrides)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, *shape, generator=gen), torch.randint(0, N_CLASSES, (16,), generator=gen)
    host = build_host(cfg, shape, N_CLASSES)
    rec = EventRecorder()
    k = new_kasmina(cfg, host, probe_host(host, [s.layer for s in cfg.seeds.slots], x[:2]), rec, build=build)
    return Rig(k, rec, host, cfg, x, y, blueprint, kind)


KINDED = pytest.mark.parametrize("name", list(RIGS))
CONV = pytest.mark.parametrize("name", ["cnn1d", "cnn2d"])


# --- G0 ---------------------------------------------------------------------------------------------------


@KINDED
def test_a_slot_learns_its_kind_and_full_shape_and_g0_builds_a_seed_of_that_shape(name: str) -> None:
    r = rig(name)
    slot = r.k.slots["s1"]
    assert slot.shape.kind == r.kind and r.k.compatible("s1")[0] == r.blueprint
    r.k.germinate("s1", r.blueprint, "test")
    assert slot.stage == "GERMINATED" and slot.module is not None
    (g0,) = [e for e in r.rec.named("gate.result") if e["gate"] == "G0"]
    assert g0["passed"] and g0["attributes"]["slot_shape"] == str(slot.shape)
    out = slot.module(r.x.new_zeros(slot.shape.batched(3)))
    assert out.shape == slot.shape.batched(3)


@pytest.mark.parametrize(("name", "wrong"), [("cnn2d", "residual_mlp"), ("cnn1d", "lowrank"), ("mlp", "conv_block"),
                                             ("tokens", "conv_dwsep")])
def test_g0_rejects_a_blueprint_that_does_not_take_the_slots_kind_without_building_it(name: str, wrong: str) -> None:
    built: list[str] = []

    def build(bp: str, shape: SlotShape) -> nn.Module:
        built.append(bp)
        return r.k.registry.build(bp, shape, 0)

    r = rig(name, f"seeds.blueprints=['{RIGS[name][2]}', '{wrong}']", build=build)
    slot = r.k.slots["s1"]
    with pytest.raises(GateRejected, match="G0") as info:
        r.k.germinate("s1", wrong, "test")
    assert f"not {slot.shape}" in str(info.value) and built == []
    assert slot.stage == "DORMANT" and slot.module is None
    assert r.k.compatible("s1") == [RIGS[name][2]] and wrong not in r.k.candidate_params("s1")


def test_a_slot_with_no_compatible_blueprint_is_a_config_error_naming_slot_shape_and_blueprints() -> None:
    with pytest.raises(ConfigError) as info:
        rig("cnn2d", "seeds.blueprints=['residual_mlp', 'gated']")
    text = str(info.value)
    assert "seeds.slots[0] ('s1' at layer 'conv1', channels2d [N, 4, 6, 6])" in text
    assert "seeds.blueprints ['residual_mlp', 'gated']" in text and "takes features, tokens slots" in text


def test_a_kind_that_contradicts_the_layer_is_a_config_error_at_build() -> None:
    with pytest.raises(ConfigError, match=r"seeds.slots\[1\].kind = 'tokens' contradicts layer 'conv2'"):
        rig("cnn2d", "seeds.slots=[{name='s1', layer='conv1'}, {name='s2', layer='conv2', kind='tokens'}]")
    r = rig("cnn1d", "seeds.slots=[{name='s1', layer='conv1', kind='tokens'}]",
            "seeds.blueprints=['residual_mlp', 'conv_block']")
    assert r.k.slots["s1"].shape == SlotShape("tokens", (4, 12)) and r.k.compatible("s1") == ["residual_mlp"]


def test_the_controller_view_of_a_slot_is_plain_data() -> None:
    r = rig("cnn1d")
    view = r.k.slot_view("s2")
    assert view == {"kind": "channels1d", "shape": [5, 12], "compatible": ["conv_block", "conv_dwsep"],
                    "candidate_params": {"conv_block": 8 * 25 * 5 + 5 * 5,
                                         "conv_dwsep": (5 * 20 + 20) + (20 * 5 + 20) + (20 * 5 + 5)}}
    assert r.k.prefetch_keys() == [("conv_block", SlotShape("channels1d", (4, 12))),
                                   ("conv_dwsep", SlotShape("channels1d", (4, 12))),
                                   ("conv_block", SlotShape("channels1d", (5, 12))),
                                   ("conv_dwsep", SlotShape("channels1d", (5, 12)))]


# --- G1 and isolation -----------------------------------------------------------------------------------


@KINDED
def test_g1_probe_passes_for_an_isolated_seed_and_flags_a_leak_on_any_weight_shape(name: str) -> None:
    r = rig(name)
    F.cross_entropy(r.host(r.x), r.y).backward()
    before = [p.grad.clone() for p in r.host.parameters()]
    r.k.germinate("s1", r.blueprint, "test")
    slot = r.k.slots["s1"]
    perturb(slot.module)
    result = r.k.probe_g1("s1", r.x, r.y, F.cross_entropy)
    assert result.passed, result.reason
    assert result.attributes["isolation_cosine"] == 0.0 and result.attributes["seed_grad_norm"] > 0.0
    assert all(torch.equal(a, p.grad) for a, p in zip(before, r.host.parameters(), strict=True))
    # memory-bounded: at most one coordinate more than k per parameter tensor (conv weights are 3-D/4-D)
    upstream = sum(1 for _ in dict(r.host.named_modules())[slot.layer].parameters())
    assert result.attributes["sample_size"] <= r.cfg.seeds.isolation_sample + upstream
    slot.detach_input = False  # the seed now sees the host activation with its graph: a leak
    leak = r.k.probe_g1("s1", r.x, r.y, F.cross_entropy)
    assert not leak.passed and "isolation violated" in leak.reason
    assert r.rec.named("isolation.violation")[0]["cosine"] == leak.attributes["isolation_cosine"] > 1e-6


@KINDED
def test_a_training_seed_leaves_host_outputs_and_gradients_bit_identical(name: str) -> None:
    r = rig(name)
    slot = seed_to_training(r.k, "s1", r.blueprint, r.x, r.y)
    perturb(slot.module)
    plain = r.plain()
    logits = r.k.forward(r.x)
    F.cross_entropy(logits, r.y).backward()
    seed_loss = r.k.seed_pass(slot, r.x, r.y, F.cross_entropy, h=slot.last_input)
    F.cross_entropy(plain(r.x), r.y).backward()
    assert torch.equal(logits, plain(r.x))
    for (pname, p), q in zip(r.host.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), pname
    assert seed_loss > 0 and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in slot.params())
    assert slot.resumable is (name != "tokens")  # the built-in hosts' forward_from covers their blocks


# --- G2-G5 on the real end_epoch -----------------------------------------------------------------------


@KINDED
def test_the_whole_lifecycle_in_a_slot_of_each_kind_passes_g0_to_g5(name: str) -> None:
    r = rig(name)
    slot = seed_to_probationary(r.k, "s1", r.blueprint, r.x, r.y)
    assert r.k.fossilize("s1", "proven").passed
    assert [h.gate["gate"] for h in slot.machine.history if h.gate] == ["G0", "G1", "G2", "G3", "G4"]
    assert [g.name for g in r.k.param_groups()] == ["host"]
    if "s2" in r.k.slots:  # a second seed is culled, embargoed and reset through G5
        other = seed_to_training(r.k, "s2", r.blueprint, r.x, r.y)
        r.k.cull("s2", "test")
        r.k.end_epoch(fake_evaluate)
        assert other.stage == "DORMANT" and other.machine.history[-1].gate["gate"] == "G5"


@CONV
def test_g3_compares_the_full_shape_of_the_seed_output(name: str) -> None:
    r = rig(name)
    slot = seed_to_training(r.k, "s1", r.blueprint, r.x, r.y)
    slot.stats.epoch_losses, slot.stats.loss_sum, slot.stats.loss_count = [2.0], 1.0, 1
    r.k.end_epoch(fake_evaluate)
    for _ in range(r.k.spec.steps):
        r.k.forward(r.x)
        r.k.after_step()
    assert slot.stage == "BLENDING" and slot.alpha == 1.0
    slot.last_output = slot.last_output[..., :-1]  # same channels, one position short
    assert r.k.end_epoch(fake_evaluate) == ["s1"]
    (g3,) = [e for e in r.rec.named("gate.result") if e["gate"] == "G3"]
    assert not g3["passed"] and "output shape" in g3["reason"] and slot.stage == "EMBARGOED"


# --- blending through the slot hook ---------------------------------------------------------------------


@KINDED
def test_a_fossilized_identity_seed_leaves_every_host_gradient_as_the_host_alone_would_have_it(name: str) -> None:
    """Residual blend, FOSSILIZED: the seed's input is the live activation; the host path must count once (2I + J
    before the fix), so a fresh (identity) seed changes neither the output nor any host gradient."""
    r = rig(name, "seeds.blend.mode='residual'")
    seed_to_probationary(r.k, "s1", r.blueprint, r.x, r.y)
    r.k.fossilize("s1", "test")
    r.host.zero_grad(set_to_none=True)
    plain = r.plain()
    out = r.k.forward(r.x)
    F.cross_entropy(out, r.y).backward()
    F.cross_entropy(plain(r.x), r.y).backward()
    assert torch.equal(out, plain(r.x))
    for (pname, p), q in zip(r.host.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0.0), pname


@pytest.mark.parametrize("mode", ["convex", "residual", "channel", "confidence"])
@KINDED
def test_every_blend_mode_works_in_every_kind_of_slot(name: str, mode: str) -> None:
    first = rig(name).k.slots["s1"]
    shape = first.shape
    extra = [f"seeds.slots=[{{name='s1', layer='{first.layer}', kind='{shape.kind}'}}]"]
    if mode == "channel":
        extra.append(f"seeds.blend.channel_alpha={[0.5] * shape.channels}")
    r = rig(name, f"seeds.blend.mode='{mode}'", *extra)
    slot = seed_to_probationary(r.k, "s1", r.blueprint, r.x, r.y)
    perturb(slot.module)
    with r.k.modes(Mode.BYPASS, ["s1"]):
        alone = r.k.forward(r.x)
    out = r.k.forward(r.x)
    assert out.shape == alone.shape and not torch.equal(out, alone)  # the seed contributes at alpha 1
    F.cross_entropy(out, r.y).backward()
    assert all(p.grad is not None for p in slot.params())


def test_a_channel_vector_must_fit_the_channel_axis_of_every_slot() -> None:
    with pytest.raises(ConfigError) as info:
        rig("cnn2d", "seeds.blend.mode='channel'", "seeds.blend.channel_alpha=[1.0, 0.5, 1.0, 0.5]")
    assert "'s2': 'channels2d [N, 5, 6, 6]'" in str(info.value) and "axis 1 of channels1d/channels2d" in str(info.value)


def test_confidence_blending_needs_class_logits_from_the_host() -> None:
    host = nn.Sequential(nn.Linear(5, 12), nn.Unflatten(1, (4, 3)))  # outputs [N, 4, 3]: per-token scores
    cfg = make_config("seeds.slots=[{name='s1', layer='0'}]", "seeds.blend.mode='confidence'")
    with pytest.raises(ConfigError, match=r"gates on class logits \[N, C\]; the host outputs \[N, 4, 3\]"):
        new_kasmina(cfg, host, probe_host(host, ["0"], torch.randn(2, 5)), EventRecorder())


# --- user blueprints --------------------------------------------------------------------------------------


def test_a_user_conv_blueprint_grows_only_where_its_declared_kinds_fit() -> None:
    r = rig("cnn2d", "seeds.slots=[{name='s1', layer='conv1'}, {name='s2', layer='head.0'}]",
            "seeds.user_blueprints={scale='plugins_fixture:channel_scale'}", "seeds.blueprints=['scale', 'lowrank']")
    assert r.k.slots["s2"].shape == SlotShape("features", (180,))  # the head's Flatten
    assert r.k.compatible("s1") == ["scale"] and r.k.compatible("s2") == ["lowrank"]
    slot = seed_to_probationary(r.k, "s1", "scale", r.x, r.y)
    assert slot.module is not None and slot.module.s.shape == (4, 1, 1)
    with pytest.raises(GateRejected, match="takes channels1d, channels2d slots, not features"):
        r.k.germinate("s2", "scale", "test")


def test_a_user_blueprint_that_breaks_the_slots_shape_is_a_config_error_at_build() -> None:
    with pytest.raises(ConfigError) as info:
        rig("cnn1d", "seeds.user_blueprints={shrink='plugins_fixture:shrinking_blueprint'}")
    text = str(info.value)
    assert "seeds.user_blueprints.shrink" in text and "slot 's1' (channels1d [N, 4, 12])" in text
    assert "maps [2, 4, 12] to [2, 4, 11]" in text


# --- Stateful: checkpoint and rollback state of conv seeds --------------------------------------------------


@CONV
def test_conv_seeds_round_trip_through_state_dict_into_a_fresh_kasmina(name: str) -> None:
    r = rig(name)
    s1 = seed_to_probationary(r.k, "s1", "conv_block", r.x, r.y)
    s2 = seed_to_training(r.k, "s2", "conv_dwsep", r.x, r.y)
    perturb(s1.module)
    perturb(s2.module, seed=2)
    state = r.k.state_dict()
    assert any(k.startswith("s1.delta.0.weight") and v.dim() == len(s1.shape.shape) + 1 for k, v in state.items())
    fresh = rig(name)
    fresh.host.load_state_dict(r.host.state_dict())
    fresh.k.load_state_dict(state)
    assert {n: s.stage for n, s in fresh.k.slots.items()} == {"s1": "PROBATIONARY", "s2": "TRAINING"}
    assert torch.equal(fresh.k.forward(r.x), r.k.forward(r.x))
    assert all(torch.equal(a, b) for a, b in zip(fresh.k.seed_tensors().values(), r.k.seed_tensors().values(),
                                                 strict=True))
    # in place when it is the same seed: a second load copies into the live module
    live = fresh.k.slots["s1"].module
    fresh.k.load_state_dict(state)
    assert fresh.k.slots["s1"].module is live
