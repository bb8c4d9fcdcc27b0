"""Activation kinds (H-1), kind-aware blending, blueprints with kinds and shape-dependent bounds (H-2), the `cnn`
host and the build-time probe of a host (issue 13, model side). Units: no training loop here."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from esper.core.config import KINDS, BlendConfig
from esper.core.errors import ConfigError, ExitCode
from esper.core.kasmina.blending import BlendError, blend, parse_blend
from esper.core.kasmina.blueprints import BUILTIN, BlueprintRegistry, param_count
from esper.core.kasmina.kinds import SlotShape, resolve
from esper.core.model import rng
from esper.core.model.host import CNNHost, MLPHost, build_host, check_output, layer_shapes, probe_host, resumes_from

FEATURES = SlotShape("features", (6,))
CH1 = SlotShape("channels1d", (6, 19))
CH2 = SlotShape("channels2d", (5, 8, 8))
TOKENS = SlotShape("tokens", (4, 6))
ALL = [FEATURES, CH1, CH2, TOKENS]


# --- kinds -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("declared", "shape", "kind"), [
    ("auto", (6,), "features"), ("features", (6,), "features"),
    ("auto", (6, 19), "channels1d"), ("channels1d", (6, 19), "channels1d"), ("tokens", (4, 6), "tokens"),
    ("auto", (5, 8, 8), "channels2d"), ("channels2d", (5, 8, 8), "channels2d"),
])
def test_the_kind_comes_from_the_rank_and_the_kind_key_settles_3d(declared: str, shape: tuple[int, ...],
                                                                   kind: str) -> None:
    s = resolve(declared, shape, "seeds.slots[0]", "layer")
    assert (s.kind, s.shape) == (kind, shape)


@pytest.mark.parametrize(("declared", "shape", "needles"), [
    ("channels2d", (6, 19), ["seeds.slots[1].kind = 'channels2d'", "[N, 6, 19]", "[N, C, H, W]",
                             "channels1d or tokens"]),
    ("features", (5, 8, 8), ["seeds.slots[1].kind = 'features'", "[N, 5, 8, 8]", "[N, D]"]),
    ("tokens", (6,), ["seeds.slots[1].kind = 'tokens'", "[N, 6]"]),
    ("auto", (2, 3, 4, 5), ["seeds.slots[1].layer = 'blk'", "[N, 2, 3, 4, 5]", "rank 5", "[N, C, L]"]),
    ("auto", (), ["seeds.slots[1].layer = 'blk'", "[N]", "rank 1"]),
])
def test_a_kind_that_contradicts_the_rank_is_a_config_error_naming_key_and_shapes(
        declared: str, shape: tuple[int, ...], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(declared, shape, "seeds.slots[1]", "blk")
    assert info.value.exit_code == ExitCode.CONFIG
    for needle in needles:
        assert needle in str(info.value)


def test_slot_shape_knows_its_channel_axis_and_text() -> None:
    assert [(s.channel_axis, s.channels) for s in ALL] == [(-1, 6), (1, 6), (1, 5), (-1, 6)]
    assert str(CH2) == "channels2d [N, 5, 8, 8]" and CH2.zeros(3).shape == (3, 5, 8, 8)
    with pytest.raises(ValueError, match="channels2d activation is"):
        SlotShape("channels2d", (5, 8))
    assert set(KINDS) == {"features", "channels1d", "channels2d", "tokens"}


# --- blending on every kind ------------------------------------------------------------------------------


def spec(mode: str, **kw: Any) -> Any:
    return parse_blend(BlendConfig(mode=mode, steps=4, **kw))  # type: ignore[arg-type]


def pair(s: SlotShape, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(s.batched(n), generator=gen), torch.randn(s.batched(n), generator=gen)


@pytest.mark.parametrize("s", ALL, ids=str)
def test_convex_and_residual_keep_the_full_shape(s: SlotShape) -> None:
    h, z = pair(s)
    assert torch.allclose(blend(h, z, 0.25, spec("convex"), channel_axis=s.channel_axis), 0.75 * h + 0.25 * z)
    # residual adds alpha times the seed's change to its (detached) input
    assert torch.allclose(blend(h, z, 0.25, spec("residual"), channel_axis=s.channel_axis), h + 0.25 * (z - h))


@pytest.mark.parametrize("s", ALL, ids=str)
def test_channel_mode_weighs_the_kinds_channel_axis(s: SlotShape) -> None:
    vec = [0.0] * s.channels
    vec[1] = 1.0  # channel 1 is the seed's, every other channel the host's
    h, z = pair(s)
    out = blend(h, z, 1.0, spec("channel", channel_alpha=vec), channel_axis=s.channel_axis)
    take = torch.zeros(s.channels, dtype=torch.bool)
    take[1] = True
    if s.channel_axis == 1:
        assert torch.equal(out[:, take], z[:, take]) and torch.equal(out[:, ~take], h[:, ~take])
    else:
        assert torch.equal(out[..., take], z[..., take]) and torch.equal(out[..., ~take], h[..., ~take])


def test_channel_mode_names_the_axis_it_counted() -> None:
    h, z = pair(CH1)
    with pytest.raises(BlendError, match=r"activation \[3, 6, 19\] has 6 channels on axis 1"):
        blend(h, z, 1.0, spec("channel", channel_alpha=[1.0] * 19), channel_axis=1)


@pytest.mark.parametrize("s", ALL, ids=str)
def test_confidence_gates_each_sample_over_its_whole_activation(s: SlotShape) -> None:
    h, z = pair(s, n=2)
    logits = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # sample 0 sure (margin 5), sample 1 unsure (0)
    out = blend(h, z, 1.0, spec("confidence", confidence_margin=0.5), logits, channel_axis=s.channel_axis)
    assert torch.equal(out[0], h[0]) and torch.equal(out[1], z[1])


@pytest.mark.parametrize("s", ALL, ids=str)
def test_residual_counts_the_host_path_once_whether_or_not_the_seed_input_is_detached(s: SlotShape) -> None:
    """A zero-delta seed x -> x: d(out)/d(host) must be the identity. Fed the live host (FOSSILIZED), subtracting
    the detached host would give 2I (the bug the research found); subtracting the seed's input gives I."""
    h = torch.randn(s.batched(3), requires_grad=True)
    g = torch.randn(s.batched(3))
    for seed_in in (h, h.detach()):
        out = blend(h, seed_in * 1.0, 1.0, spec("residual"), channel_axis=s.channel_axis, seed_input=seed_in)
        (grad,) = torch.autograd.grad((out * g).sum(), h)
        assert torch.equal(grad, g)
    doubled = blend(h, h * 1.0, 1.0, spec("residual"), channel_axis=s.channel_axis)  # the old fossilized formula
    (grad,) = torch.autograd.grad((doubled * g).sum(), h)
    assert torch.allclose(grad, 2 * g)


# --- blueprints ------------------------------------------------------------------------------------------


SHAPES = [FEATURES, SlotShape("features", (13,)), TOKENS, CH1, SlotShape("channels1d", (25, 10)), CH2,
          SlotShape("channels2d", (3, 5, 7))]


@pytest.mark.parametrize("name", sorted(n for n, b in BUILTIN.items() if b.inherits))
def test_a_blueprint_that_copies_the_hosts_layer_is_never_built_from_a_shape_alone(name: str) -> None:
    """layer_copy / layer_stack are made from the slot's trained layer (tests/test_inherit.py), not its shape."""
    with pytest.raises(TypeError, match="BlueprintRegistry.make"):
        BUILTIN[name].build(FEATURES)


@pytest.mark.parametrize("name", sorted(n for n, b in BUILTIN.items() if not b.inherits))
def test_every_builtin_blueprint_fits_exactly_its_kinds_with_exact_bounds_and_starts_as_the_identity(
        name: str) -> None:
    bp = BUILTIN[name]
    for s in SHAPES:
        if not bp.accepts(s):
            assert bp.refusal(s) and str(s) in bp.refusal(s)
            continue
        module = bp.build(s)
        assert bp.bounds(s) == (param_count(module), param_count(module)), s
        x = torch.randn(s.batched(3))
        assert torch.equal(module(x), x), s  # last layer zero-initialised: a new seed changes nothing
        assert bp.refusal(s) == ""
    assert {s.kind for s in SHAPES if bp.accepts(s)} == set(bp.kinds)


def test_the_conv_blueprints_have_the_documented_sizes() -> None:
    block, dwsep = BUILTIN["conv_block"], BUILTIN["conv_dwsep"]
    assert block.bounds(CH1)[0] == 8 * 36 * 5 + 5 * 6 == 1470  # 8 C^2 k + 5 C at C = 6, k = 5
    assert dwsep.bounds(CH1)[0] == 462
    assert block.bounds(SlotShape("channels2d", (6, 8, 8)))[0] == 8 * 36 * 9 + 5 * 6  # 3x3 in 2-D
    convs = [m for m in block.build(CH2).modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(5, 20, (3, 3)), (20, 5, (3, 3))]
    convs = [m for m in dwsep.build(CH1).modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.groups) for c in convs] == [
        (6, 24, (1,), 1), (24, 24, (5,), 24), (24, 6, (1,), 1)]


def test_compatible_lists_the_configured_blueprints_that_accept_the_kind_in_config_order() -> None:
    reg = BlueprintRegistry(make_config("seeds.blueprints=['conv_dwsep', 'lowrank', 'conv_block']").seeds)
    assert reg.compatible(CH1) == ["conv_dwsep", "conv_block"] == reg.compatible(CH2)
    assert reg.compatible(FEATURES) == ["lowrank"] == reg.compatible(TOKENS)


def test_feature_seeds_keep_their_init_stream_and_conv_seeds_get_one_per_shape() -> None:
    """The decision documented in the closing note: the init stream depends on the slot's shape, not its name; for
    a features slot it is the width, exactly as before kinds existed (default-run results stay bit-identical)."""
    reg = BlueprintRegistry(make_config().seeds)
    with rng.seeded(42 + sum(b"residual_mlp") * 131 + 6):
        before = BUILTIN["residual_mlp"].build(FEATURES)
    now = reg.build("residual_mlp", FEATURES, 42)
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), now.state_dict().values(), strict=True))
    first = reg.build("conv_block", CH1, 42).state_dict()["delta.0.weight"]
    assert torch.equal(first, reg.build("conv_block", CH1, 42).state_dict()["delta.0.weight"])
    other = reg.build("conv_block", SlotShape("channels1d", (6, 10)), 42).state_dict()["delta.0.weight"]
    assert not torch.equal(first, other)


def test_a_user_blueprint_is_told_the_slots_kind_and_shape_and_declares_its_kinds_and_bounds() -> None:
    import plugins_fixture

    cfg = make_config("seeds.user_blueprints={scale='plugins_fixture:channel_scale', "
                      "rec='plugins_fixture:recording_blueprint'}", "seeds.blueprints=['scale', 'rec']")
    reg = BlueprintRegistry(cfg.seeds)
    assert reg["scale"].kinds == {"channels1d", "channels2d"} and reg["rec"].kinds == set(KINDS)
    assert reg.compatible(CH2) == ["scale", "rec"] and reg.compatible(FEATURES) == ["rec"]
    assert reg["scale"].bounds(CH2) == (5, 5) and reg["rec"].bounds(CH2) == (1, cfg.seeds.param_budget)
    plugins_fixture.CALLS.clear()
    reg.build("rec", TOKENS, 0)
    assert plugins_fixture.CALLS == [("tokens", (4, 6))]


@pytest.mark.parametrize(("attr", "value", "needle"), [
    ("kinds", "channels1d", "must be a non-empty list"),
    ("kinds", ("channels3d",), "unknown kind(s) ['channels3d']"),
    ("bounds", 7, "must be callable"),
])
def test_a_user_blueprint_with_bad_declarations_is_a_config_error(monkeypatch: pytest.MonkeyPatch, attr: str,
                                                                  value: object, needle: str) -> None:
    import plugins_fixture

    monkeypatch.setattr(plugins_fixture.channel_scale, attr, value, raising=False)
    with pytest.raises(ConfigError, match="seeds.user_blueprints.scale") as info:
        BlueprintRegistry(make_config("seeds.user_blueprints={scale='plugins_fixture:channel_scale'}").seeds)
    assert needle in str(info.value)


# --- hosts -----------------------------------------------------------------------------------------------


def cnn_cfg(*overrides: str) -> Any:
    return make_config("host.factory=cnn", *overrides)


def test_the_cnn_host_on_mnist1d_shapes_has_the_researched_layout() -> None:
    host = build_host(cnn_cfg(), (1, 40), 10)
    assert isinstance(host, CNNHost)
    assert [n for n, _ in host.named_children()] == ["conv1", "conv2", "conv3", "head"]  # creation order
    assert param_count(host) == 574
    x = torch.randn(4, 1, 40)
    assert layer_shapes(host, ["conv1", "conv2", "conv3"], x[:2]) == {"conv1": (6, 19), "conv2": (6, 10),
                                                                       "conv3": (6, 5)}
    assert host(x).shape == (4, 10)
    assert param_count(build_host(cnn_cfg("host.channels=[25, 25, 25]"), (1, 40), 10)) == 5210
    # init seeded from run.seed, as build_host does for every host
    again = build_host(cnn_cfg(), (1, 40), 10)
    assert all(torch.equal(a, b) for a, b in zip(host.parameters(), again.parameters(), strict=True))


def test_the_cnn_host_is_2d_for_image_inputs_and_forward_from_resumes_after_any_block() -> None:
    host = build_host(cnn_cfg("host.channels=[4, 5]", "host.kernels=[3, 3]", "host.stride=1"), (1, 8, 8), 10)
    assert isinstance(host.conv1[0], nn.Conv2d) and host.conv2[0].kernel_size == (3, 3)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(host.forward_from("conv1", host.conv1(x)), host(x))
    assert torch.equal(host.forward_from("conv2", host.conv2(host.conv1(x))), host(x))
    assert host.forward_from("conv1.0", x) is None and host.forward_from("head", x) is None
    assert resumes_from(host, "conv2", x) and not resumes_from(host, "conv2.0", x)


@pytest.mark.parametrize(("factory", "shape", "needles"), [
    ("cnn", (64,), ["host.factory = 'cnn'", "[N, C, L]", "[N, C, H, W]", "[N, 64]"]),
    ("cnn", (1, 2, 3, 4), ["host.factory = 'cnn'", "[N, 1, 2, 3, 4]"]),
])
def test_an_input_shape_the_builtin_host_refuses_is_a_config_error_with_the_shapes(
        factory: str, shape: tuple[int, ...], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_host(make_config(f"host.factory={factory}"), shape, 10)
    for needle in needles:
        assert needle in str(info.value)


def test_a_cnn_stack_that_shrinks_the_input_away_is_a_config_error() -> None:
    assert param_count(build_host(cnn_cfg(), (1, 4), 10)) > 0  # 4 -> 1 -> 1 -> 1: still fits
    with pytest.raises(ConfigError) as info:
        build_host(cnn_cfg(), (1, 2), 10)  # kernel 5, stride 2, padding 1 leaves nothing of length 2
    assert "host.kernels/host.stride/host.padding: block conv1" in str(info.value)
    assert "[N, 1, 2]" in str(info.value) and "[N, 6, 0]" in str(info.value)


def test_host_config_validation_names_the_keys() -> None:
    with pytest.raises(ConfigError, match="host: kernels has 2 entries but channels has 3"):
        make_config("host.kernels=[3, 3]")
    with pytest.raises(ConfigError, match="host.stride"):
        make_config("host.stride=0")
    with pytest.raises(ConfigError, match="host.factory: must be 'mlp', 'cnn', 'transformer' or 'module:function'"):
        make_config("host.factory=resnet")
    with pytest.raises(ConfigError, match=r"host.kernels: every kernel size must lie in \[1, 64\]"):
        make_config("host.kernels=[0, 3, 3]")


# --- the probe forward -----------------------------------------------------------------------------------


def test_the_probe_learns_shapes_from_a_real_batch_and_changes_no_state() -> None:
    host = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(3 * 6, 4))
    before = {k: v.clone() for k, v in host.state_dict().items()}
    x = torch.randn(2, 1, 8)
    state = torch.get_rng_state()
    probe = probe_host(host, ["0", "1", "3"], x)
    assert probe.shapes == {"0": (3, 6), "1": (3, 6), "3": (18,)} and probe.output == (4,)
    assert all(torch.equal(v, host.state_dict()[k]) for k, v in before.items())  # BatchNorm stats untouched
    assert torch.equal(state, torch.get_rng_state()) and host.training  # no dropout draw; mode restored
    check_output(probe, 4)
    with pytest.raises(ConfigError, match=r"the host outputs \[N, 4\] for inputs \[N, 1, 8\], but the task has 10"):
        check_output(probe, 10)


def test_the_probe_names_a_layer_whose_output_is_not_a_tensor_and_a_host_that_refuses_the_input() -> None:
    import plugins_fixture

    host = plugins_fixture.PairHost(5, 3)
    with pytest.raises(ConfigError, match="seeds.slots: layer 'pair' outputs a tuple, not a tensor"):
        probe_host(host, ["pair"], torch.randn(2, 5))
    with pytest.raises(ConfigError, match=r"refuses the task's inputs \[2, 1, 8, 8\] \(RuntimeError"):
        probe_host(MLPHost(5, 3, [4], "relu"), [], torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"the host has no layer 'nope'; `esper layers` lists"):
        probe_host(host, ["nope"], torch.randn(2, 5))


class _WrongResume(nn.Module):
    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.a, self.b, self.fail = nn.Linear(3, 3), nn.Linear(3, 2), fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def forward_from(self, layer: str, h: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise KeyError(layer)
        return self.b(h)  # forgets the activation between a and b


@pytest.mark.parametrize(("fail", "needle"), [(False, "disagrees with forward()"), (True, "raised KeyError")])
def test_a_host_whose_forward_from_is_wrong_is_caught_at_build(fail: bool, needle: str) -> None:
    torch.manual_seed(0)
    host = _WrongResume(fail)
    x = torch.randn(8, 3)
    assert not torch.equal(host.b(host.a(x)), host(x))  # the relu matters on this batch
    with pytest.raises(ConfigError, match=needle):
        resumes_from(host, "a", x)


# --- hostile shapes and host keys (Hypothesis) ----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(declared=st.sampled_from(["auto", *KINDS]), shape=st.lists(st.integers(-2, 40), max_size=6).map(tuple))
def test_resolve_either_gives_a_consistent_slot_shape_or_a_config_error(declared: str, shape: tuple[int, ...]) -> None:
    try:
        s = resolve(declared, shape, "seeds.slots[0]", "layer")
    except ConfigError as exc:
        assert "seeds.slots[0]" in str(exc)
        return
    assert s.shape == shape and all(d >= 1 for d in shape) and (declared == "auto" or s.kind == declared)
    assert s.zeros(1).dim() == len(shape) + 1 and s.channels >= 1


@settings(max_examples=60, deadline=None)
@given(channels=st.lists(st.integers(1, 6), min_size=1, max_size=4), kernel=st.integers(1, 9),
       stride=st.integers(1, 4), padding=st.integers(0, 3), length=st.integers(1, 30), images=st.booleans())
def test_any_cnn_host_config_builds_a_host_that_runs_or_is_a_config_error(
        channels: list[int], kernel: int, stride: int, padding: int, length: int, images: bool) -> None:
    cfg = cnn_cfg(f"host.channels={channels}", f"host.kernels={[kernel] * len(channels)}", f"host.stride={stride}",
                  f"host.padding={padding}")
    shape = (2, length, length) if images else (2, length)
    try:
        host = build_host(cfg, shape, 5)
    except ConfigError as exc:
        assert "host.kernels/host.stride/host.padding" in str(exc)
        return
    assert host(torch.randn(3, *shape)).shape == (3, 5)
