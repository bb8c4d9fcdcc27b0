"""Kasmina: gates G0-G5, blend modes, the isolation monitor, and seed behaviour per stage on a real host."""

from __future__ import annotations

import math
from collections.abc import Callable
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

from esper.core.config import BlendConfig, EsperConfig
from esper.core.errors import ConfigError, EsperError, ExitCode
from esper.core.kasmina import gates
from esper.core.kasmina.blending import BlendError, BlendSpec, alpha_at, blend, parse_blend
from esper.core.kasmina.isolation import IsolationMonitor
from esper.core.kasmina.kasmina import Kasmina
from esper.core.kasmina.kinds import SlotShape
from esper.core.kasmina.slot import Mode, SeedSlot
from esper.core.model.host import build_host, probe_host
from esper.statemachines import GateRejected, IllegalTransition

N_FEATURES = 6
N_CLASSES = 3
BASE = ["data.task=synthetic", f"data.synthetic_features={N_FEATURES}", f"data.synthetic_classes={N_CLASSES}",
        "host.hidden=[5, 4]", "seeds.blend.steps=3", "seeds.embargo_epochs=2", "seeds.min_training_epochs=2"]


def make_cfg(*overrides: str) -> EsperConfig:
    return make_config(*overrides, base=BASE)


def make_kasmina(*overrides: str, build: Callable[[str, int], nn.Module] | None = None,
                 ) -> tuple[Kasmina, EventRecorder, nn.Module]:
    cfg = make_cfg(*overrides)
    host = build_host(cfg, (N_FEATURES,), N_CLASSES)
    probe = probe_host(host, [s.layer for s in cfg.seeds.slots], batch(2)[0])
    rec = EventRecorder()
    return new_kasmina(cfg, host, probe, rec, build=build), rec, host


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, N_FEATURES, generator=gen), torch.randint(0, N_CLASSES, (n,), generator=gen)


def to_training(k: Kasmina, slot: str, blueprint: str = "residual_mlp") -> SeedSlot:
    return seed_to_training(k, slot, blueprint, *batch())


def to_probationary(k: Kasmina, name: str) -> SeedSlot:
    return seed_to_probationary(k, name, "residual_mlp", *batch())


# --- gates as pure functions ----------------------------------------------------------------------------

G0_OK: dict[str, Any] = dict(blueprint="b", known=True, n_params=10, bounds=(5, 20), budget=100, finite=True,
                             out_shape=(2, 4), expected_shape=(2, 4))


def test_g0_passes_when_sane() -> None:
    r = gates.g0_sanity(**G0_OK)
    assert (r.gate, r.passed) == ("G0", True)


@pytest.mark.parametrize(("change", "needle"), [
    ({"known": False}, "unknown blueprint"),
    ({"n_params": 21}, "outside declared bounds"),
    ({"n_params": 4}, "outside declared bounds"),
    ({"budget": 9}, "budget"),
    ({"finite": False}, "non-finite"),
    ({"out_shape": (2, 5)}, "shape"),
    ({"out_shape": None}, "shape"),
])
def test_g0_fails_with_reason(change: dict[str, Any], needle: str) -> None:
    r = gates.g0_sanity(**{**G0_OK, **change})
    assert not r.passed
    assert needle in r.reason


G1_OK: dict[str, Any] = dict(seed_grad_norm=0.3, seed_grads_finite=True, isolation_cosine=0.0, max_cosine=1e-6,
                             host_grads_unchanged=True)


def test_g1_passes_when_healthy() -> None:
    r = gates.g1_gradient_health(**G1_OK)
    assert (r.gate, r.passed) == ("G1", True)


@pytest.mark.parametrize(("change", "needle"), [
    ({"seed_grads_finite": False}, "non-finite"),
    ({"seed_grad_norm": 0.0}, "zero"),
    ({"isolation_cosine": 0.5}, "isolation"),
    ({"host_grads_unchanged": False}, "host gradients"),
])
def test_g1_fails_with_reason(change: dict[str, Any], needle: str) -> None:
    r = gates.g1_gradient_health(**{**G1_OK, **change})
    assert not r.passed
    assert needle in r.reason


G2_OK: dict[str, Any] = dict(epochs_in_training=2, min_epochs=2, loss_start=1.0, loss_now=0.9, min_improvement=0.05,
                             step_latency_ms=1.0, latency_budget_ms=10.0)


def test_g2_passes_after_min_epochs_with_improvement() -> None:
    r = gates.g2_stability(**G2_OK)
    assert (r.gate, r.passed) == ("G2", True)
    assert r.attributes["improvement"] == pytest.approx(0.1)


@pytest.mark.parametrize(("change", "needle"), [
    ({"epochs_in_training": 1}, "epochs in TRAINING"),
    ({"loss_now": 0.99}, "improved"),
    ({"loss_now": 1.1}, "improved"),
    ({"loss_now": float("nan")}, "non-finite"),
    ({"loss_start": float("inf")}, "non-finite"),
    ({"step_latency_ms": 11.0}, "latency"),
])
def test_g2_fails_with_reason(change: dict[str, Any], needle: str) -> None:
    r = gates.g2_stability(**{**G2_OK, **change})
    assert not r.passed
    assert needle in r.reason


G3_OK: dict[str, Any] = dict(alpha=1.0, out_shape=(4, 3), host_shape=(4, 3), out_dtype="float32",
                             host_dtype="float32", out_device="cpu", host_device="cpu", required_layers=["h1"],
                             present_layers=["", "h1", "head"])


def test_g3_passes_when_interface_matches() -> None:
    r = gates.g3_interface(**G3_OK)
    assert (r.gate, r.passed) == ("G3", True)


@pytest.mark.parametrize(("change", "needle"), [
    ({"alpha": 1.0 - 1e-12}, "alpha"),
    ({"out_shape": (4, 2)}, "shape"),
    ({"out_dtype": "float64"}, "dtype"),
    ({"out_device": "cuda:0"}, "device"),
    ({"present_layers": ["head"]}, "missing"),
])
def test_g3_fails_with_reason(change: dict[str, Any], needle: str) -> None:
    r = gates.g3_interface(**{**G3_OK, **change})
    assert not r.passed
    assert needle in r.reason


def test_g4_passes_on_enough_counterfactual_gain() -> None:
    r = gates.g4_system_impact(loss_with=1.0, loss_without=1.2, min_improvement=0.1, degraded=False)
    assert (r.gate, r.passed) == ("G4", True)
    assert r.attributes["gain"] == pytest.approx(0.2)


@pytest.mark.parametrize(("change", "needle"), [
    ({"loss_with": 1.15}, "gain"),
    ({"loss_with": 1.3}, "gain"),
    ({"loss_without": float("nan")}, "non-finite"),
    ({"degraded": True}, "degraded"),
])
def test_g4_fails_with_reason(change: dict[str, Any], needle: str) -> None:
    args = {"loss_with": 1.0, "loss_without": 1.2, "min_improvement": 0.1, "degraded": False, **change}
    r = gates.g4_system_impact(**args)
    assert not r.passed
    assert needle in r.reason


def test_g5_passes_only_when_everything_is_clean() -> None:
    ok = gates.g5_reset_clean(module_detached=True, optimizer_groups_removed=True, counters_cleared=True)
    assert (ok.gate, ok.passed) == ("G5", True)
    for field, needle in (("module_detached", "module"), ("optimizer_groups_removed", "optimizer"),
                          ("counters_cleared", "counters")):
        args = {"module_detached": True, "optimizer_groups_removed": True, "counters_cleared": True, field: False}
        r = gates.g5_reset_clean(**args)
        assert not r.passed
        assert needle in r.reason


def test_gate_result_is_serialisable_with_reason() -> None:
    d = gates.g4_system_impact(loss_with=1.0, loss_without=0.5, min_improvement=0.0, degraded=False).to_dict()
    assert d["gate"] == "G4" and d["passed"] is False and d["reason"]


# --- G0 / G1 through Kasmina on a real host --------------------------------------------------------------


def test_germinate_passes_g0_and_attaches_the_module() -> None:
    k, rec, _ = make_kasmina()
    result = k.germinate("s1", "lowrank", "plateau")
    slot = k.slots["s1"]
    assert result.passed and slot.stage == "GERMINATED"
    assert slot.module is not None and slot.blueprint == "lowrank" and slot.seed_id == "s1-1"
    (event,) = rec.named("gate.result")
    assert event["gate"] == "G0" and event["passed"] is True and event["slot"] == "s1"
    assert [e["transition"]["dest"] for e in rec.named("seed.transition")] == ["GERMINATED"]


@pytest.mark.parametrize(("blueprint", "overrides", "needle"), [
    ("no_such_blueprint", (), "unknown blueprint"),
    ("gated", ("seeds.blueprints=['residual_mlp']",), "unknown blueprint"),  # known, but not allowed here
    ("residual_mlp", ("seeds.param_budget=10",), "budget"),
])
def test_germinate_failing_g0_changes_nothing(blueprint: str, overrides: tuple[str, ...], needle: str) -> None:
    k, rec, _ = make_kasmina(*overrides)
    with pytest.raises(GateRejected, match=needle):
        k.germinate("s1", blueprint, "test")
    slot = k.slots["s1"]
    assert slot.stage == "DORMANT" and slot.module is None and slot.blueprint is None
    assert slot.germinations == 0 and k.param_groups()[0].name == "host" and len(k.param_groups()) == 1
    (event,) = rec.named("gate.result")
    assert event["gate"] == "G0" and event["passed"] is False and needle in event["reason"]
    assert rec.named("seed.transition") == []


class _Widen(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_g0_rejects_a_blueprint_whose_output_does_not_fit_the_slot() -> None:
    k, _, _ = make_kasmina("seeds.param_budget=1000000", build=lambda _n, s: _Widen(s.channels))
    with pytest.raises(GateRejected, match="shape"):
        k.germinate("s1", "residual_mlp", "test")
    assert k.slots["s1"].stage == "DORMANT"


def test_g0_rejects_non_finite_parameters() -> None:
    def build(name: str, shape: SlotShape) -> nn.Module:
        m = k.registry.build(name, shape, 0)
        with torch.no_grad():
            next(m.parameters()).view(-1)[0] = float("nan")
        return m

    k, _, _ = make_kasmina(build=build)
    with pytest.raises(GateRejected, match="non-finite"):
        k.germinate("s1", "residual_mlp", "test")
    assert k.slots["s1"].stage == "DORMANT"


def test_germinate_from_a_live_stage_is_illegal() -> None:
    k, _, _ = make_kasmina()
    k.germinate("s1", "residual_mlp", "test")
    module = k.slots["s1"].module
    with pytest.raises(IllegalTransition):
        k.germinate("s1", "lowrank", "again")
    assert k.slots["s1"].module is module and k.slots["s1"].blueprint == "residual_mlp"


def test_probe_g1_passes_for_an_isolated_seed_and_leaves_host_grads_alone() -> None:
    k, rec, host = make_kasmina()
    x, y = batch()
    # host gradients already accumulated by the caller must survive the probe bit for bit
    F.cross_entropy(host(x), y).backward()
    before = [p.grad.clone() for p in host.parameters()]
    k.germinate("s2", "residual_mlp", "test")
    perturb(k.slots["s2"].module)
    result = k.probe_g1("s2", x, y, F.cross_entropy)
    assert result.gate == "G1" and result.passed, result.reason
    assert result.attributes["isolation_cosine"] == 0.0 and result.attributes["seed_grad_norm"] > 0.0
    assert all(torch.equal(a, p.grad) for a, p in zip(before, host.parameters(), strict=True))
    assert all(p.grad is None for p in k.slots["s2"].params())
    assert rec.named("isolation.violation") == []
    k.start_training("s2", result, "probe passed")
    assert k.slots["s2"].stage == "TRAINING"


def test_isolation_monitor_flags_a_leaking_seed() -> None:
    k, rec, _ = make_kasmina()
    x, y = batch()
    k.germinate("s2", "residual_mlp", "test")
    perturb(k.slots["s2"].module)
    k.slots["s2"].detach_input = False  # the seed now sees the host activation with its graph: a leak
    result = k.probe_g1("s2", x, y, F.cross_entropy)
    assert not result.passed
    assert "isolation" in result.reason
    assert result.attributes["isolation_cosine"] > k.scfg.isolation_max_cosine
    (event,) = rec.all("isolation.violation")
    violation = event.attributes
    assert event.source == "kasmina" and violation["slot"] == "s2"
    assert violation["cosine"] == result.attributes["isolation_cosine"]
    # a failed G1 cannot be used to start training
    with pytest.raises(GateRejected):
        k.start_training("s2", result, "should be refused")
    assert k.slots["s2"].stage == "GERMINATED"


def test_probe_g1_fails_on_all_zero_seed_gradients() -> None:
    k, _, _ = make_kasmina("seeds.user_blueprints={dead='plugins_fixture:dead_blueprint'}",
                           "seeds.blueprints=['dead']")
    x, y = batch()
    k.germinate("s1", "dead", "test")
    result = k.probe_g1("s1", x, y, F.cross_entropy)
    assert not result.passed
    assert "zero" in result.reason


# --- the isolation monitor -------------------------------------------------------------------------------


def test_monitor_memory_is_o_k_and_never_permutes_all_coordinates(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_randperm(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("randperm over parameters is O(numel) memory")

    monkeypatch.setattr(torch, "randperm", no_randperm)
    k = 256
    sizes = []
    for numel in (1_000, 10**9):  # meta tensors: a billion coordinates without allocating them
        params = [nn.Parameter(torch.empty(numel, device="meta")), nn.Parameter(torch.empty(7, device="meta"))]
        monitor = IsolationMonitor(params, k, seed=0)
        total_index = sum(int(i.numel()) for i in monitor.index)
        assert total_index == monitor.sample_size
        assert k <= monitor.sample_size <= k + len(params)
        assert all(i.device.type == "cpu" and int(i.max()) < p.numel() for i, p in zip(monitor.index, params,
                                                                                       strict=True))
        sizes.append(monitor.sample_size)
    assert sizes[0] == sizes[1]  # independent of the parameter count


def test_monitor_samples_the_same_coordinates_of_each_gradient() -> None:
    params = [nn.Parameter(torch.zeros(50)), nn.Parameter(torch.zeros(3, 4))]
    monitor = IsolationMonitor(params, 16, seed=3)
    g = [torch.arange(50, dtype=torch.float32), torch.arange(12, dtype=torch.float32).reshape(3, 4) + 100]
    sample = monitor.sample(g)
    expected = torch.cat([g[0][monitor.index[0]], g[1].reshape(-1)[monitor.index[1]]])
    assert torch.equal(sample, expected)
    assert torch.equal(monitor.sample([None, None]), torch.zeros(monitor.sample_size))
    again = IsolationMonitor(params, 16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(monitor.index, again.index, strict=True))


def test_monitor_cosine_is_scale_free_and_absolute() -> None:
    a = torch.tensor([1.0, 2.0, 0.0])
    assert IsolationMonitor.cosine(a, 1000 * a) == pytest.approx(1.0)
    assert IsolationMonitor.cosine(a, -a) == pytest.approx(1.0)
    assert IsolationMonitor.cosine(a, torch.tensor([0.0, 0.0, 5.0])) == 0.0
    assert IsolationMonitor.cosine(a, torch.zeros(3)) == 0.0
    assert IsolationMonitor.cosine(a, torch.tensor([2.0, -1.0, 1.0])) == pytest.approx(0.0, abs=1e-7)
    assert IsolationMonitor.cosine(a, torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1 / math.sqrt(5))


# --- blending --------------------------------------------------------------------------------------------

H = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
S = torch.tensor([[5.0, 6.0], [7.0, 8.0]])


def test_convex_blend() -> None:
    out = blend(H, S, 0.25, parse_blend({"mode": "convex"}))
    assert torch.allclose(out, torch.tensor([[2.0, 3.0], [4.0, 5.0]]))


def test_residual_blend_adds_alpha_times_the_seed_delta() -> None:
    # seed output is x + delta(x); residual keeps the host whole and adds alpha * delta
    h = H.clone().requires_grad_(True)
    out = blend(h, S, 0.5, parse_blend({"mode": "residual"}))
    assert torch.allclose(out, torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    out.sum().backward()
    assert torch.equal(h.grad, torch.ones_like(H))  # the host's gradient is not scaled by (1 - alpha)


def test_channel_blend_uses_the_per_channel_vector() -> None:
    spec = parse_blend({"mode": "channel", "channel_alpha": [1.0, 0.5]})
    out = blend(H, S, 0.5, spec)
    # weights a * vec = [0.5, 0.25]
    assert torch.allclose(out, torch.tensor([[3.0, 3.0], [5.0, 5.0]]))


def test_confidence_blend_trusts_the_seed_where_the_host_is_unsure() -> None:
    spec = parse_blend({"mode": "confidence", "confidence_margin": 2.0})
    logits = torch.tensor([[0.0, 1.0, 0.0],    # margin 1 -> gate 0.5
                           [5.0, 0.0, 0.0]])   # margin 5 -> gate 0 (host sure)
    out = blend(H, S, 1.0, spec, logits=logits)
    assert torch.allclose(out, torch.tensor([[3.0, 4.0], [3.0, 4.0]]))
    half = blend(H, S, 0.5, spec, logits=logits)  # weight a * gate = 0.25 on row 0
    assert torch.allclose(half, torch.tensor([[2.0, 3.0], [3.0, 4.0]]))


def test_channel_mode_without_a_vector_is_an_error_everywhere() -> None:
    with pytest.raises(ConfigError, match="channel_alpha"):
        make_cfg("seeds.blend.mode='channel'")
    with pytest.raises(BlendError, match="channel_alpha"):
        parse_blend(BlendConfig.model_construct(mode="channel", steps=3, channel_alpha=[], confidence_margin=0.5))
    with pytest.raises(BlendError, match="channel"):
        blend(H, S, 0.5, BlendSpec("channel", 3))


def test_channel_vector_is_validated() -> None:
    with pytest.raises(BlendError, match=r"\[0, 1\]"):
        parse_blend({"mode": "channel", "channel_alpha": [0.5, 1.5]})
    with pytest.raises(BlendError, match="3 entries"):
        blend(H, S, 0.5, parse_blend({"mode": "channel", "channel_alpha": [0.1, 0.2, 0.3]}))


def test_confidence_mode_without_logits_is_an_error() -> None:
    spec = parse_blend({"mode": "confidence"})
    assert spec.needs_logits
    with pytest.raises(BlendError, match="logits"):
        blend(H, S, 0.5, spec)
    with pytest.raises(BlendError, match="logits"):
        blend(H, S, 0.5, spec, logits=torch.zeros(2, 1))  # one class has no margin
    with pytest.raises(BlendError, match="logits"):
        blend(H, S, 0.5, spec, logits=torch.zeros(3, 4))  # wrong batch


def test_blend_shape_mismatch_is_an_error() -> None:
    with pytest.raises(BlendError, match="shape"):
        blend(H, S[:, :1], 0.5, parse_blend({}))


@pytest.mark.parametrize("mode", ["convex", "residual", "channel", "confidence"])
def test_blend_never_mutates_the_callers_tensors(mode: str) -> None:
    spec = parse_blend({"mode": mode, "channel_alpha": [0.5, 0.5] if mode == "channel" else []})
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    for value in (0.3, 1.7, -0.2):  # out-of-range alphas get clamped: never the caller's tensor
        alpha = torch.tensor(value)  # float32 on cpu: as_tensor would hand back this very object
        h, s, lg = H.clone(), S.clone(), logits.clone()
        blend(h, s, alpha, spec, logits=lg)
        assert alpha.item() == pytest.approx(value)
        assert torch.equal(h, H) and torch.equal(s, S) and torch.equal(lg, logits)


def test_alpha_is_clamped_to_the_unit_interval() -> None:
    spec = parse_blend({})
    assert torch.equal(blend(H, S, torch.tensor(3.0), spec), S)
    assert torch.equal(blend(H, S, -1.0, spec), H)


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 40, 49, 1000])
def test_alpha_schedule_is_monotone_and_ends_exactly_at_one(steps: int) -> None:
    values = [alpha_at(i, steps) for i in range(steps + 3)]
    assert values[0] == 0.0
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[steps] == 1.0 and values[steps + 2] == 1.0
    assert all(v < 1.0 for v in values[:steps])


def test_parse_blend_accepts_the_config_model_and_a_dict_alike() -> None:
    cfg = make_cfg("seeds.blend.mode='residual'", "seeds.blend.steps=9")
    assert parse_blend(cfg.seeds.blend) == parse_blend({"mode": "residual", "steps": 9}) == BlendSpec("residual", 9)
    with pytest.raises(ConfigError):
        make_cfg("seeds.blend.mode='average'")


# --- stage behaviour on a real host ----------------------------------------------------------------------


def test_training_seed_leaves_host_outputs_and_gradients_bit_identical() -> None:
    k, _, host = make_kasmina()
    plain = build_host(make_cfg(), (N_FEATURES,), N_CLASSES)  # same seed: an identical host without seeds
    assert all(torch.equal(a, b) for a, b in zip(host.parameters(), plain.parameters(), strict=True))
    slots = [to_training(k, "s1"), to_training(k, "s2", "gated")]
    for s in slots:
        perturb(s.module)  # a seed with weight everywhere: any leak would show up in the host gradients
    x, y = batch(seed=5)

    logits = k.forward(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    seed_losses = [k.seed_pass(s, x, y, F.cross_entropy) for s in slots]

    ref_logits = plain(x)
    F.cross_entropy(ref_logits, y).backward()
    assert torch.equal(logits, ref_logits)  # output computed, not added
    for (name, p), q in zip(host.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for s, seed_loss in zip(slots, seed_losses, strict=True):
        # the seed really ran (substituted) and learned: non-zero gradients on its own parameters only
        assert s.last_output is not None
        assert seed_loss != pytest.approx(float(loss.detach()))
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in s.params())
        assert sum(float(p.grad.abs().sum()) for p in s.params()) > 0
        assert s.stats.loss_count == 1

    # sensitivity check: had the seed's output been added, the host gradients would differ
    host.zero_grad(set_to_none=True)
    with k.modes(Mode.SUBSTITUTE, ["s1"]):
        F.cross_entropy(k.forward(x), y).backward()
    assert not all(torch.equal(p.grad, q.grad) for p, q in zip(host.parameters(), plain.parameters(), strict=True)
                   if p.grad is not None)


def test_blending_alpha_ramps_per_step_and_reaches_exactly_one() -> None:
    k, _, _ = make_kasmina("seeds.blend.steps=7")
    slot = to_training(k, "s1")
    slot.stats.epoch_losses = [2.0]
    slot.stats.loss_sum, slot.stats.loss_count = 1.0, 1
    slot.stats.epochs_in_stage = 1
    k.end_epoch(fake_evaluate)
    assert slot.stage == "BLENDING" and slot.alpha == 0.0
    x, _ = batch()
    seen = []
    for _ in range(9):
        k.forward(x)
        k.after_step()
        seen.append(slot.alpha)
    assert seen[:6] == [pytest.approx(i / 7) for i in range(1, 7)]
    assert seen[6:] == [1.0, 1.0, 1.0]
    # G3 needs alpha exactly 1.0 and the seed's output to match the host activation
    k.end_epoch(fake_evaluate)
    assert slot.stage == "SHADOWING" and slot.alpha == 1.0


def test_g2_failure_on_the_automatic_advance_culls_the_seed() -> None:
    k, rec, _ = make_kasmina()
    slot = to_training(k, "s1")
    slot.stats.epoch_losses = [1.0]
    slot.stats.loss_sum, slot.stats.loss_count = 1.0, 1  # no improvement
    slot.stats.epochs_in_stage = 1
    changed = k.end_epoch(fake_evaluate)
    assert changed == ["s1"]
    assert slot.stage == "EMBARGOED" and slot.module is None
    g2 = [e for e in rec.named("gate.result") if e["gate"] == "G2"]
    assert len(g2) == 1 and g2[0]["passed"] is False
    dests = [e["transition"]["dest"] for e in rec.named("seed.transition")]
    assert dests[-2:] == ["CULLED", "EMBARGOED"]


def test_g2_waits_for_min_training_epochs() -> None:
    k, _, _ = make_kasmina("seeds.min_training_epochs=3")
    slot = to_training(k, "s1")
    for loss in (2.0, 1.0):
        slot.stats.loss_sum, slot.stats.loss_count = loss, 1
        assert k.end_epoch(fake_evaluate) == []
        assert slot.stage == "TRAINING"
    slot.stats.loss_sum, slot.stats.loss_count = 0.5, 1
    k.end_epoch(fake_evaluate)
    assert slot.stage == "BLENDING"


def test_probation_measures_the_counterfactual_and_fossilize_passes_g4() -> None:
    k, rec, _ = make_kasmina()
    slot = to_probationary(k, "s1")
    assert slot.stats.counterfactual == {"loss_with": 1.0, "loss_without": 1.5, "gain": 0.5}
    params = slot.params()
    result = k.fossilize("s1", "proven")
    assert result.gate == "G4" and result.passed
    assert slot.stage == "FOSSILIZED" and slot.alpha == 1.0
    groups = k.param_groups()
    assert [g.name for g in groups] == ["host"]
    host_ids = {id(p) for p in groups[0].params}
    assert all(id(p) in host_ids for p in params)
    dests = [r.dest for r in slot.machine.history]
    assert dests == ["GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED"]
    assert [r.gate["gate"] for r in slot.machine.history if r.gate] == ["G0", "G1", "G2", "G3", "G4"]
    # a fossilized seed cannot be culled
    with pytest.raises(IllegalTransition):
        k.cull("s1", "too late")
    assert slot.stage == "FOSSILIZED" and slot.module is not None
    assert rec.named("isolation.violation") == []


def test_fossilized_seed_gets_gradients_through_its_input() -> None:
    k, _, host = make_kasmina()
    slot = to_probationary(k, "s1")
    x, y = batch()
    perturb(slot.module)
    k.fossilize("s1", "proven")
    F.cross_entropy(k.forward(x), y).backward()
    # the seed is part of the host now: the layer below it learns through it
    hidden1 = dict(host.named_modules())["hidden1"]
    assert all(p.grad is not None for p in hidden1.parameters())
    assert all(p.grad is not None for p in slot.params())


def test_fossilize_failing_g4_is_rejected_and_changes_nothing() -> None:
    k, rec, _ = make_kasmina("controller.fossilize_min_improvement=0.1")
    slot = to_probationary(k, "s1")
    slot.stats.counterfactual = {"loss_with": 1.0, "loss_without": 1.05, "gain": 0.05}
    with pytest.raises(GateRejected, match="G4"):
        k.fossilize("s1", "premature")
    assert slot.stage == "PROBATIONARY"
    assert [g.name for g in k.param_groups()] == ["host", "seed:s1"]
    assert rec.named("gate.result")[-1]["passed"] is False


def test_illegal_command_on_a_dormant_seed_changes_nothing() -> None:
    k, rec, _ = make_kasmina()
    slot = k.slots["s1"]
    for attempt in (lambda: k.fossilize("s1", "nope"), lambda: k.cull("s1", "nope")):
        with pytest.raises(IllegalTransition, match="DORMANT"):
            attempt()
        assert slot.stage == "DORMANT" and slot.module is None and slot.stats.is_clear()
    assert slot.machine.history == []
    assert rec.events == []


def test_cull_removes_the_module_and_its_param_group() -> None:
    k, _, _ = make_kasmina()
    slot = to_training(k, "s1")
    seed_params = {id(p) for p in slot.params()}
    assert [g.name for g in k.param_groups()] == ["host", "seed:s1"]
    k.cull("s1", "operator")
    assert slot.stage == "EMBARGOED" and slot.module is None and slot.params() == []
    groups = k.param_groups()
    assert [g.name for g in groups] == ["host"]
    assert not seed_params & {id(p) for g in groups for p in g.params}
    x, _ = batch()
    assert torch.equal(k.forward(x), build_host(make_cfg(), (N_FEATURES,), N_CLASSES)(x))


def test_embargo_lasts_embargo_epochs_then_resets_to_dormant_through_g5() -> None:
    k, rec, _ = make_kasmina("seeds.embargo_epochs=3")
    slot = to_training(k, "s1")
    k.cull("s1", "operator")
    for _ in range(2):
        k.end_epoch(fake_evaluate)
        assert slot.stage == "EMBARGOED"
    k.end_epoch(fake_evaluate)
    assert slot.stage == "DORMANT"
    assert slot.module is None and slot.blueprint is None and slot.seed_id is None and slot.stats.is_clear()
    history = slot.machine.history
    assert [r.dest for r in history] == ["GERMINATED", "TRAINING", "CULLED", "EMBARGOED", "RESETTING", "DORMANT"]
    assert history[-1].gate is not None and history[-1].gate["gate"] == "G5" and history[-1].gate["passed"]
    g5 = [e for e in rec.named("gate.result") if e["gate"] == "G5"]
    assert len(g5) == 1 and g5[0]["passed"]
    # the slot is usable again, with a new seed id
    k.germinate("s1", "lowrank", "again")
    assert slot.seed_id == "s1-2"


def test_zero_embargo_resets_at_once() -> None:
    k, _, _ = make_kasmina("seeds.embargo_epochs=0")
    slot = to_training(k, "s1")
    k.cull("s1", "operator")
    assert slot.stage == "DORMANT"
    assert [r.dest for r in slot.machine.history][-4:] == ["CULLED", "EMBARGOED", "RESETTING", "DORMANT"]


def test_bypass_mode_gives_the_host_alone() -> None:
    k, _, host = make_kasmina()
    slot = to_probationary(k, "s1")
    perturb(slot.module)
    x, _ = batch()
    plain = build_host(make_cfg(), (N_FEATURES,), N_CLASSES)
    with k.modes(Mode.BYPASS, ["s1"]):
        assert torch.equal(k.forward(x), plain(x))
    assert not torch.equal(k.forward(x), plain(x))
    assert slot.mode is Mode.NORMAL


def test_channel_vector_must_fit_every_slot_when_kasmina_is_built() -> None:
    """hidden widths 5 and 4: a 5-entry vector fits s1 only. That is a config error at build time (exit 3),
    not a BlendError in the middle of training."""
    with pytest.raises(EsperError, match="channel_alpha") as info:
        make_kasmina("seeds.blend.mode='channel'", "seeds.blend.channel_alpha=[1.0, 0.5, 1.0, 0.5, 1.0]")
    assert info.value.exit_code == ExitCode.CONFIG
    k, _, _ = make_kasmina("seeds.blend.mode='channel'", "seeds.blend.channel_alpha=[1.0, 0.5, 1.0, 0.5, 1.0]",
                           "seeds.slots=[{name='s1', layer='hidden1'}]")
    assert k.spec.channel_alpha == (1.0, 0.5, 1.0, 0.5, 1.0)
